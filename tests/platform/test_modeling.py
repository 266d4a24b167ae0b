from __future__ import annotations

from pathlib import Path

import pytest

from reir.platform.modeling import model_version_for


def test_model_version_tracks_weights(tmp_path: Path) -> None:
    ckpt = tmp_path / "my:model"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"weights-1")
    v1 = model_version_for(ckpt)
    assert v1 == model_version_for(ckpt) and v1.startswith("my_model-") and ":" not in v1
    (ckpt / "model.safetensors").write_bytes(b"weights-2")
    assert model_version_for(ckpt) != v1


def test_model_version_rejects_presets_and_empty_dirs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="checkpoint directory"):
        model_version_for("tiny")
    with pytest.raises(ValueError, match="no config"):
        model_version_for(tmp_path)
