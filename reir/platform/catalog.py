"""Versioned index collections and the serving alias (``reir index list|promote|rollback|drop``).

A versioned ingestion writes into a fresh collection named
``{base}__{model}__{YYYYmmddTHHMMSS}`` and records it in the catalog table
(``reir_catalog``, one row per version: model version, build time, state, rows,
promotion time). Promotion points a real Milvus alias (``reir_live`` by default) at
the version: milvus-lite (file and server mode, checked with milvus-lite 3.2) and Milvus
servers both support ``create_alias`` / ``alter_alias``, and a search through an alias is
resolved by the server per request, so a switch is atomic for readers and needs no
restart of the searcher. Previous versions stay until dropped; rollback re-points the
alias at the version promoted before the current one.

States: ``building`` (being written or resumed), ``ready`` (checked, not live),
``live`` (the alias target), ``check_failed``, ``rolled_back``.

Milvus requires a vector field in every collection, so bookkeeping tables like this one
carry a constant 2-d vector that is never searched.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from pymilvus import DataType, MilvusClient

from reir.errors import ReirError

CATALOG_COLLECTION = "reir_catalog"
STATES = ("building", "ready", "live", "check_failed", "rolled_back")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_]+")
DUMMY_VECTOR = "_v"
_DUMMY = [1.0, 0.0]
_MAX_STR = 2048


def ensure_table(client: MilvusClient, name: str, columns: Mapping[str, DataType]) -> None:
    """A small bookkeeping collection (VARCHAR ``pk`` + ``columns``), indexed and loaded."""
    if not client.has_collection(name):
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=_MAX_STR)
        for column, kind in columns.items():
            extra = {"max_length": _MAX_STR} if kind == DataType.VARCHAR else {}
            schema.add_field(column, kind, **extra)
        schema.add_field(DUMMY_VECTOR, DataType.FLOAT_VECTOR, dim=len(_DUMMY))
        try:
            # Strong: a Milvus server otherwise may answer a read with a state older than our last write.
            client.create_collection(name, schema=schema, consistency_level="Strong")
        except Exception:  # a concurrent creator won; anything else is re-raised below
            if not client.has_collection(name):
                raise
    if DUMMY_VECTOR not in client.list_indexes(name):
        params = client.prepare_index_params()
        params.add_index(field_name=DUMMY_VECTOR, index_type="FLAT", metric_type="L2")
        client.create_index(name, params)
    client.load_collection(name)


def upsert_table(client: MilvusClient, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
    if rows:
        client.upsert(name, [{**row, DUMMY_VECTOR: _DUMMY} for row in rows])


def query_table(client: MilvusClient, name: str, expr: str, output: Sequence[str], batch: int = 4096) -> Iterator[dict]:
    """Every matching row, paged (a plain query is capped at 16384 rows)."""
    it = client.query_iterator(name, batch_size=batch, filter=expr, output_fields=list(output),
                               consistency_level="Strong")
    try:
        while True:
            page = it.next()
            if not page:
                return
            yield from page
    finally:
        it.close()


def version_name(base: str, model_version: str, built_at: float) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(built_at))
    model = _NAME_CHARS.sub("_", model_version).strip("_")[:80] or "model"
    return f"{base}__{model}__{stamp}"[:255]


@dataclass(frozen=True)
class IndexVersion:
    name: str
    base: str
    alias: str
    model_version: str
    built_at: float
    state: str = "building"
    rows: int = 0
    promoted_at: float = 0.0
    info: str = "{}"  # JSON: index type, metadata fields, check outcome

    def to_row(self) -> dict[str, Any]:
        return {"pk": self.name, **{k: v for k, v in asdict(self).items() if k != "name"}}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> IndexVersion:
        names = {f.name for f in fields(cls)} - {"name"}
        return cls(name=str(row["pk"]), **{k: row[k] for k in names})


_COLUMNS = {
    "base": DataType.VARCHAR, "alias": DataType.VARCHAR, "model_version": DataType.VARCHAR,
    "built_at": DataType.DOUBLE, "state": DataType.VARCHAR, "rows": DataType.INT64,
    "promoted_at": DataType.DOUBLE, "info": DataType.VARCHAR,
}  # fmt: skip


class IndexCatalog:
    """Collection versions and alias switches over one Milvus client (lite file, lite server, Milvus)."""

    def __init__(self, client: MilvusClient, *, table: str = CATALOG_COLLECTION) -> None:
        self.client = client
        self.table = table
        ensure_table(client, table, _COLUMNS)

    def versions(self, alias: str | None = None) -> list[IndexVersion]:
        """Recorded versions (optionally of one alias), newest build first."""
        expr = f'alias == "{_checked(alias)}"' if alias else ""
        rows = query_table(self.client, self.table, expr, ["pk", *_COLUMNS])
        return sorted((IndexVersion.from_row(r) for r in rows), key=lambda v: v.built_at, reverse=True)

    def get(self, name: str) -> IndexVersion | None:
        rows = self.client.get(self.table, ids=[name], output_fields=["pk", *_COLUMNS], consistency_level="Strong")
        return IndexVersion.from_row(rows[0]) if rows else None

    def record(self, version: IndexVersion) -> IndexVersion:
        if version.state not in STATES:
            raise ValueError(f"unknown state {version.state!r}")
        upsert_table(self.client, self.table, [version.to_row()])
        return version

    def update(self, name: str, **changes: Any) -> IndexVersion:
        current = self.get(name)
        if current is None:
            raise ReirError(f"no index version named {name!r}")
        merged = {**asdict(current), **changes}
        return self.record(IndexVersion(**merged))

    def resumable(self, alias: str, base: str, model_version: str) -> IndexVersion | None:
        """The newest existing version of this model that a new run should continue."""
        for version in self.versions(alias):
            same = version.base == base and version.model_version == model_version
            if same and version.state != "rolled_back" and self.client.has_collection(version.name):
                return version
        return None

    def live(self, alias: str) -> str | None:
        """The collection ``alias`` points at, or None."""
        # Listed first: describe_alias on a missing alias (every first promotion) makes pymilvus
        # log an ERROR with a traceback before it raises, for what is a normal answer here.
        if alias not in self.client.list_aliases().get("aliases", []):
            return None
        try:
            return str(self.client.describe_alias(alias)["collection_name"])
        except Exception:  # noqa: BLE001 - dropped between the two calls
            return None

    def promote(self, alias: str, name: str) -> IndexVersion:
        """Point ``alias`` at ``name`` (atomically for readers); the old target stays as ``ready``."""
        version = self.get(name)
        if version is None or not self.client.has_collection(name):
            raise ReirError(f"no index version named {name!r}")
        if version.state in ("building", "check_failed"):
            raise ReirError(f"{name} is {version.state}; only a checked version can be promoted")
        if self.client.has_collection(alias) and self.live(alias) is None:
            raise ReirError(f"{alias!r} is a collection, not an alias; choose another alias name")
        self.client.load_collection(name)  # readers must find it searchable the moment they switch
        previous = self.live(alias)
        if previous is None:
            self.client.create_alias(name, alias)
        elif previous != name:
            self.client.alter_alias(name, alias)
        if previous not in (None, name) and self.get(previous) is not None:
            self.update(previous, state="ready")
        return self.update(name, state="live", alias=alias, promoted_at=time.time())

    def rollback(self, alias: str) -> IndexVersion:
        """Re-point ``alias`` at the version promoted before the current one."""
        current = self.live(alias)
        if current is None:
            raise ReirError(f"alias {alias!r} points at nothing; nothing to roll back")
        earlier = [
            v for v in self.versions(alias)
            if v.name != current and v.promoted_at > 0 and v.state == "ready" and self.client.has_collection(v.name)
        ]  # fmt: skip
        if not earlier:
            raise ReirError(f"no earlier promoted version of {alias!r} to roll back to")
        target = max(earlier, key=lambda v: v.promoted_at)
        promoted = self.promote(alias, target.name)
        if self.get(current) is not None:
            self.update(current, state="rolled_back")
        return promoted

    def drop(self, name: str) -> None:
        """Drop a version's collection and its record; the live one is refused."""
        aliases = self.client.list_aliases(name).get("aliases", []) if self.client.has_collection(name) else []
        if aliases:
            raise ReirError(f"{name} is served by alias {', '.join(aliases)}; promote another version first")
        if self.get(name) is None and not self.client.has_collection(name):
            raise ReirError(f"no index version named {name!r}")
        if self.client.has_collection(name):
            self.client.drop_collection(name)
        self.client.delete(self.table, ids=[name])


def describe(version: IndexVersion, live: str | None) -> dict[str, Any]:
    """A JSON-friendly view for ``reir index list``."""
    out = asdict(version)
    out["info"] = json.loads(version.info or "{}")
    out["live"] = version.name == live
    out["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(version.built_at))
    return out


def _checked(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", value):
        raise ReirError(f"bad alias/collection name {value!r}")
    return value
