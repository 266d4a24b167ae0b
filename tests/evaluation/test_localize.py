"""Small-object queries and BR@k with / without the zoom refiner."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from reir.data.formats import Query
from reir.evaluation.localize import Answer, small_object_queries, zoom_box_recall
from reir.serving.localize import BoxUpdate


def test_small_object_queries_use_the_image_size(tmp_path: Path) -> None:
    Image.new("RGB", (100, 50)).save(tmp_path / "a.png")
    path = str(tmp_path / "a.png")
    small = Query("q1", "x", "a", (0, 0, 9, 5), path)  # 45 px = 0.9% of 5000
    edge = Query("q2", "x", "a", (0, 0, 10, 10), path)  # exactly 2%: not below the threshold
    assert small_object_queries([small, edge], 0.02) == [small]
    assert small_object_queries([small, edge], 0.03) == [small, edge]
    with pytest.raises(ValueError, match="q3 has no image path"):
        small_object_queries([Query("q3", "x", "a", (0, 0, 1, 1))], 0.02)
    with pytest.raises(ValueError, match="small_area_fraction"):
        small_object_queries([small], 0.0)


def test_zoom_box_recall_scores_the_same_ranking_with_both_boxes() -> None:
    queries = [Query("q1", "the dot", "a", (10, 10, 4, 4)), Query("q2", "the speck", "b", (50, 50, 2, 2))]
    answers = {
        # q1: the right image first, with a loose box (IoU 16/36 = 0.44) that the refiner fixes
        "q1": [Answer("a", "/g/a.png", (9, 9, 6, 6)), Answer("c", "/g/c.png", (0, 0, 4, 4))],
        # q2: the right image only at rank 2, its box already exact; the refiner leaves it
        "q2": [Answer("c", "/g/c.png", (0, 0, 4, 4)), Answer("b", "/g/b.png", (50, 50, 2, 2))],
    }
    fixes = {"/g/a.png": (10.0, 10.0, 4.0, 4.0)}
    seen: list[tuple[str, list[tuple[str, tuple[float, float, float, float]]]]] = []

    def refine(text: str, items: list[tuple[str, tuple[float, float, float, float]]]) -> list[BoxUpdate]:
        seen.append((text, items))
        return [BoxUpdate(fixes[u], refined=True) if u in fixes else BoxUpdate(b) for u, b in items]

    m = zoom_box_recall(answers, queries, refine, ks=(1, 2), taus=(0.5,))
    assert m["BR@1@0.5"] == 0.0 and m["BR@2@0.5"] == 0.5  # only q2, at rank 2
    assert m["zoom_BR@1@0.5"] == 0.5 and m["zoom_BR@2@0.5"] == 1.0
    assert m["refined_answers"] == 1 and m["num_queries"] == 2
    assert [t for t, _ in seen] == ["the dot", "the speck"] and len(seen[0][1]) == 2
    with pytest.raises(ValueError, match="unknown query ids"):
        zoom_box_recall({"nope": []}, queries, refine)
    with pytest.raises(ValueError, match="refiner answered 0 boxes for 2"):
        zoom_box_recall(answers, queries, lambda text, items: [])
