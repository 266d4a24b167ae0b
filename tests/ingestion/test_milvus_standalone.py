"""Ingestion into a real Milvus standalone server (``pip install milvus==2.3.5``, the ``dev`` extra):
a manifest with metadata fields, HNSW, a checked build promoted to a real alias, filtered search."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from reir.ingestion.ledger import Ledger
from reir.ingestion.pipeline import run_ingestion
from reir.platform.catalog import IndexCatalog
from reir.platform.config import IngestConfig, MilvusConfig
from reir.platform.milvus_server import free_port
from reir.platform.store import MilvusStore, SearchFilter
from tests.platform.fakes import COLORS, color_embedding, fake_loader

milvus = pytest.importorskip("milvus", reason="the Milvus standalone server comes with `pip install milvus==2.3.5`")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = milvus.default_server
    server.set_base_dir(str(tmp_path_factory.mktemp("milvus-standalone")))
    server.listen_port = free_port()
    server.start()
    try:
        yield f"http://127.0.0.1:{server.listen_port}"
    finally:
        server.stop()


def test_manifest_with_metadata_into_milvus_standalone(
    tmp_path: Path, fake_checkpoint: Path, ray_session: None, make_gallery: Callable[..., Path], milvus_server: str
) -> None:
    root = make_gallery(tmp_path / "g", n=6, corrupt=1, synthetic_split=None)
    files = sorted(p.name for p in root.iterdir())
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(
        json.dumps({"uri": name, "site": "north" if i % 2 == 0 else "south", "year": 2020 + i})
        for i, name in enumerate(files)
    ))  # fmt: skip
    milvus_cfg = MilvusConfig(uri=milvus_server, collection="gal", index_type="HNSW",
                              metadata_fields={"site": "str", "year": "int"})  # fmt: skip
    cfg = IngestConfig(manifest=str(manifest), model_path=str(fake_checkpoint), alias="reir_live", milvus=milvus_cfg,
                       top_k_instances=2, batch_size=4, num_encoders=1, num_cpus_per_encoder=0.5)  # fmt: skip

    summary = run_ingestion(cfg, loader=fake_loader)
    assert summary.promoted and summary.check == "ok"
    assert (summary.images, summary.failures, summary.rows_in_store) == (6, 1, 12)

    with MilvusStore.from_config(milvus_cfg.model_copy(update={"collection": "reir_live"})) as store:
        assert store.index_type() == "HNSW" and store.count() == 12
        north = {f.removesuffix(".jpg") for i, f in enumerate(files) if i % 2 == 0 and f.startswith("img")}
        red = color_embedding(np.asarray(COLORS["red"]))
        hits = store.search(red, top_n=20, filter=SearchFilter(metadata=(("site", "north"),)))[0]
        assert hits and {h.image_id for h in hits} == north
        assert store.count(SearchFilter(metadata=(("year", 2021),))) == 2
        catalog = IndexCatalog(store)
        assert catalog.live("reir_live") == summary.collection
        dead = Ledger(store, collection=summary.collection, model_version=summary.model_version).dead_letters()
        assert [(d.image_id, d.uri.endswith("bad000.jpg")) for d in dead] == [("bad000", True)]

    again = run_ingestion(cfg, loader=fake_loader)
    assert (again.images, again.unchanged, again.rows_in_store, again.collection) == (0, 7, 12, summary.collection)


def test_server_defaults_hnsw_partition_per_version_and_keyed_context(milvus_server: str) -> None:
    from reir.platform import schema as S
    from reir.platform.backend import HNSW_EF, partition_for

    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(60, 8)).astype(np.float32)
    rows = [S.InstanceRow(f"i{n // 3}", f"/g/i{n // 3}.jpg", (n, 0.0, 5.0, 5.0), 0.5, n % 3, version, vecs[n],
                          image_size=(320.0, 200.0), n_instances=3).to_dict()
            for n in range(60) for version in ("va", "vb")]  # fmt: skip
    with MilvusStore(milvus_server, "layout", dim=8) as store:
        assert not store.lite
        store.upsert(rows)
        store.flush()
        store.build_index()  # AUTOINDEX on a server means HNSW M16 / efConstruction 200
        store.load()
        assert store.index_type() == "HNSW"
        assert {partition_for("va"), partition_for("vb")} <= store.layout().partitions
        hits = store.search(vecs[7], 10, SearchFilter(model_version="vb"))[0]
        assert hits[0].pk == "vb:i2:1" and {h.model_version for h in hits} == {"vb"}
        assert hits[0].image_size == (320.0, 200.0) and hits[0].n_instances == 3
        context = store.context(hits[:2], model_version="vb")
        assert [h.pk for h in context["i2"]] == ["vb:i2:0", "vb:i2:1", "vb:i2:2"]
        assert all(h.embedding is not None for h in context["i2"])
        assert store.count(SearchFilter(model_version="va")) == 60
    assert HNSW_EF >= 100
