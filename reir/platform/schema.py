"""The one instance-row schema shared by ingestion (writer) and serving (reader).

One row = one detected instance of one gallery image, encoded by one model version.
The primary key is deterministic (``"{model_version}:{image_id}:{rank}"``) so that
re-running an ingestion upserts the same rows instead of duplicating them, and two
model versions can live side by side in one collection (queries filter on
``model_version``). Dynamic fields are enabled so later metadata columns (caption,
dataset, split, ...) can be added without a schema migration.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pymilvus import CollectionSchema, DataType, MilvusClient

PK = "pk"
IMAGE_ID = "image_id"
URI = "uri"
BOX_X, BOX_Y, BOX_W, BOX_H = "box_x", "box_y", "box_w", "box_h"
SCORE = "score"
RANK = "rank"
MODEL_VERSION = "model_version"
EMBEDDING = "embedding"
# Per-image facts repeated on each of its rows, so the re-ranker needs no image file and
# the context fetch knows which keys to ask for (ranks 0..n_instances-1). Collections
# written before these fields existed lack them; readers fall back (see MilvusStore).
IMAGE_W, IMAGE_H, N_INSTANCES = "image_w", "image_h", "n_instances"
CONTEXT_FIELDS: tuple[str, str, str] = (IMAGE_W, IMAGE_H, N_INSTANCES)
# The whole image's context packed onto its rank-0 row (every instance's box, objectness and
# float16 vector; see :func:`pack_context`), "" on the other rows: the re-ranker's input for
# an image is one keyed row instead of n_instances rows. Written by the store when all of an
# image's rows arrive together; collections without the field, and images whose rows did
# not, are read row by row.
PACKED_CONTEXT = "image_context"
MAX_PACKED_LEN = 65_535  # Milvus' longest VARCHAR

BOX_FIELDS: tuple[str, str, str, str] = (BOX_X, BOX_Y, BOX_W, BOX_H)
# Every stored scalar column, in schema order (the vector is kept apart: searches
# never need it back, and it is the bulk of the payload).
SCALAR_FIELDS: tuple[str, ...] = (PK, IMAGE_ID, URI, *BOX_FIELDS, SCORE, RANK, MODEL_VERSION)
ROW_FIELDS: tuple[str, ...] = (*SCALAR_FIELDS, *CONTEXT_FIELDS, EMBEDDING)
# Every field name of the schema (no metadata field or extra may take one); the packed
# context is the store's own, never an encoder's column.
RESERVED_FIELDS: tuple[str, ...] = (*ROW_FIELDS, PACKED_CONTEXT)

MAX_PK_LEN = 512
MAX_IMAGE_ID_LEN = 256
MAX_URI_LEN = 2048
MAX_MODEL_VERSION_LEN = 128
METRIC = "IP"  # embeddings are L2-normalized, so inner product == cosine


Box = tuple[float, float, float, float]  # absolute pixels [x, y, w, h]


def as_box(values: Iterable[float]) -> Box:
    x, y, w, h = (float(v) for v in values)
    return (x, y, w, h)


def make_pk(model_version: str, image_id: str, rank: int) -> str:
    """Deterministic primary key; ``model_version`` must not contain ':' so keys stay unique."""
    if not model_version or ":" in model_version:
        raise ValueError(f"model_version must be non-empty and contain no ':': {model_version!r}")
    if not image_id:
        raise ValueError("image_id must be non-empty")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    pk = f"{model_version}:{image_id}:{int(rank)}"
    if len(pk) > MAX_PK_LEN:
        raise ValueError(f"primary key longer than {MAX_PK_LEN} chars: {pk[:80]}...")
    return pk


# Declared metadata columns (``MilvusConfig.metadata_fields``): name -> type. They become
# typed scalar fields of the collection, so filters on them are checked by Milvus.
MetadataType = str  # one of METADATA_TYPES
METADATA_TYPES: dict[str, DataType] = {
    "str": DataType.VARCHAR, "int": DataType.INT64, "float": DataType.DOUBLE, "bool": DataType.BOOL,
}  # fmt: skip
METADATA_DEFAULTS: dict[str, Any] = {"str": "", "int": 0, "float": 0.0, "bool": False}
MAX_METADATA_STR_LEN = 1024


def coerce_metadata(kind: str, value: Any) -> Any:
    """A manifest value -> the declared type; missing values (None/NaN/"") get the type's default."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or (value == "" and kind != "str"):
        return METADATA_DEFAULTS[kind]
    if kind == "str":
        return str(value)[:MAX_METADATA_STR_LEN]
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if isinstance(value, str):
        if value.strip().lower() in ("true", "1", "yes"):
            return True
        if value.strip().lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    return bool(value)


