"""Closed vocabulary of the synthetic REIR benchmark.

The attribute lists are the scene generator's universe; ``VOCABULARY`` lists every
word the expression templates (``reir.data.language``) can emit, so a tokenizer can
reserve one id per word. It is a plain list on purpose: the model package reads it
without importing the generator. ``tests/data`` checks that it covers every phrase.
"""

from __future__ import annotations

SHAPES: list[str] = ["square", "circle", "triangle", "star", "diamond", "hexagon"]
COLORS: list[str] = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SIZES: list[str] = ["small", "large"]
BACKGROUNDS: list[str] = ["plain", "noisy", "striped", "gradient", "checkered"]
RELATIONS: list[str] = ["left", "right", "above", "below"]
SUPERLATIVES: list[str] = ["largest", "smallest", "leftmost", "rightmost", "topmost", "bottommost"]

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
    "bottommost", "lowest",
]
