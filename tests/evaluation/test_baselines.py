"""Two-stage and REC-scan baselines, and their BR@k summary, on hand-built galleries."""

from __future__ import annotations

import numpy as np
import pytest

from reir.evaluation.baselines import (
    InstanceGallery,
    comparison_table,
    rec_scan_rank,
    system_summary,
    two_stage_rank,
)
from reir.evaluation.metrics import Prediction

BOX_A1, BOX_A2, BOX_B1, BOX_C1 = (0.0, 0.0, 10.0, 10.0), (50.0, 50.0, 10.0, 10.0), (5.0, 5.0, 20.0, 20.0), (1, 1, 4, 4)
E1, E2, E3 = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([0.8, 0.6, 0.0])
TEXT = np.array([1.0, 0.0, 0.0], dtype=np.float32)


def _score(text: np.ndarray, inst: np.ndarray) -> np.ndarray:
    return 3.0 * (inst @ text) - 1.0  # increasing affine, as the model's SigLIP-style logit


@pytest.fixture
def gallery() -> InstanceGallery:
    # "a": the referent (E1) beside an unrelated object (E2), so its mean points between them;
    # "b": one object fairly close to the text everywhere (E3); "c": orthogonal; "d": empty.
    return InstanceGallery.from_instances({
        "b": [(BOX_B1, E3)],
        "a": [(BOX_A1, E1), (BOX_A2, E2)],
        "c": [(BOX_C1, np.array([0.0, 0.0, 1.0]))],
        "d": [],
    })  # fmt: skip


def test_gallery_layout(gallery: InstanceGallery) -> None:
    assert gallery.image_ids == ("a", "b", "c")  # sorted, the empty image left out
    assert gallery.starts.tolist() == [0, 2, 3] and gallery.sizes.tolist() == [2, 1, 1]
    pooled = gallery.pooled()
    np.testing.assert_allclose(pooled[0], [np.sqrt(0.5), np.sqrt(0.5), 0.0], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-6)


def test_two_stage_ranks_images_by_pooled_embedding_then_picks_the_rec_box(gallery: InstanceGallery) -> None:
    preds = two_stage_rank(TEXT, gallery, gallery.pooled(), _score, top_k=10)
    # image sims: b 0.8 > a 0.707 > c 0; inside "a" REC picks A1 (score 2) over A2 (score -1)
    assert [p.image_id for p in preds] == ["b", "a", "c"]
    assert [tuple(p.box) for p in preds] == [BOX_B1, BOX_A1, BOX_C1]
    assert preds[0].score == pytest.approx(0.8) and preds[1].score == pytest.approx(np.sqrt(0.5))
    assert [p.image_id for p in two_stage_rank(TEXT, gallery, gallery.pooled(), _score, top_k=1)] == ["b"]


def test_rec_scan_ranks_images_by_their_rec_score(gallery: InstanceGallery) -> None:
    preds = rec_scan_rank(TEXT, gallery, _score, top_k=10)
    assert [(p.image_id, tuple(p.box)) for p in preds] == [("a", BOX_A1), ("b", BOX_B1), ("c", BOX_C1)]
    assert [p.score for p in preds] == pytest.approx([2.0, 1.4, -1.0])


def test_rec_scan_ties_break_by_image_id() -> None:
    g = InstanceGallery.from_instances({"z": [(BOX_A1, E1)], "y": [(BOX_B1, E1)]})
    assert [p.image_id for p in rec_scan_rank(TEXT, g, _score, top_k=2)] == ["y", "z"]


def test_br_at_k_of_the_two_rankings(gallery: InstanceGallery) -> None:
    truth = {"q": ("a", BOX_A1)}
    two = {"q": two_stage_rank(TEXT, gallery, gallery.pooled(), _score, top_k=10)}
    scan = {"q": rec_scan_rank(TEXT, gallery, _score, top_k=10)}
    assert system_summary(two, truth, 0.5) == {
        "BR@1@0.5": 0.0, "BR@5@0.5": 1.0, "BR@10@0.5": 1.0, "seconds_per_query": 0.5, "num_queries": 1}
    assert system_summary(scan, truth, 0.5)["BR@1@0.5"] == 1.0


def test_system_summary_counts_misses_and_loose_boxes() -> None:
    truth = {"q1": ("a", (0.0, 0.0, 10.0, 10.0)), "q2": ("b", (0.0, 0.0, 10.0, 10.0)),
             "q3": ("c", (0.0, 0.0, 10.0, 10.0)), "q4": ("d", (0.0, 0.0, 10.0, 10.0))}  # fmt: skip
    wrong = [Prediction(f"x{i}", (0.0, 0.0, 10.0, 10.0)) for i in range(9)]
    preds = {
        "q1": [Prediction("a", (0.0, 0.0, 10.0, 10.0))],  # hit at rank 1
        "q2": [*wrong[:5], Prediction("b", (0.0, 0.0, 10.0, 5.0))],  # IoU exactly 0.5 at rank 6
        "q3": [*wrong, Prediction("c", (0.0, 0.0, 10.0, 10.0))],  # rank 10
        "q4": [Prediction("d", (0.0, 0.0, 10.0, 4.0))],  # right image, IoU 0.4: a miss
    }
    out = system_summary(preds, truth, 2.0)
    assert out == {"BR@1@0.5": 0.25, "BR@5@0.5": 0.25, "BR@10@0.5": 0.75, "seconds_per_query": 0.5,
                   "num_queries": 4}  # fmt: skip


def test_comparison_table_is_markdown() -> None:
    row = {"BR@1@0.5": 0.25, "BR@5@0.5": 0.5, "BR@10@0.5": 0.75, "seconds_per_query": 0.0123, "num_queries": 4}
    table = comparison_table({"reir": row, "rec_scan": row})
    lines = table.splitlines()
    assert lines[0].startswith("| system | BR@1 (IoU>=0.5)") and lines[1].startswith("|---|")
    assert lines[2] == "| reir | 25.0 | 50.0 | 75.0 | 12.30 | 4 |"
    assert len(lines) == 4


def test_bad_galleries_are_refused() -> None:
    with pytest.raises(ValueError, match="no instances"):
        InstanceGallery.from_instances({"a": []})
    with pytest.raises(ValueError, match=r"image 'a'.*not \[x, y, w, h\]"):
        InstanceGallery.from_instances({"a": [((1.0, 2.0, 3.0), E1)]})
    with pytest.raises(ValueError, match="different sizes"):
        InstanceGallery.from_instances({"a": [(BOX_A1, E1)], "b": [(BOX_B1, np.ones(4))]})
