"""Versioned collections, the serving alias, incremental re-index (real Ray, real milvus-lite)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from ray.data.block import BlockAccessor
from typer.testing import CliRunner

from reir.cli import app
from reir.errors import ReirError
from reir.ingestion.ledger import Ledger, LedgerEntry
from reir.ingestion.pipeline import check_version, fused_batch_images, plan_resources, run_ingestion
from reir.ingestion.records import ERROR, STATUS
from reir.ingestion.sink import MilvusDatasink
from reir.platform import schema as S
from reir.platform.catalog import IndexCatalog
from reir.platform.config import IngestConfig, MilvusConfig, ServeConfig
from reir.platform.modeling import model_version_for
from reir.platform.store import MilvusStore, SearchFilter
from tests.platform.fakes import DIM, fake_loader, quadrant_image

TOP_K = 3


def _cfg(root: Path, ckpt: Path, db: Path, **extra: object) -> IngestConfig:
    fields: dict[str, object] = {
        "gallery_root": root, "split": None, "model_path": str(ckpt), "alias": "reir_live",
        "milvus": MilvusConfig(uri=str(db), collection="gal", index_type="FLAT"),
        "batch_size": 4, "num_encoders": 1, "num_cpus_per_encoder": 0.5, "top_k_instances": TOP_K,
    }  # fmt: skip
    return IngestConfig.model_validate({**fields, **extra})


def _image_ids(db: Path, collection: str) -> set[str]:
    with MilvusStore(str(db), collection) as store:
        store.load()  # a lite file reopened after the run's server stopped: collections start released
        rows = store.client.query(store.collection, filter="rank >= 0", output_fields=["image_id"], limit=1000)
    return {r["image_id"] for r in rows}


def test_versioned_incremental_reindex_promote_rollback_drop(
    tmp_path: Path, fake_checkpoint: Path, ray_session: None, make_gallery: Callable[..., Path]
) -> None:
    root = make_gallery(tmp_path / "g", n=6, corrupt=1, synthetic_split=None)
    db = tmp_path / "idx.db"
    cfg = _cfg(root, fake_checkpoint, db)

    first = run_ingestion(cfg, loader=fake_loader)
    assert first.promoted and first.check == "ok"
    assert (first.images, first.failures, first.instances, first.rows_in_store) == (6, 1, 6 * TOP_K, 6 * TOP_K)
    assert first.collection.startswith("gal__fake_ckpt_") and first.dead_letter_total == 1

    again = run_ingestion(cfg, loader=fake_loader)  # nothing changed: nothing encoded
    assert (again.images, again.failures, again.instances, again.unchanged) == (0, 0, 0, 7)
    assert again.collection == first.collection and again.promoted

    # change one image, delete one, add one: only the changed and the new one are encoded
    quadrant_image(("white", "blue", "black", "black")).save(root / "img001.jpg", quality=95)
    (root / "img002.jpg").unlink()
    shutil.copy(root / "img003.jpg", root / "img_new.jpg")
    third = run_ingestion(cfg, loader=fake_loader)
    assert (third.images, third.unchanged, third.deleted) == (2, 5, 1)
    assert third.rows_in_store == 6 * TOP_K and third.collection == first.collection
    assert _image_ids(db, "reir_live") == {"img000", "img001", "img003", "img004", "img005", "img_new"}

    rebuilt = run_ingestion(cfg.model_copy(update={"rebuild": True}), loader=fake_loader)
    assert rebuilt.promoted and rebuilt.collection != first.collection and rebuilt.images == 6

    with MilvusStore(str(db), "reir_catalog") as store:
        catalog = IndexCatalog(store)
        assert catalog.live("reir_live") == rebuilt.collection
        states = {v.name: v.state for v in catalog.versions("reir_live")}
        assert states == {first.collection: "ready", rebuilt.collection: "live"}
        with pytest.raises(ReirError, match="served by alias"):
            catalog.drop(rebuilt.collection)
        assert catalog.rollback("reir_live").name == first.collection
        assert catalog.live("reir_live") == first.collection
        assert catalog.get(rebuilt.collection).state == "rolled_back"
        with pytest.raises(ReirError, match="no earlier promoted version"):
            catalog.rollback("reir_live")
        # a failed check names its reason and would not promote
        entries = Ledger(store, collection=first.collection, model_version=first.model_version).entries()
        assert len(entries) == 7 and entries["bad000"].status == "failed" and entries["bad000"].error
        with MilvusStore(str(db), first.collection) as version:
            version.load()
            assert check_version(version, entries, first.model_version, 3, first.rows_in_store) == "ok"
            assert "row count" in check_version(version, entries, first.model_version, 3, 5)

    listing = CliRunner().invoke(app, ["index", "list", "--milvus-uri", str(db)])
    assert listing.exit_code == 0, listing.output
    rows = {v["name"]: v for v in json.loads(listing.output)}
    assert rows[first.collection]["live"] and not rows[rebuilt.collection]["live"]
    assert rows[first.collection]["rows"] == 6 * TOP_K and rows[first.collection]["info"]["check"] == "ok"
    dropped = CliRunner().invoke(app, ["index", "drop", rebuilt.collection, "--milvus-uri", str(db)])
    assert dropped.exit_code == 0, dropped.output
    promote = CliRunner().invoke(app, ["index", "promote", first.collection, "--milvus-uri", str(db)])
    assert promote.exit_code == 0 and f"reir_live -> {first.collection}" in promote.output

    # serving's default collection is the alias
    serve_cfg = ServeConfig.model_validate({"model_path": str(fake_checkpoint), "milvus": {"uri": str(db)}})
    with MilvusStore.from_config(serve_cfg.milvus) as store:
        store.load()
        assert store.collection == "reir_live" and store.count() == 6 * TOP_K


def test_cli_index_errors_are_one_line(tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    res = subprocess.run([sys.executable, "-m", "reir.cli", "index", "rollback", "--milvus-uri", str(db)],
                         check=False, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 1 and res.stderr.strip() == f"error: milvus-lite file not found: {db}"


def test_serving_falls_back_to_the_pre_alias_collection(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    row = S.InstanceRow("a", "/a.jpg", (0, 0, 1, 1), 0.5, 0, "v", np.eye(DIM, dtype=np.float32)[0]).to_dict()
    with MilvusStore(str(db), "reir_instances", dim=DIM) as store:
        store.upsert([row])
    cfg = ServeConfig.model_validate({"model_path": "/m", "milvus": {"uri": str(db)}})
    with MilvusStore.from_config(cfg.milvus) as store:
        store.build_index("FLAT")
        store.load()
        assert store.collection == "reir_instances" and store.count() == 1


def test_sink_trims_ranks_a_changed_image_no_longer_has(tmp_path: Path) -> None:
    """A changed image with fewer instances than before loses its stale ranks (and only those)."""
    db = tmp_path / "trim.db"
    milvus = MilvusConfig(uri=str(db), collection="c")
    vec = np.eye(DIM, dtype=np.float32)[0]
    with MilvusStore(str(db), "c", dim=DIM) as store:
        store.upsert([S.InstanceRow("a", "/a", (0, 0, 1, 1), 0.5, r, "v", vec).to_dict() for r in range(4)])
        Ledger(store, collection="c", model_version="v")  # created by the driver before writing
    block = {
        S.PK: np.array(["v:a:0", "v:a:1"], dtype=object), S.IMAGE_ID: np.array(["a", "a"], dtype=object),
        S.URI: np.array(["/a", "/a"], dtype=object), **{f: np.zeros(2, np.float32) for f in S.BOX_FIELDS},
        S.SCORE: np.ones(2, np.float32), S.RANK: np.array([0, 1]), S.MODEL_VERSION: np.array(["v", "v"], dtype=object),
        S.EMBEDDING: np.stack([vec, vec]), STATUS: np.array(["ok", "ok"], dtype=object),
        ERROR: np.array(["", ""], dtype=object), "content_hash": np.array(["h2", "h2"], dtype=object),
        "prev_instances": np.array([4, 4]),
    }  # fmt: skip
    stats = MilvusDatasink(milvus, model_version="v", ledger=True).write([BlockAccessor.batch_to_block(block)], ctx=None)
    assert (stats.rows, stats.images, stats.trimmed) == (2, 1, 2)
    with MilvusStore(str(db), "c") as store:
        store.build_index("FLAT")
        store.load()
        assert store.count(SearchFilter(image_ids=("a",))) == 2
        ledger = Ledger(store, collection="c", model_version="v").entries()
    assert ledger == {"a": LedgerEntry("a", "/a", "h2", 2, "ok", "")}


def test_resource_plan_fits_small_machines() -> None:
    cfg = IngestConfig(model_path="/m", gallery_root=Path("/g"), num_encoders=8, num_cpus_per_encoder=1.0,
                       pipeline="staged")
    plan = plan_resources(cfg, {"CPU": 2.0})  # 0.25 reader + 2 x 0.25 writers leave 1.25
    assert (plan.encoders, plan.cpus_per_encoder, plan.device) == (1, 1.0, "cpu")
    tight = plan_resources(cfg.model_copy(update={"num_cpus_per_encoder": 2.0}), {"CPU": 2.0})
    assert tight.encoders == 1 and tight.cpus_per_encoder == 1.25
    gpu = plan_resources(cfg.model_copy(update={"num_gpus_per_encoder": 0.5}), {"CPU": 16.0, "GPU": 2.0})
    assert (gpu.encoders, gpu.gpus_per_encoder, gpu.device) == (4, 0.5, "cuda")
    with pytest.raises(ValueError, match="no GPU"):
        plan_resources(cfg.model_copy(update={"device": "cuda"}), {"CPU": 4.0})


def test_resource_plan_sizes_the_pool_when_unset() -> None:
    cfg = IngestConfig(model_path="/m", gallery_root=Path("/g"), pipeline="staged")  # num_encoders unset
    # one machine with 2 cores whose Ray instance claims 4 logical CPUs: 2 one-thread encoders, 1 reader
    plan = plan_resources(cfg, {"CPU": 4.0}, cores=2)
    assert (plan.encoders, plan.cpus_per_encoder, plan.readers) == (2, 1.0, 1)
    # a cluster: the CPUs left by the reader and writers (16 - 0.75), and the rest for readers
    wide = plan_resources(cfg, {"CPU": 16.0})
    assert (wide.encoders, wide.readers) == (15, 1)
    two_cpu = plan_resources(cfg.model_copy(update={"num_cpus_per_encoder": 2.0}), {"CPU": 16.0})
    assert (two_cpu.encoders, two_cpu.readers) == (7, 1)
    assert plan_resources(cfg, {"CPU": 16.0, "GPU": 2.0}).encoders == 2  # one per GPU
    assert plan_resources(cfg.model_copy(update={"read_concurrency": 4}), {"CPU": 4.0}, cores=2).readers == 4


def test_fused_plan_gives_the_encoders_every_cpu_and_is_the_cpu_default() -> None:
    cfg = IngestConfig(model_path="/m", gallery_root=Path("/g"))  # pipeline "auto"
    plan = plan_resources(cfg, {"CPU": 4.0}, cores=2)  # no read or write tasks to leave room for
    assert (plan.fused, plan.encoders, plan.cpus_per_encoder, plan.readers) == (True, 2, 1.0, 0)
    assert plan_resources(cfg, {"CPU": 16.0}).encoders == 16
    assert plan_resources(cfg.model_copy(update={"num_encoders": 8}), {"CPU": 2.0}).encoders == 2
    gpu = plan_resources(cfg, {"CPU": 16.0, "GPU": 2.0})  # a GPU model: reading and writing on other cores
    assert (gpu.fused, gpu.device, gpu.encoders) == (False, "cuda", 2)
    assert plan_resources(cfg.model_copy(update={"pipeline": "fused"}), {"CPU": 16.0, "GPU": 1.0}).fused
    assert not plan_resources(cfg.model_copy(update={"pipeline": "staged"}), {"CPU": 4.0}).fused


def test_a_fused_batch_is_one_upsert_of_whole_model_batches() -> None:
    cfg = IngestConfig(model_path="/m", gallery_root=Path("/g"), batch_size=16, top_k_instances=10)
    assert fused_batch_images(cfg) == 64  # 512 rows / 10 per image = 52 images -> 4 model batches
    cfg = cfg.model_copy(update={"top_k_instances": 1000, "batch_size": 8})
    assert fused_batch_images(cfg) == 8


def test_model_version_is_recorded_per_row(fake_checkpoint: Path) -> None:
    assert ":" not in model_version_for(fake_checkpoint)
