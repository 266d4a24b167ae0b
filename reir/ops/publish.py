"""Publish a trained model where ingestion and serving read it: ``{to}/{version}/`` plus a
``{to}/current`` pointer.

The k8s jobs and the RayService read ``/models/reir/current``; training writes
``{output_dir}/{run_name}/model``. Publishing is the explicit step between the two
(docs/deploy.md), so a half-trained or failed run never reaches serving by accident.
``current`` is a relative symlink replaced with one ``rename``: a reader sees the old
model or the new one, never a mix, and a previous version stays for a rollback
(``--version`` of an already published one points ``current`` back at it).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from reir.errors import ReirError

CURRENT = "current"
# What a model directory holds for ``from_pretrained`` (reir.training.checkpointing).
REQUIRED_FILES = ("config.json", "model.safetensors")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


@dataclass(frozen=True)
class Published:
    """Where a publish put the model and what ``current`` pointed at before."""

    version: str
    path: Path
    previous: str | None


def model_dir_of(run_dir: Path) -> Path:
    """The model directory of a training run (``RUN/model``) or a model directory itself."""
    for candidate in (run_dir / "model", run_dir):
        if all((candidate / name).is_file() for name in REQUIRED_FILES):
            return candidate
    raise ReirError(f"no trained model in {run_dir}: expected {' and '.join(REQUIRED_FILES)} there or in "
                    f"{run_dir / 'model'}")


def current_version(to: Path) -> str | None:
    """The version ``{to}/current`` points at, if any."""
    pointer = to / CURRENT
    return os.readlink(pointer) if pointer.is_symlink() else None


def publish_model(run_dir: Path, to: Path, *, version: str | None = None) -> Published:
    """Copy the run's model to ``{to}/{version}`` (unless that version exists) and point
    ``{to}/current`` at it. ``version`` defaults to the run's name and the UTC time."""
    to.mkdir(parents=True, exist_ok=True)
    target_name = version
    if target_name is None:
        run_name = run_dir.name if run_dir.name != "model" else run_dir.parent.name
        target_name = f"{run_name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    if not _VERSION.match(target_name) or target_name == CURRENT:
        raise ReirError(f"invalid version name {target_name!r} (letters, digits, _ . -)")
    target = to / target_name
    if not target.exists():
        source = model_dir_of(run_dir)
        staging = to / f".{target_name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        # Copy then rename, so a crash mid-copy leaves no directory that looks published.
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns("train_state"))
        staging.rename(target)
    else:
        model_dir_of(target)  # re-pointing at an existing version: it must be a complete model
    previous = current_version(to)
    tmp_link = to / f".{CURRENT}.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    tmp_link.symlink_to(target_name, target_is_directory=True)
    tmp_link.replace(to / CURRENT)
    return Published(version=target_name, path=target, previous=previous)
