"""An exact in-memory vector index over one collection's rows, for :class:`reir.platform.store.MilvusStore`.

milvus-lite's search scans its rows in Python whatever the index (about 0.8 s per query at 1M
rows), while a numpy matmul over the same vectors takes tens of milliseconds. So a searcher
holds (pk, vector) of the live version's rows once, as one contiguous float32 matrix, and the
scalars a :class:`~reir.platform.store.Hit` carries as compact numpy / arrow columns (no
Python object per row), and answers unfiltered searches (the model version's partition, or
the whole collection) exactly: ``vectors @ query``, ``argpartition``, the top-N sorted by score
(row order breaks ties). The answers are the Milvus search path's ``Hit``s, field for field.

float32, not float16: storing float16 halved the matrix but changed the top-100 of 92 % of
random queries at 1M rows (recall@100 0.9998, not 1.0) and numpy's float16 -> float32
conversion made a query 15x slower (measured; docs/query-path.md).

:class:`MemoryIndexManager` keeps one such index current: it loads in the background (a search
meanwhile goes to Milvus), re-reads the collection's change signal (the alias target, and the
row count or milvus-lite's write sequence) every :data:`CHECK_EVERY_S` seconds, as the store
re-reads its layout, and drops and reloads the index when it moved. This module makes no Milvus
call: the rows and the signal come from the store (:class:`RowSource`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import pyarrow as pa

from reir.platform import schema as S

if TYPE_CHECKING:
    from reir.platform.store import Hit

log = logging.getLogger(__name__)

MemoryIndexMode = Literal["auto", "on", "off"]
DEFAULT_MAX_ROWS = 5_000_000
# As the store's Layout (reir.platform.backend.Layout.MAX_AGE_S): how stale an alias move or
# another process's writes may be before a searcher notices them.
CHECK_EVERY_S = 30.0
# Queries scored per matmul: a (queries x rows) float32 block (8 x 1M rows: 32 MB).
_QUERY_BLOCK = 8
# The scalar columns an index holds, and their arrow/numpy types.
STRING_FIELDS = (S.PK, S.IMAGE_ID, S.URI, S.MODEL_VERSION)
FLOAT_FIELDS = (*S.BOX_FIELDS, S.SCORE)
CONTEXT_FLOAT_FIELDS = (S.IMAGE_W, S.IMAGE_H)
INT_FIELDS = (S.N_INSTANCES, S.RANK)
# Inverted lists (AnnSpec): the recall@k the probe count is calibrated for, and the queries.
CALIBRATION_K = 100
CALIBRATION_QUERIES = 64
# Live recall: the last LIVE_QUERIES real queries are kept; at a check with at least
# LIVE_MIN_NEW new ones since the last measure, their recall@100 is measured against exact
# search (in the background) and the probe count raised if it is under the target.
LIVE_QUERIES = 64
LIVE_MIN_NEW = 16


def enabled(mode: MemoryIndexMode, lite: bool) -> bool:
    """``auto``: on for milvus-lite (whose search scans), off for a Milvus server (real ANN indexes)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"memory_index must be auto, on or off, got {mode!r}")
    return mode == "on" or (mode == "auto" and lite)


def index_fields(has_context: bool) -> tuple[str, ...]:
    """The scalar fields an index reads: what :meth:`MilvusStore._to_hit` reads from a search hit."""
    return (*STRING_FIELDS, *FLOAT_FIELDS, *((*CONTEXT_FLOAT_FIELDS, *INT_FIELDS) if has_context else ()))


@dataclass
class Rows:
    """Rows of one scope as the store read them: vectors ``[n, dim]`` float32 and the
    :func:`index_fields` as arrow arrays (strings) or numpy arrays (numbers), row-aligned."""

    vectors: np.ndarray
    columns: dict[str, Any]
    has_context: bool


@dataclass
class Context:
    """One image's stored instances in an index, rank order."""

    rows: np.ndarray
    pks: list[str] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)
    objectness: list[float] = field(default_factory=list)
    vectors: np.ndarray | None = None


