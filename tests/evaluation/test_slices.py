"""BR@k per phrasing family, scene regime and objects-per-image bucket on a hand-made benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reir.data.formats import test_queries
from reir.evaluation.metrics import Prediction
from reir.evaluation.slices import (
    evaluate_slices,
    format_slices,
    has_slices,
    heldout_from_meta,
    objects_bucket,
    read_heldout,
)

HIT = [0.0, 0.0, 10.0, 10.0]  # every referent's box (in its own image)
MISS = [50.0, 50.0, 10.0, 10.0]


def _entry(image_id: str, regime: str, objects: int, sentences: list[tuple[str, str]]) -> dict[str, Any]:
    dets = [{"ann_id": k, "bbox": HIT if k == 0 else [20.0 + k, 20.0, 5.0, 5.0], "category_name": "circle",
             "category_id": 0} for k in range(objects)]
    return {"image_id": image_id, "file_name": f"images/test/{image_id}.jpg", "height": 100, "width": 100,
            "split": "test", "regime": regime, "ref_anno": dets[0], "det_anno": dets,
            "sentences": [{"sent_id": sid, "raw": f"text {sid}", "family": fam, "matches": []}
                          for sid, fam in sentences]}


def _bench(root: Path, meta: dict[str, Any]) -> Path:
    root.mkdir(parents=True)
    entries = [_entry("synA", "sparse", 3, [("s1", "attr"), ("s2", "spatial")]),
               _entry("synB", "dense", 10, [("s3", "attr"), ("s4", "ordinal")]),
               _entry("synC", "border", 14, [("s5", "ordinal")])]
    (root / "reircoco.json").write_text(json.dumps(entries))
    (root / "meta.json").write_text(json.dumps({"seed": 0, **meta}))
    return root


# s1 hit at rank 1, s2 miss, s3 hit at rank 3, s4 hit at rank 1, s5 miss
PREDICTIONS = {
    "s1": [Prediction("synA", HIT)],
    "s2": [Prediction("synA", MISS)],
    "s3": [Prediction("synA", HIT), Prediction("synB", MISS), Prediction("synB", HIT)],
    "s4": [Prediction("synB", HIT)],
    "s5": [Prediction("synB", HIT)],
}
META = {"phrasing": {"heldout_families": ["ordinal"]}, "regimes": {"heldout": ["border"], "train_mixture": {}}}


def _br(slices: dict[str, dict[str, float]], name: str) -> tuple[int, float, float, float]:
    row = slices[name]
    return int(row["queries"]), row["BR@1@0.5"], row["BR@5@0.5"], row["BR@10@0.5"]


def test_slices_per_family_regime_heldout_and_objects(tmp_path: Path) -> None:
    root = _bench(tmp_path / "bench", META)
    queries = test_queries(root)
    assert has_slices(queries) and [q.family for q in queries] == ["attr", "spatial", "attr", "ordinal", "ordinal"]
    heldout = read_heldout(root)
    assert heldout == {"family": ["ordinal"], "regime": ["border"]}
    slices = evaluate_slices(PREDICTIONS, queries, heldout=heldout)
    assert list(slices) == ["family:attr", "family:ordinal", "family:spatial", "in_family", "heldout_family",
                            "regime:border", "regime:dense", "regime:sparse", "in_regime", "heldout_regime",
                            "objects:1-4", "objects:9-12", "objects:13+"]  # no image of 5-8 objects
    assert _br(slices, "family:attr") == (2, 0.5, 1.0, 1.0)
    assert _br(slices, "in_family") == pytest.approx((3, 1 / 3, 2 / 3, 2 / 3))
    assert _br(slices, "heldout_family") == (2, 0.5, 0.5, 0.5)
    assert _br(slices, "regime:dense") == (2, 0.5, 1.0, 1.0)
    assert _br(slices, "in_regime") == (4, 0.5, 0.75, 0.75)
    assert _br(slices, "heldout_regime") == (1, 0.0, 0.0, 0.0)
    assert _br(slices, "objects:13+") == (1, 0.0, 0.0, 0.0)
    table = format_slices(slices).splitlines()
    assert table[0].split()[:5] == ["slice", "queries", "BR@1", "BR@5", "BR@10"]
    assert table[5].split() == ["heldout_family", "2", "50.0", "50.0", "50.0"]


def test_detail_slices_hold_every_query_naming_the_detail(tmp_path: Path) -> None:
    from reir.data.queries import program_details

    programs = {"s1": {"shape": "circle", "color": "red"},
                "s2": {"shape": "circle", "relation": {"relation": "left", "ref": {"shape": "star"}}, "background": "plain"},
                "s3": {"shape": "circle", "superlative": "second_leftmost"},
                "s4": {"color": "red", "superlative": "pair_largest", "background": "noisy"},
                "s5": {"shape": "star", "superlative": "leftmost"}}
    root = _bench(tmp_path / "bench", META)
    entries = json.loads((root / "reircoco.json").read_text())
    for e in entries:
        for sent in e["sentences"]:
            sent["program"] = programs[sent["sent_id"]]
    (root / "reircoco.json").write_text(json.dumps(entries))
    queries = test_queries(root)
    assert [q.details for q in queries] == [("none",), ("relation", "background"), ("ordinal",),
                                            ("background", "comparative"), ("superlative",)]
    assert program_details(None) == ()
    slices = evaluate_slices(PREDICTIONS, queries, heldout=read_heldout(root))
    assert [name for name in slices if name.startswith("detail:")] == [
        "detail:background", "detail:comparative", "detail:none", "detail:ordinal", "detail:relation",
        "detail:superlative"]
    assert _br(slices, "detail:background") == (2, 0.5, 0.5, 0.5)  # s2 missed, s4 hit first
    assert _br(slices, "detail:ordinal") == (1, 0.0, 1.0, 1.0)  # s3 hit at rank 3
    # without programs (the benchmark above before this test's edit) there is no detail slice
    assert not any(n.startswith("detail:") for n in evaluate_slices(PREDICTIONS, test_queries(_bench(tmp_path / "b", META))))


def test_an_old_benchmark_gets_no_heldout_summary(tmp_path: Path) -> None:
    root = _bench(tmp_path / "old", {})
    assert read_heldout(root) == {} == heldout_from_meta({"regimes": {"train_mixture": {}}})
    slices = evaluate_slices(PREDICTIONS, test_queries(root), heldout=read_heldout(root))
    assert not any(name.startswith(("in_", "heldout_")) for name in slices)
    assert "family:spatial" in slices and "regime:border" in slices


def test_one_dimension_buckets_and_bad_dimension(tmp_path: Path) -> None:
    queries = test_queries(_bench(tmp_path / "b", META))
    only = evaluate_slices(PREDICTIONS, queries, by=("regime",), heldout={"regime": ["border"]})
    assert not any("family" in name for name in only)
    assert [objects_bucket(n) for n in (0, 1, 4, 5, 8, 9, 12, 13, 40)] == [
        None, "1-4", "1-4", "5-8", "5-8", "9-12", "9-12", "13+", "13+"]
    with pytest.raises(ValueError, match="cannot slice by 'colour'"):
        evaluate_slices(PREDICTIONS, queries, by=("colour",))


def test_reir_eval_annotations_prints_and_writes_the_slice_table(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real command: tiny model, a milvus-lite index, queries from a REIRCOCO file whose
    images lie beside it (no --data), split "val"."""
    from reir.cli import _run, app
    from reir.platform.modeling import load_reir_model
    from tests.platform.fakes import COLORS
    from tests.serving.conftest import COLLECTION, IMAGE_SIZE, fill_store

    refs = tmp_path / "refs" / "mine.json"
    fill_store(tmp_path / "idx.db", tiny_checkpoint, load_reir_model, image_dir=refs.parent / "imgs")
    width, height = IMAGE_SIZE
    box = {"ann_id": 1, "bbox": [0.0, 0.0, width / 2, height / 2], "category_name": "circle", "category_id": 0}
    refs.write_text(json.dumps([
        {"image_id": f"img_{c}", "file_name": f"imgs/img_{c}.png", "height": height, "width": width, "split": "val",
         "regime": "sparse" if k % 2 else "dense", "ref_anno": box, "det_anno": [box],
         "sentences": [{"sent_id": f"s{k}", "raw": f"the {c} one", "family": "attr", "matches": []}]}
        for k, c in enumerate(COLORS)]))  # fmt: skip
    (refs.parent / "meta.json").write_text(json.dumps({"regimes": {"heldout": ["sparse"]}}))
    out = tmp_path / "metrics.json"
    args = ["eval", "--annotations", str(refs), "--split", "val", "--model", str(tiny_checkpoint),
            "--milvus-uri", str(tmp_path / "idx.db"), "--collection", COLLECTION, "--out", str(out)]
    assert _run(lambda: app(args, standalone_mode=False)) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "family:attr" in printed and "heldout_regime" in printed
    written = json.loads(out.read_text())
    assert written["num_queries"] == len(COLORS)
    assert written["slices"]["in_regime"]["queries"] == written["slices"]["heldout_regime"]["queries"] == 3
    assert set(written["slices"]) >= {"family:attr", "regime:dense", "regime:sparse", "objects:1-4"}
