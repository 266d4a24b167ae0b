"""Surface text for :class:`~reir.data.semantics.Expr`: rendering and parsing.

Template: ``DET [SUP] [SIZE] [COLOR] NOUN [RELATION DET [COLOR] SHAPE]
[on the BG background] [in the image with DET [COLOR] SHAPE]``. A small synonym set
gives paraphrases ("to the left of" / "left of", "big" / "large"). The grammar is
unambiguous, so :func:`parse` inverts :func:`render` exactly; the tests use that to
prove each stored sentence says what its stored program means.
"""

from __future__ import annotations

import numpy as np

from reir.data.semantics import Expr, Relation, Thing
from reir.data.vocab import BACKGROUNDS, COLORS, SHAPES

SIZE_WORDS: dict[str, list[str]] = {"small": ["small", "little"], "large": ["large", "big"]}
GENERIC_NOUNS: list[str] = ["object", "shape"]
RELATION_PHRASES: dict[str, list[str]] = {
    "left": ["left of", "to the left of"],
    "right": ["right of", "to the right of"],
    "above": ["above", "over"],
    "below": ["below", "under"],
}
SUPERLATIVE_WORDS: dict[str, list[str]] = {
    "largest": ["largest", "biggest"],
    "smallest": ["smallest"],
    "leftmost": ["leftmost"],
    "rightmost": ["rightmost"],
    "topmost": ["topmost", "highest"],
    "bottommost": ["bottommost", "lowest"],
    "second_largest": ["second largest", "second biggest"],
    "second_smallest": ["second smallest"],
    "second_leftmost": ["second leftmost"],
    "second_rightmost": ["second rightmost"],
    "second_topmost": ["second highest", "second topmost"],
    "second_bottommost": ["second lowest", "second bottommost"],
    "pair_largest": ["bigger", "larger"],
    "pair_smallest": ["smaller"],
    "pair_leftmost": ["left"],
    "pair_rightmost": ["right"],
    "pair_topmost": ["upper", "top"],
    "pair_bottommost": ["lower", "bottom"],
}
BACKGROUND_PREPOSITIONS: list[str] = ["on", "against"]
CONTEXT_NOUNS: list[str] = ["image", "picture"]
ARTICLES = ("the", "a", "an")


def _pick(options: list[str], rng: np.random.Generator | None) -> str:
    # rng=None gives the canonical (first) phrasing, handy for readable defaults.
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def _indefinite(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _thing(thing: Thing, article: str) -> str:
    words = ([thing.color] if thing.color else []) + [thing.shape]
    det = _indefinite(words[0]) if article == "a" else "the"
    return " ".join([det, *words])


def render(expr: Expr, rng: np.random.Generator | None = None, *, article: str = "the") -> str:
    """Natural text for ``expr``; ``article`` "the" (unique referent) or "a" (any)."""
    words: list[str] = []
    if expr.superlative:
        words.append(_pick(SUPERLATIVE_WORDS[expr.superlative], rng))
        article = "the"  # "a largest circle" is not English
    if expr.size:
        words.append(_pick(SIZE_WORDS[expr.size], rng))
    if expr.color:
        words.append(expr.color)
    words.append(expr.shape if expr.shape else _pick(GENERIC_NOUNS, rng))
    det = _indefinite(words[0]) if article == "a" else "the"
    parts = [det, *words]
    if expr.relation:
        parts.append(_pick(RELATION_PHRASES[expr.relation.relation], rng))
        parts.append(_thing(expr.relation.ref, article))
    if expr.background:
        parts += [_pick(BACKGROUND_PREPOSITIONS, rng), "the", expr.background, "background"]
    if expr.context:
        parts += ["in", "the", _pick(CONTEXT_NOUNS, rng), "with", _thing(expr.context, "a")]
    return " ".join(parts)


class _Tokens:
    """Cursor over the words of a sentence with clear errors for the parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.words = text.lower().replace(",", " ").split()
        self.pos = 0

    def peek(self, ahead: int = 0) -> str | None:
        k = self.pos + ahead
        return self.words[k] if k < len(self.words) else None

    def take(self, *allowed: str) -> str:
        word = self.peek()
        if word is None or (allowed and word not in allowed):
            raise ValueError(f"cannot parse {self.text!r}: expected {allowed or 'a word'} at {word!r}")
        self.pos += 1
        return word

    def take_if(self, *allowed: str) -> str | None:
        return self.take() if self.peek() in allowed else None

    def take_phrase(self, table: dict[str, list[str]]) -> str | None:
        """Longest phrase of ``table`` at the cursor; returns its canonical key."""
        best: tuple[int, str] | None = None
        for key, phrases in table.items():
            for phrase in phrases:
                n = len(phrase.split())
                fits = self.words[self.pos : self.pos + n] == phrase.split()
                if fits and (best is None or n > best[0]):
                    best = (n, key)
        if best is None:
            return None
        self.pos += best[0]
        return best[1]


def _parse_thing(tok: _Tokens) -> Thing:
    tok.take(*ARTICLES)
    color = tok.take_if(*COLORS)
    return Thing(shape=tok.take(*SHAPES), color=color)


def parse(text: str) -> Expr:
    """Inverse of :func:`render`; raises ValueError on text outside the grammar."""
    tok = _Tokens(text)
    tok.take(*ARTICLES)
    superlative = tok.take_phrase(SUPERLATIVE_WORDS)
    size = tok.take_phrase(SIZE_WORDS)
    color = tok.take_if(*COLORS)
    noun = tok.take(*SHAPES, *GENERIC_NOUNS)
    relation = None
    rel = tok.take_phrase(RELATION_PHRASES)
    if rel is not None:
        relation = Relation(rel, _parse_thing(tok))
    background = None
    if tok.take_if(*BACKGROUND_PREPOSITIONS):
        tok.take("the")
        background = tok.take(*BACKGROUNDS)
        tok.take("background")
    context = None
    if tok.take_if("in"):
        tok.take("the")
        tok.take(*CONTEXT_NOUNS)
        tok.take("with")
        context = _parse_thing(tok)
    if tok.peek() is not None:
        raise ValueError(f"cannot parse {text!r}: unexpected trailing {tok.peek()!r}")
    return Expr(
        shape=noun if noun in SHAPES else None,
        color=color,
        size=size,
        superlative=superlative,
        relation=relation,
        background=background,
        context=context,
    )


def template_phrases() -> list[str]:
    """Every fixed phrase the templates can emit (for vocabulary checks)."""
    out = [*GENERIC_NOUNS, *BACKGROUND_PREPOSITIONS, *CONTEXT_NOUNS, *ARTICLES]
    out += ["the background", "in the with", *SHAPES, *COLORS, *BACKGROUNDS]
    for table in (SIZE_WORDS, RELATION_PHRASES, SUPERLATIVE_WORDS):
        out += [p for phrases in table.values() for p in phrases]
    return out
