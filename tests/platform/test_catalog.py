"""The index catalog and the bookkeeping tables, through the store only (real milvus-lite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reir.errors import ReirError
from reir.ingestion.ledger import Ledger, LedgerEntry, drop_collection_entries
from reir.platform.catalog import IndexCatalog, IndexVersion
from reir.platform.store import MilvusStore, Table
from tests.platform.test_store import DIM, _rows


@pytest.fixture
def store(tmp_path: Path):
    with MilvusStore(str(tmp_path / "idx.db"), "base", dim=DIM) as s:
        yield s


def test_table_filters_escape_values_and_refuse_unknown_columns(store: MilvusStore) -> None:
    table = store.table("t", {"name": "str", "n": "int"})
    table.upsert([{"pk": "a", "name": 'x" or name != "', "n": 1}, {"pk": "b", "name": "y", "n": 2}])
    assert [r["pk"] for r in table.rows({"name": 'x" or name != "'})] == ["a"]  # one literal, not an expression
    assert [r["pk"] for r in table.rows({"name": "y"})] == ["b"]
    assert sorted(r["pk"] for r in table.rows()) == ["a", "b"]
    with pytest.raises(ValueError, match="no string column"):
        list(table.rows({"n": "1"}))
    table.delete_where({"name": "y"})
    assert [r["pk"] for r in table.rows()] == ["a"]
    with pytest.raises(ValueError, match="unknown column kinds"):
        Table(store.client, "t2", {"when": "date"})


def test_catalog_promotes_rolls_back_and_drops_through_the_store(store: MilvusStore) -> None:
    catalog = IndexCatalog(store)
    for name, built in (("base__v1", 1.0), ("base__v2", 2.0)):
        with MilvusStore(store.uri, name, dim=DIM) as version:
            version.upsert(_rows(4)[1])
        catalog.record(IndexVersion(name=name, base="base", alias="live", model_version="m", built_at=built,
                                    state="ready"))  # fmt: skip
    assert catalog.live("live") is None
    catalog.promote("live", "base__v1")
    catalog.promote("live", "base__v2")
    assert catalog.live("live") == "base__v2" and catalog.get("base__v1").state == "ready"  # type: ignore[union-attr]
    with MilvusStore(store.uri, "live") as through_alias:
        assert through_alias.count() == 4
    assert catalog.rollback("live").name == "base__v1"
    assert catalog.get("base__v2").state == "rolled_back"  # type: ignore[union-attr]
    with pytest.raises(ReirError, match="served by alias live"):
        catalog.drop("base__v1")
    catalog.drop("base__v2")
    assert not catalog.exists("base__v2") and catalog.get("base__v2") is None
    assert [v.name for v in catalog.versions("live")] == ["base__v1"]


def test_ledger_rows_and_dropping_a_collections_entries(store: MilvusStore) -> None:
    ledger = Ledger(store, collection="c1", model_version="m")
    other = Ledger(store, collection="c2", model_version="m")
    ledger.record([LedgerEntry("img0", "/g/0.jpg", "h0", 3, "ok"), LedgerEntry("bad", "/g/b.jpg", "", 0, "failed", "x")])
    other.record([LedgerEntry("img0", "/g/0.jpg", "h0", 3, "ok")])
    assert set(ledger.entries()) == {"img0", "bad"} and [e.image_id for e in ledger.dead_letters()] == ["bad"]
    ledger.remove(["bad"])
    assert set(ledger.entries()) == {"img0"}
    drop_collection_entries(store, "c1")
    assert ledger.entries() == {} and set(other.entries()) == {"img0"}
