"""Behavioural tests on a trained checkpoint: a paraphrase keeps the answer, a changed
attribute or relation changes it.

The tiny preset is trained here (2,500 steps, seeded, two threads, about 2 minutes) on in-test
scenes whose expressions use the benchmark's synonyms ("small" / "little", "large" / "big",
"left of" / "to the left of"): an expression that has a synonym is given in every one of its
wordings, so both words are tied to the same instances. The checkpoint is saved with
``save_pretrained`` and loaded back, then asked about held-out scenes it never saw. Every pair
below is asked of the same image, and the answer is the instance the checkpoint ranks first for
the expression.

The thresholds hold for any seed, not one lucky run: the weights after thousands of steps
differ from one machine to the next (another CPU's kernels change the last bits of the first
steps), much as from one seed to the next. Measured here (2 cores), worst and best over
training seeds 0-3 (1 or 2 threads, and seed 0 with ATen and oneDNN held to AVX2 kernels): size
paraphrase kept 58/58, size word changed the answer 56-58/58, attribute 78-80/80, relation
paraphrase kept 37-38/38, relation word changed the answer 35-37/38.

History: with one wording picked at random per expression, seeds 0-5 here kept the size
paraphrase in 53-58 of 58 cases, but one CI machine trained a checkpoint that kept it in only
46 (0.79 < 0.85), so each word now comes with its synonym. With 1,500 steps, and before the
training scenes described a look-alike by its relation to an object between the two, seeds 2
and 3 changed the relation answer in only 55-59% of 158 cases and CI failed the test.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reir.model import ReirModel, ReirProcessor, create_model

from .synthetic import SynthSample, make_dataset
from .train_utils import train, use_training_threads

# The fixture trains 2,500 steps inside the first test's timeout: 445 s under `make test` on
# a 2-core machine (other worker busy with the Ray unit), where the suite-wide 900 s is too tight.
pytestmark = pytest.mark.timeout(1800)

SYNONYMS = {"small": ("small", "little"), "large": ("large", "big"), "left of": ("left of", "to the left of"),
            "right of": ("right of", "to the right of")}  # fmt: skip


# "the [size] COLOR SHAPE [rest]": the part a reordered wording moves.
HEAD = re.compile(r"^the ((?:small|large|little|big) )?(\w+) (\w+)(.*)$")


def _reordered(text: str) -> list[str]:
    """Training's other constructions of ``text``: the noun first ("the square that is red"),
    and an imperative ("find the red square"). Never "which is" or a question: the tests ask
    those, unseen."""
    m = HEAD.match(text)
    if m is None or m.group(2) in ("leftmost", "rightmost"):
        return [f"find {text}"]
    size, color, shape, rest = m.group(1) or "", m.group(2), m.group(3), m.group(4)
    return [f"the {shape} that is {size}{color}{',' if rest else ''}{rest}", f"find {text}"]


def _wordings(text: str) -> list[str]:
    """Every wording of ``text`` that swaps its words for their synonyms (itself included),
    each also in the reordered constructions of :func:`_reordered`."""
    out = {text}
    for word, options in SYNONYMS.items():
        if f" {word} " in f" {text} ":
            out = {f" {t} ".replace(f" {word} ", f" {o} ").strip() for t in out for o in options}
    return sorted(out | {r for t in out for r in _reordered(t)})


def _size_twins(sample: SynthSample) -> tuple[int, int] | None:
    """``(small, large)`` slots of the image's look-alike pair when one is clearly bigger."""
    twins = [i for i, a in enumerate(sample.attrs) if sample.attrs.count(a) > 1]
    if len(twins) != 2:
        return None
    small, large = sorted(twins, key=lambda i: sample.boxes[i][2])
    return (small, large) if sample.boxes[large][2] > 1.4 * sample.boxes[small][2] else None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    use_training_threads()
    torch.manual_seed(0)
    data = make_dataset(0, 300) + make_dataset(1, 500, relational=True)
    for _, sample in data:
        sample.refs = [(wording, target) for text, target in sample.refs for wording in _wordings(text)]
    model, processor = create_model("tiny")
    train(model, processor, data, steps=2500, batch_size=16, lr=1e-3, seed=0)
    out = tmp_path_factory.mktemp("behaviour") / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@torch.no_grad()
def _answers(model: ReirModel, processor: ReirProcessor, image: Image.Image, sample: SynthSample,
             texts: Sequence[str]) -> list[int]:  # fmt: skip
    """For each text, the ground-truth slot of the instance ranked first (-1: none matches)."""
    from reir.model import iou_xywh

    out = model.encode_images(processor.images([image]))
    (insts,) = processor.postprocess(out, sizes=[(sample.width, sample.height)], top_k=10)
    text = model.encode_text(**processor.text(list(texts)))
    best = model.score(text.embeddings, torch.from_numpy(np.stack([i.embedding for i in insts]))).argmax(dim=1)
    slots = []
    for pick in best.tolist():
        ious = [iou_xywh(insts[pick].box_xywh, b) for b in sample.boxes]
        slots.append(int(np.argmax(ious)) if max(ious) > 0.5 else -1)
    return slots


