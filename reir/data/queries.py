"""Evaluation queries: one per REIRCOCO sentence, with every acceptable (image, box) answer.

A sentence's ``matches`` name every instance that satisfies it, possibly in several images
(the synthetic test split's are gallery-wide). Scoring only the entry's own referent would
count a correct answer in another image as a miss, so a :class:`Query` carries all of them
as ``targets``; :mod:`reir.evaluation.metrics` accepts any of them.

A match names its instance by ``ann_id``; its box is looked up, in this order, in the
``det_anno`` / ``ref_anno`` of the entries of that image (the entry's own first), in the
split's COCO instances file, and last in the match's own ``bbox``. A match found nowhere is a
``ValueError`` naming the file, the sentence and the ann_id: a silently dropped target would
show up later as a mysteriously low recall.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reir.data.records import Match, RefEntry, load_reircoco, validate_coco
from reir.data.vocab import COMPARATIVES, ORDINALS

Box = tuple[float, float, float, float]
Target = tuple[str, Box]  # (image_id, [x, y, w, h] pixels)


@dataclass(frozen=True)
class Query:
    """One expression to evaluate.

    ``image_id`` / ``box`` / ``path``: the entry's own image and referent (REC accuracy scores
    the model inside this image). ``targets``: every acceptable (image_id, box), the referent
    included; empty means the referent alone (queries built by hand). ``family`` / ``regime``:
    the slices :func:`reir.evaluation.slices.evaluate_slices` groups by; ``objects``: annotated
    instances in the query's own image (0: unknown).
    """

    query_id: str
    text: str
    image_id: str
    box: Box  # ground truth [x, y, w, h] pixels
    path: str = ""  # absolute path of the ground-truth image ("" when built by hand)
    targets: tuple[Target, ...] = ()
    family: str | None = None
    regime: str | None = None
    objects: int = 0
    details: tuple[str, ...] = ()  # what a synthetic expression names beyond its head (program_details)

    @property
    def ground_truth(self) -> tuple[Target, ...]:
        """Every acceptable (image_id, box): ``targets``, or the referent alone."""
        return self.targets or ((self.image_id, self.box),)


def _box(values: Sequence[float]) -> Box:
    x, y, w, h = (float(v) for v in values)
    return (x, y, w, h)


class _BoxLookup:
    """``(image_id, ann_id) -> box`` from the entries, then (read only when needed) the instances file."""

    def __init__(self, entries: Sequence[RefEntry], instances: Path | None) -> None:
        self.boxes: dict[tuple[str, int], Box] = {}
        for e in entries:
            for a in (e.ref_anno, *e.det_anno):
                self.boxes.setdefault((e.image_id, a.ann_id), _box(a.bbox))
        self.instances = instances
        self._coco: dict[tuple[str, int], Box] | None = None

    def _coco_boxes(self) -> dict[tuple[str, int], Box]:
        if self._coco is None:
            self._coco = {}
            if self.instances is not None and self.instances.is_file():
                data = validate_coco(self.instances)
                keys = {img["id"]: str(img.get("image_key", img["id"])) for img in data["images"]}
                for ann in data["annotations"]:
                    self._coco[(keys[ann["image_id"]], int(ann["id"]))] = _box(ann["bbox"])
        return self._coco

    def find(self, entry: RefEntry, match: Match) -> Box | None:
        if match.image_id == entry.image_id:
            own = next((a for a in entry.det_anno if a.ann_id == match.ann_id), None)
            if own is not None:
                return _box(own.bbox)
        key = (match.image_id, match.ann_id)
        found = self.boxes.get(key) or self._coco_boxes().get(key)
        if found is None and match.bbox is not None:
            found = _box(match.bbox)
        return found


def _targets(path: Path, entry: RefEntry, sent_id: str, matches: Sequence[Match], lookup: _BoxLookup) -> tuple[Target, ...]:
    """The referent, then every match (deduplicated); () when there are no matches."""
    if not matches:
        return ()
    out: dict[Target, None] = {(entry.image_id, _box(entry.ref_anno.bbox)): None}
    for m in matches:
        box = lookup.find(entry, m)
        if box is None:
            where = lookup.instances.name if lookup.instances is not None else "no instances file"
            raise ValueError(
                f"{path}: image_id {entry.image_id!r}: sentence {sent_id!r}: match ann_id {m.ann_id} in image "
                f"{m.image_id!r} has no box (not in that image's det_anno/ref_anno, not in {where}, no bbox)"
            )
        out.setdefault((m.image_id, box), None)
    return tuple(out)


def program_details(program: Mapping[str, Any] | None) -> tuple[str, ...]:
    """What a synthetic expression's program names beyond colour and shape: ``size``,
    ``relation``, ``background``, ``context``, and ``superlative`` / ``ordinal`` /
    ``comparative``; ``("none",)`` for the head alone; ``()`` without a program."""
    if not program:
        return ()
    out = []
    for key in ("size", "relation", "background", "context"):
        if program.get(key) is not None:
            out.append(key)
    sup = program.get("superlative")
    if sup is not None:
        out.append("ordinal" if sup in ORDINALS else "comparative" if sup in COMPARATIVES else "superlative")
    return tuple(out) or ("none",)


def queries_from_reircoco(
    path: str | Path, split: str = "test", *, image_root: str | Path | None = None,
    instances: str | Path | None = None,
) -> list[Query]:  # fmt: skip
    """One :class:`Query` per sentence of ``split`` in the REIRCOCO file ``path``.

    ``image_root``: what ``file_name`` is relative to (default: the file's folder).
    ``instances``: the COCO instances file that resolves match boxes (default:
    ``instances_{split}.json`` beside ``path``, when it exists).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    instances = Path(instances) if instances is not None else path.parent / f"instances_{split}.json"
    entries = load_reircoco(path)
    chosen = [e for e in entries if e.split == split]
    if not chosen and entries:
        raise ValueError(f"{path}: no entries of split {split!r} (splits: {sorted({e.split for e in entries})})")
    lookup = _BoxLookup(entries, instances)
    out: list[Query] = []
    for e in chosen:
        image = str((root / e.file_name).resolve())
        for s in e.sentences:
            out.append(Query(
                s.sent_id, s.raw, e.image_id, _box(e.ref_anno.bbox), image,
                targets=_targets(path, e, s.sent_id, s.matches, lookup),
                family=s.family, regime=e.regime, objects=len(e.det_anno), details=program_details(s.program),
            ))  # fmt: skip
    return out
