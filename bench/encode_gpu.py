"""Encoder throughput on a GPU, and how many CPU cores of JPEG decoding it takes to feed it.

    PYTHONPATH=. python3 bench/encode_gpu.py --out encode-gpu.json
    PYTHONPATH=. python3 bench/encode_gpu.py --source PHOTOS_DIR --out encode-gpu.json

Pure torch: imports only ``reir.model`` and ``reir.model.images`` (no Ray, no Milvus), so it
runs on a bare GPU machine. For each preset (``small``, and ``siglip-vitb16`` with random
ViT-B/16 SigLIP towers at 224 px built from transformers' default ``SiglipVisionConfig`` /
``SiglipTextConfig`` and saved to a temporary directory; throughput does not depend on the
weights) it measures:

- ``encoder``: images/s of ``model.encode_images`` on pixel tensors already on the device, per
  batch size, in fp32 and (CUDA only) bf16 under ``torch.autocast``; warm-up iterations first,
  the clock read after ``torch.cuda.synchronize()``;
- ``decode``: images/s one CPU core (one thread) gets from ``decode_for_input`` (JPEG bytes ->
  the model's ``S x S`` uint8 input, draft mode included) on 640x480 JPEGs generated here
  (``--source`` adds a folder of real photos), and ``cores_to_feed``: the encoder's best bf16
  rate (fp32 on CPU) over that rate, i.e. how many such cores keep the GPU busy; also the
  rate of ``--workers`` decode threads (one process, one GIL) and of as many processes;
- ``end_to_end``: a pool of ``--workers`` (default ``os.cpu_count()``) decode threads (one
  process, one GIL) and, separately, as many forked decode processes (writing into shared
  memory) fill uint8 batches, which the main thread copies to the GPU, normalizes there and
  encodes (bf16 on CUDA); images/s and the ratio to the bare encoder at the same batch size.
  The outputs stay on the device (no post-processing, no copy back).

Prints one JSON object; ``--out`` also writes it. Without CUDA it runs in fp32 on the CPU
(use small ``--batch-sizes``/``--images``; the test suite does).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from reir.model import create_model
from reir.model.images import decode_for_input

PRESETS = ("small", "siglip-vitb16")
# siglip-vitb16's towers: transformers' defaults are ViT-B/16 at 224 px (12 layers, 768 wide).
# "tiny" is for tests on a CPU.
SIGLIP_TOWERS: dict[str, dict[str, dict[str, Any]]] = {
    "vitb16": {"vision": {}, "text": {}, "preset": {}},
    "tiny": {
        "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        "preset": {"embed_dim": 16, "vision": {"hidden_size": 32, "num_layers": 1, "num_heads": 2}},
    },
}


def make_jpegs(n: int, width: int = 640, height: int = 480, seed: int = 0, quality: int = 90) -> list[bytes]:
    """``n`` photo-like JPEGs: a smooth colour gradient, a few shapes, blur and sensor-like
    noise (plain flat shapes would decode faster than photos do)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for _ in range(n):
        a, b = rng.uniform(-0.3, 0.3, (2, 3))
        base = rng.uniform(40, 200, 3)
        grad = base + a * xx[..., None] + b * yy[..., None]
        img = Image.fromarray(np.clip(grad, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(4, 10))):
            x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
            w, h = int(rng.integers(20, width // 3)), int(rng.integers(20, height // 3))
            color = tuple(int(v) for v in rng.integers(0, 255, 3))
            shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
            shape((x0, y0, min(width - 1, x0 + w), min(height - 1, y0 + h)), fill=color)
        arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.int16)
        arr = arr + rng.normal(0, 6, arr.shape).astype(np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def jpeg_facts(jpegs: list[bytes]) -> dict[str, Any]:
    size = list(Image.open(io.BytesIO(jpegs[0])).size)
    return {"n": len(jpegs), "mean_kb": round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1), "first_size": size}


def read_jpegs(folder: str, limit: int) -> list[bytes]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:limit]
    return [p.read_bytes() for p in files]


def siglip_dir(directory: Path, scale: str) -> Path:
    """Random-weight SigLIP vision and text towers (+ the built-in tokenizer) saved locally."""
    from transformers import SiglipTextConfig, SiglipTextModel, SiglipVisionConfig, SiglipVisionModel

    from reir.model.tokenization import build_tokenizer, build_vocab

    towers = SIGLIP_TOWERS[scale]
    SiglipVisionModel(SiglipVisionConfig(vision_use_head=False, **towers["vision"])).save_pretrained(
        directory / "vision"
    )
    text_cfg = {"vocab_size": len(build_vocab()), **towers["text"]} if scale == "tiny" else towers["text"]
    SiglipTextModel(SiglipTextConfig(**text_cfg)).save_pretrained(directory / "text")
    build_tokenizer(64).save_pretrained(directory / "text")
    return directory