@dataclass
class ContextArrays:
    """The re-ranker's context as arrays: every stored instance of ``heads``' images (one hit
    per image: its id, uri, version, size and count), images in ``heads`` order, each image's
    rows in rank order: ``counts [U]`` rows per image, ``pks [n]``, ``boxes [n, 4]`` pixel
    ``[x, y, w, h]``, ``objectness [n]``, ``vectors [n, dim]`` float32. What the in-memory
    index reads for a re-ranked head without a :class:`Hit` per row
    (:meth:`MemoryIndex.context_arrays`); :meth:`hit` makes one row's on demand."""

    heads: list[Hit]
    counts: np.ndarray
    pks: list[str]
    boxes: np.ndarray
    objectness: np.ndarray
    vectors: np.ndarray

    @cached_property
    def _owner_rank(self) -> tuple[list[int], list[int]]:
        """Each row's position in ``heads`` and its rank in its image."""
        owners = np.repeat(np.arange(len(self.heads)), self.counts)
        ranks = np.arange(len(owners)) - np.repeat(np.cumsum(self.counts) - self.counts, self.counts)
        return owners.tolist(), ranks.tolist()

    def hit(self, i: int) -> Hit:
        """Row ``i`` as the store's keyed context holds it (``MilvusStore.context``)."""
        from reir.platform.store import _context_hit

        owners, ranks = self._owner_rank
        return _context_hit(self.heads[owners[i]], ranks[i], S.as_box(self.boxes[i].tolist()), self.objectness[i],
                            self.vectors[i], pk=self.pks[i])  # fmt: skip

    def as_dict(self) -> dict[str, list[Hit]]:
        """``{image_id: [row, ...]}``: what ``MilvusStore.context`` returns for the same hits."""
        owners = self._owner_rank[0]
        out: dict[str, list[Hit]] = {h.image_id: [] for h in self.heads}
        for i, owner in enumerate(owners):
            out[self.heads[owner].image_id].append(self.hit(i))
        return out


@dataclass(frozen=True)
class AnnSpec:
    """When and how an index searches inverted lists instead of every row.

    A scope of ``min_rows`` rows or more is split into about sqrt(rows) lists (``lists`` when
    set) by spherical k-means on a sample; a query scores the lists' centroids and then only
    the rows of the ``nprobe`` best lists, exactly. ``nprobe`` is calibrated at load: the
    smallest count whose recall@100 against the exact answer reaches ``recall`` on
    :data:`CALIBRATION_QUERIES` queries drawn from the rows themselves (half stored vectors,
    half normalized midpoints of two stored vectors, which fall between clusters). Below
    ``min_rows`` (and with ``min_rows`` 0) the index scans every row, and so it does when the
    calibration needs more than ``max_probe_share`` of the lists (rows without structure, as
    random vectors: probing most lists costs more than the scan)."""

    min_rows: int = 200_000
    recall: float = 0.97
    lists: int = 0
    seed: int = 0
    max_probe_share: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.recall <= 1.0:
            raise ValueError(f"recall must be in (0, 1], got {self.recall}")
        if not 0.0 < self.max_probe_share <= 1.0:
            raise ValueError(f"max_probe_share must be in (0, 1], got {self.max_probe_share}")
        if self.min_rows < 0 or self.lists < 0:
            raise ValueError("min_rows and lists must be >= 0")

    def applies(self, rows: int) -> bool:
        return self.min_rows > 0 and rows >= self.min_rows


