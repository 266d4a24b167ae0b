"""Box recall / REC accuracy / discovery metrics on hand-made cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reir.data.samples import Query
from reir.evaluation import (
    Prediction,
    box_recall_at_k,
    discovery_scores,
    format_table,
    rec_accuracy,
    write_metrics_json,
)

GT_BOX = [10.0, 10.0, 20.0, 20.0]
GT = {"q1": ("img1", GT_BOX)}
ELSEWHERE = [60.0, 60.0, 20.0, 20.0]


def _recall(preds: list[Prediction], **kw: object) -> dict[str, float]:
    return box_recall_at_k({"q1": preds}, GT, **kw)  # type: ignore[arg-type]


def test_perfect_prediction_hits_everywhere() -> None:
    metrics = _recall([Prediction("img1", GT_BOX)])
    assert set(metrics) == {f"BR@{k}@{t}" for k in (1, 5, 10) for t in (0.5, 0.7, 0.9)}
    assert all(v == 1.0 for v in metrics.values())


def test_right_image_wrong_box_is_a_miss() -> None:
    assert all(v == 0.0 for v in _recall([Prediction("img1", ELSEWHERE)]).values())


def test_right_box_wrong_image_is_a_miss() -> None:
    assert all(v == 0.0 for v in _recall([Prediction("img2", GT_BOX)]).values())


def test_hit_at_rank_three_counts_for_k5_not_k1() -> None:
    preds = [Prediction("img2", GT_BOX), Prediction("img1", ELSEWHERE), Prediction("img1", GT_BOX)]
    metrics = _recall(preds, ks=(1, 2, 3, 5), taus=(0.5,))
    assert metrics == {"BR@1@0.5": 0.0, "BR@2@0.5": 0.0, "BR@3@0.5": 1.0, "BR@5@0.5": 1.0}


def test_iou_threshold_boundaries() -> None:
    # Same height, half the width inside the GT: IoU = 200 / 400 = 0.5 exactly.
    half = [10.0, 10.0, 10.0, 20.0]
    metrics = _recall([Prediction("img1", half)], ks=(1,), taus=(0.5, 0.50001, 0.7))
    assert metrics == {"BR@1@0.5": 1.0, "BR@1@0.50001": 0.0, "BR@1@0.7": 0.0}
    # IoU = 0.9 exactly: 18 x 20 inside 20 x 20
    tight = [10.0, 10.0, 18.0, 20.0]
    assert _recall([Prediction("img1", tight)], ks=(1,), taus=(0.9,)) == {"BR@1@0.9": 1.0}


def test_empty_and_missing_predictions_are_misses() -> None:
    gt = {"q1": ("img1", GT_BOX), "q2": ("img2", GT_BOX)}
    metrics = box_recall_at_k({"q1": [Prediction("img1", GT_BOX)], "q2": []}, gt, ks=(1,), taus=(0.5,))
    assert metrics == {"BR@1@0.5": 0.5}
    assert box_recall_at_k({}, gt, ks=(1,), taus=(0.5,)) == {"BR@1@0.5": 0.0}


def test_unknown_query_ids_and_empty_ground_truth_raise() -> None:
    with pytest.raises(ValueError, match="unknown query"):
        box_recall_at_k({"nope": []}, GT)
    with pytest.raises(ValueError, match="empty"):
        box_recall_at_k({}, {})
    with pytest.raises(ValueError, match="unknown query"):
        rec_accuracy({"nope": GT_BOX}, GT)


def test_accepts_query_objects_and_tuples() -> None:
    gt = {"q1": Query("q1", "the red circle", "img1", tuple(GT_BOX))}  # type: ignore[arg-type]
    assert box_recall_at_k({"q1": [("img1", GT_BOX)]}, gt, ks=(1,), taus=(0.9,)) == {"BR@1@0.9": 1.0}


def test_rec_accuracy() -> None:
    gt = {"q1": ("img1", GT_BOX), "q2": ("img2", GT_BOX), "q3": ("img3", GT_BOX)}
    top = {"q1": GT_BOX, "q2": [10.0, 10.0, 10.0, 20.0], "q3": None}
    assert rec_accuracy(top, gt, taus=(0.5, 0.7)) == {"REC_Acc@0.5": 2 / 3, "REC_Acc@0.7": 1 / 3}


def test_discovery_scores() -> None:
    gt = {"d1": [("img1", GT_BOX), ("img2", GT_BOX)], "d2": []}
    preds = {
        "d1": [Prediction("img1", GT_BOX), Prediction("img1", GT_BOX), Prediction("img3", GT_BOX)],
        "d2": [Prediction("img9", GT_BOX)],
    }
    scores = discovery_scores(preds, gt)
    # one true positive (a duplicate does not count twice), four predictions, two GT
    assert scores["Disc_P@0.5"] == pytest.approx(0.25)
    assert scores["Disc_R@0.5"] == pytest.approx(0.5)
    assert scores["Disc_F1@0.5"] == pytest.approx(1 / 3)


def test_format_table_and_json(tmp_path: Path) -> None:
    metrics = _recall([Prediction("img1", [10.0, 10.0, 10.0, 20.0])])
    metrics.update({"REC_Acc@0.5": 0.25})
    table = format_table(metrics)
    lines = table.splitlines()
    assert "IoU>=0.5" in lines[0] and "IoU>=0.9" in lines[0]
    assert lines[1].startswith("R@1") and "100.0" in lines[1] and "0.0" in lines[1]
    assert [ln.split()[0] for ln in lines[1:4]] == ["R@1", "R@5", "R@10"]
    assert "REC_Acc@0.5" in table and "25.0%" in table
    write_metrics_json(tmp_path / "out" / "m.json", metrics, model_version="v1", num_queries=1)
    saved = json.loads((tmp_path / "out" / "m.json").read_text())
    assert {k: saved[k] for k in metrics} == metrics
    assert saved["model_version"] == "v1" and saved["num_queries"] == 1
    with pytest.raises(ValueError, match="overwrite"):
        write_metrics_json(tmp_path / "m2.json", metrics, **{next(iter(metrics)): 0.0})
