"""Linear probes (reir.evaluation.probes) and bench/probe.py, what a checkpoint's embeddings carry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from reir.evaluation.probes import split_probe

from .benchload import load_bench

probe = load_bench("probe")


def test_probe_reads_an_attribute_that_is_there_and_not_one_that_is_not() -> None:
    rng = np.random.default_rng(0)
    labels = [str(v) for v in rng.integers(0, 4, size=400)]
    carried = [np.eye(4)[int(v)] * 3 + rng.normal(size=4) * 0.1 for v in labels]
    noise = [rng.normal(size=4) for _ in labels]
    there, absent = split_probe(carried, labels), split_probe(noise, labels)
    assert there["accuracy"] > 0.95 and there["classes"] == 4 and there["n"] == 400
    assert absent["accuracy"] < absent["majority"] + 0.15
    assert split_probe(carried[:5], labels[:5])["accuracy"] is None  # too few to hold any out


def test_probe_runs_on_a_checkpoint(tmp_path: Path) -> None:
    import torch

    from reir.data.synth import generate
    from reir.model import create_model

    data = tmp_path / "data"
    generate(data, num_images=12, test_fraction=0.25, image_size=64, seed=1, discovery_queries=0)
    torch.manual_seed(0)
    model, processor = create_model("tiny")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    report = probe.main(["--model", str(tmp_path / "model"), "--data", str(data), "--images", "9",
                         "--out", str(tmp_path / "probe.json")])  # fmt: skip
    assert json.loads((tmp_path / "probe.json").read_text()) == report
    assert set(report["box_centre_token_colour"]) == {"backbone", "tokens", "embedding"}
    assert set(report["stored_instance"]) == {"color", "shape", "size", "background"}
    assert report["text_head_colour"]["n"] > 0
    for part in report["box_centre_token_colour"].values():
        assert 0.0 <= part["accuracy"] <= 1.0 and part["n"] > 0
