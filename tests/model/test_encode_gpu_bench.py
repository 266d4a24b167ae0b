"""bench/encode_gpu.py (encoder images/s, decode rate per core, decode threads feeding the
encoder) runs on a CPU with tiny sizes and reports every figure it promises."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..evaluation.benchload import load_bench

bench = load_bench("encode_gpu")


def test_encode_gpu_bench_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "encode.json"
    report = bench.main(["--device", "cpu", "--presets", "small,siglip-vitb16", "--siglip-towers", "tiny",
                         "--batch-sizes", "2", "--warmup", "1", "--seconds", "0", "--min-iters", "1",
                         "--images", "3", "--decode-images", "4", "--workers", "2", "--e2e-batch", "2",
                         "--e2e-images", "4", "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == report
    assert set(report["presets"]) == {"small", "siglip-vitb16"}
    assert report["jpegs"]["generated"]["first_size"] == [640, 480]
    for name, size in (("small", 128), ("siglip-vitb16", 224)):
        p = report["presets"][name]
        assert p["image_size"] == size
        assert list(p["encoder"]) == ["fp32"]  # bf16 only on CUDA
        (row,) = p["encoder"]["fp32"]
        assert row["batch"] == 2 and row["images_per_s"] > 0
        assert p["encoder_best"]["images_per_s"] == row["images_per_s"]
        dec = p["decode"]["generated"]
        assert dec["images_per_s_per_core"] > 0 and dec["cores_to_feed"] > 0
        assert {r["kind"] for r in dec["parallel"]} == {"threads", "processes"}
        assert all(r["images_per_s"] > 0 for r in dec["parallel"])
        assert set(p["end_to_end"]) == {"threads", "processes"}
        for kind, e2e in p["end_to_end"].items():
            assert e2e["kind"] == kind and e2e["workers"] == 2 and e2e["images"] == 4
            assert e2e["images_per_s"] > 0 and e2e["ratio_to_encoder"] > 0
    assert report["presets"]["siglip-vitb16"]["siglip_towers"] == "tiny"


def test_device_normalization_matches_the_processor() -> None:
    from reir.model import create_model

    _, processor = create_model("tiny")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, processor.image_size, processor.image_size, 3), dtype=np.uint8)
    expected = processor.images([Image.fromarray(p) for p in pixels])
    got = bench.to_pixel_values(torch.from_numpy(pixels), torch.tensor(processor.image_mean) * 255.0,
                                torch.tensor(processor.image_std) * 255.0)  # fmt: skip
    torch.testing.assert_close(got, expected)