def build(preset: str, workdir: Path, siglip_scale: str) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, processor, facts about it)."""
    torch.manual_seed(0)
    if preset == "siglip-vitb16":
        src = siglip_dir(workdir / f"siglip-{siglip_scale}", siglip_scale)
        model, processor = create_model(preset, vision_model_path=str(src / "vision"),
                                        text_model_path=str(src / "text"), **SIGLIP_TOWERS[siglip_scale]["preset"])  # fmt: skip
        tower: Any = model.vision.backbone.tower.config  # type: ignore[union-attr]
        extra = {"siglip_towers": siglip_scale, "tower_hidden": tower.hidden_size, "tower_layers": tower.num_hidden_layers,
                 "patch_size": tower.patch_size, "attn_implementation": getattr(tower, "_attn_implementation", None)}  # fmt: skip
    else:
        model, processor = create_model(preset)
        extra = {}
    vision_params = sum(p.numel() for p in model.vision.parameters())
    info = {"image_size": int(processor.image_size), "num_queries": int(model.num_queries),
            "vision_params_m": round(vision_params / 1e6, 2), **extra}  # fmt: skip
    return model.eval(), processor, info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encoder_rate(
    model: Any, size: int, batch: int, device: torch.device, bf16: bool, args: argparse.Namespace
) -> dict[str, Any]:
    """images/s of ``encode_images`` on a batch already on the device."""
    x = torch.randn(batch, 3, size, size, device=device)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            model.encode_images(x)

    with torch.inference_mode():
        for _ in range(args.warmup):
            step()
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        one = time.perf_counter() - t
        iters = max(args.min_iters, min(args.max_iters, math.ceil(args.seconds / max(one, 1e-6))))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        for _ in range(iters):
            step()
        _sync(device)
        seconds = time.perf_counter() - t
    out = {
        "batch": batch,
        "iters": iters,
        "seconds": round(seconds, 4),
        "images_per_s": round(batch * iters / seconds, 1),
    }
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def decode_rate(jpegs: list[bytes], size: int, min_images: int) -> dict[str, Any]:
    """images/s of ``decode_for_input`` on one thread (one core), cycling over ``jpegs``."""
    decode_for_input(jpegs[0], size)  # warm-up
    n = max(min_images, len(jpegs))
    t = time.perf_counter()
    for i in range(n):
        decode_for_input(jpegs[i % len(jpegs)], size)
    seconds = time.perf_counter() - t
    return {"images": n, "seconds": round(seconds, 4), "images_per_s_per_core": round(n / seconds, 1),
            "ms_per_image": round(1000 * seconds / n, 3)}  # fmt: skip


def decode_parallel(jpegs: list[bytes], size: int, workers: int, images: int, kind: str) -> dict[str, Any]:
    """images/s of ``decode_for_input`` spread over ``workers`` threads (one process: the GIL is
    shared) or processes (forked; each returns its pixels to this process, as a feeder would)."""
    import multiprocessing as mp
    from functools import partial

    fn = partial(decode_for_input, size=size)
    data = [jpegs[i % len(jpegs)] for i in range(max(images, len(jpegs)))]
    if kind == "threads":
        with ThreadPoolExecutor(workers) as threads:
            list(threads.map(fn, data[: workers * 2]))  # warm-up: the threads started
            t = time.perf_counter()
            list(threads.map(fn, data))
            seconds = time.perf_counter() - t
    else:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers) as procs:
            procs.map(fn, data[: workers * 2], chunksize=1)  # warm-up: the processes started
            t = time.perf_counter()
            procs.map(fn, data, chunksize=max(1, len(data) // (workers * 8)))
            seconds = time.perf_counter() - t
    return {"kind": kind, "workers": workers, "images": len(data), "seconds": round(seconds, 4),
            "images_per_s": round(len(data) / seconds, 1)}  # fmt: skip


def to_pixel_values(batch: torch.Tensor, mean255: torch.Tensor, std255: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, S, S, 3]`` -> the processor's float ``[B, 3, S, S]`` (``(x - 255 mean) / (255 std)``),
    computed wherever ``batch`` is (on the GPU: a quarter of the bytes cross the bus)."""
    return (batch.permute(0, 3, 1, 2).float() - mean255.view(1, 3, 1, 1)) / std255.view(1, 3, 1, 1)


