"""Look-alike micro-batches: images that share what their expressions say train together.

The cross-batch losses (CLIA in stage 2, the MIL contrast of stage ``weak``) learn only
what tells the batch's images apart. In a batch of 16 random images an expression's
referent ("the blue star left of the red triangle on the striped background") rarely has
a look-alike anywhere else in the batch, so nothing pays for the words that separate it
from one: the background, the relation, the landmark's colour. A linear probe on the
instance vectors a default run stores tells the five backgrounds apart 72% of the time
while the mean of the image's tokens, one layer earlier, tells them apart 97%: the model
sees the background and the embedding drops it.

``lookalike_batches`` groups each seed image with the ``partners`` images most like it
and cuts the clusters into micro-batches. Likeness comes from the text only (shared
content words of the images' expressions, weighted by inverse document frequency), so it
works for every source format and in the weak stage. Partners come from the seed's own
negative group (``reir.data.formats.negative_groups``): the images among which every
expression names one referent, so a look-alike is a hard negative, never a second answer.
Sources without such groups put every image in its own group, and their batches stay
random.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from reir.data.samples import ImageSample

WORD = re.compile(r"[a-z0-9]+")
# Expressions that begin alike ("the blue star ...", "the man in ...") name look-alike
# referents; what follows (the relation, the background) is what tells them apart.
HEAD_WORDS = 3
# A head in more than this share of the window's images says nothing about likeness.
MAX_DOCUMENT_SHARE = 0.3


def expression_heads(sample: ImageSample) -> set[str]:
    """The first ``HEAD_WORDS`` lower-cased words of each of the image's expressions."""
    return {" ".join(WORD.findall(text.lower())[:HEAD_WORDS]) for text, _ in sample.refs}


def likeness(words: Sequence[set[str]]) -> np.ndarray:
    """``[N, N]`` sum of the inverse document frequencies of the heads (or any strings)
    two images share (0 on the diagonal); one in more than ``MAX_DOCUMENT_SHARE`` of the
    images counts 0."""
    n = len(words)
    df = Counter(w for ws in words for w in ws)
    vocab = {w: k for k, w in enumerate(w for w, c in df.items() if c <= max(1.0, MAX_DOCUMENT_SHARE * n))}
    has = np.zeros((n, len(vocab)), np.float32)
    for i, ws in enumerate(words):
        has[i, [vocab[w] for w in ws if w in vocab]] = 1.0
    idf = np.log(n / np.maximum(has.sum(axis=0), 1.0))
    sim = (has * idf) @ has.T
    np.fill_diagonal(sim, 0.0)
    return sim


def lookalike_clusters(samples: Sequence[ImageSample], groups: Sequence[int], partners: int,
                       rng: random.Random) -> list[list[int]]:
    """Indices of ``samples`` in clusters of up to ``1 + partners``: a random seed and the
    unclustered images of its group most like it. Every index appears once."""
    if len(samples) != len(groups):
        raise ValueError(f"{len(samples)} samples but {len(groups)} groups")
    by_group: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        by_group[int(g)].append(i)
    clusters: list[list[int]] = []
    for members in by_group.values():
        if partners == 0 or len(members) == 1:
            clusters += [[i] for i in members]
            continue
        sim = likeness([expression_heads(samples[i]) for i in members])
        # A little noise breaks ties (no shared word) at random, not by position.
        sim += 1e-3 * np.random.default_rng(rng.getrandbits(32)).random(sim.shape, np.float32)
        order = list(range(len(members)))
        rng.shuffle(order)
        taken = np.zeros(len(members), bool)
        for seed in order:
            if taken[seed]:
                continue
            taken[seed] = True
            row = np.where(taken, -np.inf, sim[seed])
            best = [int(j) for j in np.argsort(-row, kind="stable")[: min(partners, int((~taken).sum()))]]
            taken[best] = True
            clusters.append([members[seed], *(members[j] for j in best)])
    rng.shuffle(clusters)
    return clusters


def lookalike_batches(samples: Sequence[ImageSample], groups: Sequence[int], batch_size: int, partners: int,
                      rng: random.Random) -> tuple[list[list[int]], list[int]]:
    """Full micro-batches of sample indices built from look-alike clusters, and the
    indices left over (fewer than ``batch_size``) for the caller to carry on."""
    if batch_size < 1 or partners < 0:
        raise ValueError(f"batch_size must be >= 1 and partners >= 0, got {batch_size}, {partners}")
    flat = [i for c in lookalike_clusters(samples, groups, partners, rng) for i in c]
    cut = len(flat) - len(flat) % batch_size
    return [flat[k:k + batch_size] for k in range(0, cut, batch_size)], flat[cut:]


def window_batches(windows: Iterable[list[tuple[ImageSample, int]]], batch_size: int, partners: int,
                   rng: random.Random) -> Iterator[list[ImageSample]]:
    """Micro-batches from a stream of windows of ``(sample, group)``: each window (plus
    what the previous one left over) is cut into look-alike batches; the last partial
    batch of the stream is dropped, as ``drop_last`` does."""
    carry: list[tuple[ImageSample, int]] = []
    for window in windows:
        rows = carry + list(window)
        batches, rest = lookalike_batches([s for s, _ in rows], [g for _, g in rows], batch_size, partners, rng)
        for b in batches:
            yield [rows[i][0] for i in b]
        carry = [rows[i] for i in rest]
