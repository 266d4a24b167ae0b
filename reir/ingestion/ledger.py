"""The ingestion ledger: what is indexed, per (collection, model version, image), in Milvus.

One row per image that an ingestion finished (``reir_ledger``): its URI, content hash,
how many instance rows it has, and its status (``ok``, ``empty`` or ``failed`` with the
error). Failed rows are the dead-letter table (URI, reason) and stay queryable in Milvus.

A write task records an image *after* its instance rows are upserted, so a job killed at
any point leaves at worst images whose rows are written but not recorded; the next run
encodes them again and upserts the same primary keys (no duplicates). That makes a
restarted job resume where it stopped, and a job whose inputs did not change a no-op.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from reir.ingestion.records import STATUS_FAILED
from reir.platform import schema as S
from reir.platform.store import MilvusStore

LEDGER_COLLECTION = "reir_ledger"
_COLUMNS = {
    "collection": "str", "model_version": "str", "image_id": "str", "uri": "str", "content_hash": "str",
    "instances": "int", "status": "str", "error": "str", "updated_at": "float",
}  # fmt: skip


@dataclass(frozen=True)
class LedgerEntry:
    image_id: str
    uri: str
    content_hash: str
    instances: int
    status: str
    error: str = ""


class Ledger:
    """Ledger rows of one collection and model version."""

    def __init__(self, store: MilvusStore, *, collection: str, model_version: str,
                 table: str = LEDGER_COLLECTION, create: bool = True) -> None:  # fmt: skip
        self.collection = collection
        self.model_version = model_version
        self.table = store.table(table, _COLUMNS, create=create)

    def _pk(self, image_id: str) -> str:
        return f"{self.collection}|{self.model_version}|{image_id}"

    def entries(self) -> dict[str, LedgerEntry]:
        fields = ["image_id", "uri", "content_hash", "instances", "status", "error"]
        rows = self.table.rows({"collection": self.collection, "model_version": self.model_version})
        return {str(r["image_id"]): LedgerEntry(**{f: r[f] for f in fields}) for r in rows}

    def record(self, entries: Iterable[LedgerEntry]) -> int:
        now = time.time()
        rows = [
            {"pk": self._pk(e.image_id), "collection": self.collection, "model_version": self.model_version,
             "image_id": e.image_id[:2048], "uri": e.uri[:2048], "content_hash": e.content_hash,
             "instances": int(e.instances), "status": e.status, "error": e.error[:2000], "updated_at": now}
            for e in entries
        ]  # fmt: skip
        self.table.upsert(rows)
        return len(rows)

    def remove(self, image_ids: Iterable[str]) -> None:
        self.table.delete([self._pk(i) for i in image_ids])

    def dead_letters(self) -> list[LedgerEntry]:
        return [e for e in self.entries().values() if e.status == STATUS_FAILED]


def drop_collection_entries(store: MilvusStore, collection: str, table: str = LEDGER_COLLECTION) -> None:
    """Forget every ledger row of a dropped collection."""
    store.table(table, _COLUMNS, create=False).delete_where({"collection": collection})


def instance_pks(model_version: str, image_id: str, ranks: Iterable[int]) -> list[str]:
    return [S.make_pk(model_version, image_id, r) for r in ranks]


def summarize(entries: Mapping[str, LedgerEntry]) -> tuple[int, int]:
    """(expected instance rows, failed images) over ledger entries."""
    return sum(e.instances for e in entries.values()), sum(e.status == STATUS_FAILED for e in entries.values())
