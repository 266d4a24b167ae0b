"""Where a trained model's top-1 answers go wrong, on the synthetic benchmark's test gallery.

    python bench/diagnose.py --data DATA --model MODEL [--candidates 50] [--out diag.json]

``MODEL`` is a checkpoint with a re-ranker (the rerank stage's output) or without (the ANN
order is then the answer). Every test expression is scored as ``bench/rerank.py`` scores it
(exact index: its top ``--candidates`` instances by the dual encoder, their images re-ranked,
best instance per image). For each wrong top-1 image the best instance is matched to the
scene's ground truth (IoU >= 0.5) and every conjunct of the expression's program is checked
on it (``reir.data.semantics``): which ones it breaks says what the model failed to see.
A relation error is split further: is the landmark absent from the wrong image, and if so,
are its colour and its shape there on *other* objects (a binding error)?

Then linear probes (a softmax layer, fit on the train split, scored on the test split) read
the image's background from three views of the same forward pass: the mean of the visual
encoder's output tokens, the context projection the instance head adds to every token, and
the mean of the stored embeddings of the image's top-10 instances: how much of what the
model sees survives into the vectors the index stores.

Prints one JSON object (and writes ``--out``).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="synthetic benchmark directory")
    p.add_argument("--model", type=Path, required=True, help="a checkpoint (with or without a re-ranker)")
    p.add_argument("--candidates", type=int, default=50, help="ANN instances whose images are re-ranked")
    p.add_argument("--probe-images", type=int, default=1600, help="train images the probes are fit on")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def _programs(data: Path) -> dict[tuple[str, str], dict[str, Any]]:
    with open(data / "reircoco.json") as f:
        entries = json.load(f)
    return {(e["image_id"], s["raw"]): s["program"] for e in entries if e["split"] == "test" for s in e["sentences"]}


def _object_at(scene: Any, box_xywh: list[float]) -> int | None:
    """The scene object the box covers with IoU >= 0.5, if any."""
    import torch

    from reir.model.boxes import BoxMode, convert, pairwise_iou_xyxy

    if not scene.objects:
        return None
    objs = convert(torch.tensor([o.box for o in scene.objects], dtype=torch.float64), BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
    box = convert(torch.tensor([box_xywh], dtype=torch.float64), BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
    iou = pairwise_iou_xyxy(box, objs)[0][0]
    best = int(iou.argmax())
    return best if float(iou[best]) >= 0.5 else None


def broken_conjuncts(expr: Any, scene: Any, i: int) -> list[str]:
    """The parts of ``expr`` that object ``i`` of ``scene`` does not satisfy."""
    from reir.data.semantics import NO, context_truth, head_matches, related_truth, superlative_truth

    o = scene.objects[i]
    broken = []
    if expr.shape and o.shape != expr.shape:
        broken.append("shape")
    if expr.color and o.color != expr.color:
        broken.append("color")
    if expr.size and not head_matches(o, None, None, expr.size):
        broken.append("size")
    if expr.background and scene.background != expr.background:
        broken.append("background")
    if expr.context and context_truth(scene, i, expr.context) == NO:
        broken.append("context")
    if expr.relation and related_truth(scene, i, expr.relation) == NO:
        broken.append("relation")
    if expr.superlative and superlative_truth(scene, i, expr) == NO:
        broken.append("superlative")
    return broken


def landmark_kind(expr: Any, scene: Any, i: int) -> str:
    """For a broken relation: is the landmark in the image at all, or only its parts?"""
    from reir.data.semantics import head_matches

    ref = expr.relation.ref
    others = [o for k, o in enumerate(scene.objects) if k != i]
    if any(head_matches(o, ref.shape, ref.color) for o in others):
        return "landmark present, wrong geometry"
    shape = ref.shape is not None and any(o.shape == ref.shape for o in others)
    color = ref.color is not None and any(o.color == ref.color for o in others)
    if shape and color:
        return "landmark absent, its colour and its shape on other objects"
    return "landmark absent, " + ("its shape elsewhere" if shape else "its colour elsewhere" if color else "nothing like it")


def error_breakdown(model: Any, processor: Any, data: Path, candidates: int) -> dict[str, Any]:
    from reir.data.formats import load_samples
    from reir.data.semantics import Expr
    from reir.data.synth import load_gallery
    from reir.model.boxes import BoxMode, convert
    from reir.model.modeling import score_scale
    from reir.training.rerank import build_rerank_set, rank_pool
    from reir.training.trainer import ImageCache

    samples = load_samples(data, "test")
    scenes = {sc.image_id: sc for sc in load_gallery(data, "test").scenes}
    programs = _programs(data)
    rs = build_rerank_set(model, processor, samples, [0] * len(samples), ImageCache(max_items=0).get, top_k=10,
                          min_iou=0.0)  # fmt: skip
    scale, bias = float(score_scale(model.logit_scale.detach())), float(model.logit_bias.detach())
    texts = [(row, text) for row, s in enumerate(samples) for text, _ in s.refs]
    errors: Counter[str] = Counter()
    relation: Counter[str] = Counter()
    parts_all: Counter[str] = Counter()
    parts_wrong: Counter[str] = Counter()
    right = 0
    for t, (own, text) in enumerate(texts):
        expr = Expr.from_program(programs[(samples[own].image_id, text)])
        parts = [k for k in ("background", "relation", "superlative", "context", "size") if getattr(expr, k)]
        parts_all.update(parts)
        _, ann, ranked = rank_pool(model.reranker, rs, t, candidates, scale, bias)
        pool = {img for img, _, _ in ann}
        top, _, slot = next((r for r in ranked if r[0] in pool), (-1, 0.0, 0))
        if top == own:
            right += 1
            continue
        parts_wrong.update(parts)
        if own not in pool:
            errors["own image not among the candidates"] += 1
            continue
        sample, scene = samples[top], scenes[samples[top].image_id]
        box = convert(rs.boxes[top, slot].view(1, 4).numpy(), BoxMode.CXCYWH_NORM, BoxMode.XYWH_ABS,
                      width=sample.width, height=sample.height)[0].tolist()  # fmt: skip
        i = _object_at(scene, box)
        if i is None:
            errors["box on no object"] += 1
            continue
        broken = broken_conjuncts(expr, scene, i)
        errors["+".join(broken) or "none broken (borderline)"] += 1
        if broken == ["relation"]:
            relation[landmark_kind(expr, scene, i)] += 1
    return {"queries": len(texts), "image_top1": round(right / len(texts), 4), "wrong": len(texts) - right,
            "wrong_by_broken_conjunct": dict(errors.most_common()), "relation_only_errors": dict(relation.most_common()),
            "wrong_share_by_expression_part": {k: f"{parts_wrong[k]}/{parts_all[k]}" for k in parts_all}}


def background_probes(model: Any, processor: Any, data: Path, train_images: int) -> dict[str, float]:
    import torch
    from PIL import Image

    from reir.data.formats import load_samples
    from reir.data.synth import load_gallery
    from reir.data.vocab import BACKGROUNDS
    from reir.evaluation.probes import probe_accuracy

    v = model.vision

    def views(split: str, limit: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        samples = load_samples(data, split)[:limit]
        background = {sc.image_id: sc.background for sc in load_gallery(data, split).scenes}
        out: list[list[torch.Tensor]] = [[], [], []]
        for k in range(0, len(samples), 32):
            batch = samples[k:k + 32]
            images = []
            for s in batch:
                with Image.open(s.path) as f:
                    images.append(f.convert("RGB"))
            pixels = processor.collate(batch, images).pixel_values
            seen: list[torch.Tensor] = []
            # the encoder's output tokens, as the instance heads receive them
            hook = v.norm.register_forward_hook(lambda _m, _i, out, seen=seen: seen.append(out))
            try:
                with torch.no_grad():
                    inst = model.encode_images(pixels)
            finally:
                hook.remove()
            with torch.no_grad():
                top = inst.objectness_logits.topk(min(10, inst.objectness_logits.shape[1]), dim=1).indices
                emb = inst.embeddings
                stored = torch.gather(emb, 1, top[..., None].expand(-1, -1, emb.shape[-1]))
                mean = seen[0].mean(dim=1)
                for view, x in zip(out, (mean, v.heads.context(mean), stored.mean(dim=1))):
                    view.append(x)
        labels = torch.tensor([BACKGROUNDS.index(background[s.image_id]) for s in samples])
        return [torch.cat(x) for x in out], labels

    (train, y_train), (test, y_test) = views("train", train_images), views("test", 10**9)
    result = {}
    for name, x_train, x_test in zip(("token_mean", "context_projection", "stored_embedding_mean"), train, test):
        acc = probe_accuracy(x_train, y_train, x_test, y_test, num_classes=len(BACKGROUNDS), steps=300)
        result[name] = round(acc, 4)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    from reir.model import create_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = create_model(str(args.model))
    model.eval()
    result = {"model": str(args.model), "candidates": args.candidates, "reranked": model.reranker is not None,
              **error_breakdown(model, processor, args.data, args.candidates),
              "background_probe_accuracy": background_probes(model, processor, args.data, args.probe_images)}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
