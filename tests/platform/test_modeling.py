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


def test_input_size_comes_from_a_reir_processor_config(tmp_path: Path) -> None:
    import json

    from reir.platform.modeling import input_size_for

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"processor_class": "ReirProcessor", "image_size": 96}))
    assert input_size_for(tmp_path) == 96
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"processor_class": "Other", "image_size": 96}))
    assert input_size_for(tmp_path) is None  # another model's processor: the encoder decodes
    assert input_size_for(tmp_path / "missing") is None


def test_embedding_dim_comes_from_a_reir_model_config(tmp_path: Path) -> None:
    import json

    from reir.platform.modeling import embedding_dim_for

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "reir", "embed_dim": 64}))
    assert embedding_dim_for(tmp_path) == 64
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "embed_dim": 64}))
    assert embedding_dim_for(tmp_path) is None  # another model: ingestion creates the collection from its rows
    (tmp_path / "config.json").write_text("{not json")
    assert embedding_dim_for(tmp_path) is None


def test_decoding_does_not_import_torch() -> None:
    """Read tasks import reir.model.images; the package must not pull torch and transformers."""
    import subprocess
    import sys

    code = "import sys, reir.model.images, reir.ingestion.gallery; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    # and the names still come from the package on use
    code = "import reir.model as m; print(m.ReirProcessor.__name__, m.create_model.__name__, sorted(m.__all__) == sorted(m._EXPORTS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["ReirProcessor", "create_model", "True"]
