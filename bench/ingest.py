"""Ingestion benchmark: end-to-end images/s (files -> indexed Milvus rows, through Ray Data) vs the
bare encoder's images/s on the same images and batch size, measured in one run.

    PYTHONPATH=. .venv/bin/python bench/ingest.py --images 600 --batch-size 16 --out ingest.json

The bare encoder is measured before and after the pipeline and the ratio uses their mean, so a
change in background load during the run biases neither side (``load_avg`` reports it).
Without ``--model`` the ``small`` preset with random weights is saved to a temporary checkpoint
(throughput does not depend on the weights). ``--device cuda`` runs both sides on the GPU in bf16.
Prints one JSON object: pipeline_images_per_s, encoder_images_per_s, ratio, images, instances, ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs of a few coloured rectangles and ellipses on a random background."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = (int(v) for v in rng.integers(0, size - 16, 2))
            w, h = (int(v) for v in rng.integers(8, size // 2, 2))
            color = tuple(int(v) for v in rng.integers(0, 255, 3))
            shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
            shape((x0, y0, min(size - 1, x0 + w), min(size - 1, y0 + h)), fill=color)
        path = folder / f"b{i:06d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def bare_encoder_rate(model_dir: str, paths: list[Path], batch_size: int, top_k: int, device: str) -> dict[str, Any]:
    """images/s of InstanceEncoder.encode on decoded images (one warm-up batch excluded)."""
    from reir.ingestion.encoder import InstanceEncoder, decode_image
    from reir.platform.modeling import load_reir_model, model_version_for

    model, processor = load_reir_model(model_dir)
    if device != "cpu":
        model = model.to(device)
    enc = InstanceEncoder(model, processor, model_version=model_version_for(model_dir), top_k=top_k,
                          device=device, bf16=device != "cpu")  # fmt: skip
    images = [decode_image(p.read_bytes()) for p in paths]
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    enc.encode(batches[0], [im.size for im in batches[0]])  # warm-up
    instances = 0
    start = time.perf_counter()
    for batch in batches:
        instances += sum(len(x) for x in enc.encode(batch, [im.size for im in batch]))
    seconds = time.perf_counter() - start
    return {"images_per_s": len(images) / seconds, "seconds": seconds, "instances": instances}


def pipeline_rate(model_dir: str, folder: Path, db: Path, args: argparse.Namespace) -> dict[str, Any]:
    """run_ingestion end to end (listing, reading, decoding, encoding, upserts, index build + load)."""
    from reir.ingestion.pipeline import run_ingestion
    from reir.platform.config import IngestConfig, MilvusConfig

    cfg = IngestConfig(
        gallery_root=folder, split=None, model_path=model_dir, batch_size=args.batch_size,
        num_encoders=args.encoders, num_cpus_per_encoder=float(args.threads), top_k_instances=args.top_k,
        device=args.device, milvus=MilvusConfig(uri=str(db), collection="bench", index_type=args.index_type),
    )  # fmt: skip
    summary = run_ingestion(cfg)
    return {"images_per_s": summary.images / summary.seconds, "seconds": summary.seconds,
            "instances": summary.instances, "rows": summary.rows_in_store, "images": summary.images}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--model", default=None, help="checkpoint directory [small preset, random init]")
    parser.add_argument("--top-k", type=int, default=10, help="instances kept per image")
    parser.add_argument("--encoders", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (= CPUs) per encoder")
    parser.add_argument("--index-type", default="AUTOINDEX")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: GPU actors in bf16")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import ray
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="reir-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = args.model
        if model_dir is None:
            from reir.model import create_model

            torch.manual_seed(0)
            model, processor = create_model("small")
            model_dir = str(tmp / "small-random")
            model.save_pretrained(model_dir)
            processor.save_pretrained(model_dir)
        paths = make_images(tmp / "images", args.images, args.image_size)
        load_before = os.getloadavg()[0]
        bare = bare_encoder_rate(model_dir, paths, args.batch_size, args.top_k, args.device)
        # More logical CPUs than cores, as the CLI does, so reader/writer tasks fit beside the encoders.
        ray.init(num_cpus=max(4, args.threads + 2), num_gpus=1 if args.device == "cuda" else 0,
                 include_dashboard=False, log_to_driver=False)  # fmt: skip
        try:
            piped = pipeline_rate(model_dir, tmp / "images", tmp / "bench.db", args)
        finally:
            ray.shutdown()
        bare_after = bare_encoder_rate(model_dir, paths, args.batch_size, args.top_k, args.device)
        load_after = os.getloadavg()[0]
    encoder_rate = (bare["images_per_s"] + bare_after["images_per_s"]) / 2
    result = {
        "pipeline_images_per_s": round(piped["images_per_s"], 3),
        "encoder_images_per_s": round(encoder_rate, 3),
        "ratio": round(piped["images_per_s"] / encoder_rate, 3),
        "images": piped["images"],
        "instances": piped["instances"],
        "rows_in_store": piped["rows"],
        "pipeline_seconds": round(piped["seconds"], 2),
        "encoder_images_per_s_before_after": [round(bare["images_per_s"], 3), round(bare_after["images_per_s"], 3)],
        "load_avg_1m_before_after": [round(load_before, 2), round(load_after, 2)],
        "batch_size": args.batch_size,
        "threads": args.threads,
        "encoders": args.encoders,
        "device": args.device,
        "model": args.model or "small (random init)",
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
