"""Two-stage and exhaustive re-rank baselines, and their BR@k summary, on hand-built galleries.

The grounding step is injected (``GroundFn``): here a plain scorer over the stored vectors,
so each ranking's logic is checked against answers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from reir.evaluation.baselines import (
    InstanceGallery,
    comparison_table,
    rerank_scan_rank,
    system_summary,
    two_stage_rank,
)
from reir.evaluation.metrics import Prediction

BOX_A1, BOX_A2, BOX_B1, BOX_C1 = (0.0, 0.0, 10.0, 10.0), (50.0, 50.0, 10.0, 10.0), (5.0, 5.0, 20.0, 20.0), (1, 1, 4, 4)
E1, E2, E3 = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([0.8, 0.6, 0.0])
TEXT = np.array([1.0, 0.0, 0.0], dtype=np.float32)


@pytest.fixture
def gallery() -> InstanceGallery:
    # "a": the referent (E1) beside an unrelated object (E2); "b": one object fairly close to
    # the text (E3); "c": orthogonal; "d": empty.
    return InstanceGallery.from_instances({
        "b": [(BOX_B1, E3, 0.9)],
        "a": [(BOX_A1, E1, 0.8), (BOX_A2, E2, 0.7)],
        "c": [(BOX_C1, np.array([0.0, 0.0, 1.0]), 0.6)],
        "d": [],
    }, image_sizes={"a": (100.0, 80.0)})  # fmt: skip


def ground_by_vectors(gallery: InstanceGallery, text: np.ndarray = TEXT, calls: list | None = None):
    """A GroundFn: ``3 <text, instance> - 1`` for every stored instance of the asked images,
    padded with -inf (what the re-ranker returns for a padded slot)."""

    def ground(rows: np.ndarray) -> np.ndarray:
        if calls is not None:
            calls.append(list(rows))
        width = int(gallery.sizes.max())
        out = np.full((len(rows), width), -np.inf)
        for n, i in enumerate(rows):
            lo, k = int(gallery.starts[i]), int(gallery.sizes[i])
            out[n, :k] = 3.0 * (gallery.embeddings[lo : lo + k] @ text) - 1.0
        return out

    return ground


def test_gallery_layout(gallery: InstanceGallery) -> None:
    assert gallery.image_ids == ("a", "b", "c")  # sorted, the empty image left out
    assert gallery.starts.tolist() == [0, 2, 3] and gallery.sizes.tolist() == [2, 1, 1]
    assert gallery.scores.tolist() == [0.8, 0.7, 0.9, 0.6]
    # a given size wins; without one the instances' extent stands in
    assert gallery.image_sizes.tolist() == [[100.0, 80.0], [25.0, 25.0], [5.0, 5.0]]
    plain = InstanceGallery.from_instances({"x": [(BOX_A1, E1)]})
    assert plain.scores.tolist() == [1.0]


def test_two_stage_keeps_retrieval_order_and_grounds_inside_each_image(gallery: InstanceGallery) -> None:
    calls: list = []
    retrieval = np.array([0.2, 0.9, 0.5])  # image scores for a, b, c: retrieval says b, c, a
    preds = two_stage_rank(retrieval, gallery, ground_by_vectors(gallery, calls=calls), top_k=10)
    assert [p.image_id for p in preds] == ["b", "c", "a"]
    # inside "a" the grounding picks A1 (logit 2) over A2 (-1), whatever the retriever thought
    assert [tuple(p.box) for p in preds] == [BOX_B1, BOX_C1, BOX_A1]
    assert [p.score for p in preds] == pytest.approx([0.9, 0.5, 0.2])
    assert calls == [[1, 2, 0]]  # one batched call over the retrieved images only
    calls.clear()
    top1 = two_stage_rank(retrieval, gallery, ground_by_vectors(gallery, calls=calls), top_k=1)
    assert [p.image_id for p in top1] == ["b"] and calls == [[1]]


def test_two_stage_rescored_orders_its_pool_by_the_grounding(gallery: InstanceGallery) -> None:
    retrieval = np.array([0.2, 0.9, 0.5])
    pooled = two_stage_rank(retrieval, gallery, ground_by_vectors(gallery), top_k=2, rescore=3)
    # the pool holds all three; by the grounding's best logit a (2.0) > b (1.4) > c (-1)
    assert [(p.image_id, tuple(p.box)) for p in pooled] == [("a", BOX_A1), ("b", BOX_B1)]
    assert [p.score for p in pooled] == pytest.approx([2.0, 1.4])
    # a pool of 2 never sees "a" (last by retrieval): the grounding cannot bring it back
    assert [p.image_id for p in two_stage_rank(retrieval, gallery, ground_by_vectors(gallery), 2, rescore=2)] == ["b", "c"]


def test_rerank_scan_ranks_every_image_by_its_best_instance(gallery: InstanceGallery) -> None:
    calls: list = []
    preds = rerank_scan_rank(gallery, ground_by_vectors(gallery, calls=calls), top_k=10, chunk=2)
    assert [(p.image_id, tuple(p.box)) for p in preds] == [("a", BOX_A1), ("b", BOX_B1), ("c", BOX_C1)]
    assert [p.score for p in preds] == pytest.approx([2.0, 1.4, -1.0])
    assert calls == [[0, 1], [2]]  # every image once, in chunks


def test_rerank_scan_ties_break_by_image_id() -> None:
    g = InstanceGallery.from_instances({"z": [(BOX_A1, E1)], "y": [(BOX_B1, E1)]})
    assert [p.image_id for p in rerank_scan_rank(g, ground_by_vectors(g), top_k=2)] == ["y", "z"]


def test_grounding_must_cover_every_instance(gallery: InstanceGallery) -> None:
    with pytest.raises(ValueError, match="logits per image"):
        rerank_scan_rank(gallery, lambda rows: np.zeros((len(rows), 1)), top_k=3)
    with pytest.raises(ValueError, match="image scores"):
        two_stage_rank(np.zeros(2), gallery, ground_by_vectors(gallery), top_k=3)


def test_br_at_k_of_the_rankings(gallery: InstanceGallery) -> None:
    truth = {"q": ("a", BOX_A1)}
    two = {"q": two_stage_rank(np.array([0.2, 0.9, 0.5]), gallery, ground_by_vectors(gallery), top_k=10)}
    scan = {"q": rerank_scan_rank(gallery, ground_by_vectors(gallery), top_k=10)}
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
    table = comparison_table({"reir": row, "rerank_scan": row})
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
