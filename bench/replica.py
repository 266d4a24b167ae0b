"""The demo's three training stages in plain torch (no Ray, no DeepSpeed) at fixed step
counts, on any device: a recipe comparison that machine load does not skew, fast on a GPU
(it imports the trainer module for its LR schedule and parameter groups: carry pydantic
wheels to a machine without it).

    PYTHONPATH=. python bench/replica.py --data D --s1 300 --s2 940 --save S2 \
        --variants 'tl1:{"text_layers":1};tl0:{"text_layers":0}'
    PYTHONPATH=. python bench/replica.py --data D --stage2 S2 --variants 'long:{"steps":12000}'

``D`` is a synthetic benchmark (``reir synth --out D``). Stages 1 and 2 use the trainer's
losses, flips, parameter groups and LR schedule at ``--s1`` / ``--s2`` steps (a clean 2-core
``make demo`` reaches about 300 and 940 in its 2.5 and 8 minutes); ``--stage2`` starts from a
saved stage-2 model instead. Each ``--variants`` entry ``NAME:{json}`` trains a fresh re-ranker
on the frozen model with the rerank stage's features, loss and hard negatives (JSON keys:
``steps``, ``batch``, ``lr``, ``negatives``, ``pool``, ``seed`` and any ``RerankSpec`` field), then scores the test
split as serving does on an exact index (``reir.training.rerank.rank_pool``, 50 candidates).
Prints one JSON object per line: the ANN order's BR@1/5/10 and each variant's, overall and on
the training ("in") vs held-out ("held") phrasing families.
"""
import argparse
import json
import os
import random
import time
from collections import defaultdict

import numpy as np
import torch

from reir.data.formats import load_samples, negative_groups
from reir.evaluation.metrics import Prediction, box_recall_at_k
from reir.model import create_model
from reir.model.boxes import BoxMode, convert
from reir.model.losses import ReirCriterion
from reir.model.modeling import score_scale
from reir.training.config import TrainConfig
from reir.training.rerank import (
    build_rerank_set,
    draw_negatives,
    mine_hard_negatives,
    rank_pool,
    rerank_loss,
    sample_texts,
)
from reir.training.trainer import ImageCache, _param_groups, adamw, lr_factor

p = argparse.ArgumentParser()
p.add_argument("--data", required=True)
p.add_argument("--s1", type=int, default=300)
p.add_argument("--s2", type=int, default=940)
p.add_argument("--rr", type=int, default=4000)
p.add_argument("--lr1", type=float, default=5e-4)
p.add_argument("--lr2", type=float, default=3e-4)
p.add_argument("--bs", type=int, default=16)
p.add_argument("--topk", type=int, default=10)
p.add_argument("--min-score", type=float, default=None,
               help="objectness floor of the stored instances past each image's first --min-keep [the model's]")
p.add_argument("--min-keep", type=int, default=None, help="instances kept whatever their score [the model's]")
p.add_argument("--variants", default="default")
p.add_argument("--stage2", default="")
p.add_argument("--save", default="")
p.add_argument("--overrides", default="{}", help="create_model overrides for stage 1 (JSON)")
p.add_argument("--rr-overrides", default="{}", help="applied to every variant (JSON)")
p.add_argument("--eval-pools", default="50", help="serving pools scored, comma list (the first is RR) [50]")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--model", default="small", help="preset the stages start from")
args = p.parse_args()
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T0 = time.time()


def log(**kw):
    kw["t"] = round(time.time() - T0, 1)
    print(json.dumps(kw), flush=True)


# The trainer's own LR schedule, parameter groups and image cache (reir.training.trainer).
_cache = ImageCache()
load = _cache.get


def train_stage(model, processor, stage, steps, lr, warmup, samples):
    model.to(dev).train()
    crit = ReirCriterion(model.config, stage=stage)
    opt = adamw(_param_groups(model, TrainConfig(data_root=args.data, stage=stage, lr=lr)), lr=lr)
    rng = random.Random(args.seed)
    order = []
    step = 0
    last = {}
    while step < steps:
        if not order:
            order = list(range(len(samples)))
            rng.shuffle(order)
        idx, order = order[: args.bs], order[args.bs:]
        if len(idx) < args.bs:
            continue
        bs = [samples[i] for i in idx]
        batch = processor.collate(bs, [load(s.path) for s in bs], hflip_prob=0.5, rng=rng, max_refs_per_image=12)
        batch = batch.to(dev)
        for gr in opt.param_groups:
            gr["lr"] = lr * gr["lr_mult"] * lr_factor(step / steps, step, warmup)
        losses = crit(model, batch)
        opt.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 200 == 0 or step == steps:
            last = {k: round(float(v), 3) for k, v in losses.items()}
            log(stage=stage, step=step, **last)
    model.eval()
    return model


