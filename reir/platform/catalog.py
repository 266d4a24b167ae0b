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
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from reir.errors import ReirError
from reir.platform.store import MilvusStore, Table

CATALOG_COLLECTION = "reir_catalog"
STATES = ("building", "ready", "live", "check_failed", "rolled_back")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_]+")


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
    "base": "str", "alias": "str", "model_version": "str", "built_at": "float", "state": "str", "rows": "int",
    "promoted_at": "float", "info": "str",
}  # fmt: skip


class IndexCatalog:
    """Collection versions and alias switches through one :class:`MilvusStore`'s connection
    (lite file, lite server, Milvus)."""

    def __init__(self, store: MilvusStore, *, table: str = CATALOG_COLLECTION) -> None:
        self.store = store
        self.table: Table = store.table(table, _COLUMNS)

    def versions(self, alias: str | None = None) -> list[IndexVersion]:
        """Recorded versions (optionally of one alias), newest build first."""
        rows = self.table.rows({"alias": _checked(alias)} if alias else None)
        return sorted((IndexVersion.from_row(r) for r in rows), key=lambda v: v.built_at, reverse=True)

    def get(self, name: str) -> IndexVersion | None:
        rows = self.table.get([name])
        return IndexVersion.from_row(rows[0]) if rows else None

    def exists(self, name: str) -> bool:
        """Whether a collection of that name exists (recorded here or not)."""
        return self.store.has_collection(name)

    def record(self, version: IndexVersion) -> IndexVersion:
        if version.state not in STATES:
            raise ValueError(f"unknown state {version.state!r}")
        self.table.upsert([version.to_row()])
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
            if same and version.state != "rolled_back" and self.store.has_collection(version.name):
                return version
        return None

    def live(self, alias: str) -> str | None:
        """The collection ``alias`` points at, or None."""
        return self.store.alias_target(alias)

    def promote(self, alias: str, name: str) -> IndexVersion:
        """Point ``alias`` at ``name`` (atomically for readers); the old target stays as ``ready``."""
        version = self.get(name)
        if version is None or not self.store.has_collection(name):
            raise ReirError(f"no index version named {name!r}")
        if version.state in ("building", "check_failed"):
            raise ReirError(f"{name} is {version.state}; only a checked version can be promoted")
        if self.store.has_collection(alias) and self.live(alias) is None:
            raise ReirError(f"{alias!r} is a collection, not an alias; choose another alias name")
        self.store.load_collection(name)  # readers must find it searchable the moment they switch
        previous = self.live(alias)
        self.store.point_alias(alias, name)
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
            if v.name != current and v.promoted_at > 0 and v.state == "ready" and self.store.has_collection(v.name)
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
        aliases = self.store.aliases_of(name)
        if aliases:
            raise ReirError(f"{name} is served by alias {', '.join(aliases)}; promote another version first")
        if self.get(name) is None and not self.store.has_collection(name):
            raise ReirError(f"no index version named {name!r}")
        self.store.drop_collection(name)
        self.table.delete([name])


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
