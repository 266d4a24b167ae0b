"""bench/replica.py: the demo's stages in plain torch at fixed step counts, then re-ranker variants."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reir.data.synth import generate

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_replica_trains_the_stages_and_scores_each_variant(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate(data, num_images=30, image_size=64, discovery_queries=0, seed=3)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "replica.py"), "--data", str(data), "--model", "tiny", "--s1", "2",
         "--s2", "2", "--rr", "2", "--save", str(tmp_path / "s2"),
         "--variants", 'one:{"text_layers":1};none:{"text_layers":0,"batch":8}'],
        capture_output=True, text=True, env=env, timeout=600, check=True,
    ).stdout  # fmt: skip
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    ann = next(line["ANN_only"] for line in lines if "ANN_only" in line)
    variants = {line["variant"]: line for line in lines if "variant" in line}
    assert set(variants) == {"one", "none"}
    for scores in [ann, *(v["RR"] for v in variants.values())]:
        assert set(scores) == {"1", "5", "10"}
        assert 0.0 <= scores["1"] <= scores["5"] <= scores["10"] <= 1.0
    assert {"RR_in", "RR_held"} <= set(variants["one"])
    assert (tmp_path / "s2" / "config.json").is_file()  # the stage-2 model, for --stage2 runs
    saved = json.loads((tmp_path / "s2" / "config.json").read_text())
    assert saved["vision"]["image_size"] == 64
