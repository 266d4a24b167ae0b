from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from reir.platform.config import IngestConfig, MilvusConfig, ServeConfig, load_config


def test_precedence_yaml_env_overrides(tmp_path: Path) -> None:
    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text("model_path: /m\ncandidates: 50\nport: 9000\nmilvus:\n  uri: /data/a.db\n  collection: c1\n")
    env = {"REIR_CANDIDATES": "70", "REIR_MILVUS__COLLECTION": "c2", "REIR_BATCH_SIZE": "3", "OTHER": "x"}
    cfg = load_config(ServeConfig, cfg_file, {"port": 9100, "milvus.index_type": "HNSW"}, env=env)
    assert cfg.candidates == 70  # env beats YAML
    assert cfg.port == 9100  # overrides beat YAML
    assert cfg.milvus == MilvusConfig(uri="/data/a.db", collection="c2", index_type="HNSW")


def test_unknown_keys_and_bad_values_are_errors() -> None:
    with pytest.raises(ValidationError):
        load_config(ServeConfig, None, {"model_path": "/m", "candidatez": 3}, env={})
    with pytest.raises(ValidationError):
        load_config(ServeConfig, None, {"model_path": "/m", "milvus.index_type": "DISKANN"}, env={})


def test_lite_file_allows_one_searcher_only() -> None:
    with pytest.raises(ValidationError, match="one process"):
        ServeConfig(model_path="/m", searcher_replicas=2, milvus=MilvusConfig(uri="/x/a.db"))
    ok = ServeConfig(model_path="/m", searcher_replicas=2, milvus=MilvusConfig(uri="http://127.0.0.1:1"))
    assert ok.searcher_replicas == 2


def test_ingest_needs_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        IngestConfig(model_path="/m")
    cfg = load_config(IngestConfig, None, {"model_path": "/m", "gallery_root": str(tmp_path)}, env={})
    assert cfg.gallery_root == tmp_path and cfg.milvus.is_lite_file


def test_token_is_not_in_repr() -> None:
    assert "s3cret" not in repr(MilvusConfig(token="s3cret"))
