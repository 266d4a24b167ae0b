"""Plain-torch training/eval loop used by the learning tests and the manual benchmark."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from reir.model import ReirCriterion, ReirModel, ReirProcessor, iou_xywh

from .synthetic import SynthSample


def use_training_threads() -> None:
    """Set torch's threads for a training test: 2 alone, 1 under ``make test``'s two xdist workers.
    There the other worker runs the Ray unit on the same 2 cores, and two OpenMP threads that
    spin at every barrier for a thread the scheduler has parked made the behaviour test's
    2,500 steps take 15 minutes instead of 2-3 (one thread has no barrier to wait at)."""
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@dataclass
class EvalResult:
    rec_acc: float  # top-1 instance by text score has IoU > 0.5 with the referent
    det_recall: float  # GT boxes covered (IoU > 0.5) by the top-K instances
    det_top1_precision: float  # highest-objectness instance hits some GT box
    num_texts: int
    rec_acc_twins: float = float("nan")  # referents whose (color, shape) has a twin in the image
    rec_acc_same_shape: float = float("nan")  # referents whose shape another object of the image has


def train(
    model: ReirModel,
    processor: ReirProcessor,
    data: Sequence[tuple[Image.Image, SynthSample]],
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    stage: str = "1",
    seed: int = 0,
    log_every: int = 0,
    eval_every: int = 0,
    on_eval: Callable[[int], None] | None = None,
) -> list[float]:
    rng = random.Random(seed)
    criterion = ReirCriterion(model.config, stage=stage)
    # Score temperature/bias are single scalars that must travel far from their SigLIP
    # init; at the network's lr they would barely move in a few hundred steps.
    scalars = [model.logit_scale, model.logit_bias]
    rest = [p for n, p in model.named_parameters() if n not in ("logit_scale", "logit_bias")]
    groups = [{"params": rest}, {"params": scalars, "lr": 20 * lr, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        chunk = rng.sample(list(data), batch_size)
        batch = processor.collate([s for _, s in chunk], [im for im, _ in chunk], hflip_prob=0.5, rng=rng)
        parts = criterion(model, batch)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(parts["loss"].item())
        if log_every and (step + 1) % log_every == 0:
            desc = " ".join(f"{k[5:]}={v.item():.3f}" for k, v in parts.items() if k != "loss")
            print(f"step {step + 1} loss={losses[-1]:.3f} {desc} ({time.perf_counter() - t0:.0f}s)", flush=True)
        if on_eval is not None and eval_every and (step + 1) % eval_every == 0:
            on_eval(step + 1)
            model.train()
    return losses


@torch.no_grad()
def evaluate(
    model: ReirModel, processor: ReirProcessor, data: Sequence[tuple[Image.Image, SynthSample]], top_k: int = 10
) -> EvalResult:
    model.eval()
    hits = covered = total_gt = top1 = n_texts = twin_hits = twin_texts = shape_hits = shape_texts = 0
    for start in range(0, len(data), 32):
        chunk = data[start : start + 32]
        out = model.encode_images(processor.images([im for im, _ in chunk]))
        instances = processor.postprocess(out, sizes=[(s.width, s.height) for _, s in chunk], top_k=top_k)
        for (_, sample), insts in zip(chunk, instances):
            total_gt += len(sample.boxes)
            covered += sum(any(iou_xywh(i.box_xywh, b) > 0.5 for i in insts) for b in sample.boxes)
            top1 += bool(insts) and any(iou_xywh(insts[0].box_xywh, b) > 0.5 for b in sample.boxes)
            if not insts or not sample.refs:
                n_texts += len(sample.refs)
                continue
            text = model.encode_text(**processor.text([t for t, _ in sample.refs]))
            inst_emb = torch.from_numpy(np.stack([i.embedding for i in insts]))
            best = model.score(text.embeddings, inst_emb).argmax(dim=1)
            for (_, target), pick in zip(sample.refs, best.tolist()):
                hit = iou_xywh(insts[pick].box_xywh, sample.boxes[target]) > 0.5
                hits += hit
                n_texts += 1
                if sample.attrs.count(sample.attrs[target]) > 1:
                    twin_hits += hit
                    twin_texts += 1
                if sample.labels.count(sample.labels[target]) > 1:
                    shape_hits += hit
                    shape_texts += 1
    return EvalResult(
        rec_acc=hits / max(n_texts, 1),
        det_recall=covered / max(total_gt, 1),
        det_top1_precision=top1 / max(len(data), 1),
        num_texts=n_texts,
        rec_acc_twins=twin_hits / twin_texts if twin_texts else float("nan"),
        rec_acc_same_shape=shape_hits / shape_texts if shape_texts else float("nan"),
    )
