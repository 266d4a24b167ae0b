"""Training data sources: one loader per dataset format, each returning ``ImageSample``s.

Import these through :mod:`reir.data.formats`. Every loader gives boxes as pixel
``[x, y, w, h]``, labels as indices into a :class:`LabelSpace` (category names -> one
contiguous index, shared by the sources of a run so that a "car" of COCO and a "car"
of RefCOCO train the same class logit) and refs as (expression, box index).

Loading is strict: a missing key, a box outside its image or of non-positive size, an
unknown ``ann_id`` or a missing image file stops the run with the file, the record and
the field, because a silently dropped sample only shows up later as lower recall.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from reir.data.records import _Reader, load_coco, load_reircoco
from reir.data.samples import SPLITS, ImageSample, join_reircoco, scene_label

SOURCE_KINDS = ("synthetic", "reircoco", "refcoco", "sorec", "coco")
REFER_SPLITS = ("train", "val", "test", "testA", "testB")
# Annotation tools round polygon extents: a box may overshoot its image by this much.
EDGE_SLACK_PX = 1.0
SOREC_CATEGORY = "object"  # SOREC records name no category unless they carry "category"


class LabelSpace:
    """Category names -> contiguous 0-based labels, in order of first appearance."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._index: dict[str, int] = {}
        for name in names:
            self.index(name)

    def index(self, name: str) -> int:
        return self._index.setdefault(name, len(self._index))

    @property
    def names(self) -> list[str]:
        return list(self._index)

    def __len__(self) -> int:
        return len(self._index)


def _relabel(samples: list[ImageSample], names: list[str], labels: LabelSpace) -> list[ImageSample]:
    """Labels indexing a source's own ``names`` -> indices of the shared ``labels``."""
    # Every category of the file enters the space (not only the used ones), so that
    # the same file always yields the same indices.
    mapping = [labels.index(n) for n in names]
    for s in samples:
        s.labels = [mapping[k] for k in s.labels]
    return samples


def _check_box(r: _Reader, box: list[float], width: int, height: int, where: str) -> None:
    x, y, w, h = box
    if w <= 0 or h <= 0:
        raise r.fail(where, f"box {box} has a non-positive width/height")
    if x < -EDGE_SLACK_PX or y < -EDGE_SLACK_PX or x + w > width + EDGE_SLACK_PX or y + h > height + EDGE_SLACK_PX:
        raise r.fail(where, f"box {box} lies outside its {width}x{height} image")


def _image_root(images: str | Path | None, annotations: Path) -> Path:
    """Absolute image root, resolved once: resolving each of 100k image paths costs tens of seconds."""
    return (Path(images) if images is not None else annotations.parent).resolve()


def _image_path(root: Path, name: str) -> str:
    return os.path.normpath(os.path.join(root, name))


def _check_file(r: _Reader, path: str, where: str) -> None:
    if not os.path.isfile(path):
        raise r.fail(where, f"image file not found: {path}")


def _check_samples(r: _Reader, samples: list[ImageSample]) -> None:
    """Boxes and files of already-assembled samples (formats loaded elsewhere)."""
    for s in samples:
        _check_file(r, s.path, f"image {s.image_id!r}")
        for k, box in enumerate(s.boxes):
            ann = f" (ann_id {s.ann_ids[k]})" if k < len(s.ann_ids) else ""
            _check_box(r, box, s.width, s.height, f"image {s.image_id!r}: box {k}{ann}")


# ---------------------------------------------------------------- synthetic / REIRCOCO


def load_synthetic_source(
    root: str | Path, *, split: str = "train", labels: LabelSpace | None = None
) -> list[ImageSample]:
    """The synthetic benchmark directory (``reir synth --out``): the ``load_samples`` join."""
    if split not in SPLITS:
        raise ValueError(f"{root}: unknown split {split!r} of the synthetic benchmark; expected one of {SPLITS}")
    root = Path(root)
    coco = root / f"instances_{split}.json"
    return load_reircoco_source(root / "reircoco.json", instances=coco if coco.exists() else None, images=root,
                                split=split, labels=labels)