def collection_schema(dim: int, metadata_fields: Mapping[str, str] | None = None) -> CollectionSchema:
    """The Milvus collection schema for instance rows with embeddings of size ``dim``.

    ``metadata_fields`` (name -> "str" | "int" | "float" | "bool") adds typed scalar fields.
    """
    if dim <= 0:
        raise ValueError(f"embedding dim must be positive, got {dim}")
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
    schema.add_field(PK, DataType.VARCHAR, is_primary=True, max_length=MAX_PK_LEN)
    schema.add_field(IMAGE_ID, DataType.VARCHAR, max_length=MAX_IMAGE_ID_LEN)
    schema.add_field(URI, DataType.VARCHAR, max_length=MAX_URI_LEN)
    for name in BOX_FIELDS:
        schema.add_field(name, DataType.FLOAT)
    schema.add_field(SCORE, DataType.FLOAT)
    schema.add_field(RANK, DataType.INT64)
    schema.add_field(MODEL_VERSION, DataType.VARCHAR, max_length=MAX_MODEL_VERSION_LEN)
    schema.add_field(IMAGE_W, DataType.FLOAT)
    schema.add_field(IMAGE_H, DataType.FLOAT)
    schema.add_field(N_INSTANCES, DataType.INT64)
    schema.add_field(PACKED_CONTEXT, DataType.VARCHAR, max_length=MAX_PACKED_LEN)
    for name, kind in (metadata_fields or {}).items():
        if name in RESERVED_FIELDS or kind not in METADATA_TYPES:
            raise ValueError(f"bad metadata field {name!r}: {kind!r} (types: {sorted(METADATA_TYPES)})")
        extra = {"max_length": MAX_METADATA_STR_LEN} if kind == "str" else {}
        schema.add_field(name, METADATA_TYPES[kind], **extra)
    schema.add_field(EMBEDDING, DataType.FLOAT_VECTOR, dim=dim)
    return schema


@dataclass(frozen=True)
class InstanceRow:
    """One stored instance; ``box`` is absolute pixels ``[x, y, w, h]`` (BoxMode.XYWH_ABS)."""

    image_id: str
    uri: str
    box: Box
    score: float
    rank: int
    model_version: str
    embedding: np.ndarray
    extra: Mapping[str, Any] = field(default_factory=dict)
    # (width, height) of the decoded image and how many instances it has stored; 0 = unknown.
    image_size: tuple[float, float] = (0.0, 0.0)
    n_instances: int = 0

    @property
    def pk(self) -> str:
        return make_pk(self.model_version, self.image_id, self.rank)

    def to_dict(self) -> dict[str, Any]:
        """The Milvus row: schema fields plus dynamic ``extra`` fields."""
        reserved = set(RESERVED_FIELDS) & set(self.extra)
        if reserved:
            raise ValueError(f"extra fields shadow schema fields: {sorted(reserved)}")
        row: dict[str, Any] = {
            PK: self.pk,
            IMAGE_ID: self.image_id,
            URI: self.uri,
            **{name: float(v) for name, v in zip(BOX_FIELDS, self.box, strict=True)},
            SCORE: float(self.score),
            RANK: int(self.rank),
            MODEL_VERSION: self.model_version,
            IMAGE_W: float(self.image_size[0]),
            IMAGE_H: float(self.image_size[1]),
            N_INSTANCES: int(self.n_instances),
            EMBEDDING: np.asarray(self.embedding, dtype=np.float32).reshape(-1).tolist(),
        }
        row.update(self.extra)
        return row

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> InstanceRow:
        """Inverse of :meth:`to_dict`; unknown keys land in ``extra``."""
        extra = {k: v for k, v in row.items() if k not in RESERVED_FIELDS}
        return cls(
            image_id=str(row[IMAGE_ID]),
            uri=str(row[URI]),
            box=as_box(row[name] for name in BOX_FIELDS),
            score=float(row[SCORE]),
            rank=int(row[RANK]),
            model_version=str(row[MODEL_VERSION]),
            embedding=np.asarray(row.get(EMBEDDING, []), dtype=np.float32),
            extra=extra,
            image_size=(float(row.get(IMAGE_W, 0.0)), float(row.get(IMAGE_H, 0.0))),
            n_instances=int(row.get(N_INSTANCES, 0)),
        )


