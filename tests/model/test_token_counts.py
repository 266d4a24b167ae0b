"""The processor reports how many tokens a text had before ``max_length`` cut it."""

from __future__ import annotations

from reir.model import ReirModel, ReirProcessor

LONG = " ".join(["the small red circle left of the big blue square"] * 5)


def test_token_counts_show_truncation_and_text_is_unchanged(tiny: tuple[ReirModel, ReirProcessor]) -> None:
    _, proc = tiny
    short, long = proc.token_counts(["the red square", LONG])
    assert short == 5  # [CLS] the red square [SEP]
    assert long > proc.max_length == 32
    assert proc.text([LONG])["input_ids"].shape == (1, proc.max_length)  # the model sees the first 32
    assert proc.token_counts([]) == []
