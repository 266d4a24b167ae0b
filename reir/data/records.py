"""REIRCOCO / COCO / discovery files: typed records and strict loaders.

Import these through :mod:`reir.data.formats` (the public face of the package).

The schema is the one of docs/interfaces.md ("Synthetic benchmark on disk"); real
REIRCOCO files follow it too. Loaders fail with a ``ValueError`` that names the
file, the record and the field, because a silently skipped annotation shows up
much later as a mysteriously low recall.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO


@dataclass
class Match:
    image_id: str
    ann_id: int
    bbox: list[float] | None = None  # discovery matches carry their box


@dataclass
class Sentence:
    sent_id: str
    raw: str
    matches: list[Match] = field(default_factory=list)
    program: dict[str, Any] | None = None  # synthetic data: the structured expression
    family: str | None = None  # the phrasing family (template) it was written in; evaluation slices by it


@dataclass
class Annotation:
    ann_id: int
    bbox: list[float]  # x, y, w, h pixels
    category_name: str
    category_id: int
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class RefEntry:
    """One target instance with its sentences and every instance of its image."""

    image_id: str
    file_name: str
    height: int
    width: int
    split: str
    sentences: list[Sentence]
    ref_anno: Annotation
    det_anno: list[Annotation]
    extra: dict[str, Any] = field(default_factory=dict)  # fields outside the contract
    regime: str | None = None  # the scene regime (e.g. dense, sparse) the image was drawn in; a slice


@dataclass
class DiscoveryQuery:
    query_id: str
    raw: str
    split: str
    matches: list[Match]
    program: dict[str, Any] | None = None
    group: int | None = None  # training queries: the negative group (chunk) their matches are complete over


class _Reader:
    """Typed field access that reports ``file: where: field`` on errors."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def fail(self, where: str, message: str) -> ValueError:
        return ValueError(f"{self.path}: {where}: {message}")

    def get(self, obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(obj, dict):
            raise self.fail(where, f"expected an object, got {type(obj).__name__}")
        if key not in obj:
            raise self.fail(where, f"missing field '{key}'")
        value = obj[key]
        # bool is an int subclass; a boolean id or size is always a mistake
        if isinstance(value, bool) or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self.fail(where, f"field '{key}' should be {names}, got {value!r:.60}")
        return value

    def bbox(self, obj: Any, key: str, where: str) -> list[float]:
        box = self.get(obj, key, list, where)
        if len(box) != 4 or not {type(v) for v in box} <= {int, float}:  # type(): rejects bool
            raise self.fail(where, f"field '{key}' should be 4 numbers [x, y, w, h], got {box!r:.60}")
        if box[2] < 0 or box[3] < 0:
            raise self.fail(where, f"field '{key}' has a negative width/height: {box}")
        return [float(v) for v in box]

    def load(self) -> Any:
        try:
            with open(self.path) as f:
                return json.load(f)
        except json.JSONDecodeError as err:
            raise self.fail("json", f"not valid JSON ({err})") from err


def _ann_id(r: _Reader, obj: Any, where: str, key: str = "ann_id") -> int:
    value = r.get(obj, key, (int, str), where)
    if isinstance(value, str):
        if not value.isdigit():
            raise r.fail(where, f"field '{key}' should be an integer id, got {value!r}")
        value = int(value)
    return value


def _match(r: _Reader, obj: Any, where: str, need_bbox: bool = False) -> Match:
    has_bbox = need_bbox or (isinstance(obj, dict) and "bbox" in obj)
    bbox = r.bbox(obj, "bbox", where) if has_bbox else None
    return Match(str(r.get(obj, "image_id", (str, int), where)), _ann_id(r, obj, where), bbox)


def _annotation(r: _Reader, obj: Any, where: str) -> Annotation:
    attributes = obj.get("attributes", {}) if isinstance(obj, dict) else {}
    return Annotation(
        ann_id=_ann_id(r, obj, where),
        bbox=r.bbox(obj, "bbox", where),
        category_name=r.get(obj, "category_name", str, where),
        category_id=r.get(obj, "category_id", int, where),
        attributes=dict(attributes),
    )


def _optional(r: _Reader, obj: Any, key: str, kind: type, where: str) -> Any:
    """``obj[key]`` when present and not null (type-checked), else None."""
    if not isinstance(obj, dict) or obj.get(key) is None:
        return None
    return r.get(obj, key, kind, where)


def _sentence(r: _Reader, obj: Any, where: str) -> Sentence:
    # Absent matches (older files, plain REC data): the entry's referent is the one target.
    matches = r.get(obj, "matches", list, where) if isinstance(obj, dict) and "matches" in obj else []
    return Sentence(
        sent_id=str(r.get(obj, "sent_id", (str, int), where)),
        raw=r.get(obj, "raw", str, where),
        matches=[_match(r, m, f"{where}.matches[{k}]") for k, m in enumerate(matches)],
        program=obj.get("program"),
        family=_optional(r, obj, "family", str, where),
    )


_ENTRY_KEYS = {"image_id", "file_name", "height", "width", "split", "sentences", "ref_anno", "det_anno", "regime"}


def _entry(r: _Reader, obj: Any, where: str) -> RefEntry:
    split = r.get(obj, "split", str, where)
    sentences = r.get(obj, "sentences", list, where)
    dets = r.get(obj, "det_anno", list, where)
    return RefEntry(
        image_id=str(r.get(obj, "image_id", (str, int), where)),
        file_name=r.get(obj, "file_name", str, where),
        height=r.get(obj, "height", int, where),
        width=r.get(obj, "width", int, where),
        split=split,
        sentences=[_sentence(r, s, f"{where}.sentences[{k}]") for k, s in enumerate(sentences)],
        ref_anno=_annotation(r, r.get(obj, "ref_anno", dict, where), f"{where}.ref_anno"),
        det_anno=[_annotation(r, d, f"{where}.det_anno[{k}]") for k, d in enumerate(dets)],
        extra={k: v for k, v in obj.items() if k not in _ENTRY_KEYS},
        regime=_optional(r, obj, "regime", str, where),
    )


def load_reircoco(path: str | Path) -> list[RefEntry]:
    """Read a REIRCOCO json (a list of ref entries)."""
    r = _Reader(path)
    data = r.load()
    if not isinstance(data, list):
        raise r.fail("top level", f"expected a list of ref entries, got {type(data).__name__}")
    return [_entry(r, e, f"entry[{k}]") for k, e in enumerate(data)]


def _anno_dict(a: Annotation) -> dict[str, Any]:
    out = {"ann_id": a.ann_id, "bbox": a.bbox, "category_name": a.category_name, "category_id": a.category_id}
    if a.attributes:
        out["attributes"] = a.attributes
    return out


def _sentence_dict(s: Sentence) -> dict[str, Any]:
    out: dict[str, Any] = {"sent_id": s.sent_id, "raw": s.raw, "matches": [_match_dict(m) for m in s.matches]}
    if s.program is not None:
        out["program"] = s.program
    if s.family is not None:
        out["family"] = s.family
    return out


def _match_dict(m: Match) -> dict[str, Any]:
    out: dict[str, Any] = {"image_id": m.image_id, "ann_id": m.ann_id}
    if m.bbox is not None:
        out["bbox"] = m.bbox
    return out


def entry_to_dict(e: RefEntry) -> dict[str, Any]:
    regime = {"regime": e.regime} if e.regime is not None else {}
    return {
        "image_id": e.image_id, "file_name": e.file_name, "height": e.height, "width": e.width,
        "split": e.split, **e.extra, **regime,
        "sentences": [_sentence_dict(s) for s in e.sentences],
        "ref_anno": _anno_dict(e.ref_anno), "det_anno": [_anno_dict(a) for a in e.det_anno],
    }


def save_reircoco(path: str | Path, entries: list[RefEntry]) -> None:
    Path(path).write_text(json.dumps([entry_to_dict(e) for e in entries], separators=(",", ":")))


def validate_coco(path: str | Path) -> dict[str, Any]:
    """Check the fields pycocotools and our loaders rely on; returns the parsed json."""
    r = _Reader(path)
    data = r.load()
    for key in ("images", "annotations", "categories"):
        r.get(data, key, list, "top level")
    image_ids = set()
    for k, img in enumerate(data["images"]):
        image_ids.add(r.get(img, "id", int, f"images[{k}]"))
        r.get(img, "file_name", str, f"images[{k}]")
        r.get(img, "width", int, f"images[{k}]")
        r.get(img, "height", int, f"images[{k}]")
    for k, cat in enumerate(data["categories"]):
        r.get(cat, "id", int, f"categories[{k}]")
        r.get(cat, "name", str, f"categories[{k}]")
    for k, ann in enumerate(data["annotations"]):
        where = f"annotations[{k}]"
        r.get(ann, "id", int, where)
        r.get(ann, "category_id", int, where)
        r.bbox(ann, "bbox", where)
        if r.get(ann, "image_id", int, where) not in image_ids:
            raise r.fail(where, f"field 'image_id' {ann['image_id']} is not in 'images'")
    return data


def load_coco(path: str | Path) -> COCO:
    """A pycocotools ``COCO`` for ``path`` after validating it (pycocotools' own
    errors are bare KeyErrors); its chatter on stdout is silenced."""
    data = validate_coco(path)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_discovery(root_or_path: str | Path) -> list[DiscoveryQuery]:
    """Discovery queries from ``DIR/discovery.json`` (or the file itself)."""
    path = Path(root_or_path)
    r = _Reader(path / "discovery.json" if path.is_dir() else path)
    data = r.load()
    queries = r.get(data, "queries", list, "top level")
    out = []
    for k, q in enumerate(queries):
        where = f"queries[{k}]"
        matches = r.get(q, "matches", list, where)
        out.append(DiscoveryQuery(
            query_id=str(r.get(q, "query_id", (str, int), where)),
            raw=r.get(q, "raw", str, where),
            split=q.get("split", "test") if isinstance(q, dict) else "test",
            matches=[_match(r, m, f"{where}.matches[{j}]", need_bbox=True) for j, m in enumerate(matches)],
            program=q.get("program"),
            group=r.get(q, "group", int, where) if isinstance(q, dict) and "group" in q else None,
        ))
    return out
