"""Surface noise for generated sentences: what people do to text they type.

Phrasing families (``reir.data.phrasing``) vary the construction; this layer varies the
surface: capitals, trailing punctuation, commas, stray spaces, one typo, British
spelling. It is separate so either can be switched off or measured alone, and it never
changes meaning a reader would get:

* spatial words (the ones flip augmentation swaps) are never misspelt, or a flipped
  image would be paired with an unflipped sentence;
* colour, shape, size and background words get a typo only rarely
  (``typo_key_word`` of the typos), and words shorter than four letters never do;
* at most one typo per sentence, and only one that :func:`canonical_words` undoes, so
  the meaning of every stored sentence can be checked from its text.

Deterministic given the ``rng``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass

import numpy as np

from reir.data.vocab import BACKGROUNDS, COLORS, SHAPES, VOCABULARY

# The built-in tokenizer keeps 32 tokens with [CLS] and [SEP]: noise never adds past this.
TOKEN_LIMIT = 30
_VOCAB = frozenset(VOCABULARY)
_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
# Words that reir.model.processing swaps under flips; a typo would hide them from the swap.
SPATIAL_WORDS: frozenset[str] = frozenset([
    "left", "right", "leftmost", "rightmost", "above", "below", "over", "under", "top", "bottom",
    "topmost", "bottommost", "highest", "lowest", "upper", "lower", "uppermost", "lowermost",
])
KEY_WORDS: frozenset[str] = frozenset(
    [*COLORS, *SHAPES, *(s + "s" for s in SHAPES), *BACKGROUNDS, "small", "little", "tiny", "large", "big", "huge"]
)
# A comma may follow a singular head (not a plural: "the one of the circles, that is ...").
_NOUNS: frozenset[str] = frozenset([*SHAPES, "one", "object", "shape", "thing", "background", *COLORS])
_CLAUSE_STARTS: frozenset[str] = frozenset([
    "that", "which", "left", "right", "to", "above", "below", "over", "under", "on", "in", "against",
    "with", "from", "located", "sitting", "placed", "lying", "furthest", "farthest", "at", "closest", "nearest",
])


@dataclass(frozen=True)
class NoiseRates:
    """Probabilities per sentence (``typo_key_word`` and ``british`` are conditional)."""

    capitalize: float = 0.25  # "Red circle ..."
    title: float = 0.03  # "Red Circle Left Of ..."
    upper: float = 0.02  # "RED CIRCLE ..."
    terminal: float = 0.15  # add "." (or drop a question's "?")
    comma: float = 0.1  # a comma before a clause: "the red circle, left of ..."
    spaces: float = 0.05  # a doubled or leading/trailing space
    typo: float = 0.08  # swap / drop / double a letter in one word
    typo_key_word: float = 0.15  # share of typos allowed in colour/shape/size/background words
    british: float = 0.5  # "colored" -> "coloured" where present

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


DEFAULT_NOISE = NoiseRates()
NO_NOISE = NoiseRates(*(0.0 for _ in dataclasses.fields(NoiseRates)))


def count_tokens(text: str) -> int:
    """Words plus punctuation marks, as the built-in word-level tokenizer splits them."""
    return len(_TOKEN.findall(text.lower()))


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@functools.lru_cache(maxsize=8192)
def _snap(word: str) -> str:
    """The VOCABULARY word ``word`` was before one typo, else ``word``. The edits undoing
    :mod:`reir.data.noise` (a doubled letter, two swapped, one dropped) go first; a
    changed letter only if they find nothing; an ambiguous answer keeps the word."""
    word = word.replace("colour", "color")
    if word in _VOCAB:
        return word
    cuts = [(word[:k], word[k:]) for k in range(len(word) + 1)]
    undo = {a + b[1:] for a, b in cuts if len(b) > 1 and b[0] == b[1]}
    undo |= {a + b[1] + b[0] + b[2:] for a, b in cuts if len(b) > 1}
    undo |= {a + c + b for a, b in cuts for c in _LETTERS}
    found = sorted(undo & _VOCAB) or sorted({a + c + b[1:] for a, b in cuts if b for c in _LETTERS} & _VOCAB)
    return found[0] if len(found) == 1 else word


def canonical_words(text: str) -> list[str]:
    """Lowercase words of ``text`` without punctuation, each misspelt word snapped back to
    the vocabulary word it most likely was (surface noise undone, meaning kept)."""
    return [_snap(w) for w in re.findall(r"[a-z]+", text.lower())]


def _misspell(word: str, rng: np.random.Generator) -> str:
    """One edit that keeps the first letter: swap two adjacent letters, drop or double one.
    Only typos that :func:`canonical_words` undoes unambiguously ("thee" could be "the" or
    "there"); ``word`` itself when none is found in a few draws."""
    for _ in range(6):
        kind = int(rng.integers(3))
        k = 1 + int(rng.integers(len(word) - 1))  # 1..len-1
        if kind == 0 and k < len(word) - 1:
            out = word[:k] + word[k + 1] + word[k] + word[k + 2:]
        elif kind == 1:
            out = word[:k] + word[k + 1:]
        else:
            out = word[:k] + word[k] + word[k:]
        if out != word and _snap(out) == word:
            return out
    return word


def _typo(words: list[str], rng: np.random.Generator, rates: NoiseRates) -> None:
    key = rng.random() < rates.typo_key_word
    allowed = [
        k for k, w in enumerate(words)
        if len(w) >= 4 and w.isalpha() and w not in SPATIAL_WORDS
        and (key or w not in KEY_WORDS)
    ]
    if allowed:
        k = allowed[int(rng.integers(len(allowed)))]
        words[k] = _misspell(words[k], rng)


def _comma(words: list[str], rng: np.random.Generator) -> None:
    spots = [
        k for k in range(2, len(words))
        if words[k] in _CLAUSE_STARTS and words[k - 1] in _NOUNS
    ]
    if spots:
        k = spots[int(rng.integers(len(spots)))]
        words[k - 1] += ","


def _terminal(text: str) -> str:
    return text[:-1] if text.endswith("?") else text + "."


def _case(text: str, rng: np.random.Generator, rates: NoiseRates) -> str:
    u = rng.random()
    if u < rates.upper:
        return text.upper()
    if u < rates.upper + rates.title:
        return " ".join(w[:1].upper() + w[1:] for w in text.split(" "))
    if u < rates.upper + rates.title + rates.capitalize:
        return text[:1].upper() + text[1:]
    return text


def _spaces(text: str, rng: np.random.Generator) -> str:
    where = int(rng.integers(3))
    if where == 0:
        return " " + text
    if where == 1:
        return text + " "
    gaps = [k for k, ch in enumerate(text) if ch == " "]
    if not gaps:
        return text + " "
    k = gaps[int(rng.integers(len(gaps)))]
    return text[:k] + " " + text[k:]


def add_noise(text: str, rng: np.random.Generator, rates: NoiseRates = DEFAULT_NOISE) -> str:
    """``text`` (lowercase, single-spaced) with typing noise drawn at ``rates``; adds no
    punctuation past TOKEN_LIMIT tokens."""
    gates = rng.random(5)  # fixed number of draws: the gates never shift each other
    room = TOKEN_LIMIT - count_tokens(text)
    words = text.split(" ")
    if gates[1] < rates.typo:
        _typo(words, rng, rates)
    if gates[0] < rates.british:  # after the typo: one edit per word, so typos stay recoverable
        words = ["coloured" if w == "colored" else w for w in words]
    if gates[2] < rates.comma and room > 0:
        _comma(words, rng)
    out = " ".join(words)
    if gates[3] < rates.terminal and (room > 1 or out.endswith("?")):
        out = _terminal(out)
    out = _case(out, rng, rates)
    if gates[4] < rates.spaces:
        out = _spaces(out, rng)
    return out


# ---------------------------------------------------------------- carrier words (training only)

# Words that carry no meaning in a referring expression: pronouns, auxiliaries, question
# words, chat and politeness, verbs of looking and asking, their contractions. None is a
# noun, colour, shape, size, position, order, number, background or context word, and only
# "can't" / "don't" negate (a wrapper's negation: "can't find the red circle").
# Training sentences that get a few of them before or after the description teach the model
# that words outside the description are to be ignored, whatever wrapper a person types.
_FILLER = """
i you he she we they me my your our us it its this these those
is are was were be been am do does did can could will would should may might must shall
what where when why how who whom whose whether if
see look find show give get want need like know think tell help search spot pick point try
wonder guess mean say check notice seek locate identify select choose mark highlight return
please hey hi hello ok okay so well um uh hmm now just really actually maybe perhaps
here there thanks thank quickly also again still then somewhere anywhere somehow
i'm i'd you're it's that's what's where's there's let's can't don't
"""
FILLER_WORDS: tuple[str, ...] = tuple(_FILLER.split())


def add_filler(text: str, rng: np.random.Generator, *, max_before: int = 3, max_after: int = 2,
               after_rate: float = 0.4, end_marks: str = ".?!") -> str:
    """``text`` with 1..``max_before`` carrier words (:data:`FILLER_WORDS`) before it and,
    at ``after_rate``, 1..``max_after`` after it, then sometimes an end mark; never past
    TOKEN_LIMIT tokens (fewer words, or ``text`` itself, when it would be). The description's
    own words and their order are untouched."""
    before = [FILLER_WORDS[int(k)] for k in rng.integers(len(FILLER_WORDS), size=1 + int(rng.integers(max_before)))]
    after: list[str] = []
    if rng.random() < after_rate:
        after = [FILLER_WORDS[int(k)] for k in rng.integers(len(FILLER_WORDS), size=1 + int(rng.integers(max_after)))]
    mark = end_marks[int(rng.integers(len(end_marks)))] if end_marks and rng.random() < 0.5 else ""
    core = text.strip()
    room = TOKEN_LIMIT - count_tokens(core)
    if room < 1:
        return text
    while count_tokens(" ".join(before + after)) > room:
        (after if after else before).pop()
    if count_tokens(" ".join(before + after)) == room:
        mark = ""
    out = " ".join([*before, core.rstrip(".?!"), *after]) if after else " ".join([*before, core])
    return out + mark if mark and not out.endswith(tuple(end_marks)) else out
