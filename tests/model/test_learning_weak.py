"""Weak learning sanity check: with no referent box anywhere, the MIL contrast alone must
teach the model which candidate of an image an expression means.

Toy problem, seconds on 2 cores: each image is a bag of candidate instances, 2-4 objects
(each a unique color + shape: one-hot attribute features plus noise, objectness high)
and background queries (noise, objectness low), 8 candidates in all. The real tiny text tower encodes "the
red square"; a linear head embeds the candidates. Training sees only which image each
expression belongs to; evaluation asks which candidate of its own image scores highest.
"""

from __future__ import annotations

import random

import torch
from torch import nn
from torch.nn import functional as F

from reir.model import create_model
from reir.model.losses_weak import weak_contrastive_loss

from .train_utils import use_training_threads

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "circle", "triangle")
QUERIES = 8  # candidates per image: the objects, the rest background
FEATURES = len(COLORS) + len(SHAPES)


def _scene(rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, list[str], list[int]]:
    """(features [Q, F], objectness logits [Q], expressions, each one's candidate index)."""
    n = rng.randint(2, 4)
    combos = rng.sample([(c, s) for c in range(len(COLORS)) for s in range(len(SHAPES))], n)
    feats = torch.randn(QUERIES, FEATURES) * 0.3
    for k, (c, s) in enumerate(combos):
        feats[k, c] += 1.0
        feats[k, len(COLORS) + s] += 1.0
    order = list(range(QUERIES))
    rng.shuffle(order)  # objects are not always the first candidates
    obj = torch.tensor([4.0 if i < n else -4.0 for i in order])
    texts = [f"the {COLORS[c]} {SHAPES[s]}" for c, s in combos]
    return feats[order], obj, texts, [order.index(k) for k in range(n)]


def _batch(rng: random.Random, images: int) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor, list[int]]:
    scenes = [_scene(rng) for _ in range(images)]
    feats = torch.stack([s[0] for s in scenes])
    obj = torch.stack([s[1] for s in scenes])
    texts = [t for s in scenes for t in s[2]]
    image = torch.tensor([i for i, s in enumerate(scenes) for _ in s[2]])
    referent = [r for s in scenes for r in s[3]]  # evaluation only
    return feats, obj, texts, image, referent


def _accuracy(model: nn.Module, head: nn.Module, processor: object, rng: random.Random) -> float:
    feats, obj, texts, image, referent = _batch(rng, 64)
    with torch.no_grad():
        text = model.encode_text(**processor.text(texts)).embeddings  # type: ignore[attr-defined]
        inst = F.normalize(head(feats), dim=-1)
        scores = torch.einsum("td,tqd->tq", text, inst[image]).masked_fill(obj[image] < 0, float("-inf"))
    return float((scores.argmax(dim=1) == torch.tensor(referent)).float().mean())


def test_weak_contrast_alone_finds_the_referent_candidate() -> None:
    torch.manual_seed(0)
    use_training_threads()
    model, processor = create_model("tiny")
    head = nn.Linear(FEATURES, model.config.embed_dim)
    spec = model.config.loss_spec
    params = [*model.text.parameters(), *head.parameters(), model.logit_scale, model.logit_bias]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    before = _accuracy(model, head, processor, random.Random(1))
    rng = random.Random(0)
    for _ in range(150):
        feats, obj, texts, image, _ = _batch(rng, 16)
        text = model.encode_text(**processor.text(texts))
        loss = weak_contrastive_loss(text.embeddings, image, F.normalize(head(feats), dim=-1), obj,
                                     model.logit_scale, model.logit_bias, spec)["loss_weak"]  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _accuracy(model, head, processor, random.Random(1))
    print(f"own-image accuracy {before:.3f} -> {after:.3f}")
    assert before < 0.6  # chance is about 1/3 (2-4 objects per image)
    assert after > 0.9


def test_the_appearance_head_lets_weak_training_tell_same_shape_objects_apart() -> None:
    """The real tiny model, stage "weak" (no referent box), on rendered scenes where two
    objects of one shape differ by colour: with the appearance head the weak model picks the
    right one; without it the trunk, taught by detection alone, has no colour to bind the word
    to (on the benchmark: a linear probe reads colour at chance, docs/model.md weak mode)."""
    from .synthetic import make_dataset
    from .train_utils import evaluate, train

    use_training_threads()
    train_data = make_dataset(0, 400)
    test_data = make_dataset(1, 80, start=10_000)
    same_shape = {}
    for head in (True, False):
        torch.manual_seed(0)
        model, proc = create_model("tiny", vision={"appearance_head": head}, loss={"w_weak_within": 1.0})
        train(model, proc, train_data, steps=300, batch_size=16, lr=1e-3, seed=0, stage="weak")
        result = evaluate(model, proc, test_data)
        assert result.det_recall > 0.9, result
        same_shape[head] = result.rec_acc_same_shape
    print(f"same-shape referents right: head {same_shape[True]:.3f}, no head {same_shape[False]:.3f}")
    assert same_shape[True] > 0.85  # 0.945 on two seeds
    assert same_shape[True] > same_shape[False] + 0.2  # 0.58 / 0.49 without the head
