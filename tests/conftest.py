"""Shared fixtures: one local Ray per test session, model checkpoints, image galleries."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.platform.fakes import COLORS, quadrant_image, save_fake_checkpoint

RAY_UNIT = "ray"
# Modules that use the session's Ray instance (``ray_session``), and with it Serve or the Milvus
# standalone server. ``make test`` runs them as one work unit, in order, on one xdist worker;
# collection fails when a module that uses ``ray_session`` is missing here. Tests that start a
# Ray of their own in a subprocess (the multi-node cluster, ``reir serve`` stopped by SIGTERM, a
# second local instance) run on the other worker, beside the session's instance: a reir Ray
# beside another one on the same machine is what they check (free HAProxy ports, the pinned
# state API address), and the Ray unit is the run's longest path.
RAY_MODULES = {
    "tests/ingestion/test_faults.py", "tests/ingestion/test_live_reindex.py", "tests/ingestion/test_milvus_standalone.py",
    "tests/ingestion/test_pipeline.py", "tests/ingestion/test_reindex.py", "tests/ops/test_live_metrics.py",
    "tests/platform/test_milvus_server.py", "tests/serving/test_app.py", "tests/serving/test_autoscale.py",
    "tests/serving/test_fuzz.py", "tests/serving/test_localize.py", "tests/serving/test_page.py", "tests/test_e2e.py",
    "tests/training/test_batching.py", "tests/training/test_image_retrieval_stage.py", "tests/training/test_mixing.py",
    "tests/training/test_operations.py", "tests/training/test_weak_stage.py",
}  # fmt: skip
_ran_ray_unit = False


def work_unit(nodeid: str) -> str:
    """The xdist work unit of a test: the Ray unit, or its module (whose fixtures, such as the
    behaviour test's trained checkpoint, are then built once)."""
    module = nodeid.split("::")[0]
    return RAY_UNIT if module in RAY_MODULES else module


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """``make test`` runs on two workers (``-n 2``): one takes the Ray unit, the longest path of
    the run; the other the remaining modules beside it. (xdist's own ``loadgroup`` reads marks
    into node ids that pytest 9 no longer takes.)"""
    from xdist.scheduler import LoadScopeScheduling

    class RayUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return RayUnitScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = sorted({work_unit(i.nodeid) for i in items if "ray_session" in i.fixturenames} - {RAY_UNIT})
    if missing:
        raise pytest.UsageError(f"{', '.join(missing)} use ray_session: add them to RAY_MODULES in tests/conftest.py")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """An xdist worker lowers its priority (nice 15) for good at its first test outside the
    Ray unit: the Ray unit is the longest path of the run and has waits with deadlines
    (autoscaling, metrics flushes), so the other worker's training tests take the cores it
    leaves. Ray starts its worker processes (actors, tasks, replicas, Ray Train workers) at
    nice 15 (``RAY_worker_niceness``) and its driver, raylet and GCS at 0: a nice of 10 here
    put the other worker above every Ray worker process; 19 starved it (the behaviour test's
    fixture took 765 s instead of 445 s, and the run was no shorter)."""
    global _ran_ray_unit
    if work_unit(item.nodeid) == RAY_UNIT:
        _ran_ray_unit = True
    elif os.environ.get("PYTEST_XDIST_WORKER") and os.nice(0) == 0:
        os.nice(15)


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """A test outside the Ray unit must not start Ray: it would be a second instance beside the
    Ray unit's, on the other worker."""
    ray = sys.modules.get("ray")
    if not _ran_ray_unit and work_unit(item.nodeid) != RAY_UNIT and ray is not None and ray.is_initialized():
        raise pytest.UsageError(f"{item.nodeid} started Ray outside the Ray unit: add it to RAY_MODULES in tests/conftest.py")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray with more logical CPUs than cores: Ray Data stages and Serve
    replicas ask for fractions, and 4 logical CPUs leave room so they never deadlock."""
    import ray

    started = not ray.is_initialized()
    if started:
        # Workers inherit the driver's environment when Ray starts.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from reir.platform.raylocal import init_ray

        init_ray(4, local=True, log_to_driver=False)  # the CLI's local instance, dashboard included
    yield
    if started:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real ``tiny`` model, saved once so every process loads identical weights."""
    import torch

    from reir.model import create_model

    torch.manual_seed(0)
    model, processor = create_model("tiny")
    # A random model's objectness means nothing (all ~0.01): store a fixed top k, as a trained
    # model's stored sets are exercised by the demo and tests/model/test_processing.py.
    processor.instance_min_score = 0.0
    path = tmp_path_factory.mktemp("models") / "tiny-ckpt"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def fake_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_fake_checkpoint(tmp_path_factory.mktemp("models") / "fake-ckpt")


def _make_gallery(root: Path, n: int = 6, *, corrupt: int = 1, synthetic_split: str | None = "test") -> Path:
    """``n`` quadrant-colour JPEGs (+ ``corrupt`` undecodable ones) under ``root``.

    With ``synthetic_split`` the layout is the synthetic benchmark's
    ``root/images/{split}/{image_id}.jpg``. Image ``img{i:03d}`` has its top-left
    quadrant coloured ``list(COLORS)[i % len(COLORS)]``, the rest black.
    """
    names = list(COLORS)
    folder = root / "images" / synthetic_split if synthetic_split else root
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img: Image.Image = quadrant_image((names[i % len(names)], "black", "black", "black"))
        img.save(folder / f"img{i:03d}.jpg", quality=95)
    for j in range(corrupt):
        (folder / f"bad{j:03d}.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
    return root


@pytest.fixture(scope="session")
def make_gallery() -> Callable[..., Path]:
    """Factory: ``make_gallery(root, n=6, corrupt=1, synthetic_split="test") -> root``."""
    return _make_gallery
