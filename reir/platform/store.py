"""Every Milvus call reir makes: instance rows, bookkeeping tables, aliases (milvus-lite file,
milvus-lite server, or a Milvus server/cluster).

:class:`MilvusStore` holds one collection of instance rows (search, keyed context, upsert,
index) and the server-level operations the index catalog needs (aliases, other collections);
:class:`Table` is a small bookkeeping collection over the same connection (the catalog's
versions, the ingestion ledger). Nothing else in reir talks to pymilvus.

Vectors are L2-normalized and searched with the IP metric, so ANN scores are cosine
similarities in [-1, 1]. Filters are never raw strings: callers pass a
:class:`SearchFilter`, and every string value enters the expression only through
:func:`quote_string` (a complete double-quoted literal with its quotes and backslashes
escaped), so user text can not change the expression's structure.

A milvus-lite ``.db`` path is a data directory that one process locks exclusively.
pymilvus starts an in-process server for it and keeps it (and the lock) until the
process exits; :meth:`MilvusStore.close` releases it once the last store of this
process on that path closes, so another process (an ingestion job, a Serve replica)
can open it next.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from dataclasses import fields as dataclass_fields
from typing import TYPE_CHECKING, Any

import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from reir.platform import schema as S
from reir.platform.backend import DEFAULT_PARTITION, Layout, auto_index, is_lite_version, partition_for, search_params

if TYPE_CHECKING:
    from typing import Self

    from reir.platform.config import MilvusConfig
    from reir.platform.memory_index import AnnSpec, ContextArrays, MemoryIndexManager, Rows

log = logging.getLogger(__name__)

INDEX_TYPES = ("AUTOINDEX", "FLAT", "HNSW", "IVF_FLAT")
# Keys per keyed fetch: one Milvus ``get`` call stays well under its message size limit.
_GET_BATCH = 4096
# Rows per page when the in-memory index reads a collection through the API (pymilvus' maximum).
_ITERATOR_BATCH = 16_384
# milvus-lite in another process (server mode) can only be paged through its query iterator, which
# sorts and filters every row per page in Python: 23 s for 100k rows, and worse than linearly
# beyond. memory_index "auto" reads no more than this there ("on" lifts it to max_rows).
LITE_API_AUTO_MAX_ROWS = 200_000
# What the context fetch reads per instance; the image's own facts come with the hit.
_CONTEXT_OUTPUT = (S.PK, *S.BOX_FIELDS, S.SCORE, S.EMBEDDING)
_DEFAULT_INDEX_PARAMS: dict[str, dict[str, Any]] = {
    "HNSW": {"M": 16, "efConstruction": 200},
    "IVF_FLAT": {"nlist": 128},
}
# Escapes Milvus' expression parser understands inside "...": file names hold spaces,
# brackets, quotes and unicode, so values are escaped, not refused. It knows no \x / \u
# escapes, so other control characters can not be written and are refused.
_STRING_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
MAX_FILTER_VALUE_LEN = 2048  # the longest stored string (a uri)

_GRPC_OPTIONS = {"grpc.keepalive_permit_without_calls": False, "grpc.keepalive_time_ms": 60_000}

_lite_lock = threading.Lock()
_lite_refs: dict[str, int] = {}


# Bookkeeping tables (Table): column kinds, and the constant 2-d vector every Milvus
# collection must carry (never searched).
TABLE_TYPES: dict[str, DataType] = {"str": DataType.VARCHAR, "int": DataType.INT64, "float": DataType.DOUBLE}
DUMMY_VECTOR = "_v"
_DUMMY = [1.0, 0.0]
_TABLE_STR_LEN = 2048
_DELETE_BATCH = 1000


@dataclass(frozen=True)
class Hit:
    """One ANN result: ``score`` is the raw IP (cosine), ``instance_score`` the objectness."""

    pk: str
    image_id: str
    uri: str
    box: S.Box
    score: float
    instance_score: float
    model_version: str
    # Only set by reads that ask for vectors (``rows_for_images``); searches leave it None.
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)
    # (width, height) of the image and its stored instance count; None/0 when the collection
    # predates these fields (the re-ranker and the context fetch then fall back).
    image_size: tuple[float, float] | None = field(default=None, compare=False)
    n_instances: int = field(default=0, compare=False)
    # The row of the in-memory index that answered the search (-1: Milvus did); the context
    # fetch then reads the image's rows there, after checking the row still holds this pk.
    row: int = field(default=-1, compare=False, repr=False)


HIT_FIELDS = tuple(f.name for f in dataclass_fields(Hit))


def hit_columns(hits: Sequence[Hit], *, vectors: bool = True) -> tuple[list[Any], ...]:
    """``hits`` as one list per field (:data:`HIT_FIELDS` order): what crosses a Ray hop.
    Pickling a list of dataclasses writes a class reference and a field dict per hit (about
    4.4 ms each way for a re-ranked query's 600 hits on 2 cores); field lists are a fraction.
    ``vectors=False``: the ``embedding`` column is all None (the rows' vectors stay behind)."""
    return tuple([None] * len(hits) if name == "embedding" and not vectors else [h.__dict__[name] for h in hits]
                 for name in HIT_FIELDS)  # fmt: skip


def hits_from_columns(columns: Sequence[Sequence[Any]]) -> list[Hit]:
    """The inverse of :func:`hit_columns` (rows built from their complete field dicts)."""
    out = []
    for values in zip(*columns, strict=True):
        hit = object.__new__(Hit)
        hit.__dict__.update(zip(HIT_FIELDS, values, strict=True))
        out.append(hit)
    return out


@dataclass(frozen=True)
class SearchFilter:
    """Structured filter; :meth:`to_expr` builds the only expressions the store sends."""

    model_version: str | None = None
    image_ids: tuple[str, ...] = ()
    # Equality on declared metadata fields: ((name, value), ...).
    metadata: tuple[tuple[str, str | float | bool], ...] = ()

    def to_expr(self) -> str:
        parts: list[str] = [_metadata_expr(name, value) for name, value in self.metadata]
        if self.model_version is not None:
            parts.append(f"{S.MODEL_VERSION} == {quote_string(self.model_version)}")
        if self.image_ids:
            values = ", ".join(quote_string(v) for v in self.image_ids)
            parts.append(f"{S.IMAGE_ID} in [{values}]")
        return " and ".join(parts)


_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def _metadata_expr(name: str, value: str | float | bool) -> str:
    if not _FIELD_NAME.match(name) or name in S.RESERVED_FIELDS:
        raise ValueError(f"bad metadata field name {name!r}")
    if isinstance(value, bool):
        return f"{name} == {str(value).lower()}"
    if isinstance(value, int | float):
        return f"{name} == {value!r}"
    return f"{name} == {quote_string(str(value))}"


LITE_FILTERED_EF = 32_768  # Milvus' largest ef


def _narrows(filter: SearchFilter | None) -> bool:
    """Whether ``filter`` still selects rows after the version became a partition: a version
    filter left here (a collection written before partitions) narrows too."""
    if filter is None:
        return False
    return bool(filter.image_ids or filter.metadata or getattr(filter, "conditions", ()) or (
        filter.model_version is not None))  # fmt: skip


def quote_string(value: str) -> str:
    """``value`` as one Milvus string literal, quotes included; raises ValueError for a value
    the grammar can not hold (too long, or a control character other than tab/CR/LF)."""
    if not isinstance(value, str) or len(value) > MAX_FILTER_VALUE_LEN:
        raise ValueError(f"filter value must be a string of at most {MAX_FILTER_VALUE_LEN} characters")
    out: list[str] = []
    for ch in value:
        escaped = _STRING_ESCAPES.get(ch)
        if escaped is None and (ord(ch) < 0x20 or ord(ch) == 0x7F):
            raise ValueError(f"filter value {value!r} holds control character {ch!r}")
        out.append(escaped or ch)
    return '"' + "".join(out) + '"'


def _normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def _context_hit(hit: Hit, rank: int, box: tuple[float, float, float, float], objectness: Any,
                 embedding: np.ndarray, pk: str | None = None) -> Hit:  # fmt: skip
    """Instance ``rank`` of ``hit``'s image, as the re-ranker's context holds it (no query score);
    ``pk``: the row's key when the reader has it (else built from the rank). The image's fields
    (id, uri, version, size, count) are ``hit``'s; the row is made by copying its fields, not
    through the frozen ``__init__`` (an ``object.__setattr__`` per field): a re-ranked head
    holds ~500 rows, and that was 2 ms of a 1M query's 6 ms context read on 2 cores."""
    row = object.__new__(Hit)
    row.__dict__.update(hit.__dict__, pk=pk if pk is not None else S.make_pk(hit.model_version, hit.image_id, rank),
                        box=box, score=0.0, instance_score=float(objectness), embedding=embedding, row=-1)  # fmt: skip
    return row


def _lite_rows(engine: Any, partition: str | None, has_context: bool, max_rows: int) -> Rows | None:
    """The live rows of one scope of an in-process milvus-lite collection, read as its query
    reads them (the same candidate assembly, dedup by sequence and tombstones), then the
    segments' columns taken whole instead of one Python dict per row."""
    import pyarrow as pa
    from milvus_lite.search.assembler import assemble_candidates, materialize_record
    from milvus_lite.search.bitmap import build_valid_mask

    from reir.platform.memory_index import INT_FIELDS, STRING_FIELDS, Rows, index_fields

    if getattr(engine, "_load_state", "loaded") != "loaded":
        raise RuntimeError(f"collection {engine.name!r} is not loaded")
    fields = index_fields(has_context)
    segments, deltas = engine._read_snapshot()
    memtable = engine._memtable
    pks, seqs, vectors, sources, _ = assemble_candidates(
        segments, memtable, engine._vector_name, partition_names=[partition] if partition is not None else None,
    )  # fmt: skip
    keep = np.flatnonzero(build_valid_mask(pks, seqs, deltas, memtable=memtable)) if pks else np.zeros(0, np.int64)
    if len(keep) > max_rows:
        return None
    chunks: dict[str, list[Any]] = {f: [] for f in fields}
    i = 0
    while i < len(sources):  # a segment's rows come whole and in order, then the memtable's
        owner, ref = sources[i]
        if isinstance(ref, int):
            n = int(owner.num_rows)
            if ref != 0 or sources[i + n - 1][0] is not owner:
                raise RuntimeError("unexpected milvus-lite candidate order")
            for f in fields:
                chunks[f].extend(owner.table.column(f).chunks)
            i += n
            continue
        j = i
        while j < len(sources) and not isinstance(sources[j][1], int):
            j += 1
        records = [materialize_record(s) for s in sources[i:j]]
        for f in fields:
            values = [r.get(f) for r in records]
            chunks[f].append(pa.array([str(v) for v in values]) if f in STRING_FIELDS else
                             pa.array(values, type=pa.int64() if f in INT_FIELDS else pa.float32()))
        i = j
    if sum(len(c) for c in chunks[S.PK]) != len(pks) or len(vectors) != len(pks):
        raise RuntimeError("milvus-lite candidates and columns disagree")
    take = pa.array(keep, type=pa.int64())
    columns: dict[str, Any] = {}
    for f, parts in chunks.items():
        if f in STRING_FIELDS:
            columns[f] = pa.chunked_array([c.cast(pa.large_string()) for c in parts], type=pa.large_string()).take(take)
        else:
            dtype = np.int64 if f in INT_FIELDS else np.float32
            whole = np.concatenate([np.asarray(c.to_numpy(zero_copy_only=False), dtype=dtype) for c in parts]) \
                if parts else np.zeros(0, dtype)
            columns[f] = whole[keep]
    # assemble_candidates' matrix is its own copy: kept whole when every candidate is live.
    kept = vectors if len(keep) == len(pks) else vectors[keep]
    return Rows(vectors=np.asarray(kept, dtype=np.float32), columns=columns, has_context=has_context)


def _chunks(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class MilvusStore:
    """Instance rows in one Milvus collection; see ``docs/interfaces.md``."""

    def __init__(
        self,
        uri: str,
        collection: str,
        *,
        dim: int | None = None,
        token: str = "",
        upsert_batch_size: int = 512,
        search_params: Mapping[str, Any] | None = None,
        metadata_fields: Mapping[str, str] | None = None,
    ) -> None:
        self.uri = uri
        self.collection = collection
        self.metadata_fields = dict(metadata_fields or {})
        self.upsert_batch_size = upsert_batch_size
        self._search_params = dict(search_params or {})
        self._lite_path = os.path.abspath(uri) if uri.endswith(".db") else None
        self._layout: Layout | None = None
        self._lite: bool | None = True if self._lite_path is not None else None
        self._memory: MemoryIndexManager | None = None
        self._memory_alias = True  # the name may be an alias (read at each load of the memory index)
        self._memory_api_max_rows: int | None = None  # a lower cap when rows can only be paged (auto, lite)
        if self._lite_path is not None:
            with _lite_lock:
                _lite_refs[self._lite_path] = _lite_refs.get(self._lite_path, 0) + 1
        try:
            # A dedicated channel (closed by close(), not shared by URI), pinging only during
            # calls: an idle shared channel's 10 s keepalive pings make the milvus-lite server
            # close it (GOAWAY "too_many_pings") and the next call on it fails.
            self._client: MilvusClient | None = MilvusClient(
                uri=uri, token=token, dedicated=True, grpc_options=_GRPC_OPTIONS
            )
        except Exception:
            self._release_lite()
            raise
        if dim is not None:
            self.ensure_collection(dim)

    @classmethod
    def from_config(cls, cfg: MilvusConfig, *, dim: int | None = None) -> MilvusStore:
        """``cfg.collection`` may be a collection or an alias (e.g. ``reir_live``); when it is
        neither and ``cfg.fallback_collection`` exists, that one is opened instead."""
        store = cls(
            cfg.uri,
            cfg.collection,
            dim=dim,
            token=cfg.token,
            upsert_batch_size=cfg.upsert_batch_size,
            search_params=cfg.search_params,
            metadata_fields=cfg.metadata_fields,
        )
        fallback = cfg.fallback_collection
        if dim is None and fallback and not store.exists() and store.client.has_collection(fallback):
            store.collection = fallback
        return store

    @property
    def client(self) -> MilvusClient:
        if self._client is None:
            raise RuntimeError("MilvusStore is closed")
        return self._client

    def exists(self) -> bool:
        return bool(self.client.has_collection(self.collection))

    @property
    def dim(self) -> int | None:
        """Embedding size of the existing collection, or None if it does not exist."""
        if not self.exists():
            return None
        for f in self.client.describe_collection(self.collection)["fields"]:
            if f["name"] == S.EMBEDDING:
                return int(f["params"]["dim"])
        raise RuntimeError(f"collection {self.collection} has no {S.EMBEDDING} field")

    def ensure_collection(self, dim: int) -> None:
        """Create the collection if missing; an existing one must have the same dim."""
        existing = self.dim
        if existing is None:
            schema = S.collection_schema(dim, self.metadata_fields)
            self.client.create_collection(self.collection, schema=schema)
            self.refresh()
        elif existing != dim:
            raise ValueError(
                f"collection {self.collection} has dim {existing}, rows have dim {dim}; "
                "use another collection name for this model"
            )

    @property
    def lite(self) -> bool:
        """milvus-lite (scans) rather than a Milvus server (real ANN indexes)."""
        if self._lite is None:
            self._lite = is_lite_version(str(self.client.get_server_version()))
        return self._lite

    def layout(self) -> Layout:
        """Index type, fields and partitions of the collection, read once (refreshed when stale)."""
        if self._layout is None or self._layout.stale:
            client = self.client
            previous = self._layout
            kind = None
            if previous is not None and self.lite:
                # milvus-lite answers list_indexes / describe_index by counting every row in Python
                # while it holds the GIL: 18 s at 1M rows, a searcher replica stalled every 30 s.
                # Its index changes only through build_index, which refreshes (a full read).
                kind = previous.index_type
            elif S.EMBEDDING in client.list_indexes(self.collection):
                kind = str(client.describe_index(self.collection, S.EMBEDDING)["index_type"])
            schema = tuple(client.describe_collection(self.collection)["fields"])
            parts = frozenset(client.list_partitions(self.collection))
            self._layout = Layout(index_type=kind, fields=frozenset(f["name"] for f in schema), partitions=parts,
                                  schema=schema)  # fmt: skip
        return self._layout

    def refresh(self) -> None:
        """Forget the cached layout (after an index build, a new partition, an alias move), and
        drop the in-memory index (reloaded at the next search)."""
        self._layout = None
        if self._memory is not None:
            self._memory.invalidate()

    def upsert(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Insert or replace rows by primary key, in batches; returns rows written.

        In a collection with the context fields each model version's rows go to its own
        partition (searches then need no version filter); older collections keep one.
        """
        written = 0
        layout = self.layout()
        prepared = [self._prepare(row, layout.has_context) for row in rows]
        if layout.has_packed_context:
            S.attach_packed_context(prepared)
        for chunk in _chunks(prepared, self.upsert_batch_size):
            by_partition: dict[str, list[dict[str, Any]]] = {}
            for row in chunk:
                name = partition_for(row[S.MODEL_VERSION]) if layout.has_context else DEFAULT_PARTITION
                by_partition.setdefault(name, []).append(row)
            for name, part in by_partition.items():
                if name not in layout.partitions:
                    self._ensure_partition(name)
                    layout.partitions = layout.partitions | {name}
                self._upsert_part(part, name, layout)
            written += len(chunk)
        if self._memory is not None and written:
            self._memory.invalidate()
        return written

    def _ensure_partition(self, name: str) -> None:
        """Create partition ``name`` unless it exists. Ingestion's encoder actors write at once
        (and a restarted one writes again): another may create it between the check and the
        create, which then fails although the partition is there; that is not an error."""
        if self.client.has_partition(self.collection, name):
            return
        try:
            self.client.create_partition(self.collection, name)
        except MilvusException:
            if not self.client.has_partition(self.collection, name):
                raise

    def _upsert_part(self, rows: list[dict[str, Any]], partition: str, layout: Layout) -> None:
        """One upsert call, sent by column when every row has exactly the schema's fields.

        pymilvus' row API converts each value of each row into protobuf in Python: about 2 ms
        of client CPU per image (10 rows) in ingestion, 3/4 of a write. By column, each field
        goes in as one list (the vectors as one array): about 0.9 ms. Rows with other keys (a
        collection's dynamic field) or missing ones take the row API.
        """
        handler = getattr(self.client, "_get_connection", None)  # pymilvus' column-wise API
        if handler is None or not layout.schema or any(row.keys() != layout.fields for row in rows):
            self.client.upsert(self.collection, rows, partition_name=partition)
            return
        entities = [{"name": f["name"], "type": f["type"], "values": [row[f["name"]] for row in rows]}
                    for f in layout.schema]  # fmt: skip
        for entity in entities:
            if entity["name"] == S.EMBEDDING:
                entity["values"] = np.asarray(entity["values"], dtype=np.float32)
        handler().upsert(self.collection, entities, partition_name=partition, schema={"fields": list(layout.schema)})

    @staticmethod
    def _prepare(row: Mapping[str, Any], has_context: bool = True) -> dict[str, Any]:
        out = dict(row)
        out.pop(S.PACKED_CONTEXT, None)  # the store packs it (upsert), from the rows themselves
        for name, default in zip(S.CONTEXT_FIELDS, (0.0, 0.0, 0), strict=True):
            if has_context:
                out.setdefault(name, default)
            else:  # an older collection: these would land in its dynamic JSON field
                out.pop(name, None)
        out[S.EMBEDDING] = _normalize(np.asarray(row[S.EMBEDDING]))[0].tolist()
        if S.PK not in out:
            out[S.PK] = S.make_pk(out[S.MODEL_VERSION], out[S.IMAGE_ID], int(out[S.RANK]))
        return out

    def flush(self) -> None:
        """Seal the growing segment so searches use the index: milvus-lite scans unsealed
        rows by brute force (about 10x slower per query, and it keeps the server busy)."""
        self.client.flush(self.collection)

    def build_index(self, index_type: str = "AUTOINDEX", params: Mapping[str, Any] | None = None) -> None:
        """(Re)build the vector index; a no-op when the same index type already exists.

        ``AUTOINDEX`` means the backend's default (:func:`reir.platform.backend.auto_index`):
        HNSW on a server; on milvus-lite the index the collection has, else FLAT.
        """
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
        self.refresh()
        current = self._current_index_type()
        index_type, defaults = auto_index(self.lite, index_type, current)
        params = {**defaults, **dict(params or {})}
        if current == index_type:
            return
        # Milvus refuses to change an index on a loaded collection.
        self.client.release_collection(self.collection)
        if current is not None:
            self.client.drop_index(self.collection, S.EMBEDDING)
        index_params = self.client.prepare_index_params()
        index_params.add_index(
            field_name=S.EMBEDDING,
            index_type=index_type,
            metric_type=S.METRIC,
            params={**_DEFAULT_INDEX_PARAMS.get(index_type, {}), **dict(params or {})},
        )
        self.client.create_index(self.collection, index_params)
        self.refresh()

    def _current_index_type(self) -> str | None:
        return self.layout().index_type

    def index_type(self) -> str | None:
        return self._current_index_type()

    def load(self) -> None:
        self.client.load_collection(self.collection)

    # The in-memory exact index (reir.platform.memory_index): the searcher's answer to
    # milvus-lite's scanning search.

    def use_memory_index(
        self, mode: str = "auto", max_rows: int | None = None, *, model_version: str | None = None,
        warm: bool = True, wait: bool = False, on_change: Callable[[int], None] | None = None,
        check_every_s: float | None = None, ann: AnnSpec | None = None,
        api_auto_max_rows: int = LITE_API_AUTO_MAX_ROWS,
    ) -> bool:  # fmt: skip
        """Answer unfiltered searches, and the re-rank context of their hits' images, from an
        in-memory index of the collection's rows (exact, or inverted lists as ``ann`` says;
        default :class:`reir.platform.memory_index.AnnSpec`).

        ``mode``: ``auto`` (on for milvus-lite, off for a Milvus server), ``on`` or ``off``. A scope
        (the version's partition, or the whole collection) with more than ``max_rows`` rows stays
        in Milvus. ``warm``: load ``model_version``'s partition (the whole collection when None)
        now, in the background unless ``wait``; otherwise the first search for a scope has it
        loaded (searches go to Milvus until it is). ``on_change(rows)`` hears the rows held after
        each load or drop. Returns whether the index is on. ``auto`` on a milvus-lite that this
        process does not serve (server mode) loads at most ``api_auto_max_rows`` rows
        (:data:`LITE_API_AUTO_MAX_ROWS`).
        """
        from reir.platform import memory_index as M

        if self._memory is not None:
            self._memory.close()
            self._memory = None
        if not M.enabled(mode, self.lite):  # type: ignore[arg-type]
            return False
        self._memory_api_max_rows = api_auto_max_rows if mode == "auto" else None
        self._memory = M.MemoryIndexManager(
            self, max_rows=M.DEFAULT_MAX_ROWS if max_rows is None else max_rows, on_change=on_change,
            check_every_s=M.CHECK_EVERY_S if check_every_s is None else check_every_s, name=self.collection,
            ann=M.AnnSpec() if ann is None else ann,
        )  # fmt: skip
        if warm:
            partition = self.layout().partition_of(model_version) if model_version is not None else None
            if model_version is None or partition is not None:  # a version without a partition is filtered: Milvus
                self._memory.warm(partition, wait=wait)
        return True

    @property
    def memory_index(self) -> MemoryIndexManager | None:
        """The in-memory index's manager (``status()``, ``wait()``), None when off."""
        return self._memory

    def memory_target(self) -> str:
        """The collection this store's name resolves to, per search: an alias moved by another
        process (`reir index promote`) is seen at the next search. In-process milvus-lite: a
        dict lookup; otherwise one ``describe_alias`` call (about 1 ms) when the name was an
        alias at the last load, none for a plain collection name."""
        db = self._lite_db()
        if db is not None:
            return str(db.resolve_collection_name(self.collection))
        if not self._memory_alias:
            return self.collection
        return str(self.client.describe_alias(self.collection)["collection_name"])

    def _memory_target(self) -> str:
        db = self._lite_db()
        target = str(db.resolve_collection_name(self.collection)) if db is not None else (
            self.alias_target(self.collection) or self.collection)  # fmt: skip
        self._memory_alias = target != self.collection
        return target

    def memory_signal(self, partition: str | None) -> tuple[Hashable, ...]:
        """What changes when the rows of ``partition`` (None: the collection) may have: the
        collection the name resolves to, and milvus-lite's write sequence (in this process: every
        insert, upsert and delete moves it) or the row count (over the API)."""
        target = self._memory_target()
        engine = self._lite_engine(target)
        if engine is not None:
            return (target, "seq", id(engine), int(engine._next_seq))  # milvus-lite's own counter
        return (target, "count", self._count_rows(target, partition))

    def _count_rows(self, target: str, partition: str | None) -> int:
        # milvus-lite counts the whole collection whatever the partition (still a change signal).
        res = self.client.query(target, filter="", output_fields=["count(*)"], consistency_level="Strong",
                                partition_names=[partition] if partition is not None else None)  # fmt: skip
        return int(res[0]["count(*)"])

    def memory_rows(self, partition: str | None, max_rows: int, *, direct: bool = True) -> Rows | None:
        """Every live row of ``partition`` (None: the collection) as :class:`Rows`, or None when
        there are more than ``max_rows``.

        A milvus-lite file opened by this process is read from its engine: the segments' arrays
        with milvus-lite's own dedup and tombstone mask (what its query applies), about 100x faster
        than paging (its query iterator sorts every row per page, then builds each row in Python:
        17.5 s for 100k rows). Any failure there (another milvus-lite version) falls back to the
        query iterator, the only way to a server (``direct=False``: the iterator in any case).
        """
        from reir.platform.memory_index import Rows, rows_from_pages

        target = self._memory_target()
        fields = {f["name"] for f in self.client.describe_collection(target)["fields"]}
        has_context = set(S.CONTEXT_FIELDS) <= fields
        engine = self._lite_engine(target) if direct else None
        if engine is not None:
            try:
                return _lite_rows(engine, partition, has_context, max_rows)
            except Exception:  # read through the API instead
                log.warning("memory index: milvus-lite's engine could not be read directly; paging the API",
                            exc_info=True)  # fmt: skip
        if self.lite and self._memory_api_max_rows is not None and self._memory_api_max_rows < max_rows:
            max_rows = self._memory_api_max_rows
            if self._count_rows(target, partition) > max_rows:  # the whole collection (lite counts so)
                log.warning("memory index: milvus-lite in another process holds more than %d rows, too many to "
                            "page in (set memory_index: on to page them anyway)", max_rows)  # fmt: skip
                return None
        elif not self.lite and self._count_rows(target, partition) > max_rows:
            return None
        parts = [partition] if partition is not None else None
        from reir.platform.memory_index import index_fields

        it = self.client.query_iterator(target, batch_size=_ITERATOR_BATCH, filter="", partition_names=parts,
                                        output_fields=[*index_fields(has_context), S.EMBEDDING])  # fmt: skip

        def pages() -> Iterator[list[dict[str, Any]]]:
            try:
                while True:
                    page = it.next()
                    if not page:
                        return
                    yield page
            finally:
                it.close()

        rows = rows_from_pages(pages(), has_context, max_rows)
        if rows is not None and not len(rows.vectors):
            rows = Rows(np.zeros((0, 0), np.float32), rows.columns, has_context)
        return rows

    def _lite_db(self) -> Any:
        """milvus-lite's database object when this process serves the file (pymilvus started it
        in process), else None (a server, or milvus-lite in another process)."""
        if self._lite_path is None:
            return None
        try:
            from milvus_lite.server_manager import server_manager_instance

            entry = server_manager_instance._servers.get(self._lite_path)
        except Exception:  # noqa: BLE001 - another milvus-lite: the API path
            return None
        db = entry[1] if entry is not None else None
        return db if hasattr(db, "resolve_collection_name") and hasattr(db, "get_collection") else None

    def _lite_engine(self, name: str) -> Any:
        """milvus-lite's Collection ``name`` when this process serves the file, else None."""
        db = self._lite_db()
        if db is None:
            return None
        try:
            engine = db.get_collection(name)
        except Exception:  # noqa: BLE001 - another milvus-lite: the API path
            return None
        return engine if hasattr(engine, "_next_seq") and hasattr(engine, "_read_snapshot") else None

    def search(
        self, vectors: np.ndarray, top_n: int, filter: SearchFilter | None = None
    ) -> list[list[Hit]]:
        """Nearest instances for each query vector, best first.

        A ``model_version`` filter becomes the version's partition when the collection has
        one; the layout is re-read once if the call fails (the alias may have moved).
        """
        if top_n < 1:
            raise ValueError("top_n must be >= 1")
        queries = _normalize(vectors)
        try:
            return self._search(queries, top_n, filter)
        except Exception:
            if self._layout is None:
                raise
            self.refresh()
            return self._search(queries, top_n, filter)

    def _search(self, queries: np.ndarray, top_n: int, filter: SearchFilter | None) -> list[list[Hit]]:
        layout = self.layout()
        partition = layout.partition_of(filter.model_version if filter is not None else None)
        if partition is not None and filter is not None:
            filter = replace(filter, model_version=None)
        if self._memory is not None and not _narrows(filter):
            # Only the version's partition (or nothing) restricts it: the in-memory index, when
            # it holds that scope, answers exactly; anything narrower goes to Milvus.
            found = self._memory.search(queries, top_n, partition)
            if found is not None:
                return found
        params = search_params(layout.index_type, top_n, self.lite, self._search_params)
        if self.lite and _narrows(filter):
            # milvus-lite applies a filter to the ef nearest rows only: a selective filter (one
            # image, one folder) found nothing unless ef covers the collection; lite is small.
            params["params"]["ef"] = max(int(params["params"].get("ef", 0)), LITE_FILTERED_EF)
        results = self.client.search(
            self.collection,
            data=queries.tolist(),
            limit=top_n,
            filter=filter.to_expr() if filter is not None else "",
            output_fields=self._scalar_fields(layout),
            search_params=params,
            anns_field=S.EMBEDDING,
            partition_names=[partition] if partition is not None else None,
        )
        return [[self._to_hit(h.get("entity", {}), h, float(h["distance"])) for h in hits] for hits in results]

    @staticmethod
    def _scalar_fields(layout: Layout) -> list[str]:
        return [*S.SCALAR_FIELDS, *(S.CONTEXT_FIELDS if layout.has_context else ())]

    @staticmethod
    def _to_hit(row: Mapping[str, Any], hit: Mapping[str, Any] | None = None, score: float = 0.0) -> Hit:
        """A search hit (``row`` = its entity) or a fetched row (score 0, vector when present)."""
        pk = row.get(S.PK) if hit is None else hit.get("pk", hit.get("id"))
        vector = row.get(S.EMBEDDING) if hit is None else None
        width = float(row.get(S.IMAGE_W) or 0.0)
        height = float(row.get(S.IMAGE_H) or 0.0)
        return Hit(
            pk=str(pk), image_id=str(row[S.IMAGE_ID]), uri=str(row[S.URI]),
            box=S.as_box(row[f] for f in S.BOX_FIELDS), score=score, instance_score=float(row[S.SCORE]),
            model_version=str(row[S.MODEL_VERSION]),
            embedding=None if vector is None else np.asarray(vector, dtype=np.float32),
            image_size=(width, height) if width > 0 and height > 0 else None,
            n_instances=int(row.get(S.N_INSTANCES) or 0),
        )  # fmt: skip

    def context_arrays(self, hits: Sequence[Hit], *, model_version: str | None = None) -> ContextArrays | None:
        """:meth:`context` as arrays (:class:`reir.platform.memory_index.ContextArrays`, one
        head per image, its best hit) when the in-memory index holds every one of the hits'
        images; else None (then :meth:`context` reads them)."""
        if self._memory is None or not hits:
            return None
        heads: dict[str, Hit] = {}  # each image's best hit, images in the hits' order
        for h in hits:
            heads.setdefault(h.image_id, h)
        return self._memory.context_arrays(list(heads.values()), float16=self.layout().has_packed_context)

    def context(self, hits: Sequence[Hit], *, model_version: str | None = None) -> dict[str, list[Hit]]:
        """Every stored instance (rank order, with vectors) of each hit's image: the re-ranker's input.

        A keyed lookup, one ``get`` however large the collection, in the version's partition
        only: of each image's rank-0 row, whose packed field holds every instance's vector
        (float16), box and objectness (:func:`reir.platform.schema.pack_context`); images
        without it (collections older than the field, rows written apart) by the primary keys
        of ranks 0..n_instances-1. The image's uri, size and count are the hit's. Images whose
        hits do not carry a count (older still) are read with the scalar query instead.
        """
        out: dict[str, list[Hit]] = {h.image_id: [] for h in hits}
        parts: list[str] | None = None
        images = {h.image_id: h for h in reversed(hits)}
        if self._memory is not None:  # hits the in-memory index returned: their images' rows are there
            heads = list(images.values())
            for i, found in self._memory.contexts(heads, float16=self.layout().has_packed_context).items():
                hit = heads[i]
                out[hit.image_id] = [_context_hit(hit, r, (b[0], b[1], b[2], b[3]), o, v, pk=pk) for r, (pk, b, o, v) in
                                     enumerate(zip(found.pks, found.boxes, found.objectness, found.vectors))]
                del images[hit.image_id]
        keyed = [hit for hit in images.values() if hit.n_instances > 0]
        legacy = [hit.image_id for hit in images.values() if hit.n_instances <= 0]
        if not keyed:
            keyed_rest: list[Hit] = []
        else:
            layout = self.layout()
            versions = {hit.model_version for hit in keyed}
            partition = layout.partition_of(next(iter(versions))) if len(versions) == 1 else None
            parts = [partition] if partition is not None else None
            keyed_rest = self._packed_context(keyed, out, parts) if layout.has_packed_context else keyed
        keys = {S.make_pk(hit.model_version, hit.image_id, r): (hit, r) for hit in keyed_rest
                for r in range(hit.n_instances)}
        if keys:
            ids = list(keys)
            rows: list[dict[str, Any]] = []
            for start in range(0, len(ids), _GET_BATCH):
                rows.extend(self.client.get(
                    self.collection, ids=ids[start : start + _GET_BATCH], output_fields=list(_CONTEXT_OUTPUT),
                    partition_names=parts, strict_float32=True,
                ))  # fmt: skip
            found = [(keys[str(row[S.PK])], row) for row in rows]
            for (hit, rank), row in sorted(found, key=lambda f: f[0][1]):
                out[hit.image_id].append(_context_hit(hit, rank, S.as_box(row[f] for f in S.BOX_FIELDS),
                                                      row[S.SCORE], np.asarray(row[S.EMBEDDING], np.float32)))
        if legacy:
            out.update(self.rows_for_images(legacy, model_version=model_version))
        return out

    def _packed_context(self, hits: Sequence[Hit], out: dict[str, list[Hit]],
                        partitions: list[str] | None) -> list[Hit]:  # fmt: skip
        """The context of each hit's image from its rank-0 row's packed field (one keyed row
        per image) into ``out``; returns the hits whose image has none (read row by row)."""
        first = {S.make_pk(h.model_version, h.image_id, 0): h for h in hits}
        ids = list(first)
        rest = dict.fromkeys(h.image_id for h in hits)
        for start in range(0, len(ids), _GET_BATCH):
            for row in self.client.get(self.collection, ids=ids[start : start + _GET_BATCH],
                                       output_fields=[S.PK, S.PACKED_CONTEXT], partition_names=partitions):
                hit = first[str(row[S.PK])]
                packed = S.unpack_context(str(row.get(S.PACKED_CONTEXT) or ""))
                if packed is None or len(packed.scores) != hit.n_instances:
                    continue
                out[hit.image_id] = [
                    _context_hit(hit, r, S.as_box(packed.boxes[r]), packed.scores[r], packed.embeddings[r])
                    for r in range(hit.n_instances)
                ]
                rest.pop(hit.image_id, None)
        return [h for h in hits if h.image_id in rest]

    def rows_for_images(
        self,
        image_ids: Sequence[str],
        *,
        model_version: str | None = None,
        with_vectors: bool = True,
        max_per_image: int = 64,
    ) -> dict[str, list[Hit]]:
        """Every stored instance of each image (rank order), with vectors when asked.

        The ids go through :class:`SearchFilter` (escaped literals), so no id can change
        the expression's structure. ``Hit.score`` is 0 here (there is no query).
        """
        ids = tuple(dict.fromkeys(image_ids))
        if not ids:
            return {}
        expr = SearchFilter(model_version=model_version, image_ids=ids).to_expr() + f" and {S.RANK} >= 0"
        fields = [*self._scalar_fields(self.layout()), *([S.EMBEDDING] if with_vectors else [])]
        rows = self.client.query(
            self.collection, filter=expr, output_fields=fields, limit=min(16_384, len(ids) * max_per_image)
        )
        out: dict[str, list[Hit]] = {i: [] for i in ids}
        for row in sorted(rows, key=lambda r: (str(r[S.IMAGE_ID]), int(r[S.RANK]))):
            out.setdefault(str(row[S.IMAGE_ID]), []).append(self._to_hit(row))
        return out

    def get(self, pks: Sequence[str], *, output_fields: Sequence[str] | None = None,
            strong: bool = False) -> list[dict[str, Any]]:  # fmt: skip
        """Rows (scalars and vector, or ``output_fields``) by primary key; missing keys are
        skipped. ``strong``: see every write acknowledged before the call (a server otherwise
        may answer from a slightly older state)."""
        if not pks:
            return []
        extra: dict[str, Any] = {"consistency_level": "Strong"} if strong else {}
        return list(self.client.get(self.collection, ids=list(pks),
                                    output_fields=list(output_fields) if output_fields else None, **extra))

    def count(self, filter: SearchFilter | None = None) -> int:
        """Rows matching ``filter``. A ``model_version`` filter becomes the version's partition
        when the collection has one (as in :meth:`search`). milvus-lite ignores the partition in
        a count and evaluates an expression row by row (40k rows: 1.4 s, against 15 ms for the
        whole collection), so there a version that holds the only non-empty partition is
        counted as the whole collection, and any other version by its filter."""
        if not self.exists():
            return 0
        partition = self.layout().partition_of(filter.model_version if filter is not None else None)
        partitions = None
        if partition is not None and filter is not None:
            rest = replace(filter, model_version=None)
            if not self.lite:
                filter, partitions = rest, [partition]
            elif not rest.to_expr() and self._only_partition_with_rows(partition):
                filter = None
        res = self.client.query(
            self.collection,
            filter=filter.to_expr() if filter is not None else "",
            output_fields=["count(*)"],
            consistency_level="Strong",  # a Milvus server otherwise may not count the latest writes
            partition_names=partitions,
        )
        return int(res[0]["count(*)"])

    def _only_partition_with_rows(self, partition: str) -> bool:
        """No partition but ``partition`` can hold rows: every row goes to its version's partition
        (``Layout.has_context``), and the list is read now (a cached layout may not know a
        partition another writer made)."""
        return not set(self.client.list_partitions(self.collection)) - {partition, DEFAULT_PARTITION}

    def drop(self) -> None:
        if self.exists():
            self.client.drop_collection(self.collection)
        self.refresh()

    def delete(self, pks: Sequence[str], *, collection: str | None = None) -> None:
        """Delete rows by primary key from this collection (or ``collection``); missing keys
        and a missing collection are ignored."""
        name = collection or self.collection
        if not pks or not self.client.has_collection(name):
            return
        for start in range(0, len(pks), _DELETE_BATCH):
            self.client.delete(name, ids=list(pks[start : start + _DELETE_BATCH]))
        if self._memory is not None:
            self._memory.invalidate()

    # Server-level operations (other collections, aliases): what the index catalog needs.

    def has_collection(self, name: str) -> bool:
        return bool(self.client.has_collection(name))

    def load_collection(self, name: str) -> None:
        self.client.load_collection(name)

    def drop_collection(self, name: str) -> None:
        if self.client.has_collection(name):
            self.client.drop_collection(name)
        if self._memory is not None:
            self._memory.invalidate()

    def alias_target(self, alias: str) -> str | None:
        """The collection ``alias`` points at, or None."""
        # Listed first: describe_alias on a missing alias (every first promotion) makes pymilvus
        # log an ERROR with a traceback before it raises, for what is a normal answer here.
        if alias not in self.client.list_aliases().get("aliases", []):
            return None
        try:
            return str(self.client.describe_alias(alias)["collection_name"])
        except Exception:  # noqa: BLE001 - dropped between the two calls
            return None

    def aliases_of(self, name: str) -> list[str]:
        """The aliases that point at collection ``name``."""
        if not self.client.has_collection(name):
            return []
        return list(self.client.list_aliases(name).get("aliases", []))

    def point_alias(self, alias: str, name: str) -> None:
        """Create ``alias`` -> ``name``, or move an existing alias there (atomic for readers)."""
        current = self.alias_target(alias)
        if current is None:
            self.client.create_alias(name, alias)
        elif current != name:
            self.client.alter_alias(name, alias)
        if self._memory is not None:
            self._memory.invalidate()

    def table(self, name: str, columns: Mapping[str, str], *, create: bool = True) -> Table:
        """A bookkeeping table over this store's connection (created, indexed, loaded when asked)."""
        table = Table(self.client, name, columns)
        if create:
            table.ensure()
        return table

    def close(self) -> None:
        if self._client is None:
            return
        if self._memory is not None:
            self._memory.close()  # before the client and the lite server it may be reading go
            self._memory = None
        try:
            self._client.close()
        finally:
            self._client = None
            self._release_lite()

    def _release_lite(self) -> None:
        if self._lite_path is None:
            return
        with _lite_lock:
            left = _lite_refs.get(self._lite_path, 1) - 1
            if left > 0:
                _lite_refs[self._lite_path] = left
                return
            _lite_refs.pop(self._lite_path, None)
        # Last user in this process: stop pymilvus' in-process server so the file
        # lock is freed for other processes instead of held until interpreter exit.
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(self._lite_path)
        self._lite_path = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Table:
    """A small bookkeeping collection: VARCHAR ``pk`` plus typed ``columns`` (``"str"``,
    ``"int"``, ``"float"``), read with Strong consistency (a reader sees the last write).

    Equality filters on string columns go through :func:`quote_string`, like every other
    expression the store sends.
    """

    def __init__(self, client: MilvusClient, name: str, columns: Mapping[str, str]) -> None:
        unknown = {k: v for k, v in columns.items() if v not in TABLE_TYPES}
        if unknown:
            raise ValueError(f"unknown column kinds {unknown}; use one of {sorted(TABLE_TYPES)}")
        self.client = client
        self.name = name
        self.columns = dict(columns)

    def exists(self) -> bool:
        return bool(self.client.has_collection(self.name))

    def ensure(self) -> None:
        """Create (if missing), index and load the table; safe against a concurrent creator."""
        client = self.client
        if not client.has_collection(self.name):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field(S.PK, DataType.VARCHAR, is_primary=True, max_length=_TABLE_STR_LEN)
            for column, kind in self.columns.items():
                extra = {"max_length": _TABLE_STR_LEN} if kind == "str" else {}
                schema.add_field(column, TABLE_TYPES[kind], **extra)
            schema.add_field(DUMMY_VECTOR, DataType.FLOAT_VECTOR, dim=len(_DUMMY))
            try:
                client.create_collection(self.name, schema=schema, consistency_level="Strong")
            except Exception:  # a concurrent creator won; anything else is re-raised below
                if not client.has_collection(self.name):
                    raise
        if DUMMY_VECTOR not in client.list_indexes(self.name):
            params = client.prepare_index_params()
            params.add_index(field_name=DUMMY_VECTOR, index_type="FLAT", metric_type="L2")
            client.create_index(self.name, params)
        client.load_collection(self.name)

    def upsert(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            self.client.upsert(self.name, [{**row, DUMMY_VECTOR: _DUMMY} for row in rows])

    def get(self, pks: Sequence[str]) -> list[dict[str, Any]]:
        if not pks:
            return []
        return list(self.client.get(self.name, ids=list(pks), output_fields=[S.PK, *self.columns],
                                    consistency_level="Strong"))

    def _where(self, where: Mapping[str, str] | None) -> str:
        parts = []
        for column, value in (where or {}).items():
            if self.columns.get(column) != "str":
                raise ValueError(f"{self.name} has no string column {column!r}")
            parts.append(f"{column} == {quote_string(value)}")
        return " and ".join(parts)

    def rows(self, where: Mapping[str, str] | None = None, batch: int = 4096) -> Iterator[dict[str, Any]]:
        """Every row whose string columns equal ``where``'s values, paged (a plain query is capped
        at 16384 rows)."""
        it = self.client.query_iterator(self.name, batch_size=batch, filter=self._where(where),
                                        output_fields=[S.PK, *self.columns], consistency_level="Strong")
        try:
            while True:
                page = it.next()
                if not page:
                    return
                yield from page
        finally:
            it.close()

    def delete(self, pks: Sequence[str]) -> None:
        for start in range(0, len(pks), _DELETE_BATCH):
            self.client.delete(self.name, ids=list(pks[start : start + _DELETE_BATCH]))

    def delete_where(self, where: Mapping[str, str]) -> None:
        if not where:
            raise ValueError("delete_where needs at least one column")
        if self.exists():
            self.client.delete(self.name, filter=self._where(where))