def rows_from_columns(columns: Mapping[str, Any], extra_fields: Iterable[str] = ()) -> Iterator[dict[str, Any]]:
    """Columnar batch (Ray Data / pandas-like dict of arrays) -> Milvus row dicts.

    Only schema fields (and the named ``extra_fields``, e.g. declared metadata) are taken
    (``pk`` is recomputed) so bookkeeping columns of a pipeline never leak into the store.
    The context columns (``image_w``, ``image_h``, ``n_instances``) are optional: 0 when absent.
    """
    extra_fields = tuple(extra_fields)
    n = len(columns[IMAGE_ID])
    zeros = np.zeros(n)
    width, height, count = (np.asarray(columns.get(name, zeros)) for name in CONTEXT_FIELDS)
    embeddings = np.asarray(columns[EMBEDDING], dtype=np.float32).reshape(n, -1)
    for i in range(n):
        row = InstanceRow(
            image_id=str(columns[IMAGE_ID][i]),
            uri=str(columns[URI][i]),
            box=as_box(columns[name][i] for name in BOX_FIELDS),
            score=float(columns[SCORE][i]),
            rank=int(columns[RANK][i]),
            model_version=str(columns[MODEL_VERSION][i]),
            embedding=embeddings[i],
            extra={name: _plain(columns[name][i]) for name in extra_fields},
            image_size=(float(width[i]), float(height[i])),
            n_instances=int(count[i]),
        )
        yield row.to_dict()


def _plain(value: Any) -> Any:
    """numpy scalars (what columnar batches hold) -> Python values pymilvus accepts."""
    return value.item() if isinstance(value, np.generic) else value


# Packed context: "c1" + base64 of [n: uint16][dim: uint16][n x 5 float32: box x, y, w, h,
# objectness][n x dim float16: vectors], instances in rank order. float16 keeps the field
# at a quarter of the rows' float32 vectors' size (about 3.7 KB for 10 instances of dim 128).
_PACK_TAG = "c1"
_HEADER = np.dtype([("n", "<u2"), ("dim", "<u2")])


@dataclass(frozen=True)
class PackedContext:
    """One image's instances as the re-ranker reads them: ``boxes [n, 4]`` absolute pixels
    ``[x, y, w, h]``, ``scores [n]`` objectness, ``embeddings [n, dim]`` float32 (rank order)."""

    boxes: np.ndarray
    scores: np.ndarray
    embeddings: np.ndarray


def pack_context(rows: Iterable[Mapping[str, Any]]) -> str:
    """An image's rows (rank order) -> the :data:`PACKED_CONTEXT` string; "" when it would not fit."""
    rows = list(rows)
    if not rows or len(rows) > 65_535:
        return ""
    emb = np.stack([np.asarray(r[EMBEDDING], dtype=np.float32).reshape(-1) for r in rows])
    head = np.array([(len(rows), emb.shape[1])], dtype=_HEADER)
    scalars = np.array([[*(float(r[f]) for f in BOX_FIELDS), float(r[SCORE])] for r in rows], dtype="<f4")
    blob = head.tobytes() + scalars.tobytes() + emb.astype("<f2").tobytes()
    text = _PACK_TAG + base64.b64encode(blob).decode("ascii")
    return text if len(text) <= MAX_PACKED_LEN else ""


def unpack_context(text: str) -> PackedContext | None:
    """Inverse of :func:`pack_context`; None for "" (not packed) or an unknown format."""
    if not text or not text.startswith(_PACK_TAG):
        return None
    blob = base64.b64decode(text[len(_PACK_TAG):])
    head = np.frombuffer(blob, dtype=_HEADER, count=1)[0]
    n, dim = int(head["n"]), int(head["dim"])
    start = _HEADER.itemsize
    scalars = np.frombuffer(blob, dtype="<f4", count=5 * n, offset=start).reshape(n, 5)
    emb = np.frombuffer(blob, dtype="<f2", count=n * dim, offset=start + 20 * n).reshape(n, dim)
    return PackedContext(boxes=scalars[:, :4].astype(np.float64), scores=scalars[:, 4].astype(np.float64),
                         embeddings=emb.astype(np.float32))


def attach_packed_context(rows: list[dict[str, Any]]) -> None:
    """Set :data:`PACKED_CONTEXT` on each row in place: the image's packed context on its
    rank-0 row when all ``n_instances`` of its rows are in ``rows``, else "" (read row by row)."""
    images: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for row in rows:
        row[PACKED_CONTEXT] = ""
        images.setdefault((str(row[MODEL_VERSION]), str(row[IMAGE_ID])), {})[int(row[RANK])] = row
    for ranks in images.values():
        first = ranks.get(0)
        count = int(first.get(N_INSTANCES) or 0) if first is not None else 0
        if first is not None and count > 0 and all(r in ranks for r in range(count)):
            first[PACKED_CONTEXT] = pack_context(ranks[r] for r in range(count))
