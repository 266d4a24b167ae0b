"""Ingestion benchmark: the Ray Data pipeline against a plain loop and the bare encoder, same images.

    PYTHONPATH=. .venv/bin/python bench/ingest.py --images 4000 --out ingest.json
    PYTHONPATH=. .venv/bin/python bench/ingest.py --source ../shared/data/coco-mini/val2017 --repeat 12

Three rates on the same images and batch size:
- the pipeline: ``run_ingestion`` end to end (listing, ledger, read + decode tasks, encoder
  actors, upserts, index build, flush, load), with its phases and its steady rate (20-90 %);
- a plain loop: one process without Ray doing the necessary work in turn (read and hash,
  decode at the model's input size, encode, upsert into milvus-lite, build the index), with
  seconds per step;
- the bare encoder: ``InstanceEncoder.encode`` on images already decoded and resized, measured
  before and after the pipeline (their mean is used, so a change in background load during
  the run biases neither side; ``load_avg`` reports it).

Without ``--model`` the ``small`` preset with random weights is saved to a temporary checkpoint
(throughput does not depend on the weights). ``--device cuda`` runs the model on the GPU in bf16.
Prints one JSON object: pipeline_images_per_s, plain_loop_images_per_s, encoder_images_per_s,
ratio_to_loop, ratio (to the encoder), steady, pipeline_phases_s, plain_loop_steps_s, ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


def random_small_checkpoint(directory: Path) -> str:
    """The ``small`` preset with random weights, saved (throughput does not depend on the weights)."""
    import torch

    from reir.model import create_model

    torch.manual_seed(0)
    model, processor = create_model("small")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)


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


def load_encoder(model_dir: str, top_k: int, device: str) -> tuple[Any, int]:
    """(InstanceEncoder on the checkpoint, the model's input size), as an encoder actor builds it."""
    from reir.ingestion.encoder import InstanceEncoder
    from reir.platform.modeling import input_size_for, load_reir_image_model, model_version_for

    model, processor = load_reir_image_model(model_dir)
    if device != "cpu":
        model = model.to(device)
    enc = InstanceEncoder(model, processor, model_version=model_version_for(model_dir), top_k=top_k,
                          device=device, bf16=device != "cpu")  # fmt: skip
    return enc, input_size_for(model_dir) or 0


def bare_encoder_rate(model_dir: str, paths: list[Path], batch_size: int, top_k: int, device: str) -> dict[str, Any]:
    """images/s of InstanceEncoder.encode on images already decoded and resized to the model's
    input (the model and its pre/post-processing only; one warm-up batch excluded)."""
    from PIL import Image

    from reir.model.images import decode_for_input

    enc, size = load_encoder(model_dir, top_k, device)
    decoded = [decode_for_input(p.read_bytes(), size) for p in paths]
    images = [(Image.fromarray(px), wh) for px, wh in decoded]
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    enc.encode([im for im, _ in batches[0]], [wh for _, wh in batches[0]])  # warm-up
    instances = 0
    start = time.perf_counter()
    for batch in batches:
        instances += sum(len(x) for x in enc.encode([im for im, _ in batch], [wh for _, wh in batch]))
    seconds = time.perf_counter() - start
    return {"images_per_s": len(images) / seconds, "seconds": seconds, "instances": instances}


def plain_loop_rate(model_dir: str, paths: list[Path], db: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The fair baseline: one process, no Ray, doing the necessary work in turn on the same cores.

    Per batch: read the files and hash them (the read tasks' ``read_image_bytes``), decode at
    the model's input size (the pipeline's decode: JPEG draft mode), encode, upsert the rows
    into milvus-lite (opened by this process); then build the index and load it. Seconds per
    step are reported.
    """
    from reir.ingestion.gallery import ORIGINAL_H, ORIGINAL_W, PIXELS, read_image_bytes
    from reir.ingestion.sink import instance_columns
    from reir.model.images import decode_for_input
    from reir.platform import schema as S
    from reir.platform.store import MilvusStore

    steps = dict.fromkeys(("load", "read", "decode", "encode", "write", "index"), 0.0)
    t0 = time.perf_counter()
    enc, size = load_encoder(model_dir, args.top_k, args.device)
    store = MilvusStore(str(db), "loop")
    store.ensure_collection(enc.embedding_dim)
    steps["load"] = time.perf_counter() - t0
    images = rows = 0
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        t = time.perf_counter()
        batch = read_image_bytes({"image_id": np.asarray([p.stem for p in chunk], dtype=object),
                                  "uri": np.asarray([str(p) for p in chunk], dtype=object)})  # fmt: skip
        t1 = time.perf_counter()
        decoded = [decode_for_input(b, size) for b in batch.pop("bytes")]
        batch.update({PIXELS: np.stack([px for px, _ in decoded]), ORIGINAL_W: np.asarray([wh[0] for _, wh in decoded]),
                      ORIGINAL_H: np.asarray([wh[1] for _, wh in decoded])})  # fmt: skip
        t2 = time.perf_counter()
        columns = enc.rows_for_batch(batch)
        t3 = time.perf_counter()
        rows += store.upsert(S.rows_from_columns(instance_columns(columns), {}))
        t4 = time.perf_counter()
        images += len(chunk)
        for name, a, b in (("read", t, t1), ("decode", t1, t2), ("encode", t2, t3), ("write", t3, t4)):
            steps[name] += b - a
    t = time.perf_counter()
    store.build_index("AUTOINDEX", {})
    store.flush()
    store.load()
    count = store.count()
    store.close()
    steps["index"] = time.perf_counter() - t
    seconds = time.perf_counter() - t0
    return {"images_per_s": images / seconds, "seconds": seconds, "rows": count, "instances": rows,
            "steps_s": {k: round(v, 2) for k, v in steps.items()},
            "steady_images_per_s": images / (seconds - steps["load"] - steps["index"])}  # fmt: skip


def pipeline_rate(model_dir: str, folder: Path, db: Path, args: argparse.Namespace) -> dict[str, Any]:
    """run_ingestion end to end (listing, reading, decoding, encoding, upserts, index build + load)."""
    from reir.ingestion.pipeline import run_ingestion
    from reir.platform.config import IngestConfig, MilvusConfig

    cfg = IngestConfig(
        gallery_root=folder, split=None, model_path=model_dir, batch_size=args.batch_size,
        num_encoders=args.encoders, num_cpus_per_encoder=args.cpus_per_encoder, top_k_instances=args.top_k,
        device=args.device, milvus=MilvusConfig(uri=str(db), collection="bench", index_type=args.index_type),
        decode_in_reader=not args.decode_in_encoder, progress_interval_s=2.0,
    )  # fmt: skip
    summary = run_ingestion(cfg)
    return {"images_per_s": summary.images / summary.seconds, "seconds": summary.seconds,
            "instances": summary.instances, "rows": summary.rows_in_store, "images": summary.images,
            "failures": summary.failures, "phases_s": summary.phases, "encoders": summary.encoders,
            "stream_images_per_s": summary.images / summary.phases["stream"], "progress": summary.progress}  # fmt: skip


def steady_window_rate(progress: list[tuple[float, int]], images: int, lo: float = 0.2, hi: float = 0.9) -> float | None:
    """images/s between the progress samples that first reach ``lo`` and ``hi`` of the images."""
    first = next((p for p in progress if p[1] >= lo * images), None)
    last = next((p for p in progress if p[1] >= hi * images), None)
    if first is None or last is None or last[0] <= first[0]:
        return None
    return round((last[1] - first[1]) / (last[0] - first[0]), 3)


def gallery_paths(args: argparse.Namespace, tmp: Path) -> tuple[Path, list[Path]]:
    """(folder, image files): generated JPEGs, or every image under ``--source``."""
    if args.source is None:
        folder = tmp / "images"
        return folder, make_images(folder, args.images, args.image_size)
    from reir.ingestion.gallery import IMAGE_SUFFIXES

    folder = args.source.resolve()
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no images under {folder}")
    if args.repeat > 1:  # a larger gallery of the same photos (copies: distinct files, distinct ids)
        copies = tmp / "images"
        copies.mkdir()
        for r in range(args.repeat):
            for p in paths:
                (copies / f"r{r:03d}_{p.name}").write_bytes(p.read_bytes())
        folder, paths = copies, sorted(copies.iterdir())
    return folder, paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=128, help="side of the generated JPEGs")
    parser.add_argument("--source", type=Path, default=None, help="a folder of your images instead of generated ones")
    parser.add_argument("--repeat", type=int, default=1, help="with --source: ingest N copies of its images")
    parser.add_argument("--model", default=None, help="checkpoint directory [small preset, random init]")
    parser.add_argument("--top-k", type=int, default=10, help="instances kept per image")
    parser.add_argument("--encoders", type=int, default=None, help="pipeline encoder actors [auto: one per free CPU]")
    parser.add_argument("--cpus-per-encoder", type=float, default=1.0, help="CPUs (= torch threads) per encoder actor")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the bare encoder and the plain loop [all cores]")
    parser.add_argument("--index-type", default="AUTOINDEX")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: GPU actors in bf16")
    parser.add_argument("--decode-in-encoder", action="store_true", help="the encoder actors decode (the old plan)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("ray", "pymilvus", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import ray
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="reir-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = args.model or random_small_checkpoint(tmp / "small-random")
        folder, paths = gallery_paths(args, tmp)
        load_before = os.getloadavg()[0]
        bare = bare_encoder_rate(model_dir, paths, args.batch_size, args.top_k, args.device)
        loop = plain_loop_rate(model_dir, paths, tmp / "loop.db", args)
        # More logical CPUs than cores, as the CLI does, so reader/writer tasks fit beside the encoders.
        ray.init(address="local", num_cpus=max(4, (os.cpu_count() or 1) + 2), num_gpus=1 if args.device == "cuda" else 0,
                 include_dashboard=False, log_to_driver=False)  # fmt: skip
        try:
            piped = pipeline_rate(model_dir, folder, tmp / "bench.db", args)
        finally:
            ray.shutdown()
        bare_after = bare_encoder_rate(model_dir, paths, args.batch_size, args.top_k, args.device)
        load_after = os.getloadavg()[0]
    encoder_rate = (bare["images_per_s"] + bare_after["images_per_s"]) / 2
    window = steady_window_rate(piped["progress"], piped["images"])
    result = {
        "pipeline_images_per_s": round(piped["images_per_s"], 3),
        "plain_loop_images_per_s": round(loop["images_per_s"], 3),
        "encoder_images_per_s": round(encoder_rate, 3),
        "ratio_to_loop": round(piped["images_per_s"] / loop["images_per_s"], 3),
        "ratio": round(piped["images_per_s"] / encoder_rate, 3),
        # once streaming: the pipeline between 20 and 90 % of the images (started, before the
        # tail), the loop without its model load and index build
        "steady": {"pipeline_images_per_s": window, "plain_loop_images_per_s": round(loop["steady_images_per_s"], 3)},
        "pipeline_stream_images_per_s": round(piped["stream_images_per_s"], 3),  # the stream phase, start-up included
        "pipeline_phases_s": piped["phases_s"],
        "plain_loop_steps_s": loop["steps_s"],
        "images": piped["images"],
        "failures": piped["failures"],
        "instances": piped["instances"],
        "rows_in_store": piped["rows"],
        "plain_loop_rows": loop["rows"],
        "pipeline_seconds": round(piped["seconds"], 2),
        "pipeline_progress": piped["progress"],  # (seconds into the stream, images encoded)
        "plain_loop_seconds": round(loop["seconds"], 2),
        "encoder_images_per_s_before_after": [round(bare["images_per_s"], 3), round(bare_after["images_per_s"], 3)],
        "load_avg_1m_before_after": [round(load_before, 2), round(load_after, 2)],
        "source": (f"{args.source} x{args.repeat}" if args.repeat > 1 else str(args.source)) if args.source
        else f"generated {args.image_size}px JPEGs",
        "decode": "encoder actors" if args.decode_in_encoder else "read tasks (draft mode)",
        "batch_size": args.batch_size,
        "threads": args.threads,
        "encoders": piped["encoders"],
        "cpus_per_encoder": args.cpus_per_encoder,
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
