"""What limits small objects: the stored instances' box recall by object size and IoU.

    python bench/small_objects.py --data DATA --model CKPT --out small_objects.json

Every test image of ``DATA`` goes through ingestion's encoder (decode, detect, embed, the
top ``--top-k`` instances per image, as they would be stored) in process; every ground-truth
instance is then matched to the stored instance of its image that overlaps it most. Prints
one JSON object (and writes it to ``--out``): per size bucket (the box's share of its image's
area) the share of instances some stored instance covers at IoU 0.5 / 0.7 / 0.9, and the
model's input resolution in source pixels per feature cell. Retrieval can only answer a box
that was stored, so these shares bound BR@k at each IoU, whatever the query and the re-ranker.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

BUCKETS = ((0.0, 0.01), (0.01, 0.02), (0.02, 0.05), (0.05, 1.01))
TAUS = (0.5, 0.7, 0.9)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="benchmark directory (instances_test.json)")
    p.add_argument("--model", type=Path, required=True, help="checkpoint")
    p.add_argument("--split", default="test")
    p.add_argument("--top-k", type=int, default=10, help="instances stored per image (ingestion's top_k_instances)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of one xywh box ``a`` with each of ``b [n, 4]``."""
    x0, y0 = np.maximum(a[0], b[:, 0]), np.maximum(a[1], b[:, 1])
    x1, y1 = np.minimum(a[0] + a[2], b[:, 0] + b[:, 2]), np.minimum(a[1] + a[3], b[:, 1] + b[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    return inter / (a[2] * a[3] + b[:, 2] * b[:, 3] - inter + 1e-9)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from reir.data.formats import load_coco, load_samples
    from reir.evaluation.comparison import encode_gallery
    from reir.platform import schema as S
    from reir.platform.modeling import load_reir_model

    torch.set_num_threads(max(1, args.threads))
    coco = load_coco(args.data / f"instances_{args.split}.json")
    samples = load_samples(args.data, args.split)
    encoded = encode_gallery(args.model, samples, top_k=args.top_k, batch_size=32)
    stored: dict[str, list[list[float]]] = {}
    for cols in encoded.ok_columns():
        for i, image_id in enumerate(cols[S.IMAGE_ID]):
            stored.setdefault(str(image_id), []).append([float(cols[n][i]) for n in S.BOX_FIELDS])
    images = {img["id"]: img for img in coco.dataset["images"]}
    counts = {b: {"instances": 0, **{f"stored@{t}": 0 for t in TAUS}} for b in BUCKETS}
    for ann in coco.dataset["annotations"]:
        img = images[ann["image_id"]]
        key = str(img.get("image_key", img["id"]))
        share = ann["bbox"][2] * ann["bbox"][3] / (img["width"] * img["height"])
        bucket = next(b for b in BUCKETS if b[0] <= share < b[1])
        counts[bucket]["instances"] += 1
        boxes = np.asarray(stored.get(key, []), dtype=np.float64).reshape(-1, 4)
        best = float(_iou(np.asarray(ann["bbox"], dtype=np.float64), boxes).max()) if len(boxes) else 0.0
        for t in TAUS:
            counts[bucket][f"stored@{t}"] += best >= t
    from reir.model.modeling_visual import vision_grid_size

    model, _ = load_reir_model(str(args.model))
    vision = model.config.vision_spec
    cells = vision_grid_size(vision, model.vision.backbone)
    sizes = [max(s.width, s.height) for s in samples]
    out = {
        "model": str(args.model), "data": str(args.data), "images": len(samples), "top_k": args.top_k,
        "input_size": int(getattr(vision, "image_size", 0)), "feature_grid": cells,
        "source_pixels_per_cell": round(float(np.mean(sizes)) / cells, 2),
        "by_area_share": {f"{lo:g}-{min(hi, 1):g}": {
            "instances": c["instances"],
            **{k: round(v / c["instances"], 4) for k, v in c.items() if k != "instances" and c["instances"]}}
            for (lo, hi), c in counts.items()},
    }  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