@dataclass
class InvertedLists:
    """Rows grouped by nearest centroid: list ``l`` holds rows ``offsets[l]:offsets[l+1]``."""

    centroids: np.ndarray  # [lists, dim] float32, unit norm
    offsets: np.ndarray  # [lists + 1] int64
    nprobe: int
    recall: float  # recall@CALIBRATION_K of nprobe on the calibration queries
    build_s: float

    def __len__(self) -> int:
        return len(self.centroids)

    def spans(self, query: np.ndarray, top_n: int) -> list[tuple[int, int]]:
        """Row spans of the lists to scan for ``query``: the calibrated count (scaled by
        ``top_n / CALIBRATION_K`` for longer answers), more while they hold fewer than ``top_n`` rows."""
        total = len(self.centroids)
        want = min(total, self.nprobe * max(1, -(-top_n // CALIBRATION_K)))
        scores = self.centroids @ query
        order = np.argsort(-scores, kind="stable")
        spans, held = [], 0
        for i, lst in enumerate(order.tolist()):
            a, b = int(self.offsets[lst]), int(self.offsets[lst + 1])
            if b > a:
                spans.append((a, b))
                held += b - a
            if i + 1 >= want and held >= top_n:
                break
        return spans


class MemoryIndex:
    """One scope's rows (a partition, or the whole collection when ``partition`` is None),
    searched exactly, or through :class:`InvertedLists` when ``ann`` applies to its size.

    With lists, the rows are stored list by list (the load permutes them once). With the
    per-image columns (``has_context``), it also answers the re-ranker's context of an image
    it returned a hit for (:meth:`context`), so a query makes no Milvus call at all."""

    def __init__(self, rows: Rows, *, partition: str | None, signal: Hashable, target: Hashable = "",
                 ann: AnnSpec | None = None) -> None:  # fmt: skip
        self.partition = partition
        self.signal = signal
        self.target = target  # the collection the rows came from (an alias resolved)
        vectors = np.ascontiguousarray(rows.vectors, dtype=np.float32)
        n = len(vectors)
        cols = rows.columns
        self.lists: InvertedLists | None = None
        built = build_lists(vectors, ann) if ann is not None and ann.applies(n) else None
        # Probing most of the lists costs more than scanning every row (random vectors: no
        # structure to use): then the index stays exact.
        if built is not None and ann is not None and built[0].nprobe <= ann.max_probe_share * len(built[0]):
            self.lists, order = built
            vectors = vectors[order]
            take = pa.array(order, type=pa.int64())
            cols = {f: (_strings(c, n).take(take) if f in STRING_FIELDS else np.asarray(c)[order]) for f, c in cols.items()}
        self.vectors = vectors
        self.has_context = rows.has_context
        # Strings stay arrow arrays (offsets + one buffer); the version is dictionary-encoded.
        self.pk = _strings(cols[S.PK], n)
        self.image_id = _strings(cols[S.IMAGE_ID], n)
        self.uri = _strings(cols[S.URI], n)
        self.model_version = _strings(cols[S.MODEL_VERSION], n).dictionary_encode()
        self.box = np.stack([np.asarray(cols[f], dtype=np.float32) for f in S.BOX_FIELDS], axis=1).reshape(n, 4)
        self.objectness = np.asarray(cols[S.SCORE], dtype=np.float32).reshape(n)
        self.size: np.ndarray | None = None
        self.n_instances: np.ndarray | None = None
        self.rank: np.ndarray | None = None
        self._groups: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        if rows.has_context:
            self.size = np.stack([np.asarray(cols[f], dtype=np.float32) for f in CONTEXT_FLOAT_FIELDS], 1).reshape(n, 2)
            self.n_instances = np.asarray(cols[S.N_INSTANCES], dtype=np.int64).reshape(n)
            self.rank = np.asarray(cols[S.RANK], dtype=np.int32).reshape(n)
            self._groups = _image_groups(self.image_id, self.model_version, self.rank)

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def nbytes(self) -> int:
        arrays = [self.vectors, self.box, self.objectness, self.size, self.n_instances, self.rank,
                  *(self._groups or ()), *((self.lists.centroids, self.lists.offsets) if self.lists else ())]
        strings = [self.pk, self.image_id, self.uri, self.model_version]
        return sum(a.nbytes for a in arrays if a is not None) + sum(s.nbytes for s in strings)

    def search(self, queries: np.ndarray, top_n: int) -> list[list[Hit]]:
        """The top ``top_n`` rows by inner product for each (normalized) query, best first:
        exact over every row, or over the probed lists' rows."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        total = len(self)
        n = min(top_n, total)
        if n <= 0:
            return [[] for _ in queries]
        if self.lists is not None:
            return [self._search_lists(q, n) for q in queries]
        out: list[list[Hit]] = []
        for start in range(0, len(queries), _QUERY_BLOCK):
            block = queries[start : start + _QUERY_BLOCK]
            sims = block @ self.vectors.T if len(block) > 1 else (self.vectors @ block[0])[None, :]
            for s in sims:
                out.append(self._best(np.arange(total), s, n))
        return out

    def _search_lists(self, query: np.ndarray, n: int) -> list[Hit]:
        assert self.lists is not None
        spans = self.lists.spans(query, n)
        rows = np.concatenate([np.arange(a, b) for a, b in spans])
        sims = np.concatenate([self.vectors[a:b] @ query for a, b in spans])
        return self._best(rows, sims, min(n, len(rows)))

    def _best(self, rows: np.ndarray, sims: np.ndarray, n: int) -> list[Hit]:
        total = len(rows)
        top = np.argpartition(sims, total - n)[total - n :] if n < total else np.arange(total)
        top = top[np.lexsort((rows[top], -sims[top]))]  # best first; the row order breaks ties
        return self._hits(rows[top], sims[top])

    def contexts(self, hits: list[Hit], *, float16: bool) -> dict[int, Context]:
        """For each of ``hits`` (hits this index returned; position in the list -> Context):
        every stored instance of its image, rank order, as the store's keyed context fetch reads
        them (``float16``: vectors rounded as the packed context stores them). Hits that are not
        this index's (the row holds another pk: it reloaded) or whose image's ranks
        0..n_instances-1 are not all here are left out (the store reads them from Milvus)."""
        found = self._context_rows(hits)
        if found is None:
            return {}
        both, counts, valid = found
        pks = self.pk.take(pa.array(both, type=pa.int64())).to_pylist()
        boxes, objectness = self.box[both].tolist(), self.objectness[both].tolist()
        vectors = self._vectors(both, float16)
        ends = np.cumsum(counts * valid)
        out: dict[int, Context] = {}
        for i in np.flatnonzero(valid).tolist():
            a, b = int(ends[i] - counts[i]), int(ends[i])
            out[i] = Context(both[a:b], pks[a:b], boxes[a:b], objectness[a:b], vectors[a:b])
        return out

    def context_arrays(self, heads: list[Hit], *, float16: bool) -> ContextArrays | None:
        """Every stored instance of the images of ``heads`` (one hit per image) as flat arrays,
        or None unless this index holds all of them (see :meth:`contexts`): the re-ranker's
        input without a Python object per row."""
        found = self._context_rows(heads)
        if found is None or not bool(found[2].all()):
            return None
        both, counts, _ = found
        return ContextArrays(heads, counts, self.pk.take(pa.array(both, type=pa.int64())).to_pylist(), self.box[both],
                             self.objectness[both], self._vectors(both, float16))  # fmt: skip

    def _vectors(self, rows: np.ndarray, float16: bool) -> np.ndarray:
        vectors = self.vectors[rows]
        return vectors.astype(np.float16).astype(np.float32) if float16 else vectors

    def _context_rows(self, hits: list[Hit]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(the index rows of the valid hits' images, flat, ``[sum counts]``; the row count of
        each hit's image ``[len(hits)]``; which hits are valid ``[len(hits)]``), or None when
        the index has no image groups.

        One pass of array operations for all the hits (a re-ranked head has ~50 images): image
        ``i``'s rows are the ``n_i`` positions of the group order from its group's start, valid
        when they hold its key with ranks ``0..n_i-1``."""
        if self._groups is None or self.rank is None or not hits:
            return None
        keys, order, start = self._groups
        rows = np.asarray([h.row for h in hits], dtype=np.int64)
        ok = (rows >= 0) & (rows < len(self))
        rows = np.where(ok, rows, 0)
        pks = self.pk.take(pa.array(rows)).to_pylist()
        ok &= np.asarray([pk == h.pk for pk, h in zip(pks, hits, strict=True)], dtype=bool)
        counts = np.where(ok, np.maximum(np.asarray([h.n_instances for h in hits], dtype=np.int64), 0), 0)
        owner = np.repeat(np.arange(len(hits)), counts)  # the hit each wanted row belongs to
        within = np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)  # its rank
        at = start[rows][owner] + within
        inside = at < len(order)
        found = order[np.where(inside, at, 0)]
        good = inside & (keys[found] == keys[rows][owner]) & (self.rank[found] == within)
        valid = ok & (counts > 0) & (np.bincount(owner[~good], minlength=len(hits)) == 0)
        return found[valid[owner]], counts, valid  # one read of each column for every image

    def _hits(self, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
        from reir.platform.store import Hit

        take = pa.array(rows, type=pa.int64())
        pk, image_id, uri = (a.take(take).to_pylist() for a in (self.pk, self.image_id, self.uri))
        version = self.model_version.take(take).to_pylist()
        boxes = self.box[rows].tolist()
        objectness = self.objectness[rows].tolist()
        sizes = self.size[rows].tolist() if self.size is not None else None
        counts = self.n_instances[rows].tolist() if self.n_instances is not None else None
        hits = []
        for j, (row, score) in enumerate(zip(rows.tolist(), scores.tolist())):
            w, h = sizes[j] if sizes is not None else (0.0, 0.0)
            hits.append(Hit(
                pk=pk[j], image_id=image_id[j], uri=uri[j], box=S.as_box(boxes[j]), score=score,
                instance_score=objectness[j], model_version=version[j],
                image_size=(w, h) if w > 0 and h > 0 else None, n_instances=counts[j] if counts is not None else 0,
                row=row,
            ))  # fmt: skip
        return hits


def _image_groups(image_id: pa.Array, version: pa.DictionaryArray,
                  rank: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Rows grouped by (image, version), rank order within: (key of each row, the rows in
    group order, and each row's position of its group's first row in that order), so a row's
    group is an array lookup away."""
    images = image_id.dictionary_encode()
    codes = np.asarray(images.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    versions = np.asarray(version.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    keys = codes * max(1, len(version.dictionary)) + versions
    order = np.lexsort((rank, keys))
    sorted_keys = keys[order]
    return keys, order, np.searchsorted(sorted_keys, keys, "left")


def build_lists(vectors: np.ndarray, spec: AnnSpec) -> tuple[InvertedLists, np.ndarray]:
    """Spherical k-means lists over ``vectors`` (unit rows) and the row permutation that
    stores them list by list; the probe count calibrated as :class:`AnnSpec` says."""
    start = time.monotonic()
    n = len(vectors)
    rng = np.random.default_rng(spec.seed)
    count = spec.lists or math.isqrt(n)
    count = max(1, min(count, n))
    sample = vectors[np.sort(rng.choice(n, size=min(n, 64 * count), replace=False))]
    centroids = _kmeans(sample, count, rng)
    labels = _nearest(vectors, centroids)
    order = np.argsort(labels, kind="stable")
    offsets = np.zeros(count + 1, np.int64)
    np.cumsum(np.bincount(labels, minlength=count), out=offsets[1:])
    nprobe, recall = _calibrate(vectors, labels, centroids, spec.recall, rng)
    lists = InvertedLists(centroids=centroids, offsets=offsets, nprobe=nprobe, recall=recall,
                          build_s=time.monotonic() - start)  # fmt: skip
    log.info("memory index: %d rows in %d lists, nprobe %d (recall@%d %.3f on calibration queries), %.1f s%s",
             n, count, nprobe, CALIBRATION_K, recall, lists.build_s,
             "; over max_probe_share: no structure to use, every row is scanned"
             if nprobe > spec.max_probe_share * count else "")  # fmt: skip
    return lists, order


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _nearest(vectors: np.ndarray, centroids: np.ndarray, block: int = 16_384) -> np.ndarray:
    return np.concatenate([np.argmax(vectors[i : i + block] @ centroids.T, axis=1)
                           for i in range(0, len(vectors), block)]).astype(np.int64)  # fmt: skip


def _kmeans(sample: np.ndarray, count: int, rng: np.random.Generator, iterations: int = 10) -> np.ndarray:
    centroids = sample[rng.choice(len(sample), size=count, replace=False)].copy()
    for _ in range(iterations):
        labels = _nearest(sample, centroids)
        sums = np.zeros_like(centroids)
        _sum_by_label(sums, labels, sample)
        empty = np.flatnonzero(np.bincount(labels, minlength=count) == 0)
        sums[empty] = sample[rng.choice(len(sample), size=len(empty), replace=False)]
        centroids = _unit(sums)
    return centroids


def _sum_by_label(out: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> None:
    order = np.argsort(labels, kind="stable")
    present, starts = np.unique(labels[order], return_index=True)
    out[present] = np.add.reduceat(rows[order], starts, axis=0)


def _live_recall(vectors: np.ndarray, lists: InvertedLists, queries: np.ndarray,
                 target: float) -> tuple[float, int]:  # fmt: skip
    """Recall@k of ``lists`` (rows stored list by list) on ``queries``, and the probe count
    those queries need for ``target``."""
    labels = np.repeat(np.arange(len(lists)), np.diff(lists.offsets))
    pos = _probe_positions(vectors, labels, lists.centroids, queries)
    return float((pos < lists.nprobe).mean()), _needed_probe(pos, target)


def _calibrate(vectors: np.ndarray, labels: np.ndarray, centroids: np.ndarray, target: float,
               rng: np.random.Generator) -> tuple[int, float]:  # fmt: skip
    """The smallest probe count whose mean recall@k on the calibration queries reaches ``target``."""
    n = len(vectors)
    half = CALIBRATION_QUERIES // 2
    stored = vectors[rng.choice(n, size=half)]
    between = _unit(vectors[rng.choice(n, size=half)] + vectors[rng.choice(n, size=half)])
    queries = np.concatenate([stored, between])
    pos = _probe_positions(vectors, labels, centroids, queries)
    probe = _needed_probe(pos, target)
    return probe, float((pos < probe).mean())


def _needed_probe(pos: np.ndarray, target: float) -> int:
    """The smallest probe count that scans a ``target`` share of the true neighbours."""
    need = max(1, int(np.ceil(target * len(pos))))
    return int(pos[need - 1]) + 1  # the need-th smallest position is then scanned


def _probe_positions(vectors: np.ndarray, labels: np.ndarray, centroids: np.ndarray,
                     queries: np.ndarray) -> np.ndarray:  # fmt: skip
    """Sorted, for every query's exact top-k rows: the position of the row's list in that
    query's list order (0 = the best list), so recall@k at probe count p is ``mean(pos < p)``."""
    n, count = len(vectors), len(centroids)
    k = min(CALIBRATION_K, n)
    positions = []  # per query: the probe position (0 = best list) of each true neighbour's list
    for start in range(0, len(queries), 16):
        block = queries[start : start + 16]
        sims = vectors @ block.T  # [n, 16]
        for j, q in enumerate(block):
            truth = np.argpartition(sims[:, j], n - k)[n - k :]
            place = np.empty(count, np.int64)
            place[np.argsort(-(centroids @ q), kind="stable")] = np.arange(count)
            positions.append(place[labels[truth]])
    return np.sort(np.concatenate(positions))


def _strings(values: Any, n: int) -> pa.Array:
    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if not isinstance(arr, pa.Array):
        arr = pa.array(list(arr), type=pa.large_string())
    arr = arr.cast(pa.large_string())
    if len(arr) != n:
        raise ValueError(f"column of {len(arr)} values for {n} rows")
    return arr


class RowSource(Protocol):
    """What the manager needs from the store (every Milvus call stays in the store)."""

    def memory_target(self) -> str:
        """The collection the store's name resolves to now (cheap: asked at every search)."""
        ...

    def memory_signal(self, partition: str | None) -> tuple[Hashable, ...]:
        """A value that changes when the scope's rows may have: the collection the name resolves
        to (first: an alias moved) and its row count or write sequence."""
        ...

    def memory_rows(self, partition: str | None, max_rows: int) -> Rows | None:
        """Every live row of the scope, or None when there are more than ``max_rows``."""
        ...


@dataclass
class MemoryIndexStatus:
    """What the manager holds and has done (``MilvusStore.memory_index.status()``)."""

    rows: int = 0
    partition: str | None = None
    load_s: float = 0.0
    mb: float = 0.0
    loads: int = 0
    answered: int = 0  # searches answered from memory
    passed: int = 0  # unfiltered searches that went to Milvus (no index, another scope, loading)
    over_max_rows: bool = False  # the last scope asked for held more than max_rows: not loaded
    error: str = ""  # the last load's or check's failure ("" after a load)
    lists: int = 0  # inverted lists (0: every row is scanned)
    nprobe: int = 0
    calibrated_recall: float = 1.0  # recall@100 of nprobe on the calibration queries
    contexts: int = 0  # images whose re-rank context came from memory
    live_recall: float | None = None  # recall@100 measured on recent real queries (lists only)
    live_queries: int = 0  # how many queries that measure used


class MemoryIndexManager:
    """Keeps one :class:`MemoryIndex` current for a store (see the module docstring).

    ``search`` answers from the index when it holds the asked scope, else returns None (the
    caller searches Milvus) and has the scope loaded in the background. ``invalidate`` drops
    the index at once (this store wrote or re-read its layout); ``on_change(rows)`` is told the
    rows held after each load or drop (a metric).
    """

    def __init__(self, source: RowSource, *, max_rows: int = DEFAULT_MAX_ROWS, check_every_s: float = CHECK_EVERY_S,
                 on_change: Callable[[int], None] | None = None, name: str = "",
                 ann: AnnSpec | None = None) -> None:  # fmt: skip
        self.source = source
        self.max_rows = max_rows
        self.ann = ann
        self.check_every_s = check_every_s
        self.on_change = on_change
        self.name = name
        self._index: MemoryIndex | None = None
        self._lock = threading.Lock()
        self._generation = 0
        self._checked_at = 0.0
        self._pending: Future[None] | None = None
        self._running = False  # a background task runs (set and cleared under the lock)
        self._queued_load: tuple[str | None] | None = None  # a load asked for while it ran
        self._too_big: tuple[str | None, Hashable] | None = None
        # After a failed load, or a scope over max_rows, no new load before this (monotonic s).
        self._retry_at = 0.0
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reir-memory-index")
        self._status = MemoryIndexStatus()
        self._recent: deque[np.ndarray] = deque(maxlen=LIVE_QUERIES)  # real queries (lists only)
        self._new_queries = 0

    # The query path

    def search(self, queries: np.ndarray, top_n: int, partition: str | None) -> list[list[Hit]] | None:
        index = self._index
        if index is None or index.partition != partition:
            self._status.passed += 1
            if time.monotonic() >= self._retry_at:
                self._schedule(self._load, partition)
            return None
        try:
            target = self.source.memory_target()
        except Exception:  # noqa: BLE001 - the alias is gone: Milvus answers (or says what is wrong)
            target = None
        if target != index.target:
            log.info("memory index %s: the name now resolves to %s, not %s; reloading", self.name, target,
                     index.target)  # fmt: skip
            self.invalidate()
            self._status.passed += 1
            self._schedule(self._load, partition)
            return None
        if time.monotonic() - self._checked_at > self.check_every_s:
            self._schedule(self._check, partition)
        if index.lists is not None:
            for q in np.atleast_2d(queries):
                self._recent.append(np.array(q, dtype=np.float32))
                self._new_queries += 1
        hits = index.search(queries, top_n)
        self._status.answered += 1
        return hits

    def contexts(self, hits: list[Hit], *, float16: bool) -> dict[int, Context]:
        """The re-rank context of the hits' images from the index that returned them (see
        :meth:`MemoryIndex.contexts`); hits left out are read from Milvus by the store."""
        index = self._index
        found = index.contexts(hits, float16=float16) if index is not None else {}
        self._status.contexts += len(found)
        return found

    def context_arrays(self, heads: list[Hit], *, float16: bool) -> ContextArrays | None:
        """The heads' images' rows as arrays from the index that returned them, or None (see
        :meth:`MemoryIndex.context_arrays`)."""
        index = self._index
        found = index.context_arrays(heads, float16=float16) if index is not None else None
        if found is not None:
            self._status.contexts += len(heads)
        return found

    def warm(self, partition: str | None, *, wait: bool = False, timeout: float | None = None) -> None:
        """Load ``partition``'s rows now (in the background unless ``wait``)."""
        self._schedule(self._load, partition)
        if wait:
            self.wait(timeout)

    def wait(self, timeout: float | None = None) -> None:
        """Until the load or check in progress (if any) is done."""
        pending = self._pending
        if pending is not None:
            pending.result(timeout)

    def invalidate(self) -> None:
        """Drop the index now: the next search goes to Milvus and has the scope reloaded."""
        with self._lock:
            self._generation += 1
            dropped = self._index is not None
            self._index = None
            self._too_big = None
            self._retry_at = 0.0
        if dropped:
            self._notify(0)

    def check_soon(self) -> None:
        """Re-read the change signal at the next search."""
        self._checked_at = 0.0

    def status(self) -> MemoryIndexStatus:
        return self._status

    @property
    def index(self) -> MemoryIndex | None:
        return self._index

    def close(self, timeout: float = 10.0) -> None:
        self._closed = True
        self.invalidate()
        pending = self._pending
        self._pool.shutdown(wait=False, cancel_futures=True)
        if pending is not None:
            try:
                pending.result(timeout)
            except (TimeoutError, CancelledError):  # a long load: its rows are dropped when it ends
                log.info("memory index %s: closed while a load was running", self.name)

    # Background tasks (one at a time)

    def _schedule(self, task: Callable[[str | None], None], partition: str | None) -> None:
        """Run ``task`` in the background, one task at a time. A load asked for while another
        task runs (an alias moved during a check) runs right after it, in the same background
        call (``wait`` covers both); anything else asked for meanwhile is dropped."""
        with self._lock:
            if self._closed:
                return
            if self._running:
                if task == self._load:
                    self._queued_load = (partition,)
                return
            self._running = True
            try:
                self._pending = self._pool.submit(self._run, task, partition)
            except RuntimeError:  # shut down
                self._running = False

    def _run(self, task: Callable[[str | None], None], partition: str | None) -> None:
        while True:
            try:
                task(partition)
            except Exception as exc:  # the searches go on through Milvus
                self._retry_at = time.monotonic() + self.check_every_s
                self._status.error = f"{type(exc).__name__}: {exc}"
                if not self._closed:
                    log.exception("memory index %s: %s failed; searches go to Milvus", self.name, task.__name__)
            with self._lock:
                queued, self._queued_load = self._queued_load, None
                if queued is None or self._closed:
                    self._running = False
                    return
            task, partition = self._load, queued[0]

    def _check(self, partition: str | None) -> None:
        index = self._index
        self._checked_at = time.monotonic()  # a failing check is retried after check_every_s too
        signal = self.source.memory_signal(partition)
        if index is not None and index.signal != signal:
            log.info("memory index %s: the collection changed (%s -> %s); reloading", self.name, index.signal, signal)
            self.invalidate()
            self._load(partition)
        elif index is not None and index.lists is not None and self._new_queries >= LIVE_MIN_NEW:
            self.measure_recall(index)

    def recall(self) -> float | None:
        """The index's recall@100 as last known: 1 for an exact scan, the live measure with
        lists (the calibration's before the first), None while no index is loaded."""
        index = self._index
        if index is None:
            return None
        if index.lists is None:
            return 1.0
        live = self._status.live_recall
        return live if live is not None else index.lists.recall

    def measure_recall(self, index: MemoryIndex | None = None) -> float | None:
        """Recall@100 of the lists on the recent real queries against exact search (status
        ``live_recall``); when under the target, the probe count rises to what those queries need."""
        index = index or self._index
        queries = list(self._recent)
        if index is None or index.lists is None or not queries or self.ann is None:
            return None
        self._new_queries = 0
        lists = index.lists
        recall, needed = _live_recall(index.vectors, lists, np.stack(queries), self.ann.recall)
        self._status.live_recall, self._status.live_queries = round(recall, 4), len(queries)
        if needed > lists.nprobe:
            log.warning("memory index %s: recall@%d on %d recent queries %.3f < %.2f with nprobe %d; nprobe -> %d",
                        self.name, CALIBRATION_K, len(queries), recall, self.ann.recall, lists.nprobe, needed)
            lists.nprobe = needed
            self._status.nprobe = needed
        return recall

    def _load(self, partition: str | None) -> None:
        if self._closed:
            return
        current = self._index
        if current is not None and current.partition == partition:
            return
        with self._lock:
            generation = self._generation
        signal = self.source.memory_signal(partition)  # before the rows: a write in between reloads later
        target = signal[0]
        if self._too_big == (partition, signal):
            self._retry_at = time.monotonic() + self.check_every_s
            return
        start = time.monotonic()
        rows = self.source.memory_rows(partition, self.max_rows)
        if rows is None:
            self._too_big = (partition, signal)
            self._retry_at = time.monotonic() + self.check_every_s
            self._status.over_max_rows = True
            log.warning("memory index %s: %s holds more than memory_index_max_rows=%d rows; searches go to Milvus",
                        self.name, partition or "the collection", self.max_rows)  # fmt: skip
            return
        index = MemoryIndex(rows, partition=partition, signal=signal, target=target, ann=self.ann)
        del rows  # with lists, the index holds a permuted copy
        took = time.monotonic() - start
        with self._lock:
            if self._closed or generation != self._generation:
                return  # invalidated while loading: the next search loads again
            self._index = index
            self._checked_at = time.monotonic()
        st = self._status
        st.rows, st.partition, st.load_s, st.mb = len(index), partition, round(took, 3), round(index.nbytes / 2**20, 1)
        st.loads += 1
        st.error, st.over_max_rows = "", False
        lists = index.lists
        st.lists, st.nprobe = (len(lists), lists.nprobe) if lists else (0, 0)
        st.calibrated_recall = round(lists.recall, 4) if lists else 1.0
        log.info("memory index %s: %d rows of %s loaded in %.1f s (%.0f MB)", self.name, len(index),
                 partition or "the collection", took, st.mb)  # fmt: skip
        self._notify(len(index))

    def _notify(self, rows: int) -> None:
        if rows == 0:
            self._status.rows = 0
        if self.on_change is not None:
            try:
                self.on_change(rows)
            except Exception:  # a metric must not break searches
                log.exception("memory index on_change failed")


def rows_from_pages(pages: Iterable[list[dict[str, Any]]], has_context: bool, max_rows: int) -> Rows | None:
    """:class:`Rows` from pages of row dicts (a query iterator's), or None past ``max_rows``."""
    fields = index_fields(has_context)
    vectors: list[np.ndarray] = []
    columns: dict[str, list[Any]] = {f: [] for f in fields}
    total = 0
    for page in pages:
        if not page:
            continue
        total += len(page)
        if total > max_rows:
            return None
        vectors.append(np.asarray([row[S.EMBEDDING] for row in page], dtype=np.float32))
        for f in fields:
            columns[f].append(_page_column(f, [row.get(f) for row in page]))
    return Rows(vectors=np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32),
                columns={f: _concat(f, chunks) for f, chunks in columns.items()}, has_context=has_context)


def _page_column(name: str, values: list[Any]) -> Any:
    if name in STRING_FIELDS:
        return pa.array([str(v) for v in values], type=pa.large_string())
    if name in INT_FIELDS:
        return np.asarray([int(v or 0) for v in values], dtype=np.int64)
    return np.asarray([float(v or 0.0) for v in values], dtype=np.float32)


def _concat(name: str, chunks: list[Any]) -> Any:
    if name in STRING_FIELDS:
        return pa.chunked_array(chunks, type=pa.large_string()).combine_chunks()
    dtype = np.int64 if name in INT_FIELDS else np.float32
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype)


