"""BR@k per slice of the queries: phrasing family, scene regime, objects per image, held-out vs seen.

One overall BR@k hides what a benchmark built to test generalisation asks: a model that
memorised its training phrasings (or scene regimes) scores well on them and badly on the
families held out of training. The synthetic benchmark records a sentence's ``family`` and
an image's ``regime``, and its meta.json names the held-out ones
(``phrasing.heldout_families``, ``regimes.heldout``; older benchmarks have neither, and then
there are no held-out/seen summary rows). Crowded images are harder (more look-alikes), so
queries are also bucketed by the number of annotated objects in their own image.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from reir.data.formats import Query
from reir.evaluation.metrics import Prediction, box_recall_at_k, br_key

SLICE_KS = (1, 5, 10)
SLICE_TAU = 0.5
SLICE_DIMENSIONS = ("family", "regime")
# (lowest, highest or None, label) of the objects-per-image buckets
OBJECT_BUCKETS: tuple[tuple[int, int | None, str], ...] = ((1, 4, "1-4"), (5, 8, "5-8"), (9, 12, "9-12"),
                                                           (13, None, "13+"))
QUERIES = "queries"


def heldout_from_meta(meta: Mapping[str, Any]) -> dict[str, list[str]]:
    """``{"family": [...], "regime": [...]}`` from a benchmark's meta.json; a key only when the
    benchmark names its held-out values (so an old benchmark gets no summary rows)."""
    out: dict[str, list[str]] = {}
    families = (meta.get("phrasing") or {}).get("heldout_families")
    if families is not None:
        out["family"] = [str(f) for f in families]
    regimes = (meta.get("regimes") or {}).get("heldout")
    if regimes is not None:
        out["regime"] = [str(r) for r in regimes]
    return out


def read_heldout(*folders: Path | None) -> dict[str, list[str]]:
    """:func:`heldout_from_meta` of the first ``meta.json`` found in ``folders`` (none: ``{}``)."""
    for folder in folders:
        if folder is not None and (Path(folder) / "meta.json").is_file():
            return heldout_from_meta(json.loads((Path(folder) / "meta.json").read_text()))
    return {}


def objects_bucket(count: int) -> str | None:
    """The bucket label of an image with ``count`` annotated objects (None: unknown, 0)."""
    for low, high, label in OBJECT_BUCKETS:
        if count >= low and (high is None or count <= high):
            return label
    return None


def has_slices(queries: Sequence[Query]) -> bool:
    """Whether any query carries a family or a regime (what makes the slice table worth printing)."""
    return any(getattr(q, dim) is not None for q in queries for dim in SLICE_DIMENSIONS)


def _groups(queries: Sequence[Query], by: Sequence[str],
            heldout: Mapping[str, Collection[str]]) -> dict[str, list[Query]]:  # fmt: skip
    """Slice name -> its queries, in table order (value slices, then the summary pair per dimension)."""
    groups: dict[str, list[Query]] = {}
    for dim in by:
        if dim not in Query.__dataclass_fields__:
            raise ValueError(f"cannot slice by {dim!r}: queries have no such field")
        values = sorted({str(getattr(q, dim)) for q in queries if getattr(q, dim) is not None})
        for value in values:
            groups[f"{dim}:{value}"] = [q for q in queries if getattr(q, dim) == value]
        if dim in heldout and values:
            held = set(heldout[dim])
            tagged = [q for q in queries if getattr(q, dim) is not None]
            groups[f"in_{dim}"] = [q for q in tagged if getattr(q, dim) not in held]
            groups[f"heldout_{dim}"] = [q for q in tagged if getattr(q, dim) in held]
    for _, _, label in OBJECT_BUCKETS:
        groups[f"objects:{label}"] = [q for q in queries if objects_bucket(q.objects) == label]
    # A query is in the slice of every detail its expression names ("relation", "ordinal", ...).
    for detail in sorted({d for q in queries for d in q.details}):
        groups[f"detail:{detail}"] = [q for q in queries if detail in q.details]
    return groups


def evaluate_slices(
    predictions: Mapping[str, Sequence[Prediction]],
    queries: Sequence[Query],
    by: Sequence[str] = SLICE_DIMENSIONS,
    heldout: Mapping[str, Collection[str]] | None = None,
    *,
    ks: Sequence[int] = SLICE_KS,
    tau: float = SLICE_TAU,
) -> dict[str, dict[str, float]]:
    """``{slice: {"queries": n, "BR@k@tau": recall, ...}}`` for every non-empty slice.

    Slices: ``{dim}:{value}`` per value of each dimension in ``by``; ``in_{dim}`` /
    ``heldout_{dim}`` when ``heldout`` (see :func:`heldout_from_meta`) lists that dimension's
    held-out values; ``objects:{bucket}`` per objects-per-image bucket; ``detail:{name}`` per
    detail a synthetic expression names (a query with two is in both). A query's hits are
    the same as in the overall BR@k (any of its targets).
    """
    out: dict[str, dict[str, float]] = {}
    for name, members in _groups(queries, by, heldout or {}).items():
        if not members:
            continue
        ids = {q.query_id for q in members}
        subset = {qid: preds for qid, preds in predictions.items() if qid in ids}
        recall = box_recall_at_k(subset, {q.query_id: q for q in members}, ks=ks, taus=(tau,))
        out[name] = {QUERIES: len(members), **recall}
    return out


def format_slices(slices: Mapping[str, Mapping[str, float]], *, ks: Sequence[int] = SLICE_KS,
                  tau: float = SLICE_TAU) -> str:  # fmt: skip
    """One table: a row per slice with its query count and BR@k (percent) at IoU >= ``tau``."""
    width = max([len("slice"), *(len(name) for name in slices)])
    head = f"{'slice':<{width}}  {QUERIES:>7}" + "".join(f"{'BR@' + str(k):>7}" for k in ks)
    lines = [head + f"   (IoU>={tau:g})"]
    for name, row in slices.items():
        cells = "".join(f"{100 * row[br_key(k, tau)]:>7.1f}" if br_key(k, tau) in row else f"{'-':>7}" for k in ks)
        lines.append(f"{name:<{width}}  {int(row[QUERIES]):>7}" + cells)
    return "\n".join(lines)
