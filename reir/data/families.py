"""Phrasing families: functions ``(Expr, rng, article) -> str`` that say the same thing differently.

Each renders one meaning (:class:`~reir.data.semantics.Expr`) in its own construction:
``template`` (the grammar of :mod:`reir.data.language`, so ``parse`` still inverts it),
nouns first, "one" as the noun, relative clauses, details fronted, appositions,
imperative and question wrappers, "colored red", partitives ("the biggest of the red
circles") and telegraphic text. The Expr is never changed; every colour, shape, size,
superlative, relation, background name and context thing is put into words (checked by
``reir.data.phrasing.mentioned``), and ``article`` "a" gives the indefinite reading used by
discovery queries.

The phrase tables are shared by all families. Every spatial word in them is one that
``reir.model.processing``'s flip swaps mirror, and mirrored kinds (left/right,
top/bottom) have parallel option lists, so an Expr flipped and rendered with the same rng
reads exactly as the swapped text. Only words of the built-in tokenizer's vocabulary are
used (``reir.data.vocab.VOCABULARY`` lists them), so none becomes [UNK].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from reir.data.language import SUPERLATIVE_WORDS, render
from reir.data.semantics import Expr, Thing
from reir.data.vocab import COMPARATIVES, ORDINALS

Family = Callable[[Expr, np.random.Generator, str], str]
T = TypeVar("T")

SIZE_SYNONYMS: dict[str, list[str]] = {"small": ["small", "little", "tiny"], "large": ["large", "big", "huge"]}
SUP_BEFORE: dict[str, list[str]] = {  # before the noun: "the leftmost circle"
    "largest": ["largest", "biggest"], "smallest": ["smallest"],
    "leftmost": ["leftmost"], "rightmost": ["rightmost"],
    "topmost": ["topmost", "highest", "uppermost"], "bottommost": ["bottommost", "lowest", "lowermost"],
    # ordinals and comparatives: the template's own words ("second largest", "bigger")
    **{kind: words for kind, words in SUPERLATIVE_WORDS.items() if kind in ORDINALS or kind in COMPARATIVES},
}
# The ordinal's direction when it follows the noun, or splits around it: "the second circle from the left"
ORDINAL_FROM: dict[str, str] = {"second_leftmost": "from the left", "second_rightmost": "from the right",
                                "second_topmost": "from the top", "second_bottommost": "from the bottom"}
SUP_AFTER: dict[str, list[str]] = {  # positional ones after the noun: "the circle on the far left"
    "leftmost": ["furthest to the left", "on the far left", "farthest left"],
    "rightmost": ["furthest to the right", "on the far right", "farthest right"],
    "topmost": ["at the very top", "closest to the top", "nearest the top"],
    "bottommost": ["at the very bottom", "closest to the bottom", "nearest the bottom"],
    **{kind: [f"second {words}"] for kind, words in ORDINAL_FROM.items()},
    "pair_leftmost": ["on the left", "more to the left"], "pair_rightmost": ["on the right", "more to the right"],
    "pair_topmost": ["at the top", "closer to the top"], "pair_bottommost": ["at the bottom", "closer to the bottom"],
}
SUP_TERSE: dict[str, list[str]] = {
    "leftmost": ["far left", "furthest left"], "rightmost": ["far right", "furthest right"],
    "topmost": ["at very top", "nearest top"], "bottommost": ["at very bottom", "nearest bottom"],
    **{kind: [f"second {words.replace('the ', '')}"] for kind, words in ORDINAL_FROM.items()},
}
REL_WORDS: dict[str, list[str]] = {
    "left": ["left of", "to the left of", "on the left of"],
    "right": ["right of", "to the right of", "on the right of"],
    "above": ["above", "over"], "below": ["below", "under"],
}
COPULAS = ["that is", "which is"]
REL_VERBS = [*COPULAS, "sitting", "located", "placed", "that is sitting", "which is located"]
BG_PHRASES = ["on the {} background", "against the {} background", "in front of the {} background",
              "on a {} background", "with the {} background", "with a {} background"]
_BG_PREDICATIVE = 4  # the "with" forms attach to nouns only ("that is with ..." is not English)
CTX_PHRASES = ["in the {n} with {t}", "in the {n} that also has {t}", "from the {n} with {t}",
               "in the {n} where there is also {t}", "in the {n} that has {t} in it"]
CTX_NOUNS = ["image", "picture", "photo", "scene"]
GENERIC = ["object", "shape", "thing"]
GENERIC_PLURAL = ["objects", "shapes", "things"]


# ---------------------------------------------------------------- shared pieces


def _pick(options: Sequence[T], rng: np.random.Generator) -> T:
    return options[int(rng.integers(len(options)))]


def _det(article: str, next_word: str) -> str:
    return "the" if article == "the" else ("an" if next_word[0] in "aeiou" else "a")


def _np(article: str, words: list[str]) -> str:
    return " ".join([_det(article, words[0]), *words])


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _bare(thing: Thing) -> str:
    return f"{thing.color} {thing.shape}" if thing.color else thing.shape


def _thing(thing: Thing, article: str) -> str:
    return _np(article, _bare(thing).split())


def _article(expr: Expr, article: str) -> str:
    return "the" if expr.superlative else article  # "a leftmost circle" is not English


def _size(expr: Expr, rng: np.random.Generator) -> list[str]:
    return [_pick(SIZE_SYNONYMS[expr.size], rng)] if expr.size else []


def _attrs(expr: Expr, rng: np.random.Generator) -> list[str]:
    """Size and colour words, in English order ("small red")."""
    return _size(expr, rng) + ([expr.color] if expr.color else [])


def _plural(expr: Expr, rng: np.random.Generator) -> str:
    return expr.shape + "s" if expr.shape else _pick(GENERIC_PLURAL, rng)


def _details(expr: Expr, rng: np.random.Generator, article: str, predicative: bool = False) -> list[str]:
    """Relation, background and context as phrases that fit after a noun (or after
    "that is" when ``predicative``). Background names start with a consonant: "a"."""
    out = []
    if expr.relation:
        out.append(f"{_pick(REL_WORDS[expr.relation.relation], rng)} {_thing(expr.relation.ref, article)}")
    if expr.background:
        out.append(_pick(BG_PHRASES[:_BG_PREDICATIVE] if predicative else BG_PHRASES, rng).format(expr.background))
    if expr.context:
        out.append(_pick(CTX_PHRASES, rng).format(n=_pick(CTX_NOUNS, rng), t=_thing(expr.context, "a")))
    return out


def _sup_after(kind: str, rng: np.random.Generator) -> str:
    """Superlative after "that is" / "the one": positional phrase, or "the biggest"."""
    return _pick(SUP_AFTER[kind], rng) if kind in SUP_AFTER else "the " + _pick(SUP_BEFORE[kind], rng)


def _sup_before(expr: Expr, rng: np.random.Generator) -> list[str]:
    return [_pick(SUP_BEFORE[expr.superlative], rng)] if expr.superlative else []


def _head(expr: Expr, rng: np.random.Generator, nouns: Sequence[str] = GENERIC) -> list[str]:
    """[SUP] [SIZE] [COLOR] NOUN words of a plain noun phrase; half the time a positional
    ordinal splits around the noun ("the second red circle from the left") and a comparative
    names the pair ("the bigger of the two red circles")."""
    noun = expr.shape or _pick(nouns, rng)
    if expr.superlative in ORDINAL_FROM and rng.random() < 0.5:
        return ["second", *_attrs(expr, rng), noun, ORDINAL_FROM[expr.superlative]]
    if expr.superlative in COMPARATIVES and rng.random() < 0.5:
        return [_sup_of(expr, rng), "of the two", *_attrs(expr, rng), _plural(expr, rng)]
    return _sup_before(expr, rng) + _attrs(expr, rng) + [noun]


def _sup_of(expr: Expr, rng: np.random.Generator) -> str:
    """The superlative before "of the ...": "biggest", "bigger", but "left one" (never "the
    left of the two circles", which reads as a relation)."""
    word = _sup_before(expr, rng)[0]
    positional = COMPARATIVES.get(expr.superlative or "") not in (None, "largest", "smallest")
    return f"{word} one" if positional else word


def _group(expr: Expr, rng: np.random.Generator) -> str:
    """The look-alikes a superlative chooses among: "the red circles" ("the two red circles")."""
    return " ".join(["the", *(["two"] if expr.superlative in COMPARATIVES else []), *_attrs(expr, rng),
                     _plural(expr, rng)])


def _with_details(text: str, details: list[str]) -> str:
    return " ".join([text, *details]) if details else text


# ---------------------------------------------------------------- families


def _template(expr: Expr, rng: np.random.Generator, article: str) -> str:
    return render(expr, rng, article=article)


def _postnominal(expr: Expr, rng: np.random.Generator, article: str) -> str:
    """Noun first, attributes after: "the circle that is small and red, left of ..."."""
    art = _article(expr, article)
    noun = expr.shape or ("one" if art == "the" else _pick(GENERIC, rng))
    preds = _attrs(expr, rng) + ([_sup_after(expr.superlative, rng)] if expr.superlative else [])
    text = _np(art, [noun])
    if preds:
        text += f" {_pick(COPULAS, rng)} {_and(preds)}"
    details = _details(expr, rng, article)
    if preds and details:
        text += ","
    return _with_details(text, details)


def _one_head(expr: Expr, rng: np.random.Generator, article: str) -> str:
    """"one" as the noun: "the red one", "the small red one in the shape of a circle"."""
    art = _article(expr, article)
    pre = _sup_before(expr, rng) + _attrs(expr, rng)
    text = _np(art, [*pre, "one"]) if pre else ("the one" if art == "the" else "any one")
    if expr.shape:
        form = _pick(["in the shape of {}", "that is {}", "which is {}"], rng)
        text += " " + form.format(_thing(Thing(expr.shape), "a"))
        text += "," if form != "in the shape of {}" and (expr.relation or expr.background or expr.context) else ""
    return _with_details(text, _details(expr, rng, article))


def _relative_clause(expr: Expr, rng: np.random.Generator, article: str) -> str:
    """Details as a relative clause: "the red circle that is left of ... and on ..."."""
    art = _article(expr, article)
    details = _details(expr, rng, article, predicative=True)
    clauses = ([_sup_after(expr.superlative, rng)] if expr.superlative else []) + details
    pre = _attrs(expr, rng)
    if not clauses and pre:  # head only: the attributes become the clause
        clauses, pre = [_and(pre)], []
    noun = expr.shape or ("one" if art == "the" else _pick(GENERIC, rng))
    text = _np(art, [*pre, noun])
    if not clauses:
        return text
    # "the biggest" and bare attributes need "is"; place phrases also take "sitting", "located"...
    adjectival = expr.superlative not in SUP_AFTER if expr.superlative else not details
    verb = _pick(COPULAS if adjectival else REL_VERBS, rng)
    return f"{text} {verb} {_and(clauses)}"


def _fronted(expr: Expr, rng: np.random.Generator, article: str) -> str:
    """Details first: "left of the blue square, the red circle"; "of the circles, the red one"."""
    details = _details(expr, rng, article)
    sep = _pick([",", ":"], rng)
    if details:
        front = details.pop(int(rng.integers(len(details))))
        rest = _with_details(_np(_article(expr, article), _head(expr, rng)), details)
        return f"{front}{sep} {rest}"
    if expr.superlative:
        group = _group(expr, rng)
        if expr.superlative in SUP_AFTER and rng.random() < 0.5:
            return f"of {group}{sep} the one {_pick(SUP_AFTER[expr.superlative], rng)}"
        return f"of {group}{sep} the {_sup_before(expr, rng)[0]} one"
    if expr.color or expr.size:  # the group is the shape; attributes pick one out of it
        return f"of the {_plural(expr, rng)}{sep} {_np(article, [*_attrs(expr, rng), 'one'])}"
    return _np(article, _head(expr, rng))


def _appositive(expr: Expr, rng: np.random.Generator, article: str) -> str:
    """Bare head, then "the one ...": "red square, the one left of the green circle"."""
    art = _article(expr, article)
    details = _details(expr, rng, article, predicative=True)
    if not details and not expr.superlative:  # "circle, the red one"; "red thing, the small one"
        if expr.shape is None and expr.size:
            return f"{expr.color} {_pick(GENERIC, rng)}, {_np(art, [*_size(expr, rng), 'one'])}"
        noun = expr.shape or _pick(GENERIC, rng)
        return f"{noun}, {_np(art, [*_attrs(expr, rng), 'one'])}" if expr.color or expr.size else _np(art, [noun])
    head = " ".join(_attrs(expr, rng) + [expr.shape or _pick(GENERIC, rng)])
    if rng.random() < 0.4:
        head = _np(art, head.split())
    one = "the one" if art == "the" else "one"
    if expr.superlative in SUP_AFTER and rng.random() < 0.5:
        tail = f"{one} {_pick(SUP_AFTER[expr.superlative], rng)}"
    elif expr.superlative:
        tail = f"the {_sup_before(expr, rng)[0]} one"
    elif rng.random() < 0.5:
        return f"{head}, {one} {_pick(COPULAS, rng)} {_and(details)}"
    else:
        tail = one
    return _with_details(f"{head}, {tail}", details)


def _descriptive(expr: Expr, rng: np.random.Generator, article: str) -> str:
    """Attributes described: "the small circle colored red", "the red-colored circle"."""
    art = _article(expr, article)
    noun = expr.shape or _pick([*GENERIC, "one"], rng)
    sup = _sup_before(expr, rng)
    if expr.color:
        size = _size(expr, rng)
        form = int(rng.integers(3))
        if form == 0:
            text = f"{_np(art, [*sup, *size, noun])} colored {expr.color}"
        else:
            text = _np(art, [*sup, *size, expr.color + ("-colored" if form == 1 else " colored"), noun])
    elif expr.size:
        if rng.random() < 0.5:
            text = f"{_np(art, [*sup, noun])} of {expr.size} size"
        else:
            text = _np(art, [*sup, expr.size + "-sized", noun])
    else:
        text = _np(art, [*sup, noun])
    details = _details(expr, rng, article)
    if details and text.endswith(f"colored {expr.color}") and rng.random() < 0.5:
        text += ","
    return _with_details(text, details)


def _partitive(expr: Expr, rng: np.random.Generator, article: str) -> str:
    """A choice among a group: "the biggest of the red circles", "the one of the ... that is ..."."""
    details = _details(expr, rng, article, predicative=True)
    one = "the one" if _article(expr, article) == "the" else "one"
    if expr.superlative:
        group = _group(expr, rng)
        if expr.superlative in SUP_AFTER and rng.random() < 0.5:
            text = f"the one of {group} {_pick(SUP_AFTER[expr.superlative], rng)}"
        else:
            text = f"the {_sup_of(expr, rng)} of {group}"
        return _with_details(text, details)
    if details:
        group = " ".join(["the", *_attrs(expr, rng), _plural(expr, rng)])
        return f"{one} of {group} {_pick(COPULAS, rng)} {_and(details)}"
    if expr.color or expr.size:  # "the one of the circles that is red"
        return f"{one} of the {_plural(expr, rng)} {_pick(COPULAS, rng)} {_and(_attrs(expr, rng))}"
    return _np(article, _head(expr, rng))


def _terse(expr: Expr, rng: np.random.Generator, article: str) -> str:
    """Telegraphic, no articles: "small red circle left of blue square, striped background"."""
    post = SUP_TERSE.get(expr.superlative or "") if rng.random() < 0.5 else None
    words = ([] if post else _sup_before(expr, rng)) + _attrs(expr, rng)
    parts = [" ".join([*words, expr.shape or _pick(["one", *GENERIC], rng)])]
    if post:
        parts[0] += f"{_pick(['', ','], rng)} {_pick(post, rng)}"
    if expr.relation:
        parts[0] += f" {_pick(REL_WORDS[expr.relation.relation], rng)} {_bare(expr.relation.ref)}"
    if expr.background:
        parts.append(_pick(["on {} background", ", {} background"], rng).format(expr.background))
    if expr.context:
        form = _pick(["in image with {}", "in picture with {}", ", picture with {}"], rng)
        parts.append(form.format(_bare(expr.context)))
    return " ".join(parts).replace(" ,", ",")


def _wrapped(prefixes: dict[str, list[str]], end: str) -> Family:
    inner: list[Family] = [_template, _postnominal, _relative_clause, _one_head, _descriptive, _partitive]

    def family(expr: Expr, rng: np.random.Generator, article: str) -> str:
        art = _article(expr, article)
        phrase = _pick(inner, rng)(expr, rng, art)
        return _pick(prefixes[art], rng).format(phrase) + end

    return family


_COMMANDS = ["find {}", "show me {}", "point to {}", "give me {}", "get {}", "look for {}", "i want {}",
             "i need {}", "spot {}"]
_imperative = _wrapped({"the": _COMMANDS, "a": _COMMANDS}, "")
_question = _wrapped({
    "the": ["where is {}", "which one is {}", "can you find {}", "can you show me {}", "could you point to {}",
            "where can i find {}", "do you see {}"],
    "a": ["is there {}", "can you find {}", "do you see {}", "can you show me {}", "where can i find {}"],
}, "?")

FAMILIES: dict[str, Family] = {
    "template": _template, "postnominal": _postnominal, "one_head": _one_head,
    "relative_clause": _relative_clause, "fronted": _fronted, "imperative": _imperative,
    "descriptive": _descriptive, "partitive": _partitive, "terse": _terse,
    "question": _question, "appositive": _appositive,
}
