"""Training-source loaders on tiny files written here in every format: exact samples,
one shared label space, and clear errors on bad input (file, record, field)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from reir.data.formats import (
    ImageSample,
    LabelSpace,
    load_coco_source,
    load_plain_pickle,
    load_refer_source,
    load_reircoco_source,
    load_samples,
    load_sorec_source,
    load_source,
    load_synthetic_source,
)

SIZES = {"a.jpg": (80, 60), "b.jpg": (64, 64), "c.jpg": (50, 40)}
# Sparse, unsorted category ids: labels follow id order (person 0, car 1, dog 2).
CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
ANNOTATIONS = [
    {"id": 101, "image_id": 11, "category_id": 1, "bbox": [1, 2, 30, 40], "iscrowd": 0},
    {"id": 102, "image_id": 11, "category_id": 3, "bbox": [40, 10, 20, 20], "iscrowd": 0},
    {"id": 103, "image_id": 11, "category_id": 1, "bbox": [0, 0, 80, 60], "iscrowd": 1},
    {"id": 104, "image_id": 12, "category_id": 7, "bbox": [5.5, 6, 10, 12], "iscrowd": 0},
]  # image 13 has no box


def _sent(text: str, sent_id: int) -> dict[str, Any]:
    return {"sent": text, "raw": text.capitalize() + ".", "tokens": text.split(), "sent_id": sent_id}


REFS = [
    {"ref_id": 0, "ann_id": 102, "image_id": 11, "split": "train", "category_id": 3, "sent_ids": [0, 1],
     "sentences": [_sent("car on the right", 0), _sent("gray car", 1)], "file_name": "a_102.jpg"},
    {"ref_id": 1, "ann_id": 104, "image_id": 12, "split": "train", "category_id": 7, "sent_ids": [2],
     "sentences": [_sent("the dog", 2)], "file_name": "b_104.jpg"},
    {"ref_id": 2, "ann_id": 103, "image_id": 11, "split": "testA", "category_id": 1, "sent_ids": [3],
     "sentences": [_sent("the crowd", 3)], "file_name": "a_103.jpg"},
]


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """``imgs/{a,b,c}.jpg`` and a COCO ``instances.json`` beside a refer ``refs(unc).p``."""
    for name, size in SIZES.items():
        (tmp_path / "imgs").mkdir(exist_ok=True)
        Image.new("RGB", size, "gray").save(tmp_path / "imgs" / name)
    images = [{"id": 11 + k, "file_name": n, "width": w, "height": h} for k, (n, (w, h)) in enumerate(SIZES.items())]
    _write_coco(tmp_path / "instances.json", images=images)
    with open(tmp_path / "refs(unc).p", "wb") as f:
        pickle.dump(REFS, f)
    return tmp_path


def _write_coco(path: Path, **changes: Any) -> Path:
    data = {"images": [], "annotations": ANNOTATIONS, "categories": CATEGORIES, **changes}
    path.write_text(json.dumps(data))
    return path


def _img(root: Path, name: str) -> str:
    return str((root / "imgs" / name).resolve())


# ---------------------------------------------------------------- COCO detection


def test_coco_source_gives_every_box_without_expressions(files: Path) -> None:
    samples = load_coco_source(files / "instances.json", images=files / "imgs")
    assert samples == [
        ImageSample("11", _img(files, "a.jpg"), 80, 60, boxes=[[1.0, 2.0, 30.0, 40.0], [40.0, 10.0, 20.0, 20.0]],
                    labels=[0, 1], ann_ids=[101, 102]),  # the crowd region 103 is no detection target
        ImageSample("12", _img(files, "b.jpg"), 64, 64, boxes=[[5.5, 6.0, 10.0, 12.0]], labels=[2], ann_ids=[104]),
        ImageSample("13", _img(files, "c.jpg"), 50, 40),  # no box: kept as a background image
    ]


@pytest.mark.parametrize(
    ("bbox", "message"),
    [([70, 50, 20, 20], "lies outside its 80x60 image"), ([1, 1, 0, 5], "non-positive width/height")],
)
def test_coco_boxes_outside_the_image_or_empty_are_errors(files: Path, bbox: list[float], message: str) -> None:
    images = json.loads((files / "instances.json").read_text())["images"]
    bad = [*ANNOTATIONS[:1], {**ANNOTATIONS[1], "bbox": bbox}, *ANNOTATIONS[2:]]
    path = _write_coco(files / "bad.json", images=images, annotations=bad)
    with pytest.raises(ValueError, match=rf"bad\.json: annotations\[1\]: box .*{message}"):
        load_coco_source(path, images=files / "imgs")


def test_coco_missing_image_file_and_missing_field_are_errors(files: Path) -> None:
    (files / "imgs" / "c.jpg").unlink()
    with pytest.raises(ValueError, match=r"instances\.json: images\[2\]: image file not found: .*c\.jpg"):
        load_coco_source(files / "instances.json", images=files / "imgs")
    no_bbox = [{k: v for k, v in a.items() if k != "bbox"} for a in ANNOTATIONS]
    path = _write_coco(files / "nobox.json", annotations=no_bbox)
    with pytest.raises(ValueError, match=r"nobox\.json: annotations\[0\]: missing field 'bbox'"):
        load_coco_source(path, images=files / "imgs")


# ---------------------------------------------------------------- refer-style RefCOCO


def test_refer_source_joins_refs_with_every_box_of_the_image(files: Path) -> None:
    train = load_refer_source(files / "refs(unc).p", images=files / "imgs", split="train")
    assert train == [
        ImageSample("11", _img(files, "a.jpg"), 80, 60, boxes=[[1.0, 2.0, 30.0, 40.0], [40.0, 10.0, 20.0, 20.0]],
                    labels=[0, 1], refs=[("car on the right", 1), ("gray car", 1)], ann_ids=[101, 102]),
        ImageSample("12", _img(files, "b.jpg"), 64, 64, boxes=[[5.5, 6.0, 10.0, 12.0]], labels=[2],
                    refs=[("the dog", 0)], ann_ids=[104]),
    ]
    (test_a,) = load_refer_source(files / "refs(unc).p", images=files / "imgs", split="testA")
    assert test_a.ann_ids == [101, 102, 103]  # a referred crowd region stays: it carries an expression
    assert test_a.refs == [("the crowd", 2)]


def test_refer_split_selection_errors(files: Path) -> None:
    with pytest.raises(ValueError, match=r"no refs of split 'val'; the file has \['testA', 'train'\]"):
        load_refer_source(files / "refs(unc).p", images=files / "imgs", split="val")
    with pytest.raises(ValueError, match=r"unknown split 'testC'"):
        load_refer_source(files / "refs(unc).p", images=files / "imgs", split="testC")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ann_id": 999}, r"refs\[1\]: field 'ann_id' 999 is not an annotation of .*instances\.json"),
        ({"ann_id": 101}, r"refs\[1\]: field 'ann_id' 101 belongs to image 11, not to image_id 12"),
        ({"sentences": [{"raw": "no sent"}]}, r"refs\[1\]\.sentences\[0\]: missing field 'sent'"),
        ({"image_id": "12"}, r"refs\[1\]: field 'image_id' should be int"),
    ],
)
def test_refer_bad_records_name_the_record_and_field(files: Path, change: dict[str, Any], message: str) -> None:
    refs = [REFS[0], {**REFS[1], **change}, REFS[2]]
    with open(files / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    with pytest.raises(ValueError, match=message):
        load_refer_source(files / "refs(unc).p", images=files / "imgs")


def test_refer_missing_instances_file_is_an_error(files: Path) -> None:
    (files / "instances.json").unlink()
    with pytest.raises(FileNotFoundError, match="instances.json"):
        load_refer_source(files / "refs(unc).p", images=files / "imgs")


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_naming_a_global_is_refused_before_anything_runs(files: Path) -> None:
    marker = files / "pwned"
    refs = [{**REFS[0], "sentences": [_Exploit(marker)]}]
    with open(files / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p: not a pickle of plain .*refused to load global "
                                         r"(posix|os|nt)\.system"):
        load_refer_source(files / "refs(unc).p", images=files / "imgs")
    assert not marker.exists()
    (files / "junk.p").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(ValueError, match=r"junk\.p: not a pickle of plain"):
        load_plain_pickle(files / "junk.p")


def _py2(value: Any) -> bytes:
    """Opcodes a Python-2 ``pickle.dump(..., protocol=2)`` writes for plain containers:
    ``str`` is a byte string (SHORT_BINSTRING), which Python 3 must decode itself."""
    if isinstance(value, bytes):
        return b"U" + bytes([len(value)]) + value
    if isinstance(value, int):
        return b"J" + value.to_bytes(4, "little", signed=True)
    if isinstance(value, list):
        return b"](" + b"".join(_py2(v) for v in value) + b"e"
    if isinstance(value, dict):
        return b"}(" + b"".join(_py2(k) + _py2(v) for k, v in value.items()) + b"u"
    raise TypeError(value)


def test_python2_pickles_with_utf8_byte_strings_load(files: Path) -> None:
    ref = {b"ref_id": 0, b"ann_id": 102, b"image_id": 11, b"split": b"train", b"category_id": 3,
           b"sentences": [{b"sent": "caf\u00e9 car".encode(), b"raw": b"Cafe car", b"sent_id": 0}]}
    (files / "refs(unc).p").write_bytes(b"\x80\x02" + _py2([ref]) + b".")
    with pytest.raises(UnicodeDecodeError):  # what a plain pickle.load(f) does with it
        pickle.loads((files / "refs(unc).p").read_bytes())
    (sample,) = load_refer_source(files / "refs(unc).p", images=files / "imgs")
    assert sample.refs == [("caf\u00e9 car", 1)]


# ---------------------------------------------------------------- SOREC


SOREC = [
    {"image": "a.jpg", "bbox": [1, 2, 30, 40], "ref": "man on the left"},
    {"image": "b.jpg", "bbox": [5, 6, 10, 12], "ref": "small dog", "width": 64, "height": 64, "category": "dog"},
    {"image": "a.jpg", "bbox": [40, 10, 20, 20], "ref": "the car"},
    {"image": "a.jpg", "bbox": [1, 2, 30, 40], "ref": "the person"},
]


def _sorec(files: Path, records: list[Any]) -> Path:
    path = files / "sorec_train.json"
    path.write_text(json.dumps(records))
    return path


def test_sorec_records_of_one_image_share_a_sample(files: Path) -> None:
    labels = LabelSpace(["dog"])
    samples = load_sorec_source(_sorec(files, SOREC), images=files / "imgs", labels=labels)
    assert samples == [
        ImageSample("a.jpg", _img(files, "a.jpg"), 80, 60,  # size read from the image header
                    boxes=[[1.0, 2.0, 30.0, 40.0], [40.0, 10.0, 20.0, 20.0]], labels=[1, 1],
                    refs=[("man on the left", 0), ("the car", 1), ("the person", 0)], ann_ids=[0, 2]),
        ImageSample("b.jpg", _img(files, "b.jpg"), 64, 64, boxes=[[5.0, 6.0, 10.0, 12.0]], labels=[0],
                    refs=[("small dog", 0)], ann_ids=[1]),
    ]
    assert labels.names == ["dog", "object"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"image": "a.jpg", "bbox": [1, 2, 30, 40]}, r"record\[1\]: missing field 'ref'"),
        ({"image": "a.jpg", "bbox": [60, 2, 30, 40], "ref": "x"}, r"record\[1\]: box .* outside its 80x60 image"),
        ({"image": "a.jpg", "bbox": [1, 2, 0, 4], "ref": "x"}, r"record\[1\]: box .* non-positive"),
        ({"image": "gone.jpg", "bbox": [1, 2, 3, 4], "ref": "x"}, r"record\[1\]: image file not found: .*gone\.jpg"),
        ({"image": "a.jpg", "bbox": [1, 2, 3], "ref": "x"}, r"record\[1\]: field 'bbox' should be 4 numbers"),
        ({"image": "a.jpg", "bbox": [1, 2, 3, 4], "ref": "x", "width": 99, "height": 60},
         r"record\[1\]: image 'a\.jpg' was 80x60 in an earlier record"),
    ],
)
def test_sorec_bad_records_name_the_record_and_field(files: Path, record: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=r"sorec_train\.json: " + message):
        load_sorec_source(_sorec(files, [SOREC[0], record]), images=files / "imgs")


# ---------------------------------------------------------------- REIRCOCO and the synthetic benchmark


def _entry(image_id: str, ann_id: int, text: str, split: str = "train") -> dict[str, Any]:
    ann = next(a for a in ANNOTATIONS if a["id"] == ann_id)
    anno = {"ann_id": ann_id, "bbox": ann["bbox"], "category_name": "car", "category_id": ann["category_id"]}
    w, h = SIZES["a.jpg"]
    return {"image_id": image_id, "file_name": "a.jpg", "height": h, "width": w, "split": split,
            "sentences": [{"sent_id": text, "raw": text, "matches": [{"image_id": image_id, "ann_id": ann_id}]}],
            "ref_anno": anno, "det_anno": [anno]}


def test_reircoco_source_joins_coco_instances_and_an_image_root(files: Path) -> None:
    (files / "reir").mkdir()
    path = files / "reir" / "reircoco.json"
    path.write_text(json.dumps([_entry("11", 102, "the car right of the person"), _entry("11", 101, "x", "test")]))
    samples = load_reircoco_source(path, instances=files / "instances.json", images=files / "imgs")
    assert [(s.image_id, s.refs) for s in samples] == [("11", [("the car right of the person", 1)]),
                                                      ("12", []), ("13", [])]
    assert samples[0].boxes == [[1.0, 2.0, 30.0, 40.0], [40.0, 10.0, 20.0, 20.0]] and samples[0].labels == [0, 1]
    with pytest.raises(ValueError, match=r"reircoco\.json: split: no entries of split 'val'; the file has "
                                         r"\['test', 'train'\]"):
        load_reircoco_source(path, instances=files / "instances.json", images=files / "imgs", split="val")
    path.write_text(json.dumps([_entry("11", 104, "wrong image")]))
    with pytest.raises(ValueError, match=r"image_id '11': ref_anno\.ann_id 104 has no box in the image"):
        load_reircoco_source(path, instances=files / "instances.json", images=files / "imgs")


def test_synthetic_source_is_load_samples_in_a_shared_label_space(synth_root: Path) -> None:
    assert load_synthetic_source(synth_root) == load_samples(synth_root, "train")  # a fresh space: same labels
    labels = LabelSpace(["dog", "circle"])
    shifted = load_source("synthetic", synth_root, labels=labels)
    names = json.loads((synth_root / "instances_train.json").read_text())["categories"]
    own = [c["name"] for c in sorted(names, key=lambda c: c["id"])]
    assert labels.names == ["dog", "circle", *[n for n in own if n != "circle"]]
    for a, b in zip(load_samples(synth_root, "train"), shifted):
        assert [labels.names[k] for k in b.labels] == [own[k] for k in a.labels]
        assert (a.boxes, a.refs) == (b.boxes, b.refs)


def test_sources_share_one_label_space_by_category_name(files: Path) -> None:
    labels = LabelSpace()
    coco = load_source("coco", files / "instances.json", images=files / "imgs", labels=labels)
    sorec = load_source("sorec", _sorec(files, SOREC), images=files / "imgs", labels=labels)
    assert labels.names == ["person", "car", "dog", "object"]
    assert coco[1].labels == [2] and sorec[1].labels == [2]  # COCO's dog and SOREC's dog are one class
    with pytest.raises(ValueError, match="unknown source kind 'voc'"):
        load_source("voc", files)