# What forked decode processes inherit (set before the pool forks): the shared pixel ring,
# the JPEGs and the input size. Tasks then carry four integers, and pixels are not pickled.
_FEED: dict[str, Any] = {}


def _fill(lo: int, hi: int, first: int, slot: int) -> None:
    ring, jpegs, size = _FEED["ring"], _FEED["jpegs"], _FEED["size"]
    for k in range(lo, hi):
        ring[slot, k] = decode_for_input(jpegs[(first + k) % len(jpegs)], size)[0]


def end_to_end(model: Any, processor: Any, jpegs: list[bytes], batch: int, device: torch.device, bf16: bool,
               workers: int, images: int, kind: str = "threads", depth: int = 4) -> dict[str, Any]:  # fmt: skip
    """CPU decoding feeds the encoder. Each batch is split into ``workers`` chunks, decoded by a
    pool of ``workers`` threads (``kind="threads"``: one process, one GIL) or forked processes
    (``"processes"``) into a ring of ``depth`` uint8 batches (pinned host memory for threads,
    shared memory for processes, then copied into a pinned buffer); the main thread copies each
    finished batch to the device, normalizes it there and encodes it, while the next
    ``depth - 1`` batches decode."""
    import ctypes
    import multiprocessing as mp

    size = int(processor.image_size)
    cuda = device.type == "cuda"
    mean = torch.tensor(processor.image_mean, device=device) * 255.0
    std = torch.tensor(processor.image_std, device=device) * 255.0
    pinned = [torch.empty((batch, size, size, 3), dtype=torch.uint8, pin_memory=cuda) for _ in range(depth)]
    copied: list[torch.cuda.Event | None] = [None] * depth
    nb = max(2, images // batch)
    chunk = math.ceil(batch / workers)
    pool: Any
    if kind == "threads":
        ring = None  # the threads decode straight into the pinned buffers
        pool = ThreadPoolExecutor(workers)
    else:
        ctx = mp.get_context("fork")
        raw = ctx.RawArray(ctypes.c_uint8, depth * batch * size * size * 3)
        ring = np.ctypeslib.as_array(raw).reshape(depth, batch, size, size, 3)
        _FEED.update(ring=ring, jpegs=jpegs, size=size)
        pool = ctx.Pool(workers)

    def wait_copied(slot: int) -> None:
        event = copied[slot]
        if event is not None:
            event.synchronize()  # the batch that used this pinned buffer is on the device

    def fill_pinned(lo: int, hi: int, first: int, slot: int) -> None:
        buf = pinned[slot].numpy()
        for k in range(lo, hi):
            buf[k] = decode_for_input(jpegs[(first + k) % len(jpegs)], size)[0]

    def submit(j: int) -> list[Any]:
        slot, spans = j % depth, [(lo, min(batch, lo + chunk), j * batch, j % depth) for lo in range(0, batch, chunk)]
        if kind == "threads":
            wait_copied(slot)
            return [pool.submit(fill_pinned, *span) for span in spans]
        return [pool.apply_async(_fill, span) for span in spans]

    def encode(j: int, tasks: list[Any]) -> None:
        for task in tasks:
            if kind == "threads":
                task.result()
            else:
                task.get()
        slot = j % depth
        if kind != "threads":
            wait_copied(slot)
            pinned[slot].copy_(torch.from_numpy(ring[slot]))  # type: ignore[index]
        x = pinned[slot].to(device, non_blocking=True)
        if cuda:
            event = torch.cuda.Event()
            event.record()
            copied[slot] = event
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            model.encode_images(to_pixel_values(x, mean, std))

    try:
        with torch.inference_mode():
            encode(0, submit(0))  # warm-up batch (not timed)
            _sync(device)
            t = time.perf_counter()
            pending = deque(submit(j) for j in range(min(depth, nb)))
            for i in range(nb):
                encode(i, pending.popleft())
                if i + depth < nb:
                    pending.append(submit(i + depth))
            _sync(device)
            seconds = time.perf_counter() - t
    finally:
        if kind == "threads":
            pool.shutdown()
        else:
            pool.terminate()
            pool.join()
            _FEED.clear()
    return {"kind": kind, "batch": batch, "workers": workers, "images": nb * batch, "seconds": round(seconds, 3),
            "images_per_s": round(nb * batch / seconds, 1), "bf16": bf16}  # fmt: skip


def bench_preset(preset: str, args: argparse.Namespace, device: torch.device, jpeg_sets: dict[str, list[bytes]],
                 workdir: Path) -> dict[str, Any]:  # fmt: skip
    t = time.perf_counter()
    model, processor, info = build(preset, workdir, args.siglip_towers)
    model = model.to(device)
    size = info["image_size"]
    out: dict[str, Any] = {**info, "build_s": round(time.perf_counter() - t, 2), "encoder": {}}
    dtypes = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    for dtype in dtypes:
        rows = []
        for batch in args.batch_sizes:
            try:
                rows.append(encoder_rate(model, size, batch, device, dtype == "bf16", args))
            except torch.OutOfMemoryError:
                rows.append({"batch": batch, "error": "out of memory"})
                torch.cuda.empty_cache()
            print(f"[{preset}] {dtype} batch {batch}: {rows[-1]}", file=sys.stderr, flush=True)
        out["encoder"][dtype] = rows
    feed_dtype = dtypes[-1]
    best = max((r for r in out["encoder"][feed_dtype] if "images_per_s" in r), key=lambda r: r["images_per_s"])
    out["encoder_best"] = {"dtype": feed_dtype, "batch": best["batch"], "images_per_s": best["images_per_s"]}
    out["decode"] = {}
    for name, jpegs in jpeg_sets.items():
        rate = decode_rate(jpegs, size, args.decode_images)
        rate["cores_to_feed"] = round(best["images_per_s"] / rate["images_per_s_per_core"], 3)
        out["decode"][name] = rate
        if name == "generated":
            rate["parallel"] = [decode_parallel(jpegs, size, args.workers, args.decode_images * 4, kind)
                                for kind in ("threads", "processes")]  # fmt: skip
        print(f"[{preset}] decode {name} @ {size}px: {rate}", file=sys.stderr, flush=True)
    e2e_batch = args.e2e_batch if args.e2e_batch in args.batch_sizes else args.batch_sizes[-1]
    bare = next(r for r in out["encoder"][feed_dtype] if r["batch"] == e2e_batch)
    decode_core = out["decode"]["generated"]["images_per_s_per_core"]
    out["end_to_end"] = {}
    for kind in args.e2e_kinds:
        e2e = end_to_end(model, processor, jpeg_sets["generated"], e2e_batch, device, feed_dtype == "bf16",
                         args.workers, args.e2e_images, kind=kind)  # fmt: skip
        e2e["bare_encoder_images_per_s"] = bare.get("images_per_s")
        e2e["ratio_to_encoder"] = (
            round(e2e["images_per_s"] / bare["images_per_s"], 3) if "images_per_s" in bare else None
        )
        e2e["decode_bound_images_per_s"] = round(decode_core * args.workers, 1)  # one core's rate x workers
        out["end_to_end"][kind] = e2e
        print(f"[{preset}] end to end: {e2e}", file=sys.stderr, flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--presets", default=",".join(PRESETS), help="comma-separated: small, siglip-vitb16 (others: any preset)"
    )
    p.add_argument("--batch-sizes", default="32,128,512", help="comma-separated encoder batch sizes")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations per encoder measurement")
    p.add_argument("--seconds", type=float, default=2.0, help="target timed seconds per encoder measurement")
    p.add_argument("--min-iters", type=int, default=5)
    p.add_argument("--max-iters", type=int, default=500)
    p.add_argument("--images", type=int, default=256, help="distinct generated 640x480 JPEGs")
    p.add_argument("--source", default=None, help="a folder of real JPEGs, measured as a second decode set")
    p.add_argument("--decode-images", type=int, default=1000, help="decodes timed per set (cycling)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode threads end to end")
    p.add_argument("--e2e-batch", type=int, default=128)
    p.add_argument("--e2e-images", type=int, default=8192, help="images encoded end to end")
    p.add_argument("--e2e-kinds", default="threads,processes", help="decode pools end to end: threads, processes")
    p.add_argument("--siglip-towers", default="vitb16", choices=sorted(SIGLIP_TOWERS), help="tiny: tests")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    args.presets = [s for s in args.presets.split(",") if s]
    args.batch_sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    args.e2e_kinds = [s for s in args.e2e_kinds.split(",") if s]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
    t = time.perf_counter()
    jpeg_sets = {"generated": make_jpegs(args.images)}
    gen_s = time.perf_counter() - t
    if args.source:
        jpeg_sets["source"] = read_jpegs(args.source, 10_000)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "jpegs": {name: jpeg_facts(js) for name, js in jpeg_sets.items()},
        "jpeg_generation_s": round(gen_s, 2),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "presets": {},
    }
    try:
        import transformers

        report["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    with tempfile.TemporaryDirectory(prefix="reir-encode-gpu-") as tmp:
        for preset in args.presets:
            report["presets"][preset] = bench_preset(preset, args, device, jpeg_sets, Path(tmp))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
