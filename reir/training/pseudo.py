"""Pseudo referents for weak mode: a weak model names the box of each expression.

Weak mode trains from (image, expression) pairs without the referent's box. Once a weak
model localizes better than chance, its own answers can stand in for the missing boxes
(self-training, as in weakly supervised grounding): for every training expression, the
instance it scores highest in its own image is snapped to the nearest box of the image's
detection annotations (which weak data has: boxes and categories, never linked to an
expression) and, when the model is confident, written as that expression's referent.
Stages 1 and 2 then train on the result as on any REIRCOCO file.

Only the model's answers decide a label. The true referent of a training expression is
read for one thing, the report's ``precision`` (the share of kept labels that are right,
on data that has it, overall and split by whether the referent's category is unique in its
image), and never reaches the written file.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from reir.data.formats import Annotation, Match, RefEntry, load_reircoco, save_reircoco
from reir.model.boxes import iou_xywh
from reir.model.rerank import pack_instance_sets


def _confidences(model: Any, processor: Any, image: Any, texts: list[str], top_k: int) -> tuple[list[Any], np.ndarray]:
    """The image's top instances and, per text, the softmax of its logits over them
    (``rerank_logits``: the re-ranker's when the model has one, as serving localizes, else
    the dual encoder's)."""
    size = (int(image.width), int(image.height))
    with torch.inference_mode():
        out = model.encode_images(processor.images([image]))
        (insts,) = processor.postprocess(out, sizes=[size], top_k=top_k)
        if not insts:
            return [], np.zeros((len(texts), 0), dtype=np.float32)
        enc = processor.text(texts)
        arrays = pack_instance_sets([[i.embedding for i in insts]], [[i.box_xywh for i in insts]],
                                    [[i.score for i in insts]], [size])  # fmt: skip
        emb, boxes, objectness, mask = (torch.from_numpy(a).expand(len(texts), *a.shape[1:]) for a in arrays)
        logits = model.rerank_logits(enc["input_ids"], enc["attention_mask"], emb, boxes, objectness, mask,
                                     text_index=torch.arange(len(texts)))  # fmt: skip
        probs = logits.float().softmax(dim=1).numpy()
    return list(insts), probs


class _Answer(NamedTuple):
    """The weak model's answer for one training expression."""

    confidence: float
    image_id: str
    sentence: Any
    ann: Annotation  # the annotated box the answer was snapped to
    right: bool  # the true referent (for the report only)
    shared_category: bool  # the true referent's category has another object in the image


def _precision(answers: list[_Answer]) -> float:
    """The share of ``answers`` whose picked box is the true referent (0 when there are none)."""
    return sum(a.right for a in answers) / max(len(answers), 1)


def pseudo_label(
    model_dir: str | Path,
    data_root: str | Path,
    out_root: str | Path,
    *,
    keep: float = 0.5,
    min_iou: float = 0.5,
    top_k: int = 10,
) -> dict[str, Any]:
    """Write ``out_root``: ``data_root``'s benchmark with each train expression's referent
    replaced by the weak model's answer; expressions outside the ``keep`` most confident
    fraction, or whose answer covers no annotated box by ``min_iou``, are dropped. The test
    split is copied as it is (it is what evaluation reads). Returns the report, also
    written as ``out_root/pseudo_labels.json``."""
    from PIL import Image

    from reir.model import create_model

    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    data_root, out_root = Path(data_root), Path(out_root)
    if out_root.resolve() == data_root.resolve():
        raise ValueError("out_root must differ from data_root: the source's referents are kept")
    entries = load_reircoco(data_root / "reircoco.json")
    model, processor = create_model(str(model_dir))
    model.eval()
    train = [e for e in entries if e.split == "train"]
    by_image: dict[str, list[RefEntry]] = {}
    for e in train:
        by_image.setdefault(e.image_id, []).append(e)
    answers: list[_Answer] = []
    unmatched = 0
    for image_id, group in by_image.items():
        first = group[0]
        sentences = [(s, e.ref_anno.ann_id) for e in group for s in e.sentences]
        with Image.open(data_root / first.file_name) as im:
            image = im.convert("RGB")
        insts, probs = _confidences(model, processor, image, [s.raw for s, _ in sentences], top_k)
        if not insts:
            unmatched += len(sentences)
            continue
        categories = [a.category_id for a in first.det_anno]
        shared_category = {a.ann_id: categories.count(a.category_id) > 1 for a in first.det_anno}
        for (sentence, true_ann), row in zip(sentences, probs):
            best = int(row.argmax())
            ious = [iou_xywh(insts[best].box_xywh, a.bbox) for a in first.det_anno]
            if not ious or max(ious) < min_iou:
                unmatched += 1
                continue
            ann = first.det_anno[int(np.argmax(ious))]
            answers.append(_Answer(float(row[best]), image_id, sentence, ann, ann.ann_id == true_ann,
                                   shared_category.get(true_ann, False)))
    answers.sort(key=lambda a: -a.confidence)
    kept = answers[: math.ceil(keep * len(answers))] if answers else []
    grouped: dict[tuple[str, int], tuple[Annotation, list[Any]]] = {}
    for a in kept:
        grouped.setdefault((a.image_id, a.ann.ann_id), (a.ann, []))[1].append(a.sentence)
    new_train = [
        replace(by_image[image_id][0], ref_anno=ann,
                sentences=[replace(s, matches=[Match(image_id=image_id, ann_id=ann_id)]) for s in sentences])
        for (image_id, ann_id), (ann, sentences) in sorted(grouped.items())  # keys are unique
    ]  # fmt: skip
    out_root.mkdir(parents=True, exist_ok=True)
    save_reircoco(out_root / "reircoco.json", new_train + [e for e in entries if e.split != "train"])
    for name in ("meta.json", "instances_train.json", "instances_test.json", "discovery.json"):
        if (data_root / name).exists():
            shutil.copyfile(data_root / name, out_root / name)
    images = out_root / "images"
    if not images.exists() and (data_root / "images").is_dir():
        images.symlink_to((data_root / "images").resolve(), target_is_directory=True)
    total = sum(len(e.sentences) for e in train)
    parts = {name: ([a for a in answers if a.shared_category == flag], [a for a in kept if a.shared_category == flag])
             for name, flag in (("unique_in_image", False), ("shared_in_image", True))}
    report = {
        "model": str(model_dir),
        "data": str(data_root),
        "keep": keep,
        "min_iou": min_iou,
        "expressions": total,
        "answered": len(answers),
        "unmatched": unmatched,
        "kept": len(kept),
        "precision_kept": _precision(kept),
        "precision_all": _precision(answers),
        "min_confidence_kept": kept[-1].confidence if kept else None,
        # A confident answer is mostly one whose referent is the only object of its category in
        # the image: keeping the confident ones selects the easy half, so both are reported.
        "by_referent_category": {
            name: {"answered": len(part_all), "kept": len(part_kept),
                   "precision_all": _precision(part_all), "precision_kept": _precision(part_kept)}
            for name, (part_all, part_kept) in parts.items()
        },
    }
    (out_root / "pseudo_labels.json").write_text(json.dumps(report, indent=2))
    return report
