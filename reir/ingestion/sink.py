"""Ray Data sink that upserts instance rows into Milvus and accounts images/failures.

Each write task opens its own :class:`MilvusStore`, upserts the ``status == "ok"`` rows
(deterministic primary keys, so a rerun or a retried task overwrites instead of
duplicating) and returns :class:`WriteStats`; status rows (see
``reir.ingestion.encoder``) are only counted. ``on_write_complete`` runs on the driver
and folds the per-task stats into :attr:`MilvusDatasink.result`.

The sink needs a URI that several processes may open at once (a server); the
pipeline arranges that for milvus-lite files (see ``reir.ingestion.pipeline``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink, WriteResult

from reir.ingestion.records import (
    ERROR,
    STATUS,
    STATUS_EMPTY,
    STATUS_FAILED,
    STATUS_OK,
    DeadLetter,
)
from reir.platform import schema as S
from reir.platform.config import MilvusConfig
from reir.platform.store import MilvusStore

log = logging.getLogger(__name__)


@dataclass
class WriteStats:
    rows: int = 0
    images: int = 0
    failures: int = 0
    dead_letter: list[DeadLetter] = field(default_factory=list)

    def merge(self, other: WriteStats) -> None:
        self.rows += other.rows
        self.images += other.images
        self.failures += other.failures
        self.dead_letter.extend(other.dead_letter)


def _embedding_dim_from_schema(schema: Any) -> int | None:
    """Vector size from a pyarrow schema whose embedding column is a fixed-shape tensor."""
    try:
        shape = getattr(schema.field(S.EMBEDDING).type, "shape", None)
    except (KeyError, AttributeError):
        return None
    return int(shape[-1]) if shape else None


def _stats_for(columns: dict[str, np.ndarray]) -> tuple[np.ndarray, WriteStats]:
    status = columns[STATUS]
    ok = status == STATUS_OK
    failed = status == STATUS_FAILED
    stats = WriteStats(
        # rank 0 marks an image's first instance, so each image is counted exactly once
        images=int(np.sum(ok & (columns[S.RANK] == 0)) + np.sum(status == STATUS_EMPTY)),
        failures=int(np.sum(failed)),
        dead_letter=[
            DeadLetter(str(i), str(u), str(e))
            for i, u, e in zip(columns[S.IMAGE_ID][failed], columns[S.URI][failed], columns[ERROR][failed])
        ],
    )
    return ok, stats


class MilvusDatasink(Datasink[WriteStats]):
    def __init__(self, milvus: MilvusConfig, *, dim: int | None = None) -> None:
        self.milvus = milvus
        self.dim = dim
        self.result = WriteStats()

    def get_name(self) -> str:
        return "Milvus"

    @property
    def min_rows_per_write(self) -> int | None:
        # Fewer, larger upserts: each write task opens a connection.
        return self.milvus.upsert_batch_size

    def on_write_start(self, schema: Any = None) -> None:
        dim = self.dim or _embedding_dim_from_schema(schema)
        if dim is None:
            return  # the write tasks create the collection from their first block
        with MilvusStore.from_config(self.milvus) as store:
            store.ensure_collection(dim)

    def write(self, blocks: Iterable[Block], ctx: Any) -> WriteStats:
        total = WriteStats()
        store = MilvusStore.from_config(self.milvus)
        collection_ready = False
        try:
            for block in blocks:
                columns = BlockAccessor.for_block(block).to_batch_format("numpy")
                if len(columns[S.IMAGE_ID]) == 0:
                    continue
                ok, stats = _stats_for(columns)
                if np.any(ok):
                    kept = {name: columns[name][ok] for name in S.ROW_FIELDS}
                    if not collection_ready:
                        _ensure_collection(store, kept[S.EMBEDDING].shape[-1])
                        collection_ready = True
                    stats.rows = store.upsert(S.rows_from_columns(kept))
                total.merge(stats)
        finally:
            store.close()
        return total

    def on_write_complete(self, write_result: WriteResult[WriteStats]) -> None:
        result = WriteStats()
        for stats in write_result.write_returns:
            if stats is not None:
                result.merge(stats)
        self.result = result
        log.info("Milvus sink: %d rows, %d images, %d failures", result.rows, result.images, result.failures)


def _ensure_collection(store: MilvusStore, dim: int) -> None:
    try:
        store.ensure_collection(int(dim))
    except Exception:
        # Another write task may have created it between our check and create.
        if store.dim != int(dim):
            raise
