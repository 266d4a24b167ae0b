"""Closed vocabulary of the synthetic REIR benchmark.

The attribute lists are the scene generator's universe; ``VOCABULARY`` lists every
word the expression template (``reir.data.language``) and the phrasing families
(``reir.data.families``) can emit before surface noise, so a tokenizer can reserve one
id per word (typos and "coloured" from ``reir.data.noise`` are deliberately outside it).
It is a plain list on purpose: the model package reads it without importing the
generator. ``tests/data`` checks that it covers every phrase, and every word must also
be in the built-in tokenizer's list (``reir.model.tokenization``) or it becomes [UNK].
"""

from __future__ import annotations

SHAPES: list[str] = ["square", "circle", "triangle", "star", "diamond", "hexagon"]
COLORS: list[str] = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SIZES: list[str] = ["small", "large"]
BACKGROUNDS: list[str] = ["plain", "noisy", "striped", "gradient", "checkered"]
RELATIONS: list[str] = ["left", "right", "above", "below"]
SUPERLATIVES: list[str] = ["largest", "smallest", "leftmost", "rightmost", "topmost", "bottommost"]
# Ordinals: the second in a superlative's order ("the second circle from the left", "the
# second largest star"). They are superlative kinds, so every rule for superlatives holds.
ORDINALS: dict[str, tuple[str, int]] = {f"second_{kind}": (kind, 2) for kind in SUPERLATIVES}
# Comparatives: a superlative between exactly two look-alikes ("the bigger of the two circles",
# "the left star"); false in an image with one or three or more of them.
COMPARATIVES: dict[str, str] = {f"pair_{kind}": kind for kind in SUPERLATIVES}
SUPERLATIVES += [*ORDINALS, *COMPARATIVES]

VOCABULARY: list[str] = [
    # articles and function words
    "the", "a", "an", "of", "to", "on", "against", "in", "with", "background",
    "image", "picture",
    # generic nouns
    "object", "shape",
    # shapes
    "square", "circle", "triangle", "star", "diamond", "hexagon",
    # colors
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black",
    # sizes and their synonyms
    "small", "little", "large", "big",
    # backgrounds
    "plain", "noisy", "striped", "gradient", "checkered",
    # relations
    "left", "right", "above", "over", "below", "under",
    # superlatives
    "largest", "biggest", "smallest", "leftmost", "rightmost", "topmost", "highest",
    "bottommost", "lowest", "second", "bigger", "larger", "smaller", "two", "upper", "lower", "more", "closer",
    # phrasing families (reir.data.families): synonyms, plurals, clause and question words
    "tiny", "huge", "uppermost", "lowermost", "far", "furthest", "farthest", "very", "top", "bottom",
    "closest", "nearest", "front", "one", "thing", "objects", "shapes", "things",
    "squares", "circles", "triangles", "stars", "diamonds", "hexagons",
    "colored", "size", "sized", "that", "which", "is", "and", "any", "at", "from", "has", "also",
    "there", "where", "it", "sitting", "located", "placed", "photo", "scene",
    "find", "show", "me", "point", "give", "get", "look", "for", "i", "want", "need", "spot",
    "can", "could", "you", "do", "see",
]
