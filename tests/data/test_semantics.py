"""Predicates on hand-made scenes, and the text <-> expression round trip."""

from __future__ import annotations

import numpy as np
import pytest

from reir.data.language import parse, render
from reir.data.referring import random_discovery_expr
from reir.data.semantics import (
    MAYBE,
    NO,
    YES,
    Expr,
    Gallery,
    Obj,
    Relation,
    Scene,
    Thing,
    evaluate,
    relation_truth,
    within_image_unique,
)
from reir.data.vocab import VOCABULARY


def _obj(shape: str, color: str, x: float, y: float, side: float = 10.0, size: str = "small") -> Obj:
    return Obj(shape, color, size, (x - side / 2, y - side / 2, side, side))


def _scene(*objs: Obj, background: str = "plain") -> Scene:
    return Scene("syn000001", 100, 100, background, list(objs))


def test_relation_margins() -> None:
    a = _obj("circle", "red", 20, 50)
    assert relation_truth(a, _obj("square", "blue", 40, 50), "left", 100, 100) == YES
    assert relation_truth(a, _obj("square", "blue", 40, 50), "right", 100, 100) == NO
    assert relation_truth(a, _obj("square", "blue", 27, 50), "left", 100, 100) == MAYBE  # 7% offset
    assert relation_truth(a, _obj("square", "blue", 22, 50), "left", 100, 100) == NO  # 2% offset
    # mostly vertical: not "left of", but clearly "above"
    b = _obj("square", "blue", 30, 90)
    assert relation_truth(a, b, "left", 100, 100) == NO
    assert relation_truth(a, b, "above", 100, 100) == YES


def test_relation_is_existential_over_other_objects() -> None:
    scene = _scene(_obj("circle", "red", 20, 50), _obj("square", "blue", 60, 50), _obj("square", "blue", 5, 50))
    expr = Expr(shape="circle", relation=Relation("left", Thing("square", "blue")))
    assert evaluate(expr, scene, 0) == YES
    assert evaluate(Expr(shape="square", color="blue", relation=Relation("left", Thing("square", "blue"))), scene, 2) == YES


def test_superlatives() -> None:
    scene = _scene(
        _obj("circle", "red", 10, 10, side=10), _obj("circle", "red", 60, 60, side=30, size="large"),
        _obj("circle", "blue", 90, 90, side=40, size="large"),
    )
    largest = Expr(shape="circle", color="red", superlative="largest")
    assert [evaluate(largest, scene, i) for i in range(3)] == [NO, YES, NO]
    leftmost = Expr(shape="circle", superlative="leftmost")
    assert [evaluate(leftmost, scene, i) for i in range(3)] == [YES, NO, NO]
    # a single candidate is only trivially "the largest": never a clear YES
    assert evaluate(Expr(color="blue", superlative="largest"), scene, 2) == MAYBE
    # nearly equal areas are ambiguous
    tie = _scene(_obj("star", "red", 20, 20, side=20), _obj("star", "red", 70, 70, side=21))
    assert evaluate(Expr(shape="star", superlative="largest"), tie, 1) == MAYBE


def test_ordinals_count_in_the_superlative_order() -> None:
    row = _scene(*(_obj("circle", "red", x, 50) for x in (10, 40, 70)), _obj("star", "red", 25, 50))
    second = Expr(shape="circle", superlative="second_leftmost")
    assert [evaluate(second, row, i) for i in range(4)] == [NO, YES, NO, NO]
    assert [evaluate(Expr(shape="circle", superlative="second_rightmost"), row, i) for i in range(3)] == [NO, YES, NO]
    # the star is not a circle: among red things the circle at 40 is third from the left
    assert evaluate(Expr(color="red", superlative="second_leftmost"), row, 3) == YES
    assert evaluate(Expr(color="red", superlative="second_leftmost"), row, 1) == NO
    # two circles: the second from the left is the right one
    pair = _scene(_obj("circle", "red", 20, 50), _obj("circle", "red", 60, 50))
    assert [evaluate(second, pair, i) for i in range(2)] == [NO, YES]
    # a rival too close to call makes the rank uncertain
    close = _scene(_obj("circle", "red", 10, 50), _obj("circle", "red", 40, 50), _obj("circle", "red", 45, 50))
    assert [evaluate(second, close, i) for i in range(3)] == [NO, MAYBE, MAYBE]
    sizes = _scene(_obj("star", "red", 20, 20, side=10), _obj("star", "red", 50, 50, side=20),
                   _obj("star", "red", 80, 80, side=30))
    assert [evaluate(Expr(shape="star", superlative="second_largest"), sizes, i) for i in range(3)] == [NO, YES, NO]
    assert [evaluate(Expr(shape="star", superlative="second_smallest"), sizes, i) for i in range(3)] == [NO, YES, NO]
    with pytest.raises(ValueError, match="size superlative"):
        Expr(shape="star", size="large", superlative="second_largest")


