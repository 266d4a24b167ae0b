"""Phrasing families: one meaning (:class:`~reir.data.semantics.Expr`), many surface forms.

Why: a model trained only on the template of :mod:`reir.data.language` learns its word
order instead of the words (7.6% BR@1 on queries phrased otherwise vs 35.8% on
template-like ones). Each family (:mod:`reir.data.families`) renders the SAME Expr in
another construction; the meaning is chosen first and never touched by the text. This
module splits the families into training and held-out ones, renders sentences for the
generator (several training phrasings per training expression; one training and one
held-out phrasing per test expression; surface noise from :mod:`reir.data.noise` on all),
and checks text against meaning (:func:`mentioned` vs :func:`meaning_words`).

Held out (never in training sentences; each test referent gets one sentence in a
training family and one in a held-out family, so the gap measures generalisation to
unseen constructions):

* ``question``: an interrogative wrapper ("where is ...?", "can you find ...?") and a
  question mark. Training has the closest relative, imperative wrappers ("find ...",
  "show me ..."), so it tests whether a new wrapper is ignored as it should be.
* ``appositive``: a bare head followed by "the one ..." ("red square, the one left of
  the green circle"). Every piece occurs in training (bare heads in ``terse``, "one" in
  ``one_head``, details after the noun in ``postnominal``) but never this combination,
  so it tests composition, the commonest way typed queries differ from the template.

``fronted`` (details before the noun) is the most different order of all; it stays in
training because the model cannot be expected to invent it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from reir.data.families import FAMILIES, REL_WORDS, SIZE_SYNONYMS, SUP_AFTER, SUP_BEFORE, SUP_TERSE
from reir.data.language import RELATION_PHRASES, SUPERLATIVE_WORDS
from reir.data.noise import DEFAULT_NOISE, NoiseRates, add_noise, canonical_words, count_tokens
from reir.data.semantics import Expr, Thing
from reir.data.vocab import BACKGROUNDS, COLORS, SHAPES

HELDOUT_FAMILIES: tuple[str, ...] = ("question", "appositive")
TRAIN_FAMILIES: tuple[str, ...] = tuple(f for f in FAMILIES if f not in HELDOUT_FAMILIES)
TRAIN_PHRASINGS_PER_EXPR = 3
MAX_TOKENS = 28  # words + punctuation before noise (noise.TOKEN_LIMIT: 30); redraws try to fit
_TRIES = 10


# ---------------------------------------------------------------- rendering API

def render_family(expr: Expr, family: str, rng: np.random.Generator, article: str = "the") -> str:
    """``expr`` in ``family``, redrawing variants (at most a few times) to fit MAX_TOKENS."""
    best = ""
    for _ in range(_TRIES):
        text = FAMILIES[family](expr, rng, article)
        if count_tokens(text) <= MAX_TOKENS:
            return text
        if not best or count_tokens(text) < count_tokens(best):
            best = text
    return best


def describe(
    expr: Expr, families: Sequence[str], count: int, rng: np.random.Generator, *,
    article: str = "the", noise: NoiseRates = DEFAULT_NOISE, exclude: set[str] | None = None,
) -> list[tuple[str, str]]:
    """Up to ``count`` (family, noisy text) pairs in distinct families of ``families``
    with distinct clean texts (none in ``exclude``, which is updated)."""
    seen = set() if exclude is None else exclude
    out: list[tuple[str, str]] = []
    for k in rng.permutation(len(families)).tolist():
        if len(out) == count:
            break
        text = render_family(expr, families[k], rng, article)
        if text not in seen:
            seen.add(text)
            out.append((families[k], add_noise(text, rng, noise)))
    return out


def describe_train(expr: Expr, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Training sentences: TRAIN_PHRASINGS_PER_EXPR training families."""
    return describe(expr, TRAIN_FAMILIES, TRAIN_PHRASINGS_PER_EXPR, rng)


