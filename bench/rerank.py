"""Re-ranker training recipes compared at equal wall-clock time, on a frozen stage-2 model.

    python bench/rerank.py --data DATA --model STAGE2 --seconds 330 \
        --variant random32:batch=32,lr=1e-3,group=0 --variant group128:batch=128,lr=4e-3,group=1

``DATA`` is a synthetic benchmark dir, ``STAGE2`` a stage-2 checkpoint (the re-ranker's input:
``reir train --stage rerank --model STAGE2``). The training features are built once, as
stage ``rerank`` builds them (``reir.training.rerank.build_rerank_set``: the checkpoint's
stored-instance policy unless ``--top-k``, carrier words on ``--filler-rate`` of the
expressions), then each variant trains a fresh re-ranker with the stage's own loss, negatives
(drawn each step from the ``--negative-pool`` images the dual encoder ranks first), held-out
calibration images and LR schedule (warm-up,
cosine by elapsed time) for ``--seconds`` of wall time, or for ``--steps`` (cosine by step:
comparisons of two stage-2 models that machine load does not skew), in this process (pure
torch: what is compared is the recipe, not Ray Train). ``group=1`` draws each batch from one negative group
(``sample_texts``, what stage ``rerank`` does), ``group=0`` uniformly.

Scoring mirrors the service on an exact index: each test expression's top ``--candidates``
instances by the dual encoder over the whole test gallery, their images re-ranked, one answer
(best instance) per image; BR@k at IoU 0.5. Prints one JSON object (and writes ``--out``).
``--weak`` trains as stage ``weak-rerank`` (no referent slots; a weak or any frozen model).
``--train-gallery N`` also scores N train expressions on the first train chunk (400 images the
models trained on, expressions unique among them): the ``train_*`` keys, against the test
split's, say how much of the shortfall is generalization.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from reir.demo import RERANK_RECIPE as DEMO


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from reir.model.configuration import RerankSpec
    from reir.training.config import TrainConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="synthetic benchmark directory (reircoco.json)")
    p.add_argument("--model", type=Path, required=True, help="a stage-2 checkpoint")
    p.add_argument("--seconds", type=float, default=330.0, help="wall-clock training time per variant")
    p.add_argument("--steps", type=int, default=0, help="train each variant this many steps instead (the LR "
                   "schedule by step): a comparison that the machine's load does not skew")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME:batch=B,lr=LR,group=0|1 (repeatable; default: the demo's recipe)",
    )
    p.add_argument("--negatives", type=int, default=DEMO["rerank_negatives"])
    p.add_argument("--negative-pool", type=int, default=TrainConfig.model_fields["rerank_negative_pool"].default,
                   help="each step draws the negatives from this many images the dual encoder ranks first "
                   "(stage rerank's rerank_negative_pool; 0: always the hardest)")
    p.add_argument("--calibration-every", type=int,
                   default=TrainConfig.model_fields["rerank_calibration_every"].default,
                   help="the expressions of every N-th train image are left out, as stage rerank leaves them out")
    p.add_argument("--filler-rate", type=float, default=TrainConfig.model_fields["filler_rate"].default,
                   help="share of training expressions given carrier words, as the training stages do")
    p.add_argument("--hidden-size", type=int, default=DEMO["model_overrides"]["rerank"]["hidden_size"])
    p.add_argument("--spec", default="{}", help="more RerankSpec fields of the new re-ranker, as JSON "
                   "(e.g. '{\"num_relations\": 12}')")
    p.add_argument("--input-dropout", type=float, default=RerankSpec.input_dropout,
                   help="dropout on the stored instance vectors while training (RerankSpec's default)")
    p.add_argument(
        "--candidates",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[50],
        help="instances handed to the re-ranker (serving default 50); a comma list scores each "
        "trained variant at every size (keys of the extra sizes get the prefix cN_; the ANN order "
        "is scored once, from the largest pool)",
    )
    p.add_argument("--weak", action="store_true", help="train as stage weak-rerank does: the training "
                   "expressions lose their referent box, the loss is over images (test scoring unchanged)")
    p.add_argument("--train-gallery", type=int, default=0, metavar="N",
                   help="also score N train expressions on a gallery of the first train chunk (images "
                   "the stage-2 model and the re-ranker trained on): the keys train_* measure how far the "
                   "test figures fall short of the seen images'")
    p.add_argument("--extra-train", type=Path, default=None, metavar="DIR",
                   help="also train on the train split of another synthetic benchmark (its chunks become "
                   "negative groups of their own): the re-ranker on more images' features, test split unchanged")
    p.add_argument("--train-images", type=int, default=0, metavar="N",
                   help="only the first N images of --data's train split (0: all), as TrainConfig.train_images "
                   "picks them; --extra-train's images come on top")
    p.add_argument("--extra-images", type=int, default=0, metavar="N",
                   help="with --extra-train: its first N train images (0: all)")
    p.add_argument("--top-k", type=int, default=None,
                   help="instances stored per image (default: the checkpoint's stored-instance policy, as the "
                   "rerank stage and ingestion store them; 10: this bench's figures before 2026-11-30)")
    p.add_argument("--log-every", type=int, default=0, metavar="N", help="print the losses every N steps (stderr)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=lambda v: [int(x) for x in v.split(",")], default=[0],
                   help="re-ranker seed, or a comma list: every variant is trained once per seed on the same "
                   "features (keys NAME@seedN) and the spread of BR@1 is reported")
    # The demo's re-ranker recipe, which leaves the clip at the trainer's default.
    p.add_argument("--grad-clip", type=float, default=TrainConfig.model_fields["grad_clip"].default,
                   help="gradient norm clip (0: none; default: the trainer's, as in the demo)")
    p.add_argument("--weight-decay", type=float, default=DEMO["weight_decay"])
    p.add_argument("--warmup-steps", type=int, default=DEMO["warmup_steps"])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    try:  # at once, not after the features
        spec = json.loads(args.spec)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--spec {args.spec!r}: not JSON ({e})") from None
    if not isinstance(spec, dict):
        raise SystemExit(f"--spec {args.spec!r}: a JSON object of RerankSpec fields, e.g. '{{\"num_relations\": 12}}'")
    args.rerank_spec = spec
    return args


def parse_variant(text: str) -> tuple[str, dict[str, float]]:
    name, _, spec = text.partition(":")
    fields = {"batch": float(DEMO["batch_size"]), "lr": DEMO["lr"], "group": 1.0}  # the demo's recipe
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if key not in fields:
            raise SystemExit(f"--variant {text!r}: unknown field {key!r} (batch, lr, group)")
        fields[key] = float(value)
    return name or "default", fields


def gallery_features(model: Any, processor: Any, samples: list[Any],
                     top_k: int | None = None) -> tuple[Any, dict[str, tuple[str, list[float]]]]:
    """Every gallery image's stored instances, and each of its expressions' ground truth
    ``(image row, [x, y, w, h] normalized)``, keyed by expression row. The expressions must be
    unique in the gallery (the test split; one chunk of the synthetic train split). ``top_k``:
    instances stored per image (None: the checkpoint's stored-instance policy, as ingestion)."""
    from reir.training.rerank import build_rerank_set
    from reir.training.trainer import ImageCache

    # min_iou 0: every expression is kept, found or not (a miss counts against BR@k).
    rs = build_rerank_set(
        model, processor, samples, [0] * len(samples), ImageCache(max_items=0).get, top_k=top_k, min_iou=0.0
    )
    gt = [(str(row), [x / s.width, y / s.height, w / s.width, h / s.height])
          for row, s in enumerate(samples) for _, j in s.refs for x, y, w, h in [s.boxes[j]]]  # fmt: skip
    return rs, {str(t): g for t, g in enumerate(gt)}


def train_chunk(data: Path, samples: list[Any], groups: list[int], queries: int, seed: int) -> list[Any]:
    """The train images of negative group 0 (expressions unique among them) with ``queries``
    of their expressions drawn at random (seeded), the rest of their refs dropped."""
    import dataclasses
    import random

    chunk = [s for s, g in zip(samples, groups, strict=True) if g == 0]
    if len(chunk) == len(samples):
        raise SystemExit(f"{data}: the train split has no negative groups (chunks); --train-gallery needs them")
    refs = [(i, r) for i, s in enumerate(chunk) for r in range(len(s.refs))]
    keep = set(random.Random(seed).sample(refs, min(queries, len(refs))))
    return [dataclasses.replace(s, refs=[ref for r, ref in enumerate(s.refs) if (i, r) in keep]) for i, s in enumerate(chunk)]


def with_extra_train(samples: list[Any], groups: list[int], extra: Path,
                     images: int = 0) -> tuple[list[Any], list[int]]:
    """``samples`` and their negative ``groups`` followed by the first ``images`` (0: all) train
    images of the benchmark ``extra``, whose groups are renumbered after the last of ``groups``
    (``reir.training.trainer.extra_train_samples``, as ``TrainConfig.extra_train_roots``)."""
    from reir.training.trainer import extra_train_samples

    more, more_groups = extra_train_samples([str(extra)], max(groups, default=-1) + 1)
    if images:
        more, more_groups = more[:images], more_groups[:images]
    return samples + more, groups + more_groups


def evaluate(
    reranker: Any, rs: Any, gt: dict[str, Any], scale: float, bias: float, pools: list[int]
) -> dict[str, float]:
    """BR@k of the re-ranked answers for each pool size in ``pools`` (keys of every size after
    the first get the prefix ``cN_``) and of the ANN order (from the largest pool)."""
    from reir.evaluation.metrics import Prediction, box_recall_at_k
    from reir.model.boxes import BoxMode, convert
    from reir.training.rerank import rank_pool

    n, m, _ = rs.emb.shape
    # normalized [x, y, w, h], the ground truth's frame (IoU does not change with it)
    xywh = convert(rs.boxes.reshape(-1, 4).numpy(), BoxMode.CXCYWH_NORM, BoxMode.XYWH_ABS, width=1, height=1)
    xywh = xywh.reshape(n, m, 4).tolist()
    reranked: dict[int, dict[str, list[Prediction]]] = {size: {} for size in pools}
    ann: dict[str, list[Prediction]] = {}
    for t in range(rs.num_texts):
        # An image's re-ranked scores depend on that image alone: score the largest pool's
        # images once, and each pool answers from the images it holds.
        top, ann_order, scored = rank_pool(reranker, rs, t, max(pools), scale, bias)
        ann[str(t)] = [Prediction(str(i), xywh[i][s]) for i, _, s in ann_order]
        for size in pools:
            held = set((top[:size] // m).tolist())
            reranked[size][str(t)] = [Prediction(str(i), xywh[i][s], v) for i, v, s in scored if i in held]
    ks, taus = (1, 5, 10), (0.5,)
    out = {f"ANN_{k}": v for k, v in box_recall_at_k(ann, gt, ks, taus).items()}
    for i, size in enumerate(pools):
        prefix = "" if i == 0 else f"c{size}_"
        out.update({prefix + k: v for k, v in box_recall_at_k(reranked[size], gt, ks, taus).items()})
    return out


def train_variant(
    model: Any, rs: Any, negatives: Any, pool: Any, fields: dict[str, float], args: argparse.Namespace,
    scale: float, bias: float, seed: int,
) -> tuple[Any, dict[str, float]]:
    """A fresh re-ranker trained on ``rs``; ``negatives``: each expression's mined pool
    (``mine_hard_negatives``), ``pool``: the expressions it trains on (``calibration_split``)."""
    import torch

    from reir.training.rerank import draw_negatives, rerank_loss, sample_texts
    from reir.training.trainer import adamw, lr_factor

    torch.manual_seed(seed)
    reranker = model.add_reranker(**{"hidden_size": args.hidden_size, "input_dropout": args.input_dropout,
                                     **args.rerank_spec})
    reranker.train()
    lr, batch = fields["lr"], int(fields["batch"])
    optimizer = adamw(reranker.parameters(), lr=lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    step, started = 0, time.monotonic()
    while (progress := step / args.steps if args.steps else (time.monotonic() - started) / args.seconds) < 1.0:
        for group in optimizer.param_groups:  # the trainer's schedule, by elapsed time (or step)
            group["lr"] = lr * lr_factor(progress, step, warmup_steps=args.warmup_steps)
        if fields["group"]:
            idx = sample_texts(rs, pool, batch, gen)
        else:
            idx = pool[torch.randint(pool.numel(), (batch,), generator=gen)]
        losses = rerank_loss(reranker, rs, idx, draw_negatives(negatives[idx], args.negatives, gen), scale, bias)
        loss = losses["loss"]
        if args.log_every and step % args.log_every == 0:
            print(json.dumps({"step": step, **{k: round(float(v), 4) for k, v in losses.items()},
                              "relation_weight": round(float(reranker.scale), 4)}), file=sys.stderr, flush=True)
        optimizer.zero_grad()
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(reranker.parameters(), args.grad_clip)
        optimizer.step()
        step += 1
    reranker.eval()
    seconds = time.monotonic() - started
    return reranker, {"steps": step, "seconds": round(seconds, 1), "texts_per_second": round(step * batch / seconds, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    from reir.data.formats import load_samples, negative_groups
    from reir.model import create_model
    from reir.model.modeling import score_scale
    from reir.training.config import TrainConfig
    from reir.training.rerank import build_rerank_set, calibration_split, mine_hard_negatives
    from reir.training.trainer import ImageCache, filler_fits, filler_rng, first_train_images, with_filler

    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in (args.variant or ["demo"])]
    model, processor = create_model(str(args.model))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    scale, bias = float(score_scale(model.logit_scale)), float(model.logit_bias)
    started = time.monotonic()
    samples = first_train_images(load_samples(args.data, "train"), args.train_images or None)
    groups = negative_groups(args.data, "train", [s.image_id for s in samples])
    if args.extra_train is not None:
        samples, groups = with_extra_train(samples, groups, args.extra_train, args.extra_images)
    samples = with_filler(samples, args.filler_rate, filler_rng(TrainConfig(data_root=str(args.data), seed=args.seed[0]), 0),
                          filler_fits(processor))
    # weak: build_rerank_set keeps every expression with its image only, never its box index
    train = build_rerank_set(model, processor, samples, groups, ImageCache(max_items=0).get, top_k=args.top_k, min_iou=0.5,
                             weak=args.weak)
    # As stage rerank: each step's negatives drawn from the pool the dual encoder ranks first, and
    # the expressions of every N-th image held out (they calibrate discover mode there).
    negatives = mine_hard_negatives(train, max(args.negatives, args.negative_pool))
    pool, _ = calibration_split(train.text_image, args.calibration_every)
    test, gt = gallery_features(model, processor, load_samples(args.data, "test"), args.top_k)
    seen = None
    if args.train_gallery:
        seen = gallery_features(model, processor, train_chunk(args.data, samples, groups, args.train_gallery, args.seed[0]),
                                args.top_k)
    result: dict[str, Any] = {"weak": args.weak, "features_seconds": round(time.monotonic() - started, 1),
                              "train_images": len(samples), "train_texts": train.num_texts,
                              "test_queries": test.num_texts, "seconds_per_variant": None if args.steps else args.seconds,
                              "steps_per_variant": args.steps or None,
                              "threads": torch.get_num_threads(), "grad_clip": args.grad_clip,
                              "weight_decay": args.weight_decay, "warmup_steps": args.warmup_steps,
                              "input_dropout": args.input_dropout, "top_k": args.top_k, "spec": args.rerank_spec,
                              "negative_pool": args.negative_pool, "calibration_every": args.calibration_every,
                              "filler_rate": args.filler_rate,
                              "variants": {}}  # fmt: skip
    for name, fields in variants:
        top1 = []
        for seed in args.seed:
            key = name if len(args.seed) == 1 else f"{name}@seed{seed}"
            reranker, stats = train_variant(model, train, negatives, pool, fields, args, scale, bias, seed)
            metrics = evaluate(reranker, test, gt, scale, bias, args.candidates)
            if seen is not None:
                seen_metrics = evaluate(reranker, *seen, scale, bias, args.candidates[:1])
                metrics.update({f"train_{k}": v for k, v in seen_metrics.items()})
            result["variants"][key] = {**fields, **stats, "seed": seed, "candidates": args.candidates,
                                       **{k: round(v, 4) for k, v in metrics.items()}}  # fmt: skip
            top1.append(result["variants"][key]["BR@1@0.5"])
            print(json.dumps({key: result["variants"][key]}), file=sys.stderr, flush=True)
        if len(top1) > 1:
            result.setdefault("seed_spread", {})[name] = {
                "BR@1@0.5_mean": round(sum(top1) / len(top1), 4), "BR@1@0.5_min": min(top1), "BR@1@0.5_max": max(top1)}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
