"""Pseudo referents for weak mode: the weak model's answers, never the true referents."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from reir.data.formats import load_reircoco, load_samples, save_reircoco
from reir.model import create_model
from reir.model.boxes import iou_xywh
from reir.model.localize import InstanceLocalizer
from reir.training.pseudo import pseudo_label


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from reir.data.synth import generate

    root = tmp_path_factory.mktemp("pseudo")
    generate(root / "data", num_images=16, test_fraction=0.25, image_size=64, seed=3, discovery_queries=0)
    model, processor = create_model("tiny")
    processor.instance_min_score = 0.0  # a random model's objectness means nothing: a fixed top k
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root / "data", root / "model"


def _train_labels(root: Path) -> dict[str, tuple[str, int]]:
    """sentence id -> (image id, referent ann id) of the train split."""
    return {s.sent_id: (e.image_id, e.ref_anno.ann_id)
            for e in load_reircoco(root / "reircoco.json") if e.split == "train" for s in e.sentences}  # fmt: skip


def _assert_labels_are_the_answers(model: Any, processor: Any, data: Path, labels: dict[str, tuple[str, int]]) -> None:
    """Each label is the annotated box nearest to what serving's localizer answers."""
    model.eval()
    localize = InstanceLocalizer(model, processor, top_k=10)
    train = [e for e in load_reircoco(data / "reircoco.json") if e.split == "train"]
    entries = {e.image_id: e for e in train}  # every entry of an image lists all its boxes
    texts = {s.sent_id: s.raw for e in train for s in e.sentences}
    for sent_id, (image_id, ann_id) in labels.items():
        entry = entries[image_id]
        with Image.open(data / entry.file_name) as im:
            (answer,) = localize([im.convert("RGB")], texts[sent_id])
        assert answer is not None
        assert max(entry.det_anno, key=lambda a: iou_xywh(answer.box_xywh, a.bbox)).ann_id == ann_id


def test_labels_are_the_models_answers_snapped_to_annotated_boxes(bench: tuple[Path, Path], tmp_path: Path) -> None:
    data, model_dir = bench
    report = pseudo_label(model_dir, data, tmp_path / "out", keep=1.0, min_iou=0.0)
    out = tmp_path / "out"
    labels = _train_labels(out)
    assert report["kept"] == len(labels) == report["answered"] > 0
    assert report["expressions"] == len(_train_labels(data))
    model, processor = create_model(str(model_dir))
    _assert_labels_are_the_answers(model, processor, data, dict(list(labels.items())[:8]))
    # The test split is what evaluation reads: copied as it is.
    test = lambda root: [(e.image_id, e.ref_anno.ann_id, [s.raw for s in e.sentences])
                         for e in load_reircoco(root / "reircoco.json") if e.split == "test"]  # fmt: skip
    assert test(out) == test(data)
    samples = load_samples(out, "train")  # trains like any benchmark
    assert sum(len(s.refs) for s in samples) == len(labels)
    assert json.loads((out / "pseudo_labels.json").read_text())["kept"] == report["kept"]
    # The precision split by whether the referent's category is unique in its image adds up.
    split = report["by_referent_category"]
    truth = {e.image_id: e for e in load_reircoco(data / "reircoco.json") if e.split == "train"}
    shared = sum(
        sum(a.category_id == ref.category_id for a in truth[iid].det_anno) > 1
        for iid, ann_id in _train_labels(data).values()
        for ref in [next(a for a in truth[iid].det_anno if a.ann_id == ann_id)]
    )
    assert split["shared_in_image"]["answered"] == shared
    assert split["unique_in_image"]["answered"] + shared == report["answered"]
    right = sum(split[k]["precision_all"] * split[k]["answered"] for k in split)
    assert right == pytest.approx(report["precision_all"] * report["answered"])


def test_the_true_referents_never_reach_the_labels(bench: tuple[Path, Path], tmp_path: Path) -> None:
    data, model_dir = bench
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("meta.json", "instances_train.json", "instances_test.json"):
        (moved / name).write_bytes((data / name).read_bytes())
    (moved / "images").symlink_to((data / "images").resolve(), target_is_directory=True)
    entries = load_reircoco(data / "reircoco.json")
    # Every train expression now names another box of its image as its referent.
    shifted = [replace(e, ref_anno=e.det_anno[(e.det_anno.index(e.ref_anno) + 1) % len(e.det_anno)])
               if e.split == "train" else e for e in entries]  # fmt: skip
    save_reircoco(moved / "reircoco.json", shifted)
    a = pseudo_label(model_dir, data, tmp_path / "a", keep=0.5, min_iou=0.0)
    b = pseudo_label(model_dir, moved, tmp_path / "b", keep=0.5, min_iou=0.0)
    assert _train_labels(tmp_path / "a") == _train_labels(tmp_path / "b")
    assert a["answered"] > 0 and a["kept"] == b["kept"] == -(-a["answered"] // 2)
    # The report's precision is the one place the truth is read: one label cannot be right
    # under both truths.
    assert a["precision_kept"] + b["precision_kept"] <= 1.0 + 1e-9


def test_answers_on_no_annotated_box_are_dropped_and_bad_arguments_refused(
    bench: tuple[Path, Path], tmp_path: Path
) -> None:
    data, model_dir = bench
    strict = pseudo_label(model_dir, data, tmp_path / "strict", min_iou=0.999)  # an untrained model's boxes
    assert strict["unmatched"] == strict["expressions"] > 0 and strict["kept"] == 0
    with pytest.raises(ValueError, match="keep must be"):
        pseudo_label(model_dir, data, data.parent / "x", keep=0.0)
    with pytest.raises(ValueError, match="must differ"):
        pseudo_label(model_dir, data, data, keep=0.5)


def test_a_model_with_a_reranker_labels_with_the_reranker(bench: tuple[Path, Path], tmp_path: Path) -> None:
    data, model_dir = bench
    model, processor = create_model(str(model_dir))
    torch.manual_seed(0)
    for p in model.add_reranker().parameters():  # a re-ranker that reorders the dual encoder's answers
        torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(tmp_path / "rr")
    processor.save_pretrained(tmp_path / "rr")
    pseudo_label(tmp_path / "rr", data, tmp_path / "with", keep=1.0, min_iou=0.0)
    pseudo_label(model_dir, data, tmp_path / "without", keep=1.0, min_iou=0.0)
    labels, plain = _train_labels(tmp_path / "with"), _train_labels(tmp_path / "without")
    assert labels != plain
    _assert_labels_are_the_answers(model, processor, data, labels)
