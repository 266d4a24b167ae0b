"""Writing encoder batches into Milvus (:class:`RowWriter`) and the Ray Data sink around it.

A :class:`RowWriter` holds one :class:`MilvusStore`, upserts the ``status == "ok"`` rows
(deterministic primary keys, so a rerun or a retried task overwrites instead of
duplicating), deletes ranks a changed image no longer has, then records every image of
the block in the ledger (``reir.ingestion.ledger``) and returns :class:`WriteStats`;
status rows (see ``reir.ingestion.encoder``) are only counted and recorded. The staged plan's
write tasks (:class:`MilvusDatasink`) use one each; ``on_write_complete`` runs on the driver and
folds the per-task stats into :attr:`MilvusDatasink.result`. In the fused plan each encoder
actor writes its own batches (``reir.ingestion.pipeline``).

Writers need a URI that several processes may open at once (a server); the
pipeline arranges that for milvus-lite files (see ``reir.ingestion.pipeline``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink, WriteResult

from reir.ingestion.gallery import CONTENT_HASH, PREV_INSTANCES
from reir.ingestion.ledger import Ledger, LedgerEntry, instance_pks
from reir.ingestion.records import (
    ERROR,
    STATUS,
    STATUS_EMPTY,
    STATUS_FAILED,
    STATUS_OK,
    DeadLetter,
)
from reir.platform import schema as S
from reir.platform import telemetry as T
from reir.platform.config import MilvusConfig
from reir.platform.store import MilvusStore

log = logging.getLogger(__name__)


@dataclass
class WriteStats:
    rows: int = 0
    images: int = 0
    failures: int = 0
    trimmed: int = 0  # stale rows of changed images (they now have fewer instances) deleted
    dead_letter: list[DeadLetter] = field(default_factory=list)

    def merge(self, other: WriteStats) -> None:
        self.rows += other.rows
        self.images += other.images
        self.failures += other.failures
        self.trimmed += other.trimmed
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


def instance_columns(columns: dict[str, np.ndarray], metadata_fields: Iterable[str] = (),
                     ok: np.ndarray | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """The encoder's columns -> the stored fields of its instance rows (status rows dropped);
    ``S.rows_from_columns`` turns them into rows for ``MilvusStore.upsert``."""
    ok = columns[STATUS] == STATUS_OK if ok is None else ok
    # context fields are absent from older encoders' batches
    return {name: columns[name][ok] for name in (*S.ROW_FIELDS, *metadata_fields) if name in columns}


def _images_of(columns: dict[str, np.ndarray]) -> list[tuple[LedgerEntry, int]]:
    """Per image of a block (the encoder emits each image's rows together, in one block):
    its ledger entry and how many rows it had before (0 if new)."""
    out: dict[str, tuple[LedgerEntry, int]] = {}
    n = len(columns[S.IMAGE_ID])
    hashes = columns.get(CONTENT_HASH, np.full(n, "", dtype=object))
    prev = columns.get(PREV_INSTANCES, np.zeros(n, dtype=np.int64))
    for i in range(n):
        image_id, status = str(columns[S.IMAGE_ID][i]), str(columns[STATUS][i])
        entry, before = out.get(image_id, (None, int(prev[i])))
        count = (entry.instances if entry else 0) + (status == STATUS_OK)
        out[image_id] = (
            LedgerEntry(image_id, str(columns[S.URI][i]), str(hashes[i]), count, status, str(columns[ERROR][i])),
            before,
        )
    return list(out.values())


class RowWriter:
    """Writes encoder batches: upserts the ``status == "ok"`` rows, trims the stale ranks of
    changed images, records every image of the batch in the ledger; one store connection.

    The sink's write tasks use one per task; in the fused plan each encoder actor writes its
    own batches with one (``reir.ingestion.pipeline.IngestActor``).
    """

    def __init__(self, milvus: MilvusConfig, *, model_version: str = "", ledger: bool = False) -> None:
        self.milvus = milvus
        self.model_version = model_version
        self.store = MilvusStore.from_config(milvus)
        self.ledger = Ledger(self.store, collection=milvus.collection, model_version=model_version,
                             create=False) if ledger else None  # fmt: skip
        self._rows_metric = T.ray_metric(T.INGEST_ROWS_WRITTEN_TOTAL)
        self._collection_ready = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    def write(self, columns: dict[str, np.ndarray]) -> WriteStats:
        """One batch of the encoder's columns (instance and status rows) -> its stats."""
        if S.IMAGE_ID not in columns or len(columns[S.IMAGE_ID]) == 0:  # all rows filtered upstream
            return WriteStats()
        ok, stats = _stats_for(columns)
        if np.any(ok):
            kept = instance_columns(columns, self.milvus.metadata_fields, ok)
            if not self._collection_ready:
                _ensure_collection(self.store, kept[S.EMBEDDING].shape[-1])
                self._collection_ready = True
            stats.rows = self.store.upsert(S.rows_from_columns(kept, self.milvus.metadata_fields))
            if stats.rows:
                self._rows_metric.inc(stats.rows)
        images = _images_of(columns)
        stats.trimmed = self._trim(images)
        if self.ledger is not None:
            self.ledger.record(entry for entry, _ in images)
        return stats

    def _trim(self, images: list[tuple[LedgerEntry, int]]) -> int:
        """A changed image with fewer instances than before: delete its now-stale ranks."""
        stale: list[str] = []
        for entry, before in images:
            if before > entry.instances and self.model_version:
                stale += instance_pks(self.model_version, entry.image_id, range(entry.instances, before))
        self.store.delete(stale)
        return len(stale)


class MilvusDatasink(Datasink[WriteStats]):
    """Upserts instance rows, trims stale ranks of changed images, records images in the ledger."""

    def __init__(self, milvus: MilvusConfig, *, dim: int | None = None, model_version: str = "",
                 ledger: bool = False) -> None:  # fmt: skip
        self.milvus = milvus
        self.dim = dim
        self.model_version = model_version
        self.ledger = ledger
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
        with RowWriter(self.milvus, model_version=self.model_version, ledger=self.ledger) as writer:
            for block in blocks:
                total.merge(writer.write(BlockAccessor.for_block(block).to_batch_format("numpy")))
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
