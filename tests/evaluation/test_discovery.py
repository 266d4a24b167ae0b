"""Discovery scoring on hand-built answers: every number below is counted by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from reir.data.records import DiscoveryQuery, Match
from reir.evaluation.discovery import (
    Found,
    discovery_curve,
    discovery_scores,
    format_by_kind,
    plot_curve,
    query_kind,
    scores_by_kind,
    summarize,
)

from .benchload import load_bench

BOX = (10.0, 10.0, 20.0, 20.0)
SHIFTED = (25.0, 25.0, 20.0, 20.0)  # IoU with BOX = 25 / 775 < 0.5


def _q(qid: str, *matches: tuple[str, tuple[float, ...]]) -> DiscoveryQuery:
    return DiscoveryQuery(qid, f"query {qid}", "test", [Match(img, k, list(b)) for k, (img, b) in enumerate(matches)])


QUERIES = [
    _q("two", ("a", BOX), ("b", BOX)),  # the object is in two images
    _q("one", ("c", BOX)),
    _q("none"),  # nowhere in the gallery
]
ANSWERS = {
    "two": [Found("a", BOX, 0.9), Found("x", BOX, 0.6), Found("b", BOX, 0.3)],
    "one": [Found("c", SHIFTED, 0.8)],  # right image, wrong box: not correct
    "none": [Found("y", BOX, 0.4)],
}


def test_scores_join_recall_and_localization_precision() -> None:
    at_half = discovery_scores(ANSWERS, QUERIES, 0.5)
    # kept: a (ok), x (wrong image), c (wrong box); none's 0.4 is dropped -> none answered with nothing
    assert at_half["answers"] == 3
    assert at_half["precision"] == pytest.approx(1 / 3)
    assert at_half["recall"] == pytest.approx(1 / 3)  # a of {a, b, c}
    assert at_half["none_accuracy"] == 1.0
    assert at_half["f1"] == pytest.approx(1 / 3)
    # per query: two 1/2 * 1/2, one 0 (its only answer has the wrong box), none 1 (nothing kept)
    assert at_half["joint"] == pytest.approx((0.25 + 0 + 1) / 3)
    at_low = discovery_scores(ANSWERS, QUERIES, 0.0)
    assert at_low["answers"] == 5 and at_low["precision"] == pytest.approx(2 / 5)
    assert at_low["recall"] == pytest.approx(2 / 3) and at_low["none_accuracy"] == 0.0
    assert at_low["joint"] == pytest.approx((2 / 3 * 1 + 0 + 0) / 3)
    nothing = discovery_scores(ANSWERS, QUERIES, 0.95)
    assert nothing["answers"] == 0 and nothing["precision"] == 1.0 and nothing["recall"] == 0.0
    assert nothing["f1"] == 0.0


def test_scores_by_kind_split_the_queries_by_what_their_program_names() -> None:
    from dataclasses import replace

    background = {"shape": "circle", "color": "red", "background": "striped", "relation": None}
    relation = {"shape": "star", "color": "blue", "relation": {"name": "left"}}
    queries = [replace(QUERIES[0], program=background), replace(QUERIES[1], program=background),
               replace(QUERIES[2], program=relation), _q("free")]  # the last one: no program
    assert [query_kind(q) for q in queries] == ["background+color+shape", "background+color+shape",
                                                 "color+relation+shape", None]
    by_kind = scores_by_kind(ANSWERS, queries, 0.5)
    assert sorted(by_kind) == ["background+color+shape", "color+relation+shape"]
    bg = by_kind["background+color+shape"]
    # two and one at 0.5: a (ok), x (wrong image), c (wrong box) -> 1 of 3 answers, 1 of 3 images
    assert bg["queries"] == 2 and bg["empty_queries"] == 0 and bg["answers"] == 3
    assert bg["precision"] == pytest.approx(1 / 3) and bg["recall"] == pytest.approx(1 / 3)
    rel = by_kind["color+relation+shape"]
    assert rel["queries"] == 1 and rel["empty_queries"] == 1 and rel["none_accuracy"] == 1.0
    assert scores_by_kind(ANSWERS, QUERIES, 0.5) == {}  # no programs, no breakdown
    lines = format_by_kind(by_kind)  # what reir eval --discover and make demo print
    assert len(lines) == 2 and lines[0].startswith("background+color+shape") and "P 0.33" in lines[0]
    assert "none -" in lines[0] and "none 1.00" in lines[1]


def test_a_correct_image_counts_once_and_tau_is_applied() -> None:
    dup = {"one": [Found("c", BOX, 0.9), Found("c", BOX, 0.8)]}
    s = discovery_scores(dup, [QUERIES[1]], 0.5)
    assert s["recall"] == 1.0 and s["precision"] == 1.0  # both answers overlap the truth
    assert discovery_scores({"one": [Found("c", SHIFTED, 0.9)]}, [QUERIES[1]], 0.5, tau=0.01)["recall"] == 1.0


def test_curve_is_monotone_in_answers_and_the_png_is_written(tmp_path: Path) -> None:
    curve = discovery_curve(ANSWERS, QUERIES, points=11)
    answers = [c["answers"] for c in curve]
    assert answers == sorted(answers, reverse=True) and answers[0] == 5
    at = discovery_scores(ANSWERS, QUERIES, 0.5)
    png = plot_curve(curve, at, tmp_path / "d.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    summary = summarize(curve, at, QUERIES)
    assert summary["empty_queries"] == 1 and summary["best_f1_on_curve"]["f1"] >= at["f1"]


def test_a_match_without_box_is_an_error() -> None:
    q = DiscoveryQuery("q", "q", "test", [Match("a", 1, None)])
    with pytest.raises(ValueError, match="no bbox"):
        discovery_scores({}, [q], 0.5)


def test_bench_discovery_end_to_end_on_a_tiny_index(tmp_path: Path) -> None:
    """bench/discovery.py on a generated benchmark with discovery queries, a tiny model with
    a re-ranker and a real milvus-lite file: every query is answered, the PNG is written."""
    import json

    import torch

    from reir.data.formats import load_discovery, load_samples
    from reir.data.synth import generate
    from reir.evaluation.comparison import COLLECTION, encode_gallery, write_index
    from reir.model import create_model

    root = tmp_path / "data"
    generate(root, num_images=16, test_fraction=0.5, image_size=64, seed=3, discovery_queries=6)
    torch.manual_seed(1)
    model, processor = create_model("tiny")
    model.add_reranker(hidden_size=16)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    (ckpt / "calibration.json").write_text(json.dumps({"discover_threshold": 0.25}))
    write_index(encode_gallery(ckpt, load_samples(root, "test"), top_k=5, batch_size=4), tmp_path / "idx.db")

    bench = load_bench("discovery")
    args = bench.parse_args(["--data", str(root), "--model", str(ckpt), "--milvus", str(tmp_path / "idx.db"),
                             "--collection", COLLECTION, "--png", str(tmp_path / "curve.png")])
    result = bench.run(args)
    queries = [q for q in load_discovery(root) if q.split == "test"]
    assert result["num_queries"] == len(queries) > 0
    assert result["at_calibrated_threshold"]["threshold"] == 0.25  # the checkpoint's calibration
    assert 0.0 <= result["at_calibrated_threshold"]["recall"] <= 1.0
    assert result["curve"][0]["answers"] >= result["curve"][-1]["answers"]
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_a_query_level_gate_silences_a_query_whose_best_answer_is_under_it() -> None:
    # "none"'s only answer is 0.4 and "two"'s best is 0.9: a gate of 0.5 at threshold 0.3
    # silences "none" and keeps all of "two" (b at 0.3 included), "one" (0.8) answers as before.
    gated = discovery_scores(ANSWERS, QUERIES, 0.3, gate=0.5)
    plain = discovery_scores(ANSWERS, QUERIES, 0.3)
    assert plain["none_accuracy"] == 0.0 and gated["none_accuracy"] == 1.0
    assert gated["answers"] == plain["answers"] - 1 == 4 and gated["gate"] == 0.5
    assert gated["recall"] == plain["recall"] == pytest.approx(2 / 3)
    assert gated["joint"] == pytest.approx((2 / 3 * 1 + 0 + 1) / 3)
    # A gate over "two"'s best silences it too; the curve holds the gate at every threshold.
    assert discovery_scores(ANSWERS, QUERIES, 0.3, gate=0.95)["answers"] == 0
    assert all(c["gate"] == 0.5 and c["none_accuracy"] == 1.0 for c in discovery_curve(ANSWERS, QUERIES, gate=0.5))


def test_best_gate_trades_silenced_empty_queries_against_lost_answers() -> None:
    from reir.evaluation.discovery import best_gate

    # Three queries with matches (best 0.9 / 0.95 / 0.99, each worth 0.5 when answered) and
    # three without (best 0.2 / 0.6 / 0.97, worth 1 when silent), threshold 0.3.
    best, answered, silent = [0.9, 0.95, 0.99, 0.2, 0.6, 0.97], [0.5] * 3 + [0.0] * 3, [0.0] * 3 + [1.0] * 3
    # Silencing 0.6 gains 1; silencing up to 0.97 too loses 0.9 and 0.95 (-1) for +1: a tie, the lower gate.
    assert best_gate(0.3, best, answered, silent) == pytest.approx((0.6 + 0.9) / 2)
    # A none-accuracy target of 0.9 needs every empty query silent: the gate above 0.97.
    assert best_gate(0.3, best, answered, silent, none_target=0.9) == pytest.approx((0.97 + 0.99) / 2)
    # Nothing to gain: the threshold itself; never half of a tie.
    assert best_gate(0.3, [0.9, 0.95], [0.5, 0.5], [0.0, 0.0]) == 0.3
    assert best_gate(0.3, [0.8, 0.8, 0.99], [0.0, 1.0, 0.9], [1.0, 0.0, 0.0]) == 0.3  # 0.8: one empty, one not
