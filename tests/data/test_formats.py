"""Loaders: pycocotools round trip, samples/queries assembly, clear errors."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
from pycocotools.coco import COCO

from reir.data import (
    load_coco,
    load_discovery,
    load_reircoco,
    load_samples,
    save_reircoco,
    test_queries,
)
from reir.data.samples import scene_label
from reir.data.vocab import BACKGROUNDS


def _write(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _coco_dict() -> dict[str, Any]:
    return {
        "images": [{"id": 5, "file_name": "a.jpg", "width": 64, "height": 48}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 0, "bbox": [1.5, 2.0, 10.25, 7.0], "area": 71.75, "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 1, "bbox": [30, 20, 12, 12], "area": 144, "iscrowd": 0},
        ],
        "categories": [{"id": 0, "name": "square"}, {"id": 1, "name": "circle"}],
    }


def test_boxes_round_trip_through_pycocotools(tmp_path: Path) -> None:
    path = _write(tmp_path / "coco.json", _coco_dict())
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
    assert coco.loadAnns(1)[0]["bbox"] == [1.5, 2.0, 10.25, 7.0]
    ours = load_coco(path)
    assert [a["bbox"] for a in ours.loadAnns(ours.getAnnIds(imgIds=[5]))] == [[1.5, 2.0, 10.25, 7.0], [30, 20, 12, 12]]


def test_generated_coco_matches_reircoco(synth_root: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(synth_root / "instances_test.json"))
    entries = [e for e in load_reircoco(synth_root / "reircoco.json") if e.split == "test"]
    assert entries
    for e in entries:
        for det in e.det_anno:
            ann = coco.loadAnns(det.ann_id)[0]
            assert ann["bbox"] == det.bbox
            assert coco.loadCats(ann["category_id"])[0]["name"] == det.category_name
            assert coco.loadImgs(ann["image_id"])[0]["image_key"] == e.image_id


def test_reircoco_save_load_round_trip(synth_root: Path, tmp_path: Path) -> None:
    entries = load_reircoco(synth_root / "reircoco.json")
    save_reircoco(tmp_path / "copy.json", entries)
    assert load_reircoco(tmp_path / "copy.json") == entries
    assert entries[0].extra["background"]  # fields beyond the contract survive


def test_load_samples_refs_point_at_referents(synth_root: Path) -> None:
    entries = {(e.image_id, s.raw): e.ref_anno.bbox for e in load_reircoco(synth_root / "reircoco.json") for s in e.sentences}
    for split in ("train", "test"):
        samples = load_samples(synth_root, split)
        assert samples and all(Path(s.path).is_absolute() and Path(s.path).exists() for s in samples)
        for s in samples:
            assert len(s.boxes) == len(s.labels) and all(0 <= lab < 6 for lab in s.labels)
            for text, index in s.refs:
                assert s.boxes[index] == entries[(s.image_id, text)]
    train = load_samples(synth_root, "train")
    assert sum(len(s.refs) for s in train) > 2 * len(train)


def test_load_samples_reads_the_scene_label_from_the_images_background(synth_root: Path) -> None:
    background = {e.image_id: e.extra["background"] for e in load_reircoco(synth_root / "reircoco.json")}
    samples = load_samples(synth_root, "train")
    assert {s.scene for s in samples} <= set(range(len(BACKGROUNDS)))
    assert all(BACKGROUNDS[s.scene] == background[s.image_id] for s in samples if s.image_id in background)
    assert len({s.scene for s in samples}) > 1
    assert scene_label({"background": "velvet"}) == scene_label({}) == -1  # not one we know: no label


def test_test_queries_have_one_ground_truth(synth_root: Path) -> None:
    queries = test_queries(synth_root)
    n_sentences = sum(len(e.sentences) for e in load_reircoco(synth_root / "reircoco.json") if e.split == "test")
    assert len(queries) == n_sentences and len({q.query_id for q in queries}) == len(queries)
    assert all(q.image_id.startswith("syn") and len(q.box) == 4 for q in queries)


def test_load_discovery(synth_root: Path) -> None:
    queries = load_discovery(synth_root)
    assert queries and all(m.bbox is not None for q in queries for m in q.matches)


def _entry() -> dict[str, Any]:
    ann = {"ann_id": 1, "bbox": [0, 0, 5, 5], "category_name": "square", "category_id": 0}
    return {"image_id": "syn000001", "file_name": "images/test/syn000001.jpg", "height": 64, "width": 64,
            "split": "test", "sentences": [{"sent_id": "s1", "raw": "the square", "matches": []}],
            "ref_anno": ann, "det_anno": [ann]}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: e.pop("split"), "missing field 'split'"),
        (lambda e: e.update(height="64"), "field 'height' should be int"),
        (lambda e: e["ref_anno"].update(bbox=[0, 0, 5]), "field 'bbox' should be 4 numbers"),
        (lambda e: e["ref_anno"].update(bbox=[0, 0, -5, 5]), "negative width"),
        (lambda e: e["sentences"][0].pop("raw"), r"entry\[0\]\.sentences\[0\]: missing field 'raw'"),
        (lambda e: e["sentences"][0]["matches"].append({"image_id": "x"}), "missing field 'ann_id'"),
        (lambda e: e["det_anno"][0].update(ann_id="abc"), "integer id"),
    ],
)
def test_malformed_reircoco_names_file_and_field(tmp_path: Path, mutate: Any, message: str) -> None:
    entry = _entry()
    mutate(entry)
    path = _write(tmp_path / "bad.json", [entry])
    with pytest.raises(ValueError, match=message) as err:
        load_reircoco(path)
    assert "bad.json" in str(err.value)


def test_not_json_or_wrong_top_level(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        load_reircoco(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="expected a list"):
        load_reircoco(_write(tmp_path / "obj.json", {"entries": []}))


def test_malformed_coco_and_discovery(tmp_path: Path) -> None:
    coco = _coco_dict()
    coco["annotations"][1]["image_id"] = 99
    with pytest.raises(ValueError, match=r"annotations\[1\].*'image_id' 99"):
        load_coco(_write(tmp_path / "coco.json", coco))
    coco = _coco_dict()
    del coco["categories"]
    with pytest.raises(ValueError, match="missing field 'categories'"):
        load_coco(_write(tmp_path / "coco.json", coco))
    bad = {"queries": [{"query_id": "d0", "raw": "a star", "matches": [{"image_id": "syn1", "ann_id": 3}]}]}
    with pytest.raises(ValueError, match=r"discovery.json: queries\[0\]\.matches\[0\]: missing field 'bbox'"):
        load_discovery(_write(tmp_path / "discovery.json", bad))


def test_unknown_split(synth_root: Path) -> None:
    with pytest.raises(ValueError, match="unknown split"):
        load_samples(synth_root, "val")


def test_every_generator_word_is_in_the_built_in_tokenizer_vocabulary() -> None:
    """A word missing from the model's vocabulary becomes [UNK]: the model could not
    tell "on the noisy background" from "on the checkered background"."""
    from reir.data.vocab import VOCABULARY
    from reir.model.tokenization import build_vocab

    assert sorted(set(VOCABULARY) - set(build_vocab())) == []


def test_queries_carry_their_ground_truth_image_path(synth_root: Path) -> None:
    from reir.data.formats import test_queries

    queries = test_queries(synth_root)
    assert queries
    for q in queries:
        path = Path(q.path)
        assert path.is_absolute() and path.is_file() and path.stem == q.image_id
