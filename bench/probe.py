"""Linear probes: what a checkpoint's instance and text embeddings carry.

For the first ``--images`` training images of a synthetic benchmark, every annotated object
is paired with the stored instance (top 10 per image, as ingestion keeps them) that
overlaps it most (IoU >= 0.5), and a linear classifier is fitted on 70% of those
instance embeddings to read the object's colour, shape and size and its image's
background, then scored on the other
30%. The same is done for the colour of each training expression's head ("the *red*
circle ...") from its text embedding, and at the token of each box's centre for the
backbone's output and the trunk's tokens (the heads' input), which tells where in the
visual branch an attribute is lost. A probe near ``majority`` (the most frequent value's
share) means the attribute is not there.

    PYTHONPATH=. .venv/bin/python bench/probe.py --model runs/app/model --data data --out probe.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reir.evaluation.probes import split_probe


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--data", type=Path, required=True, help="synthetic benchmark root (reir synth --out)")
    parser.add_argument("--images", type=int, default=300, help="training images read [300]")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = parser.parse_args(argv)

    from PIL import Image

    from reir.data.formats import load_reircoco
    from reir.model import create_model
    from reir.model.boxes import iou_xywh
    from reir.serving.retriever import QueryEncoder

    model, processor = create_model(str(args.model))
    model.eval()
    by_image: dict[str, list[Any]] = {}
    for entry in load_reircoco(args.data / "reircoco.json"):
        if entry.split == "train":
            by_image.setdefault(entry.image_id, []).append(entry)
    captured: dict[str, torch.Tensor] = {}
    model.vision.backbone.register_forward_hook(lambda m, i, o: captured.__setitem__("backbone", o))
    model.vision.heads.register_forward_hook(lambda m, i, o: captured.__setitem__("tokens", i[0]))
    grid = model.vision.grid
    stored: dict[str, list[np.ndarray]] = {"feature": []}
    stored_labels: dict[str, list[str]] = {"color": [], "shape": [], "size": [], "background": []}
    at_centre: dict[str, list[np.ndarray]] = {"backbone": [], "tokens": [], "embedding": []}
    centre_colour: list[str] = []
    texts, text_colour = [], []
    for image_id in sorted(by_image)[: args.images]:
        entries = by_image[image_id]
        first = entries[0]
        with Image.open(args.data / first.file_name) as im:
            image = im.convert("RGB")
        with torch.inference_mode():
            out = model.encode_images(processor.images([image]))
            (insts,) = processor.postprocess(out, sizes=[(image.width, image.height)], top_k=10)
        for ann in first.det_anno:
            ious = [iou_xywh(inst.box_xywh, ann.bbox) for inst in insts]
            if ious and max(ious) >= 0.5:
                stored["feature"].append(np.asarray(insts[int(np.argmax(ious))].embedding, dtype=np.float32))
                labels = {**ann.attributes, "background": first.extra.get("background")}
                for key, values in stored_labels.items():
                    values.append(str(labels[key]))
            x, y, w, h = ann.bbox
            col = min(int((x + w / 2) / image.width * grid), grid - 1)
            row = min(int((y + h / 2) / image.height * grid), grid - 1)
            q = row * grid + col
            at_centre["backbone"].append(captured["backbone"][0, q].float().numpy())
            at_centre["tokens"].append(captured["tokens"][0, q].float().numpy())
            at_centre["embedding"].append(out.embeddings[0, q].float().numpy())
            centre_colour.append(str(ann.attributes["color"]))
        for entry in entries:
            for sentence in entry.sentences:
                if sentence.program and sentence.program.get("color"):
                    texts.append(sentence.raw)
                    text_colour.append(sentence.program["color"])
    encoder = QueryEncoder(model, processor)  # the text embeddings serving searches with
    text_features = [row for start in range(0, len(texts), 256) for row in encoder.encode(texts[start : start + 256])]
    report: dict[str, Any] = {
        "model": str(args.model), "data": str(args.data), "images": args.images,
        "stored_instance": {key: split_probe(stored["feature"], labels) for key, labels in stored_labels.items()},
        "box_centre_token_colour": {key: split_probe(feats, centre_colour) for key, feats in at_centre.items()},
        "text_head_colour": split_probe(text_features, text_colour),
    }  # fmt: skip
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
