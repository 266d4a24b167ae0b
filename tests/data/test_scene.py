"""Scene regimes: every recipe keeps its promises (counts, occlusion cap, boxes inside
the image, look-alikes, rows, border cuts) and the benchmark mixes them as configured.

Scenes are checked from what ``sample_scene`` returns (boxes, size words, visible
fractions), with fixed seeds so the statistical checks are deterministic.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from reir.data.layouts import REGIMES, pick_regime, split_mixture
from reir.data.scene import MAX_COVERED, Rendered, sample_scene
from reir.data.semantics import Obj
from reir.data.synth import HELDOUT_TEST_SHARE, generate

SCENES = 60


def _scenes(regime: str, size: int = 128, seed: int = 11, n: int = SCENES) -> list[Rendered]:
    return [sample_scene(f"s{k}", size, np.random.default_rng([seed, k]), regime) for k in range(n)]


def _touch(a: Obj, b: Obj, gap: float = 2.0) -> bool:
    ax, ay, aw, ah = a.box
    bx, by, bw, bh = b.box
    return not (ax + aw + gap <= bx or bx + bw + gap <= ax or ay + ah + gap <= by or by + bh + gap <= ay)


def _twins(objs: list[Obj], key: str) -> float:
    """Fraction of objects sharing ``key`` ("shape" or "kind" = shape and colour) with another."""
    groups = Counter(o.shape if key == "shape" else (o.shape, o.color) for o in objs)
    return sum(n for n in groups.values() if n > 1) / len(objs)


@pytest.mark.parametrize("size", [128, 64])
@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_regime_counts_cap_and_boxes(regime: str, size: int) -> None:
    lo, hi = REGIMES[regime].counts
    for r in _scenes(regime, size):
        objs = r.scene.objects
        assert r.regime == regime and lo <= len(objs) <= hi
        assert len(r.visible) == len(r.pixels) == len(objs)
        assert min(r.visible) >= 1 - MAX_COVERED - 1e-9  # occlusion and border cuts together
        for k, o in enumerate(objs):
            x, y, w, h = o.box
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= size and y + h <= size
            assert 0 < r.pixels[k] <= w * h
            side = max(w, h) / size
            assert side <= 0.15 if o.size == "small" else side >= 0.2, (regime, o)
            if size == 128:
                assert max(w, h) >= 8  # stays detectable
        same_color = [(a, b) for k, a in enumerate(objs) for b in objs[k + 1:] if a.color == b.color]
        assert not any(_touch(a, b) for a, b in same_color)


def test_dense_regimes_are_dense() -> None:
    mean = {name: np.mean([len(r.scene.objects) for r in _scenes(name)]) for name in REGIMES}
    assert mean["dense"] >= 10 and mean["lookalike"] >= 7.5 and mean["sparse"] <= 5
    assert mean["classic"] == pytest.approx(5.5, abs=0.7)


def test_lookalike_regime_has_many_lookalikes() -> None:
    look = _scenes("lookalike")
    kind = [_twins(r.scene.objects, "kind") for r in look]
    shape = [_twins(r.scene.objects, "shape") for r in look]
    assert np.mean(kind) >= 0.6 and np.mean(shape) >= 0.75
    assert sum(k > 0 for k in kind) >= 0.9 * len(look)  # nearly every scene has an identical pair
    sparse = [_twins(r.scene.objects, "kind") for r in _scenes("sparse")]
    assert np.mean(sparse) < 0.2
    # Look-alikes still differ in size somewhere (they are told apart by size or position).
    assert sum(len({o.size for o in r.scene.objects}) == 2 for r in look) >= 0.5 * len(look)


def _rows(objs: list[Obj], size: int, vertical: bool) -> list[list[Obj]] | None:
    """Objects grouped by the line their centres lie on, or None if they do not."""
    across = sorted(objs, key=lambda o: o.cx if vertical else o.cy)
    lines: list[list[Obj]] = [[across[0]]]
    for o in across[1:]:
        prev = lines[-1][0]
        if abs((o.cx - prev.cx) if vertical else (o.cy - prev.cy)) <= 0.04 * size:
            lines[-1].append(o)
        else:
            lines.append([o])
    return lines if len(lines) <= 2 else None


@pytest.mark.parametrize("size", [128, 64])
def test_rows_are_rows(size: int) -> None:
    for r in _scenes("row", size):
        objs = r.scene.objects
        vertical = _rows(objs, size, True) is not None and _rows(objs, size, False) is None
        lines = _rows(objs, size, vertical)
        assert lines is not None, [o.box for o in objs]
        for line in lines:
            line.sort(key=lambda o: o.cy if vertical else o.cx)
            start = [o.box[1] if vertical else o.box[0] for o in line]
            end = [o.box[1] + o.box[3] if vertical else o.box[0] + o.box[2] for o in line]
            gaps = [b - a for a, b in zip(end, start[1:])]
            assert min(gaps, default=3) >= 2  # never touching, never overlapping
            # Even spacing of the drawn squares; tight boxes of stars sit a little inside.
            assert max(gaps, default=0) - min(gaps, default=0) <= 0.06 * size
        assert min(r.visible) == 1.0


def test_border_regime_cuts_objects_at_the_border() -> None:
    scenes = _scenes("border")
    at_border = [
        sum(o.box[0] == 0 or o.box[1] == 0 or o.box[0] + o.box[2] == 128 or o.box[1] + o.box[3] == 128
            for o in r.scene.objects)
        for r in scenes
    ]
    assert min(at_border) >= 2
    cut = [v for r in scenes for v in r.visible if v < 1.0]
    assert len(cut) >= len(scenes)
    # Other regimes keep (almost) everything away from the edge.
    assert np.mean([sum(o.box[0] == 0 for o in r.scene.objects) for r in _scenes("dense")]) < 0.5


def test_cluster_regime_gathers_objects() -> None:
    def spread(name: str) -> float:
        return float(np.mean([np.std([[o.cx, o.cy] for o in r.scene.objects], axis=0).mean() for r in _scenes(name)]))

    assert spread("cluster") < 0.8 * spread("dense")


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_same_seed_same_scene(regime: str) -> None:
    a = sample_scene("x", 128, np.random.default_rng([5, 9]), regime)
    b = sample_scene("x", 128, np.random.default_rng([5, 9]), regime)
    assert a.scene == b.scene and a.visible == b.visible and a.pixels == b.pixels
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_unknown_regime_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown scene regime"):
        sample_scene("x", 128, np.random.default_rng(0), "crowded")


def test_mixtures_and_picks() -> None:
    train = {"sparse": 3.0, "dense": 1.0}
    assert split_mixture(train, ("row",), "train", 0.25) == {"sparse": 0.75, "dense": 0.25}
    test = split_mixture(train, ("row", "border"), "test", 0.2)
    assert test == pytest.approx({"sparse": 0.6, "dense": 0.2, "row": 0.1, "border": 0.1})
    picks = Counter(pick_regime(test, np.random.default_rng([1, k])) for k in range(4000))
    assert {k: v / 4000 for k, v in picks.items()} == pytest.approx(test, abs=0.03)
    # Choice is independent of the mapping's order.
    flipped = dict(reversed(list(test.items())))
    assert all(pick_regime(test, np.random.default_rng([2, k])) == pick_regime(flipped, np.random.default_rng([2, k]))
               for k in range(50))


def test_generate_with_a_custom_mixture(tmp_path: Path) -> None:
    summary = generate(tmp_path, num_images=40, test_fraction=0.5, image_size=64, seed=2, discovery_queries=0,
                       regimes={"dense": 1.0, "classic": 1.0}, heldout_regimes=("row", "border"))
    meta = json.loads((tmp_path / "meta.json").read_text())
    counts = meta["regimes"]["counts"]
    assert set(counts["train"]) == {"dense", "classic"} and sum(counts["train"].values()) == 20
    assert {"row", "border"} <= set(counts["test"]) and sum(counts["test"].values()) == 20
    assert meta["regimes"]["test_mixture"]["row"] == pytest.approx(HELDOUT_TEST_SHARE / 2)
    assert summary.config.heldout_regimes == ("row", "border")
    images = json.loads((tmp_path / "instances_test.json").read_text())["images"]
    assert Counter(i["regime"] for i in images) == counts["test"]
