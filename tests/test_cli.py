from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reir.limits import MAX_TOP_K

COMMANDS = ["synth", "train", "ingest", "serve", "search", "eval", "demo", "api-key"]


def _reir(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reir.cli", *args], capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    res = _reir(command, "--help")
    assert res.returncode == 0, res.stderr
    assert "Usage" in res.stdout


@pytest.mark.parametrize(
    "args, message, code",
    [
        # usage errors (the caller's syntax or settings): exit 2
        (["search", "red", "--filters", "{not json"], "--filters is not valid JSON", 2),
        (["search", "red", "--filters", '{"field": "image_id"}'], "--filters must be a JSON list", 2),
        (["search", "red", "--top-k", str(MAX_TOP_K + 1)], "Invalid value for '--top-k'", 2),
        (["serve", "--model", ".", "--port", "99999"], "Invalid value for '--port'", 2),
        (["api-key", "--name", "bad name!"], "invalid key name", 2),
        (["bogus"], "No such command 'bogus'", 2),
        (["train"], "Missing option '--data'", 2),
        (["train", "--source", "voc:/x"], "invalid SourceSpec setting kind", 2),
        (["train", "--source", "coco"], "expected KIND:PATH[:WEIGHT]", 2),
        (["train", "--data", ".", "--batch-size", "0"], "Invalid value for '--batch-size'", 2),
        # failures while running (a missing file, a refused connection): exit 1
        (["train", "--data", "/nonexistent/bench"], "data directory not found: /nonexistent/bench", 1),
        (["ingest", "--gallery", "/nonexistent/g", "--model", "/x"], "gallery not found", 1),
        (["index", "add", "/nonexistent/my photos", "--model", "/x"], "folder not found: /nonexistent/my photos", 1),
        (["eval", "--data", "/nonexistent/d", "--model", "/x"], "data directory not found", 1),
        (["eval", "--annotations", "/nonexistent/refs.json", "--model", "/x"], "annotations file not found", 1),
        (["eval", "--model", "/x"], "Missing option '--data' (or --annotations PATH)", 2),
        (["search", "red square", "--url", "http://127.0.0.1:9"], "cannot reach reir service", 1),
    ],
)
def test_errors_are_one_line_without_traceback(args: list[str], message: str, code: int) -> None:
    res = _reir(*args)
    assert res.returncode == code, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_eval_split_and_annotations_flags_reach_its_settings(tmp_path: Path) -> None:
    import typer

    from reir.cli import app, eval_settings

    refs, model = tmp_path / "refs.json", tmp_path / "model"
    refs.write_text("[]")
    model.mkdir()
    command = typer.main.get_command(app).commands["eval"]  # type: ignore[attr-defined]

    def settings(*args: str) -> object:
        params = command.make_context("eval", [*args, "--model", str(model)]).params
        return eval_settings(**{k: v for k, v in params.items() if k not in ("discover", "png")})

    cfg = settings("--annotations", str(refs), "--split", "val")
    assert (cfg.annotations, cfg.split, cfg.data_root) == (refs, "val", None)  # type: ignore[attr-defined]
    assert settings("--data", str(tmp_path)).split == "test"  # type: ignore[attr-defined]
    (tmp_path / "reir.yaml").write_text(f"eval:\n  split: train\n  annotations: {refs}\n")
    from_file = settings("--config", str(tmp_path / "reir.yaml"))
    assert (from_file.split, from_file.annotations) == ("train", refs)  # type: ignore[attr-defined]
    assert settings("--config", str(tmp_path / "reir.yaml"), "--split", "val").split == "val"  # type: ignore[attr-defined]


def test_index_add_stored_instance_flags_reach_its_settings(tmp_path: Path) -> None:
    import typer

    from reir.cli import app, index_add_settings

    photos, model = tmp_path / "photos", tmp_path / "model"
    (photos / "images" / "test").mkdir(parents=True)
    model.mkdir()
    command = typer.main.get_command(app).commands["index"].commands["add"]  # type: ignore[attr-defined]

    def settings(*args: str) -> object:
        params = command.make_context("add", [str(photos), "--model", str(model), *args]).params
        return index_add_settings(**params)

    default = settings()
    assert (default.top_k_instances, default.min_instance_score, default.split) == (None, None, None)  # type: ignore[attr-defined]
    cfg = settings("--top-k-instances", "40", "--min-instance-score", "0.02")
    assert (cfg.top_k_instances, cfg.min_instance_score) == (40, 0.02)  # type: ignore[attr-defined]
    assert cfg.gallery_root == photos.resolve() and cfg.model_path == str(model)  # type: ignore[attr-defined]
    (tmp_path / "reir.yaml").write_text("ingest:\n  min_instance_score: 0.05\n")
    assert settings("--config", str(tmp_path / "reir.yaml")).min_instance_score == 0.05  # type: ignore[attr-defined]
    res = _reir("index", "add", str(photos), "--model", str(model), "--min-instance-score", "1.5")
    assert res.returncode == 2 and "--min-instance-score" in res.stderr


def test_a_bug_is_one_line_exit_1_with_the_traceback_in_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    from reir.cli import _run

    def broken() -> None:
        {}["calibration"]  # the bug under test

    assert _run(broken) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: internal error (KeyError: 'calibration'); traceback in ") and "\n" not in err
    saved = Path(err.rsplit(" ", 1)[1])
    assert "Traceback" in saved.read_text() and "broken" in saved.read_text()
    saved.unlink()


def test_bad_option_values_are_rejected_cleanly(tmp_path: Path) -> None:
    res = _reir("train", "--data", str(tmp_path), "--stage", "7")
    assert res.returncode == 2
    assert "--stage must be 1, 2, rerank, weak, weak-rerank or image-retrieval" in res.stderr
    res = _reir("synth", "--out", str(tmp_path / "o"), "--num-images", "3")
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_yaml_config_values_are_validated_and_flags_only_override_when_given(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text("lr: -1\n")
    res = _reir("train", "--data", str(tmp_path), "--config", str(tmp_path / "run.yaml"))
    assert res.returncode == 2
    assert "invalid TrainConfig setting lr" in res.stderr
    (tmp_path / "typo.yaml").write_text("learning_rate: 0.1\n")
    res = _reir("train", "--data", str(tmp_path), "--config", str(tmp_path / "typo.yaml"))
    assert res.returncode == 2 and "learning_rate" in res.stderr


def test_api_key_prints_a_key_and_its_stored_hash() -> None:
    import hashlib

    import yaml

    res = _reir("api-key", "--name", "frontend", "--admin")
    assert res.returncode == 0, res.stderr
    key = res.stderr.strip().split("key (shown once): ")[1]
    (entry,) = yaml.safe_load(res.stdout)
    assert entry == {"name": "frontend", "sha256": hashlib.sha256(key.encode()).hexdigest(),
                     "scopes": ["search", "admin"], "rate_per_s": None, "burst": None}
    assert key not in res.stdout


def test_the_local_ray_instance_answers_state_queries_even_beside_a_later_instance() -> None:
    """Ray Train's placement-group cleaner (an actor) asks the state API whether the controller
    lives. Asked from inside the CLI's local instance, after a second Ray instance started on
    the machine, the answer must come from our own instance: an unknown actor reads as dead
    and the cleaner would remove the run's placement group. ``local=True`` (the demo) ignores
    ``RAY_ADDRESS``."""
    code = (
        "import subprocess, sys, ray\n"
        "from reir.platform.raylocal import init_ray\n"
        "init_ray(2, local=True)\n"
        "later = subprocess.Popen([sys.executable, '-c', 'import ray, time; ray.init(address=\"local\", num_cpus=1, include_dashboard=True);"
        " print(1, flush=True); time.sleep(120)'], stdout=subprocess.PIPE, text=True)\n"
        "assert later.stdout.readline().strip() == '1'\n"
        "@ray.remote(num_cpus=0)\n"
        "class Probe:\n"
        "    def state(self, actor_id):\n"
        "        from ray.util.state import get_actor\n"
        "        found = get_actor(actor_id, timeout=20)\n"
        "        return found.state if found else None\n"
        "probe = Probe.remote()\n"
        "try:\n"
        "    print('state', ray.get(probe.state.remote(probe._actor_id.hex())))\n"
        "finally:\n"
        "    later.kill()\n"
        "    later.wait()\n"
    )
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1", "RAY_USAGE_STATS_ENABLED": "0"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env,
                         check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "state ALIVE" in res.stdout, res.stdout[-2000:]


def test_serve_stops_cleanly_on_sigterm(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Every container stop is a SIGTERM: Serve and Ray shut down, exit 0, no stack dump."""
    import signal
    import time

    import requests

    from reir.platform.milvus_server import free_port
    from reir.platform.modeling import load_reir_model
    from tests.serving.conftest import COLLECTION, fill_store

    fill_store(tmp_path / "idx.db", tiny_checkpoint, load_reir_model)
    (tmp_path / "serve.yaml").write_text("num_cpus_encoder: 0.25\nnum_cpus_searcher: 0.25\n"
                                         "num_cpus_ingress: 0.1\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "REIR_CONFIG")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "reir.cli", "serve", "--model", str(tiny_checkpoint), "--milvus-uri",
         str(tmp_path / "idx.db"), "--collection", COLLECTION, "--port", str(port), "--config",
         str(tmp_path / "serve.yaml")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline() if proc.stdout else ""  # blocks until the app is deployed
        if not line.startswith("serving on"):
            proc.wait(timeout=60)
            pytest.fail(f"reir serve exited {proc.returncode}: {proc.stderr.read()[-3000:] if proc.stderr else ''}")
        deadline = time.monotonic() + 60
        while requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.5)
        assert requests.get(f"http://127.0.0.1:{port}/livez", timeout=10).json() == {"status": "alive"}
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: shutting down" in err and "Traceback" not in err, err[-3000:]
    with pytest.raises(requests.ConnectionError):  # the proxy is gone with the process
        requests.get(f"http://127.0.0.1:{port}/livez", timeout=5)


def test_serve_on_a_taken_port_is_one_line_exit_1(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "model").mkdir()
        res = _reir("serve", "--model", str(tmp_path / "model"), "--milvus-uri", str(tmp_path / "x.db"),
                    "--port", str(port))
    assert res.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_index_add_is_the_folder_flow_and_refuses_a_folder_without_images(tmp_path: Path) -> None:
    res = _reir("index", "--help")
    assert res.returncode == 0 and "add" in res.stdout and "folder of photos" in res.stdout
    res = _reir("index", "add", "--help")
    assert res.returncode == 0 and "reir serve" in res.stdout
    empty = tmp_path / "no photos here"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("x")
    (empty / ".hidden.jpg").write_bytes(b"x")  # hidden files are not photos
    res = _reir("index", "add", str(empty), "--model", str(tmp_path))
    assert res.returncode == 1 and f"error: no images under {empty}" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_a_failed_deploy_is_reported_by_the_replicas_own_error() -> None:
    from reir.serving.lifecycle import deploy_failure

    serve_error = RuntimeError("Deploying application default failed: Failed to update the deployments ['Searcher'].")
    status = ("The deployment failed to start 3 times in a row.\nTraceback (most recent call last):\n"
              '  File "replica.py", line 9, in initialize\n    raise RuntimeError(f"collection ...")\n'
              "ray.exceptions.RayTaskError(RuntimeError): ray::ServeReplica:default:Searcher.initialize() (pid=7)\n"
              "RuntimeError: collection 'reir_live' not found at reir.db; run ingestion first")
    assert str(deploy_failure(serve_error, [status])) == (
        "the app failed to start: RuntimeError: collection 'reir_live' not found at reir.db; run ingestion first")
    assert str(deploy_failure(serve_error, [])) == f"the app failed to start: {serve_error}"


def test_eval_png_needs_discover_and_discover_needs_discovery_queries(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "data").mkdir()
    usage = _reir("eval", "--data", str(tmp_path / "data"), "--model", str(model), "--png", str(tmp_path / "c.png"))
    assert usage.returncode == 2 and "--discover" in usage.stderr
    missing = _reir("eval", "--data", str(tmp_path / "data"), "--model", str(model), "--discover")
    assert missing.returncode == 1 and "discovery.json" in missing.stderr