def test_a_paraphrase_keeps_the_answer_and_a_changed_size_word_changes_it(checkpoint: Path) -> None:
    model, processor = create_model(str(checkpoint))
    model.eval()
    same = changed = asked = 0
    for image, sample in make_dataset(7, 120, start=50_000, relational=True):
        pair = _size_twins(sample)
        if pair is None:
            continue
        small, _ = pair
        color, shape = sample.attrs[small]
        answers = _answers(model, processor, image, sample, [f"the small {color} {shape}", f"the little {color} {shape}",
                                                             f"the large {color} {shape}", f"the big {color} {shape}"])  # fmt: skip
        asked += 1
        same += answers[0] == answers[1] and answers[2] == answers[3]
        changed += answers[0] != answers[2]
    report = f"size twins: {asked}, paraphrase kept {same}, size word changed the answer {changed}"
    print(report)
    assert asked >= 20, report
    assert same / asked >= 0.85, report
    assert changed / asked >= 0.8, report


def test_a_changed_attribute_or_relation_changes_the_answer(checkpoint: Path) -> None:
    model, processor = create_model(str(checkpoint))
    model.eval()
    moved = asked = 0
    relation_kept = relation_moved = relation_asked = 0
    for image, sample in make_dataset(8, 80, start=60_000):
        if len(sample.attrs) < 2:
            continue
        (c0, s0), (c1, s1) = sample.attrs[0], sample.attrs[1]
        answers = _answers(model, processor, image, sample, [f"the {c0} {s0}", f"the {c1} {s1}"])
        asked += 1
        moved += answers == [0, 1]
    for image, sample in make_dataset(9, 120, start=70_000, relational=True):
        twins = [i for i, a in enumerate(sample.attrs) if sample.attrs.count(a) > 1]
        anchors = [j for j, a in enumerate(sample.attrs) if sample.attrs.count(a) == 1]
        if len(twins) != 2 or not anchors:
            continue
        left, right = sorted(twins, key=lambda i: sample.boxes[i][0] + sample.boxes[i][2] / 2)
        anchor = anchors[0]
        ax = sample.boxes[anchor][0] + sample.boxes[anchor][2] / 2
        if not (sample.boxes[left][0] + sample.boxes[left][2] / 2 < ax < sample.boxes[right][0] + sample.boxes[right][2] / 2):
            continue  # the anchor must sit between the look-alikes
        (color, shape), (ac, ash) = sample.attrs[left], sample.attrs[anchor]
        answers = _answers(model, processor, image, sample, [
            f"the {color} {shape} left of the {ac} {ash}", f"the {color} {shape} to the left of the {ac} {ash}",
            f"the {color} {shape} right of the {ac} {ash}",
        ])  # fmt: skip
        relation_asked += 1
        relation_kept += answers[0] == answers[1]
        relation_moved += answers[0] == left and answers[2] == right
    report = f"attribute: {moved}/{asked}; relation: kept {relation_kept}, moved {relation_moved} of {relation_asked}"
    print(report)
    assert asked >= 40 and moved / asked >= 0.8, report
    assert relation_asked >= 10, report
    assert relation_kept / relation_asked >= 0.85, report
    assert relation_moved / relation_asked >= 0.7, report


def test_reordered_and_unseen_phrasings_keep_the_answer(checkpoint: Path) -> None:
    """The same referent asked in the template, in a reordered construction seen in training,
    in constructions never seen ("which is", a question) and with a typo: the first answer
    stays the same instance."""
    model, processor = create_model(str(checkpoint))
    model.eval()
    asked = 0
    kept = {"reordered": 0, "which is (unseen)": 0, "question (unseen)": 0, "typo": 0}
    for image, sample in make_dataset(10, 80, start=80_000):
        if len(sample.attrs) < 2:
            continue
        color, shape = sample.attrs[0]
        typo = shape[:2] + shape[3] + shape[2] + shape[4:]  # two letters swapped
        answers = _answers(model, processor, image, sample, [
            f"the {color} {shape}", f"the {shape} that is {color}", f"the {shape} which is {color}",
            f"where is the {color} {shape}?", f"the {color} {typo}",
        ])  # fmt: skip
        if answers[0] != 0:
            continue  # the template answer itself is wrong: nothing to keep
        asked += 1
        for name, answer in zip(kept, answers[1:]):
            kept[name] += answer == answers[0]
    report = f"asked {asked}, kept: {kept}"
    print(report)
    assert asked >= 40, report
    assert all(n / asked >= 0.8 for n in kept.values()), report