def describe_test(expr: Expr, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Test sentences: one in a training family, then one in a held-out family."""
    seen: set[str] = set()
    return describe(expr, TRAIN_FAMILIES, 1, rng, exclude=seen) + describe(expr, HELDOUT_FAMILIES, 1, rng,
                                                                           exclude=seen)


def describe_query(expr: Expr, rng: np.random.Generator, article: str) -> tuple[str, str]:
    """A discovery query: (family, text) in any family."""
    return describe(expr, tuple(FAMILIES), 1, rng, article=article)[0]


def describe_train_query(expr: Expr, rng: np.random.Generator, article: str) -> tuple[str, str]:
    """A training discovery query: (family, text) in a training family."""
    return describe(expr, TRAIN_FAMILIES, 1, rng, article=article)[0]


def phrasing_meta(noise: NoiseRates = DEFAULT_NOISE) -> dict[str, Any]:
    """The ``meta.json`` record of how sentences were phrased."""
    return {
        "train_families": list(TRAIN_FAMILIES), "heldout_families": list(HELDOUT_FAMILIES),
        "phrasings_per_train_expr": TRAIN_PHRASINGS_PER_EXPR, "noise": noise.as_dict(),
        "test_sentences": "one training family + one held-out family per referent",
        "discovery_families": "any", "train_discovery_families": "training families",
        "max_tokens": MAX_TOKENS,
    }


# ---------------------------------------------------------------- meaning check


def _meaning_table() -> dict[tuple[str, ...], str]:
    table: dict[tuple[str, ...], str] = {}
    for c in COLORS:
        table[(c,)] = f"color:{c}"
    for s in SHAPES:
        table[(s,)] = table[(s + "s",)] = f"shape:{s}"
    for b in BACKGROUNDS:
        table[(b,)] = f"background:{b}"
    for key, words in SIZE_SYNONYMS.items():
        table.update({(w,): f"size:{key}" for w in words})
    for source, prefix in ((SUP_BEFORE, "sup"), (SUP_AFTER, "sup"), (SUP_TERSE, "sup"),
                           (SUPERLATIVE_WORDS, "sup"), (REL_WORDS, "rel"), (RELATION_PHRASES, "rel")):
        for key, phrases in source.items():
            table.update({tuple(p.split()): f"{prefix}:{key}" for p in phrases})
    return table


_MEANING = _meaning_table()
_LONGEST = max(len(k) for k in _MEANING)


def meaning_words(expr: Expr) -> Counter[str]:
    """Content an Expr must put into words: colours, shapes, size, superlative, relation, background."""
    out: Counter[str] = Counter()
    things = [Thing(expr.shape or "", expr.color)]
    things += [t for t in (expr.relation.ref if expr.relation else None, expr.context) if t]
    for t in things:
        out.update([f"shape:{t.shape}"] if t.shape else [])
        out.update([f"color:{t.color}"] if t.color else [])
    for key, value in (("size", expr.size), ("sup", expr.superlative), ("background", expr.background),
                       ("rel", expr.relation.relation if expr.relation else None)):
        out.update([f"{key}:{value}"] if value else [])
    return out


def _join_ordinal(words: list[str]) -> list[str]:
    """"second red circle from the left" -> "second from the left red circle": an ordinal
    split around its noun, read as the one phrase it means."""
    for k, w in enumerate(words):
        if w != "second":
            continue
        for j in range(k + 1, min(k + 6, len(words) - 2)):
            if words[j:j + 2] == ["from", "the"] and words[j + 2] in ("left", "right", "top", "bottom"):
                return words[:k + 1] + words[j:j + 3] + words[k + 1:j] + _join_ordinal(words[j + 3:])
    return words


def mentioned(text: str) -> Counter[str]:
    """Content words found in ``text`` (longest phrase first, typos undone), comparable
    to :func:`meaning_words`."""
    words = _join_ordinal(canonical_words(text))
    out: Counter[str] = Counter()
    k = 0
    while k < len(words):
        for n in range(min(_LONGEST, len(words) - k), 0, -1):
            key = _MEANING.get(tuple(words[k:k + n]))
            if key:
                out[key] += 1
                k += n
                break
        else:
            k += 1
    return out
