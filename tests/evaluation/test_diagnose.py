"""bench/diagnose.py: which conjunct a wrong answer breaks, and the background probes."""

from __future__ import annotations

from pathlib import Path

import pytest

from reir.data.semantics import Expr, Obj, Relation, Scene, Thing

from .benchload import load_bench

diagnose = load_bench("diagnose")


def _scene(*objects: Obj, background: str = "plain") -> Scene:
    return Scene("s", 100, 100, background, list(objects))


def test_a_look_alike_without_its_landmark_breaks_the_relation_only() -> None:
    expr = Expr(shape="triangle", color="red", relation=Relation("left", Thing("square", "blue")))
    # a red triangle with a blue circle and a green square to its right: the landmark's
    # colour and shape, on two other objects
    scene = _scene(Obj("triangle", "red", "small", (10, 40, 10, 10)), Obj("circle", "blue", "small", (70, 40, 10, 10)),
                   Obj("square", "green", "small", (70, 70, 10, 10)))  # fmt: skip
    assert diagnose.broken_conjuncts(expr, scene, 0) == ["relation"]
    assert diagnose.landmark_kind(expr, scene, 0) == "landmark absent, its colour and its shape on other objects"
    # the blue square is there, but to the left: the geometry is what is wrong
    scene = _scene(Obj("triangle", "red", "small", (70, 40, 10, 10)), Obj("square", "blue", "small", (10, 40, 10, 10)))
    assert diagnose.broken_conjuncts(expr, scene, 0) == ["relation"]
    assert diagnose.landmark_kind(expr, scene, 0) == "landmark present, wrong geometry"
    # and the right one: nothing broken
    scene = _scene(Obj("triangle", "red", "small", (10, 40, 10, 10)), Obj("square", "blue", "small", (70, 40, 10, 10)))
    assert diagnose.broken_conjuncts(expr, scene, 0) == []


def test_head_and_background_conjuncts_are_named() -> None:
    expr = Expr(shape="star", color="white", background="striped")
    scene = _scene(Obj("circle", "white", "small", (10, 10, 10, 10)), background="noisy")
    assert diagnose.broken_conjuncts(expr, scene, 0) == ["shape", "background"]
    assert diagnose._object_at(scene, [11.0, 11.0, 10.0, 10.0]) == 0
    assert diagnose._object_at(scene, [50.0, 50.0, 10.0, 10.0]) is None


@pytest.mark.parametrize("with_reranker", [False, True])
def test_every_wrong_answer_is_counted_once(tmp_path: Path, with_reranker: bool) -> None:
    import torch

    from reir.data.synth import generate
    from reir.model import create_model

    data = tmp_path / "data"
    generate(data, num_images=16, test_fraction=0.5, image_size=64, seed=3, discovery_queries=0)
    torch.manual_seed(0)
    model, processor = create_model("tiny")
    if with_reranker:
        model.add_reranker(hidden_size=16)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = tmp_path / "diag.json"
    result = diagnose.main(["--data", str(data), "--model", str(tmp_path / "model"), "--candidates", "20",
                            "--probe-images", "8", "--out", str(out)])  # fmt: skip
    assert out.exists() and result["reranked"] is with_reranker
    assert result["queries"] > 0
    assert result["wrong"] == sum(result["wrong_by_broken_conjunct"].values())
    assert round(1 - result["wrong"] / result["queries"], 4) == result["image_top1"]
    assert sum(result["relation_only_errors"].values()) == result["wrong_by_broken_conjunct"].get("relation", 0)
    probes = result["background_probe_accuracy"]
    assert set(probes) == {"token_mean", "context_projection", "stored_embedding_mean"}
    assert all(0.0 <= v <= 1.0 for v in probes.values())