def load_reircoco_source(
    path: str | Path, *, instances: str | Path | None = None, images: str | Path | None = None,
    split: str = "train", labels: LabelSpace | None = None,
) -> list[ImageSample]:
    """A REIRCOCO json joined with its COCO instances file: every image and box of that
    file (images without an entry of ``split`` as detection-only samples); without one,
    the entries' images and ``det_anno``. ``file_name``s are relative to ``images``
    (default: the json's folder)."""
    path = Path(path)
    r = _Reader(path)
    if not path.is_file():
        raise r.fail("path", "file not found")
    image_root = _image_root(images, path)
    every = load_reircoco(path)
    entries = [e for e in every if e.split == split]
    if not entries:  # a typo'd split would otherwise train on no expression at all
        raise r.fail("split", f"no entries of split {split!r}; the file has {sorted({e.split for e in every})}")
    samples, names = join_reircoco(path, entries, Path(instances) if instances is not None else None, image_root)
    _check_samples(r, samples)
    return _relabel(samples, names, labels if labels is not None else LabelSpace())


# ---------------------------------------------------------------- refer-style RefCOCO / + / g


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles lists, dicts, tuples, strings and numbers only: a pickle that names any
    global (a class, or a callable like ``os.system``) could run code when loaded."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused to load global {module}.{name}: only plain containers are allowed")


