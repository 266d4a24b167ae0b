"""`reir model publish`: the step between training and the jobs / RayService that read
``/models/reir/current`` (docs/deploy.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reir.cli import app
from reir.errors import ReirError
from reir.ops.publish import current_version, publish_model


def _run(root: Path, name: str, weights: bytes) -> Path:
    model = root / name / "model"
    (model / "train_state").mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"name": name}))
    (model / "model.safetensors").write_bytes(weights)
    (model / "train_state" / "trainer.json").write_text("{}")
    return root / name


def test_publish_copies_the_model_and_moves_the_current_pointer(tmp_path: Path) -> None:
    models = tmp_path / "models" / "reir"
    first = publish_model(_run(tmp_path / "runs", "reir-stage2", b"w1"), models, version="v1")
    assert (first.version, first.previous) == ("v1", None)
    assert (models / "current" / "model.safetensors").read_bytes() == b"w1"
    assert not (models / "v1" / "train_state").exists(), "optimizer state is not part of a published model"
    second = publish_model(_run(tmp_path / "runs", "reir-rerank", b"w2"), models)
    assert second.version.startswith("reir-rerank-") and second.previous == "v1"
    assert (models / "current" / "model.safetensors").read_bytes() == b"w2"
    assert os.readlink(models / "current") == second.version  # relative: works wherever the volume mounts
    # Rolling back is publishing an existing version again; nothing is copied.
    publish_model(tmp_path / "unused", models, version="v1")
    assert current_version(models) == "v1"
    assert sorted(p.name for p in models.iterdir()) == sorted(["current", "v1", second.version])


def test_publish_refuses_what_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(ReirError, match="no trained model"):
        publish_model(tmp_path / "half", tmp_path / "models")
    with pytest.raises(ReirError, match="invalid version"):
        publish_model(_run(tmp_path, "r", b"w"), tmp_path / "models", version="../escape")
    assert not (tmp_path / "models" / "current").exists()


def test_cli_prints_what_it_published(tmp_path: Path) -> None:
    run = _run(tmp_path / "runs", "reir-stage2", b"w")
    res = CliRunner().invoke(app, ["model", "publish", str(run), "--to", str(tmp_path / "m"), "--version", "a"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == {"version": "a", "path": str(tmp_path / "m" / "a"), "previous": None}
