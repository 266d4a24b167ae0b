"""Fault tolerance: an encoder actor dies mid-run; a job crashes and is restarted (real Ray, real milvus-lite)."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from reir.errors import IngestionAborted
from reir.ingestion.guard import FailureGuard
from reir.ingestion.ledger import Ledger
from reir.ingestion.pipeline import run_ingestion
from reir.platform.catalog import IndexCatalog, IndexVersion
from reir.platform.config import IngestConfig, MilvusConfig
from reir.platform.milvus_server import EmbeddedMilvus
from reir.platform.modeling import model_version_for
from reir.platform.store import MilvusStore
from tests.platform.fakes import fake_loader

TOP_K = 2
N = 12


class ExitOnce:
    """Fault hook: the encoder actor's process exits at its ``at``-th batch, once per marker file."""

    def __init__(self, marker: Path, at: int = 2) -> None:
        self.marker = marker
        self.at = at

    def __call__(self, batch: int) -> None:
        if batch == self.at and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)


class CrashAfterRecorded:
    """Fault hook: once ``images`` are in the ledger, every later batch raises (the job dies)."""

    def __init__(self, uri: str, collection: str, model_version: str, images: int) -> None:
        self.args = (uri, collection, model_version)
        self.images = images

    def __call__(self, batch: int) -> None:
        if batch == 1:
            return
        uri, collection, version = self.args
        with MilvusStore(uri, collection) as store:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if len(Ledger(store, collection=collection, model_version=version, create=False).entries()) >= self.images:
                    raise RuntimeError("injected crash")
                time.sleep(0.2)


def _cfg(root: Path, ckpt: Path, uri: str, **extra: object) -> IngestConfig:
    fields: dict[str, object] = {
        "gallery_root": root, "split": None, "model_path": str(ckpt), "top_k_instances": TOP_K,
        "milvus": MilvusConfig(uri=uri, collection="gal", index_type="FLAT", upsert_batch_size=1),
        "batch_size": 2, "num_encoders": 2, "num_cpus_per_encoder": 0.5,
    }  # fmt: skip
    return IngestConfig.model_validate({**fields, **extra})


def _all_pks(uri: str, collection: str) -> list[str]:
    with MilvusStore(uri, collection) as store:
        store.load()
        return [r["pk"] for r in store.client.query(collection, filter="rank >= 0", output_fields=["pk"], limit=10_000)]


def test_killed_encoder_actor_is_replaced_and_rows_are_exact(
    tmp_path: Path, fake_checkpoint: Path, ray_session: None, make_gallery: Callable[..., Path]
) -> None:
    root = make_gallery(tmp_path / "g", n=N, corrupt=0, synthetic_split=None)
    marker = tmp_path / "killed"
    db = tmp_path / "idx.db"
    # 8 one-CPU encoders do not fit the 4-CPU test cluster: the plan shrinks the pool instead of
    # hanging (the fused layout has no read or write tasks beside them: 4)
    cfg = _cfg(root, fake_checkpoint, str(db), num_encoders=8, num_cpus_per_encoder=1.0)
    summary = run_ingestion(cfg, loader=fake_loader, fault=ExitOnce(marker))
    assert marker.exists()  # an actor process really died mid-run
    assert (summary.encoders, summary.pipeline) == (4, "fused")
    assert (summary.images, summary.instances, summary.failures) == (N, N * TOP_K, 0)
    pks = _all_pks(str(db), "gal")
    assert len(pks) == len(set(pks)) == summary.rows_in_store == N * TOP_K


def test_crashed_job_resumes_without_redoing_or_duplicating(
    tmp_path: Path, fake_checkpoint: Path, ray_session: None, make_gallery: Callable[..., Path]
) -> None:
    root = make_gallery(tmp_path / "g", n=N, corrupt=0, synthetic_split=None)
    with EmbeddedMilvus(tmp_path / "srv.db") as server:
        cfg = _cfg(root, fake_checkpoint, server.uri, num_encoders=1)
        crash = CrashAfterRecorded(server.uri, "gal", model_version_for(fake_checkpoint), images=2)
        with pytest.raises(Exception, match="injected crash"):
            run_ingestion(cfg, loader=fake_loader, fault=crash)
        with MilvusStore(server.uri, "reir_ledger") as store:
            done = len(Ledger(store, collection="gal", model_version=model_version_for(fake_checkpoint)).entries())
        assert 2 <= done < N

        resumed = run_ingestion(cfg, loader=fake_loader)
        assert resumed.images == N - done and resumed.unchanged == done  # only the unfinished images
        assert resumed.rows_in_store == N * TOP_K
        pks = _all_pks(server.uri, "gal")
        assert len(pks) == len(set(pks)) == N * TOP_K


def test_mostly_failing_ingestion_stops_early_and_promotes_nothing(
    tmp_path: Path, fake_checkpoint: Path, ray_session: None, make_gallery: Callable[..., Path]
) -> None:
    """An unreadable gallery (30 of 32 files corrupt, listed first) trips the failure-rate guard."""
    root = make_gallery(tmp_path / "g", n=2, corrupt=30, synthetic_split=None)
    db = tmp_path / "idx.db"
    cfg = _cfg(root, fake_checkpoint, str(db), num_encoders=1, alias="live_t", max_failure_rate=0.5,
               failure_rate_min_images=4)
    with pytest.raises(IngestionAborted, match="ingestion stopped early, nothing promoted") as caught:
        run_ingestion(cfg, loader=fake_loader)
    message = str(caught.value)
    tried = int(re.search(r"of the first (\d+) images failed", message).group(1))  # type: ignore[union-attr]
    assert 4 <= tried < 32 and "(32 images listed)" in message  # stopped before the end
    assert "UnidentifiedImageError" in message or "cannot identify image" in message  # the first errors
    with MilvusStore(str(db), "reir_catalog") as store:
        catalog = IndexCatalog(store)
        assert catalog.live("live_t") is None
        (version,) = catalog.versions("live_t")
        assert version.state == "check_failed" and "max_failure_rate" in version.info


def test_the_guard_counts_across_batches_and_keeps_the_first_errors() -> None:
    guard = FailureGuard(max_rate=0.5, min_images=10, keep_errors=2)
    assert not guard.add(4, 4, ["e1", "e2", "e3"])  # 100% failed, but too few tried to judge
    assert not guard.add(6, 1, ["e4"])  # 5 of 10: not over half
    assert guard.add(2, 2, [])  # 7 of 12
    assert guard.first_errors == ["e1", "e2"] and "7 of the first 12 images failed (58%" in guard.reason()
    assert not FailureGuard(max_rate=1.0, min_images=1).add(5, 5, [])  # 1.0: the guard is off


def test_first_promotion_into_a_fresh_milvus_logs_no_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG), MilvusStore(str(tmp_path / "fresh.db"), "reir_catalog") as store:
        catalog = IndexCatalog(store)
        assert catalog.live("reir_live") is None
        catalog.record(IndexVersion(name="gal_v1", base="gal", alias="reir_live", model_version="m", built_at=1.0))
        store.client.create_collection("gal_v1", dimension=4)
        catalog.update("gal_v1", state="ready")
        catalog.promote("reir_live", "gal_v1")
        assert catalog.live("reir_live") == "gal_v1"
    # (milvus-lite's own gRPC server logs an unrelated "AllocTimestamp not implemented"; not ours)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and ("alias" in r.getMessage()
                                                                            or r.name.startswith("pymilvus"))]
    assert errors == [], [r.getMessage()[:200] for r in errors]