def test_comparatives_hold_only_between_two() -> None:
    pair = _scene(_obj("circle", "red", 20, 50, side=10), _obj("circle", "red", 60, 50, side=20),
                  _obj("star", "red", 90, 50, side=30))
    bigger = Expr(shape="circle", superlative="pair_largest")
    assert [evaluate(bigger, pair, i) for i in range(3)] == [NO, YES, NO]
    assert [evaluate(Expr(shape="circle", superlative="pair_leftmost"), pair, i) for i in range(2)] == [YES, NO]
    # among the three red things "the bigger red one" is false for every one of them
    assert [evaluate(Expr(color="red", superlative="pair_largest"), pair, i) for i in range(3)] == [NO, NO, NO]
    alone = _scene(_obj("circle", "red", 20, 50))
    assert evaluate(bigger, alone, 0) == NO
    close = _scene(_obj("circle", "red", 20, 50, side=20), _obj("circle", "red", 60, 50, side=21))
    assert evaluate(bigger, close, 1) == MAYBE


def test_context_and_background() -> None:
    scene = _scene(_obj("circle", "red", 20, 20), _obj("star", "yellow", 70, 70), background="striped")
    with_star = Expr(shape="circle", context=Thing("star", "yellow"))
    assert evaluate(with_star, scene, 0) == YES
    assert evaluate(Expr(shape="star", context=Thing("star", "yellow")), scene, 1) == NO  # not itself
    assert evaluate(Expr(shape="circle", background="striped"), scene, 0) == YES
    assert evaluate(Expr(shape="circle", background="plain"), scene, 0) == NO
    assert within_image_unique(Expr(color="red"), scene, 0)


def test_gallery_index_agrees_with_brute_force() -> None:
    rng = np.random.default_rng(0)
    scenes = []
    for k in range(30):
        objs = [
            _obj(["circle", "star"][int(rng.integers(2))], ["red", "blue"][int(rng.integers(2))],
                 float(rng.uniform(10, 90)), float(rng.uniform(10, 90)))
            for _ in range(4)
        ]
        scenes.append(Scene(f"syn{k:06d}", 100, 100, "plain", objs))
    gallery = Gallery(scenes)
    for expr in [Expr(shape="star"), Expr(color="red", relation=Relation("above", Thing("circle"))),
                 Expr(shape="circle", color="blue", superlative="rightmost")]:
        brute = {(s, i, evaluate(expr, sc, i)) for s, sc in enumerate(scenes) for i in range(4)}
        assert set(gallery.truths(expr)) == {t for t in brute if t[2] != NO}


def test_render_parse_round_trip() -> None:
    rng = np.random.default_rng(1)
    exprs = [random_discovery_expr(rng) for _ in range(300)]
    exprs += [
        Expr(shape="triangle", color="blue", size="small", relation=Relation("left", Thing("square", "red"))),
        Expr(color="green", superlative="largest"),
        Expr(shape="circle", color="red", background="striped", context=Thing("star", "yellow")),
        Expr(shape="hexagon", color="orange", superlative="topmost", background="noisy"),
    ]
    for expr in exprs:
        for article in ("the", "a"):
            text = render(expr, rng, article=article)
            assert parse(text) == expr, text
            assert set(text.split()) <= set(VOCABULARY)
    assert render(exprs[-4]) == "the small blue triangle left of the red square"
    assert render(exprs[-3]) == "the largest green object"
    assert render(exprs[-2]) == "the red circle on the striped background in the image with a yellow star"


@pytest.mark.parametrize("text", ["", "the", "red circle", "the red circle left", "the purple unicorn",
                                  "the red circle on the striped", "the red circle please"])
def test_parse_rejects_text_outside_the_grammar(text: str) -> None:
    with pytest.raises(ValueError):
        parse(text)


def test_invalid_expressions_raise() -> None:
    with pytest.raises(ValueError, match="shape or a color"):
        Expr(size="small")
    with pytest.raises(ValueError):
        Expr(shape="circle", size="small", superlative="largest")
    with pytest.raises(ValueError):
        Expr(shape="circle", superlative="leftmost", relation=Relation("left", Thing("star")))
    with pytest.raises(ValueError):
        Expr(shape="pentagon")


def test_program_round_trip() -> None:
    expr = Expr(shape="star", color="red", relation=Relation("below", Thing("circle")), context=Thing("square", "blue"))
    assert Expr.from_program(expr.to_program()) == expr
