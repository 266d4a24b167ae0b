"""Shared fixtures: one local Ray per test session, model checkpoints, image galleries."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.platform.fakes import COLORS, quadrant_image, save_fake_checkpoint

RAY_GROUP = "ray"
# Tests that start Ray of their own, without the ``ray_session`` fixture.
OWN_RAY_TESTS = {"tests/test_cli.py::test_the_local_ray_instance_answers_state_queries_even_beside_a_later_instance"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Work units for ``pytest -n 2 --dist loadgroup`` (``make test``): one unit per module, so a
    module's fixtures (the behaviour test's trained checkpoint) are built once, and one unit,
    run in order on one worker, for every module that uses Ray (and with it Serve or the Milvus
    standalone server) and every test that starts a Ray instance of its own. Those share one
    Ray instance and Serve's proxy, and a Ray started beside them would be a second instance on
    the machine; the other worker runs the rest beside them. Without xdist the marks do nothing."""
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    for module, members in modules.items():
        uses_ray = any("ray_session" in item.fixturenames for item in members)
        for item in members:
            ray_test = uses_ray or item.nodeid in OWN_RAY_TESTS
            item.add_marker(pytest.mark.xdist_group(RAY_GROUP if ray_test else module))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """An xdist worker lowers its priority for good at its first test outside the Ray unit: the
    Ray unit is the longest path of the run and has waits with deadlines (autoscaling, metrics
    flushes), so the other worker's training tests take the cores it leaves."""
    group = item.get_closest_marker("xdist_group")
    if os.environ.get("PYTEST_XDIST_WORKER") and group and group.args[0] != RAY_GROUP and os.nice(0) == 0:
        os.nice(10)


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
