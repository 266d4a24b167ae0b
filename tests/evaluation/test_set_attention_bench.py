"""bench/set_attention.py: the timings behind the re-ranker's written-out attention and dropout."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .benchload import load_bench

bench = load_bench("set_attention")


def test_the_bench_times_every_pair_and_writes_its_json(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        out = bench.main(["--rounds", "1", "--threads", "1", "--out", str(tmp_path / "r.json")])
    finally:
        torch.set_num_threads(threads)
    pairs = [("softmax_1200x10_torch_ms", "softmax_1200x10_written_out_ms"),
             ("query_30_images_sdpa_ms", "query_30_images_set_attention_ms"),
             ("training_2048_rows_sdpa_fwd_bwd_ms", "training_2048_rows_set_attention_fwd_bwd_ms"),
             ("query_30_images_padded16_sdpa_ms", "query_30_images_padded16_set_attention_ms"),
             ("training_2048_rows_padded16_sdpa_fwd_bwd_ms", "training_2048_rows_padded16_set_attention_fwd_bwd_ms"),
             ("dropout_1200x10x129_bernoulli_ms", "dropout_1200x10x129_input_dropout_ms")]  # fmt: skip
    for torch_key, ours in pairs:
        assert out[torch_key] > 0 and out[ours] > 0
    assert json.loads((tmp_path / "r.json").read_text()) == out
