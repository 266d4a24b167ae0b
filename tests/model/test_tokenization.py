"""The built-in subword tokenizer and the typo correction in front of it."""

from __future__ import annotations

import pickle
import random

import pytest

from reir.model import ReirModel, ReirProcessor
from reir.model.tokenization import SpellingCorrector, build_tokenizer, build_vocab

from .synthetic import make_dataset


def _tokens(text: str) -> list[str]:
    tok = build_tokenizer()
    return tok.convert_ids_to_tokens(tok(text)["input_ids"])


def test_an_unseen_word_is_spelled_in_pieces_not_unk() -> None:
    tokens = _tokens("the crimson zigzag")
    assert "[UNK]" not in tokens
    assert tokens[:2] == ["[CLS]", "the"]
    assert any(t.startswith("##") for t in tokens)  # pieces after a word start
    assert build_tokenizer().decode(build_tokenizer()("the crimson zigzag")["input_ids"],
                                    skip_special_tokens=True) == "the crimson zigzag"


def test_known_words_stay_one_token_each() -> None:
    assert _tokens("The red circle, left of the blue square?") == [
        "[CLS]", "the", "red", "circle", ",", "left", "of", "the", "blue", "square", "?", "[SEP]"]


def test_vocabulary_ids_are_stable_and_unique() -> None:
    vocab = build_vocab()
    assert vocab[:4] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    assert len(vocab) == len(set(vocab))
    assert vocab == build_vocab()


@pytest.mark.parametrize(("typed", "meant"), [
    ("the cirlce", "the circle"),            # two letters swapped
    ("the trinagle", "the triangle"),
    ("the yelow star", "the yellow star"),   # a letter dropped
    ("the squarre", "the square"),           # a letter doubled
    ("the hexagan", "the hexagon"),          # a letter changed
    ("Where is the Sqaure?", "Where is the square?"),
])
def test_one_typo_maps_back_to_the_known_word(typed: str, meant: str) -> None:
    assert SpellingCorrector.from_tokenizer(build_tokenizer())(typed) == meant


def test_known_short_and_far_words_are_left_alone() -> None:
    fix = SpellingCorrector.from_tokenizer(build_tokenizer())
    assert fix("the red one left of it") == "the red one left of it"
    assert fix("the xyzzyq") == "the xyzzyq"  # nothing one edit away: kept, tokenized in pieces


def test_real_words_one_edit_from_a_known_word_are_left_as_typed() -> None:
    from reir.data.noise import FILLER_WORDS

    fix = SpellingCorrector.from_tokenizer(build_tokenizer())
    # without the list, "pick" and "mark" became colours ("pink", "dark") and "seek" "see"
    assert fix("pick the cirlce, mark the trinagle") == "pick the circle, mark the triangle"
    assert SpellingCorrector(["pink", "dark"], as_typed=())("pick mark") == "pink dark"
    # the carrier words training adds (reir.data.noise.add_filler) reach the model as typed
    assert [w for w in FILLER_WORDS if fix(w) != w] == []


def test_processor_corrects_before_tokenizing_and_saves_the_setting(
        tiny: tuple[ReirModel, ReirProcessor], tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, proc = tiny
    assert proc.text(["the cirlce"])["input_ids"].tolist() == proc.text(["the circle"])["input_ids"].tolist()
    proc.save_pretrained(tmp_path)
    assert ReirProcessor.from_pretrained(tmp_path).spell_correct
    raw = ReirProcessor(proc.tokenizer, image_size=64, spell_correct=False)
    assert raw.text(["the cirlce"])["input_ids"].tolist() != raw.text(["the circle"])["input_ids"].tolist()


def test_collate_draws_at_most_max_refs_per_image(tiny: tuple[ReirModel, ReirProcessor]) -> None:
    _, proc = tiny
    data = make_dataset(0, 2)
    for _, s in data:
        s.refs = [(f"the red square {k}", 0) for k in range(20)]
    capped = proc.collate([s for _, s in data], [im for im, _ in data], rng=random.Random(0), max_refs_per_image=5)
    per_image = capped.text_image_index.tolist()
    assert per_image.count(0) == 5 and per_image.count(1) == 5
    assert len(set(capped.texts[:5])) == 5  # drawn without replacement
    full = proc.collate([s for _, s in data], [im for im, _ in data])
    assert len(full.texts) == 40


def test_corrected_texts_are_kept_and_the_store_stays_bounded() -> None:
    speller = SpellingCorrector(["circle", "triangle", "left"], as_typed=(), text_cache=2)
    assert speller("the cirlce left of the trinagle") == "the circle left of the triangle"
    assert speller("the cirlce left of the trinagle") == "the circle left of the triangle"  # kept: the same answer
    assert speller("a trinagle") == "a triangle"
    # full: emptied, and a third text is still corrected as before
    assert speller("the lfet cirlce") == "the left circle"
    assert len(speller._texts) <= 2
    # pickled (a processor shipped to a Ray actor): the same corrections, none of the kept texts
    copy = pickle.loads(pickle.dumps(speller))
    assert copy._texts == {} and copy("the cirlce") == "the circle"