def _repair_utf8(value: Any) -> Any:
    """Python-2 ``str`` read as latin-1 -> the UTF-8 text it held."""
    if isinstance(value, str):
        try:
            return value.encode("latin-1").decode("utf-8")
        except UnicodeError:
            return value
    if isinstance(value, list):
        return [_repair_utf8(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_repair_utf8(v) for v in value)
    if isinstance(value, dict):
        return {_repair_utf8(k): _repair_utf8(v) for k, v in value.items()}
    return value


def load_plain_pickle(path: str | Path) -> Any:
    """A pickle of plain containers (refer's ``refs(*).p``, Python-2 era ones included)."""
    raw = Path(path).read_bytes()
    try:
        try:
            return _PlainUnpickler(io.BytesIO(raw)).load()
        except UnicodeDecodeError:
            return _repair_utf8(_PlainUnpickler(io.BytesIO(raw), encoding="latin1").load())
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as err:
        raise ValueError(f"{path}: not a pickle of plain lists/dicts ({err})") from err


def _refer_refs(r: _Reader, data: Any, split: str) -> list[tuple[int, dict[str, Any]]]:
    """``(record index, ref)`` of ``split``, every field the loader reads checked."""
    if not isinstance(data, list):
        raise r.fail("top level", f"expected a list of refs, got {type(data).__name__}")
    out = []
    for k, ref in enumerate(data):
        where = f"refs[{k}]"
        for key in ("ref_id", "ann_id", "image_id"):
            r.get(ref, key, int, where)
        if r.get(ref, "split", str, where) != split:
            continue
        for j, sent in enumerate(r.get(ref, "sentences", list, where)):
            r.get(sent, "sent", str, f"{where}.sentences[{j}]")
        out.append((k, ref))
    if not out:
        raise r.fail("split", f"no refs of split {split!r}; the file has {sorted({d['split'] for d in data})}")
    return out


def load_refer_source(
    path: str | Path, *, instances: str | Path | None = None, images: str | Path | None = None,
    split: str = "train", labels: LabelSpace | None = None,
) -> list[ImageSample]:
    """RefCOCO / RefCOCO+ / RefCOCOg in the refer layout: ``refs(unc|umd|google).p`` joined
    with ``instances.json`` (default: beside the pickle; read through pycocotools).

    Every box of a referred image goes in (crowd regions only when referred); the referred
    ones carry their sentences' ``sent``. ``images`` holds the COCO ``file_name``s
    (default: the pickle's folder). ``split``: train, val, test, testA or testB.
    """
    path = Path(path)
    r = _Reader(path)
    if split not in REFER_SPLITS:
        raise r.fail("split", f"unknown split {split!r}; expected one of {REFER_SPLITS}")
    if not path.is_file():
        raise r.fail("path", "file not found")
    inst_path = Path(instances) if instances is not None else path.parent / "instances.json"
    coco = load_coco(inst_path)
    ri = _Reader(inst_path)
    image_root = _image_root(images, path)
    refs = _refer_refs(r, load_plain_pickle(path), split)
    cats = sorted(coco.cats.values(), key=lambda c: c["id"])
    cat_index = {c["id"]: k for k, c in enumerate(cats)}
    by_image: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for k, ref in refs:
        ann = coco.anns.get(ref["ann_id"])
        if ann is None:
            raise r.fail(f"refs[{k}]", f"field 'ann_id' {ref['ann_id']} is not an annotation of {inst_path}")
        if ann["image_id"] != ref["image_id"]:
            raise r.fail(f"refs[{k}]", f"field 'ann_id' {ref['ann_id']} belongs to image {ann['image_id']}, "
                                       f"not to image_id {ref['image_id']}")
        by_image.setdefault(ref["image_id"], []).append((k, ref))
    samples = []
    for image_id in sorted(by_image):
        img = coco.imgs[image_id]  # present: the annotation above names it
        sample = ImageSample(str(image_id), _image_path(image_root, img["file_name"]), img["width"], img["height"],
                             scene=scene_label(img))
        _check_file(r, sample.path, f"image_id {image_id}")
        referred = {ref["ann_id"] for _, ref in by_image[image_id]}
        for ann_id in sorted(coco.getAnnIds(imgIds=[image_id])):
            ann = coco.anns[ann_id]
            if ann.get("iscrowd") and ann_id not in referred:
                continue
            if ann["category_id"] not in cat_index:
                raise ri.fail(f"annotation id {ann_id}", f"field 'category_id' {ann['category_id']} is not in 'categories'")
            box = [float(v) for v in ann["bbox"]]
            _check_box(ri, box, sample.width, sample.height, f"annotation id {ann_id}")
            sample.boxes.append(box)
            sample.labels.append(cat_index[ann["category_id"]])
            sample.ann_ids.append(ann_id)
        for _, ref in sorted(by_image[image_id], key=lambda kr: kr[1]["ref_id"]):
            index = sample.ann_ids.index(ref["ann_id"])
            sample.refs += [(s["sent"], index) for s in ref["sentences"]]
        samples.append(sample)
    return _relabel(samples, [str(c["name"]) for c in cats], labels if labels is not None else LabelSpace())


# ---------------------------------------------------------------- SOREC


def _image_size(r: _Reader, rec: dict[str, Any], path: str, where: str) -> tuple[int, int]:
    if "width" in rec or "height" in rec:
        return r.get(rec, "width", int, where), r.get(rec, "height", int, where)
    try:
        with Image.open(path) as img:  # reads the header only
            return img.size
    except OSError as err:
        raise r.fail(where, f"cannot read the size of {path} ({err})") from err


def load_sorec_source(
    path: str | Path, *, images: str | Path | None = None, labels: LabelSpace | None = None
) -> list[ImageSample]:
    """A SOREC json: a list of ``{"image", "bbox": [x, y, w, h], "ref"}`` (optional
    ``width``/``height``, else read from the image header; optional ``category``, else
    "object"). Records of one image make one sample; records with the same box share it.
    ``image`` is relative to ``images`` (default: the json's folder); one file per split."""
    path = Path(path)
    r = _Reader(path)
    data = r.load()
    if not isinstance(data, list):
        raise r.fail("top level", f"expected a list of records, got {type(data).__name__}")
    image_root = _image_root(images, path)
    labels = labels if labels is not None else LabelSpace()
    by_image: dict[str, ImageSample] = {}
    box_index: dict[tuple[str, tuple[float, ...]], int] = {}
    for k, rec in enumerate(data):
        where = f"record[{k}]"
        name = r.get(rec, "image", str, where)
        text = r.get(rec, "ref", str, where)
        box = r.bbox(rec, "bbox", where)
        category = r.get(rec, "category", str, where) if "category" in rec else SOREC_CATEGORY
        sample = by_image.get(name)
        if sample is None:
            file = _image_path(image_root, name)
            _check_file(r, file, where)
            sample = by_image[name] = ImageSample(name, file, *_image_size(r, rec, file, where))
        elif "width" in rec and (rec["width"], rec.get("height")) != (sample.width, sample.height):
            raise r.fail(where, f"image {name!r} was {sample.width}x{sample.height} in an earlier record")
        _check_box(r, box, sample.width, sample.height, where)
        key = (name, tuple(box))
        if key not in box_index:
            box_index[key] = len(sample.boxes)
            sample.boxes.append(box)
            sample.labels.append(labels.index(category))
            sample.ann_ids.append(k)
        sample.refs.append((text, box_index[key]))
    return list(by_image.values())


# ---------------------------------------------------------------- COCO detection


def load_coco_source(
    path: str | Path, *, images: str | Path | None = None, labels: LabelSpace | None = None
) -> list[ImageSample]:
    """COCO detection (an instances json): boxes and labels, no expressions. Crowd regions
    are left out; images without boxes stay (they teach "nothing here"). ``file_name``s
    are relative to ``images`` (default: the json's folder)."""
    path = Path(path)
    r = _Reader(path)
    coco = load_coco(path)
    image_root = _image_root(images, path)
    cats = sorted(coco.cats.values(), key=lambda c: c["id"])
    cat_index = {c["id"]: k for k, c in enumerate(cats)}
    samples: dict[int, ImageSample] = {}
    for k, img in enumerate(coco.dataset["images"]):
        sample = ImageSample(str(img["id"]), _image_path(image_root, img["file_name"]), img["width"], img["height"],
                             scene=scene_label(img))
        _check_file(r, sample.path, f"images[{k}]")
        samples[img["id"]] = sample
    for k, ann in sorted(enumerate(coco.dataset["annotations"]), key=lambda ka: ka[1]["id"]):
        if ann.get("iscrowd"):
            continue
        if ann["category_id"] not in cat_index:
            raise r.fail(f"annotations[{k}]", f"field 'category_id' {ann['category_id']} is not in 'categories'")
        sample = samples[ann["image_id"]]
        box = [float(v) for v in ann["bbox"]]
        _check_box(r, box, sample.width, sample.height, f"annotations[{k}]")
        sample.boxes.append(box)
        sample.labels.append(cat_index[ann["category_id"]])
        sample.ann_ids.append(ann["id"])
    out = sorted(samples.values(), key=lambda s: int(s.image_id))
    return _relabel(out, [str(c["name"]) for c in cats], labels if labels is not None else LabelSpace())


def load_source(
    kind: str, path: str | Path, *, images: str | Path | None = None, instances: str | Path | None = None,
    split: str = "train", labels: LabelSpace | None = None,
) -> list[ImageSample]:
    """Dispatch on ``kind`` (one of :data:`SOURCE_KINDS`). ``split`` selects records of
    synthetic, REIRCOCO and refer files; SOREC and COCO files hold one split each."""
    if kind == "synthetic":
        return load_synthetic_source(path, split=split, labels=labels)
    if kind == "reircoco":
        return load_reircoco_source(path, instances=instances, images=images, split=split, labels=labels)
    if kind == "refcoco":
        return load_refer_source(path, instances=instances, images=images, split=split, labels=labels)
    if kind == "sorec":
        return load_sorec_source(path, images=images, labels=labels)
    if kind == "coco":
        return load_coco_source(path, images=images, labels=labels)
    raise ValueError(f"unknown source kind {kind!r}; expected one of {SOURCE_KINDS}")
