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


@pytest.mark.parametrize("old, new", [({"num_cpus_reranker": 0.5}, "num_cpus_searcher"),
                                      ({"reranker_replicas": 2}, "searcher_replicas"),
                                      ({"autoscaling": {"reranker": {"max_replicas": 2}}}, "autoscaling.searcher")])
def test_retired_reranker_keys_say_what_replaces_them(old: dict, new: str) -> None:
    with pytest.raises(ValidationError, match=f"Searcher deployment re-ranks now.*{new}"):
        ServeConfig(model_path="m", **old)


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


# --- one configuration system for every command (reir.settings) ---------------------------------


def _sectioned(tmp_path: Path) -> Path:
    path = tmp_path / "reir.yaml"
    path.write_text(
        "milvus:\n  uri: http://milvus:19530\n  index_type: HNSW\n"
        "ingest:\n  gallery_root: /data/g\n  model_path: /m\n  top_k_instances: 30\n  batch_size: 8\n"
        "serve:\n  model_path: /m\n  candidates: 60\n"
        "train:\n  data_root: /d\n  stage: '2'\n"
    )
    return path


def test_sectioned_file_gives_each_command_its_section_and_the_shared_keys(tmp_path: Path) -> None:
    from reir.settings import command_config

    path = _sectioned(tmp_path)
    ingest = command_config("ingest", config=path, env={})
    assert (ingest.top_k_instances, ingest.batch_size, ingest.alias) == (30, 8, "reir_live")
    assert (ingest.milvus.uri, ingest.milvus.index_type, ingest.milvus.collection) == (
        "http://milvus:19530", "HNSW", "reir_instances")
    serve = command_config("serve", config=path, env={})
    assert (serve.candidates, serve.milvus.uri, serve.milvus.collection) == (60, "http://milvus:19530", "reir_live")
    index = command_config("index", config=path, env={})
    assert (index.milvus.uri, index.alias) == ("http://milvus:19530", "reir_live")
    # A flag left out (None) does not hide the file: stage 2 stays stage 2.
    assert command_config("train", config=path, flags={"stage": None, "data": None}, env={}).stage == "2"


def test_precedence_is_defaults_file_environment_flags(tmp_path: Path) -> None:
    from reir.settings import command_config

    path = _sectioned(tmp_path)
    env = {"REIR_CONFIG": str(path), "REIR_BATCH_SIZE": "12", "REIR_MILVUS__URI": "http://env:1"}
    cfg = command_config("ingest", env=env)  # the file comes from $REIR_CONFIG
    assert (cfg.batch_size, cfg.milvus.uri, cfg.top_k_instances) == (12, "http://env:1", 30)
    cfg = command_config("ingest", env=env, flags={"batch_size": 4, "milvus_uri": "x.db", "encoders": None},
                         extra={"alias": None})
    assert (cfg.batch_size, cfg.milvus.uri, cfg.num_encoders, cfg.alias) == (4, "x.db", None, None)
    # No file, no environment: the command's own defaults, and one milvus-lite path for all.
    bare = command_config("ingest", flags={"gallery": tmp_path, "model_dir": "/m"}, env={})
    assert (bare.batch_size, bare.alias) == (32, "reir_live")
    uris = {command_config(c, flags=f, env={}).milvus.uri for c, f in
            [("ingest", {"gallery": tmp_path, "model_dir": "/m"}), ("serve", {"model_dir": "/m"}), ("index", {}),
             ("eval", {"data": tmp_path, "model_dir": "/m"})]}
    assert uris == {"reir.db"}


def test_bad_files_and_unknown_keys_are_errors(tmp_path: Path) -> None:
    from reir.settings import command_config

    typo = tmp_path / "typo.yaml"
    typo.write_text("milvs:\n  uri: x\ningest:\n  model_path: /m\n")
    with pytest.raises(ValueError, match="unknown top-level key"):
        command_config("index", config=typo, env={})
    (tmp_path / "bad.yaml").write_text("serve:\n  model_path: /m\n  candidatez: 3\n")
    with pytest.raises(ValidationError, match="candidatez"):
        command_config("serve", config=tmp_path / "bad.yaml", env={})
    with pytest.raises(FileNotFoundError, match="config file not found"):
        command_config("search", config=tmp_path / "missing.yaml", env={})
    assert command_config("search", env={"REIR_API_KEY": "k", "REIR_TOP_K": "7"}).top_k == 7


def test_every_flag_maps_to_a_config_key_and_the_doc_table_is_current() -> None:
    """docs/configuration.md embeds the table generated from the code; regenerate it with
    `python -m reir.settings docs/configuration.md` when this fails."""
    from reir.settings import COMMANDS, render_doc

    for spec in COMMANDS.values():
        fields = spec.config_class().model_fields
        for param in spec.flags:
            assert spec.key(param).split(".")[0] in fields, (spec.name, param)
    doc = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    text = doc.read_text()
    assert "| `milvus.uri` | str | `reir.db` | `REIR_MILVUS__URI` | `--milvus-uri` |" in text
    assert render_doc(text) == text, "docs/configuration.md is stale: python -m reir.settings docs/configuration.md"


def test_index_commands_find_milvus_through_the_environment(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    missing = tmp_path / "deployed.db"
    env = {**os.environ, "REIR_MILVUS__URI": str(missing)}
    res = subprocess.run([sys.executable, "-m", "reir.cli", "index", "list"], capture_output=True, text=True,
                         env=env, timeout=120, check=False)
    assert f"milvus-lite file not found: {missing}" in res.stderr


def test_cli_commands_read_their_section_of_the_file(tmp_path: Path) -> None:
    """`reir ingest` / `reir eval` with only --config: the settings come from the file (the
    first one the command checks is the model directory, named only there)."""
    from typer.testing import CliRunner

    from reir.cli import app
    from reir.errors import ReirError

    cfg = tmp_path / "reir.yaml"
    cfg.write_text(f"ingest:\n  gallery_root: {tmp_path}\n  model_path: {tmp_path / 'no-model'}\n"
                   f"eval:\n  data_root: {tmp_path}\n  model_path: {tmp_path / 'no-eval-model'}\n")
    for command, missing in (("ingest", "no-model"), ("eval", "no-eval-model")):
        res = CliRunner().invoke(app, [command, "--config", str(cfg)], env={"REIR_CONFIG": ""})
        assert isinstance(res.exception, ReirError), res.output
        assert str(res.exception) == f"model directory not found: {tmp_path / missing}"


def test_one_deployment_refuses_settings_it_would_ignore() -> None:
    """``search_in_ingress`` (the default) is one deployment scaled as the searcher: settings for
    stages it does not have are errors, not silently ignored."""
    from reir.platform.config import AutoscalingSpec

    base = {"model_path": "/m", "milvus": {"uri": "http://milvus:19530"}}
    assert ServeConfig(**base).search_in_ingress
    for extra, said in (({"encode_in_searcher": False}, "QueryEncoder deployment"),
                        ({"autoscaling": {"ingress": AutoscalingSpec()}}, "autoscaling.ingress"),
                        ({"ingress_replicas": 2}, "ingress_replicas"), ({"encoder_replicas": 3}, "encoder_replicas")):
        with pytest.raises(ValidationError, match=said):
            ServeConfig(**base, **extra)
        apart = ServeConfig(**{**base, "encode_in_searcher": False, **extra, "search_in_ingress": False})
        assert not apart.search_in_ingress
    scaled = ServeConfig(**base, autoscaling={"searcher": AutoscalingSpec(max_replicas=4)})
    assert scaled.autoscaling["searcher"].max_replicas == 4