def train_reranker(model, rs, steps, seed, batch=128, lr=4e-3, negatives=15, pool=49, **spec):
    """The rerank stage's loop: each step draws an expression's ``negatives`` from the ``pool``
    images the dual encoder ranks first (``rerank_negative_pool``)."""
    torch.manual_seed(seed)
    reranker = model.add_reranker(**{"hidden_size": 128, **spec})
    reranker.to(dev).train()
    opt = adamw(reranker.parameters(), lr=lr, weight_decay=0.01)
    neg = mine_hard_negatives(rs, max(negatives, pool))
    scale, bias = float(score_scale(model.logit_scale)), float(model.logit_bias)
    texts, gen = torch.arange(rs.num_texts), torch.Generator().manual_seed(seed)
    accs = []
    for step in range(steps):
        for gr in opt.param_groups:
            gr["lr"] = lr * lr_factor(step / steps, step, 20)
        idx = sample_texts(rs, texts, batch, gen)
        out = rerank_loss(reranker, rs, idx, draw_negatives(neg[idx], negatives, gen), scale, bias, device=dev)
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(reranker.parameters(), 1.0)
        opt.step()
        accs.append(float(out["rerank_acc"]))
    reranker.eval()
    return reranker, float(np.mean(accs[-200:]))


def evaluate(model, reranker, rs, gt, fams, pools=(50,)):
    """BR@k of the ANN order and of the re-ranker over each serving pool of ``pools`` (its
    top ``p`` instances' images): ``RR`` / ``RR_in`` / ``RR_held`` for the first pool,
    ``RR_p{p}`` for the others."""
    scale, bias = float(score_scale(model.logit_scale)), float(model.logit_bias)
    n, m, _ = rs.emb.shape
    xywh = convert(rs.boxes.reshape(-1, 4).numpy(), BoxMode.CXCYWH_NORM, BoxMode.XYWH_ABS, width=1, height=1)
    xywh = xywh.reshape(n, m, 4).tolist()
    rer, ann = {p: {} for p in pools}, {}
    for t in range(rs.num_texts):
        top, ann_order, scored = rank_pool(reranker, rs, t, max(pools), scale, bias)
        ann[str(t)] = [Prediction(str(i), xywh[i][s]) for i, _, s in ann_order]
        for p in pools:
            held = set((top[:p] // m).tolist())
            rer[p][str(t)] = [Prediction(str(i), xywh[i][s], v) for i, v, s in scored if i in held]

    def brk(preds, truth, ks=(1, 5, 10)):
        return {k.split("@")[1]: round(v, 4) for k, v in box_recall_at_k(preds, truth, ks, (0.5,)).items()}

    out = {"ANN": brk(ann, gt), "RR": brk(rer[pools[0]], gt)}
    out.update({f"RR_p{p}": brk(rer[p], gt) for p in pools[1:]})
    by = defaultdict(dict)
    for t, f in fams.items():
        by["held" if f in ("question", "appositive") else "in"][t] = gt[t]
    for name, sub in by.items():
        out[f"RR_{name}"] = brk({t: rer[pools[0]][t] for t in sub}, sub, (1, 10))
    return out


torch.manual_seed(args.seed)
train = load_samples(args.data, "train")
test = load_samples(args.data, "test")
log(train=len(train), test=len(test), device=str(dev))
ov = json.loads(args.overrides)
if args.stage2:
    model, processor = create_model(args.stage2)
    model.to(dev)
else:
    model, processor = create_model(args.model, **ov)
    train_stage(model, processor, "1", args.s1, args.lr1, 50, train)
    train_stage(model, processor, "2", args.s2, args.lr2, 10, train)
    if args.save:
        model.save_pretrained(args.save)
        processor.save_pretrained(args.save)
model.eval()
if args.min_keep is not None:
    processor.instance_min_keep = args.min_keep
groups = negative_groups(args.data, "train", [s.image_id for s in train])
with torch.no_grad():
    rs_train = build_rerank_set(model, processor, train, groups, load, top_k=args.topk, min_score=args.min_score)
    rs_test = build_rerank_set(model, processor, test, [0] * len(test), load, top_k=args.topk, min_score=args.min_score, min_iou=0.0)
log(rerank_train_texts=rs_train.num_texts, skipped=rs_train.skipped)
# ground truth + families of test expressions
with open(os.path.join(args.data, "reircoco.json")) as f:
    raw = json.load(f)
fam_of = {s["raw"]: s["family"] for e in raw if e["split"] == "test" for s in e["sentences"]}
gt, fams = {}, {}
t = 0
for row, s in enumerate(test):
    for text, j in s.refs:
        x, y, w, h = s.boxes[j]
        gt[str(t)] = (str(row), [x / s.width, y / s.height, w / s.width, h / s.height])
        fams[str(t)] = fam_of.get(text, "?")
        t += 1
res = {"ANN_only": evaluate(model, None, rs_test, gt, fams)["ANN"]}
log(**res)
for v in args.variants.split(";"):
    name, _, spec = v.partition(":")
    kw = json.loads(spec) if spec else {}
    kw = {**json.loads(args.rr_overrides), **kw}
    steps = kw.pop("steps", args.rr)
    rr, acc = train_reranker(model, rs_train, steps, kw.pop("seed", args.seed), **kw)
    r = evaluate(model, rr.cpu(), rs_test, gt, fams, tuple(int(x) for x in args.eval_pools.split(",")))
    log(variant=name, train_acc=round(acc, 3), **{k: v for k, v in r.items() if k != "ANN"})
