"""Training samples and evaluation queries assembled from a benchmark directory.

``load_samples`` joins the COCO instances file (every box of every image, so the
detector also learns objects nobody refers to) with the REIRCOCO sentences.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reir.data.queries import Query, queries_from_reircoco
from reir.data.records import RefEntry, load_reircoco, validate_coco
from reir.data.vocab import BACKGROUNDS

SPLITS = ("train", "test")


@dataclass
class ImageSample:
    image_id: str
    path: str  # absolute
    width: int
    height: int
    boxes: list[list[float]] = field(default_factory=list)  # [x, y, w, h] pixels
    labels: list[int] = field(default_factory=list)  # 0-based contiguous category index
    refs: list[tuple[str, int]] = field(default_factory=list)  # (expression, index into boxes)
    ann_ids: list[int] = field(default_factory=list)  # parallel to boxes
    scene: int = -1  # the image's scene label (index into vocab.BACKGROUNDS), -1 unknown


def scene_label(img: dict[str, Any]) -> int:
    """A COCO image record's scene label: its ``background`` (synthetic benchmarks write
    one of :data:`reir.data.vocab.BACKGROUNDS`) as an index, -1 when it has none we know."""
    name = img.get("background")
    return BACKGROUNDS.index(name) if name in BACKGROUNDS else -1


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _image_key(img: dict[str, Any]) -> str:
    # Synthetic COCO files keep the string id ("syn000123") in image_key; real COCO
    # files only have the integer id, which REIRCOCO entries then use as image_id.
    return str(img.get("image_key", img["id"]))


def _samples_from_coco(
    root: Path, coco_path: Path, referred: Collection[int] = ()
) -> tuple[dict[str, ImageSample], list[str]]:
    """Samples keyed by image id, and the category names their labels index.

    Crowd regions (``iscrowd: 1``) cover many instances at once, so they are no
    detection target (DETR practice) unless an expression in ``referred`` names them.
    """
    data = validate_coco(coco_path)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: k for k, c in enumerate(cats)}
    by_id: dict[int, ImageSample] = {}
    for img in data["images"]:
        path = str((root / img["file_name"]).resolve())
        by_id[img["id"]] = ImageSample(_image_key(img), path, img["width"], img["height"], scene=scene_label(img))
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        if ann["category_id"] not in cat_index:
            raise ValueError(f"{coco_path}: annotation id {ann['id']}: unknown category_id {ann['category_id']}")
        if ann.get("iscrowd") and ann["id"] not in referred:
            continue
        sample = by_id[ann["image_id"]]
        sample.boxes.append([float(v) for v in ann["bbox"]])
        sample.labels.append(cat_index[ann["category_id"]])
        sample.ann_ids.append(ann["id"])
    return {s.image_id: s for s in by_id.values()}, [str(c["name"]) for c in cats]


def _samples_from_entries(root: Path, entries: list[RefEntry]) -> tuple[dict[str, ImageSample], list[str]]:
    """Fallback when no instances file exists: boxes come from ``det_anno``."""
    names = {a.category_id: a.category_name for e in entries for a in e.det_anno}
    cat_ids = sorted(names)
    cat_index = {c: k for k, c in enumerate(cat_ids)}
    out: dict[str, ImageSample] = {}
    for e in entries:
        if e.image_id in out:
            continue
        dets = sorted(e.det_anno, key=lambda a: a.ann_id)
        out[e.image_id] = ImageSample(
            e.image_id, str((root / e.file_name).resolve()), e.width, e.height,
            boxes=[list(a.bbox) for a in dets], labels=[cat_index[a.category_id] for a in dets],
            ann_ids=[a.ann_id for a in dets],
        )
    return out, [names[c] for c in cat_ids]


def join_reircoco(
    reircoco: Path, entries: list[RefEntry], coco_path: Path | None, image_root: Path
) -> tuple[list[ImageSample], list[str]]:
    """Every image with all its boxes (from ``coco_path``, else the ``det_anno`` of
    ``entries``, one split's entries of the file ``reircoco``) and its refs; also the
    category names the labels index, so that several sources can share one label space."""
    if coco_path is not None:
        referred = {e.ref_anno.ann_id for e in entries}
        samples, names = _samples_from_coco(image_root, coco_path, referred)
    else:
        samples, names = _samples_from_entries(image_root, entries)
    coco_name = coco_path.name if coco_path is not None else "det_anno"
    for e in entries:
        sample = samples.get(e.image_id)
        if sample is None:
            raise ValueError(f"{reircoco}: image_id {e.image_id!r} ({e.split}) is missing from {coco_name}")
        try:
            index = sample.ann_ids.index(e.ref_anno.ann_id)
        except ValueError:
            raise ValueError(
                f"{reircoco}: image_id {e.image_id!r}: ref_anno.ann_id {e.ref_anno.ann_id} has no box in the image"
            ) from None
        sample.refs += [(s.raw, index) for s in e.sentences]
    return sorted(samples.values(), key=lambda s: s.image_id), names


def load_samples(root: str | Path, split: str) -> list[ImageSample]:
    """Every image of ``split`` with all its boxes and its (expression, box index) refs."""
    _check_split(split)
    root = Path(root)
    reircoco = root / "reircoco.json"
    entries = [e for e in load_reircoco(reircoco) if e.split == split]
    coco_path = root / f"instances_{split}.json"
    return join_reircoco(reircoco, entries, coco_path if coco_path.exists() else None, root)[0]


def negative_groups(root: str | Path, split: str, image_ids: list[str]) -> list[int]:
    """A group id per image: an expression of one image is known NOT to hold in the other
    images of its group (cross-image negatives for contrastive and re-ranking losses).

    The synthetic benchmark makes train expressions unique within chunks of
    ``meta.json: splits.train.chunk_size`` images (in image-id order) and test expressions
    unique in the whole split. Without that knowledge (other datasets) every image is its
    own group: only within-image negatives are certain.
    """
    _check_split(split)
    meta_path = Path(root) / "meta.json"
    info: dict[str, Any] = {}
    if meta_path.exists():
        info = json.loads(meta_path.read_text()).get("splits", {}).get(split, {})
    scope = str(info.get("matches_scope", ""))
    chunk = info.get("chunk_size")
    if scope == "gallery":
        return [0] * len(image_ids)
    if chunk:
        rank = {iid: i for i, iid in enumerate(sorted(image_ids))}
        return [rank[iid] // int(chunk) for iid in image_ids]
    return list(range(len(image_ids)))


def test_queries(root: str | Path, split: str = "test") -> list[Query]:
    """One query per sentence of ``split`` of a benchmark directory; its targets are every
    instance the sentence's ``matches`` name (the entry's referent when it has none)."""
    _check_split(split)
    root = Path(root)
    return queries_from_reircoco(root / "reircoco.json", split, image_root=root,
                                 instances=root / f"instances_{split}.json")


# The contract's name starts with "test_": stop pytest from collecting it wherever
# a test module imports it.
test_queries.__test__ = False  # type: ignore[attr-defined]
