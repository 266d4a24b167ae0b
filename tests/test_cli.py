from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    "args, message",
    [
        (["train", "--data", "/nonexistent/bench"], "data directory not found: /nonexistent/bench"),
        (["ingest", "--gallery", "/nonexistent/g", "--model", "/x"], "gallery not found"),
        (["eval", "--data", "/nonexistent/d", "--model", "/x"], "data directory not found"),
        (["search", "red square", "--url", "http://127.0.0.1:9"], "cannot reach reir service"),
        (["search", "red", "--filters", "{not json"], "--filters is not valid JSON"),
        (["search", "red", "--filters", '{"field": "image_id"}'], "--filters must be a JSON list"),
        (["api-key", "--name", "bad name!"], "invalid key name"),
        (["bogus"], "No such command 'bogus'"),
        (["train"], "Missing option '--data'"),
        (["train", "--source", "voc:/x"], "invalid SourceSpec setting kind"),
        (["train", "--source", "coco"], "expected KIND:PATH[:WEIGHT]"),
        (["train", "--data", ".", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    ],
)
def test_errors_are_one_line_without_traceback(args: list[str], message: str) -> None:
    res = _reir(*args)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_bad_option_values_are_rejected_cleanly(tmp_path: Path) -> None:
    res = _reir("train", "--data", str(tmp_path), "--stage", "7")
    assert res.returncode == 2
    assert "--stage must be 1, 2, rerank, weak or weak-rerank" in res.stderr
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
        "later = subprocess.Popen([sys.executable, '-c', 'import ray, time; ray.init(num_cpus=1, include_dashboard=True);"
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
