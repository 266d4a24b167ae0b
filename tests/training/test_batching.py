"""Look-alike micro-batches (reir.training.batching) and the trainer's epoch iterator."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from reir.data.samples import ImageSample
from reir.training.batching import expression_heads, likeness, lookalike_batches, lookalike_clusters, window_batches

COLORS = ["red", "blue", "green", "black", "white", "pink", "grey", "brown"]
BACKGROUNDS = ["plain", "striped", "noisy", "checkered"]


def _image(k: int, color: str, background: str) -> ImageSample:
    refs = [(f"the {color} star left of the square on the {background} background", 0),
            (f"the square right of the {color} star", 1)]
    return ImageSample(f"img{k}", "-", 64, 64, boxes=[[1, 1, 8, 8], [20, 1, 8, 8]], labels=[0, 1], refs=refs)


def _world(n_per_color: int = 4) -> list[ImageSample]:
    """Images whose star colour repeats ``n_per_color`` times, backgrounds at random."""
    rng = random.Random(1)
    out = []
    for c in COLORS:
        for _ in range(n_per_color):
            out.append(_image(len(out), c, rng.choice(BACKGROUNDS)))
    rng.shuffle(out)
    return out


def _color(s: ImageSample) -> str:
    return s.refs[0][0].split()[1]


def test_heads_are_the_first_words_of_each_expression() -> None:
    s = _image(0, "red", "plain")
    assert expression_heads(s) == {"the red star", "the square right"}


def test_likeness_ignores_heads_that_most_images_share() -> None:
    words = [{"the square right", f"the star {k}"} for k in range(10)]
    words[1] = {"the square right", "the star 0"}  # images 0 and 1 share a rare head
    sim = likeness(words)
    # "the square right" is in every image (share 1.0 > 0.3): it counts nothing
    assert sim[2, 3] == 0 and sim[0, 1] > 0 and sim[0, 3] == 0
    assert sim[0, 0] == 0 and sim[0, 1] == sim[1, 0]


def test_clusters_put_images_whose_expressions_begin_alike_together() -> None:
    samples = _world(n_per_color=4)
    clusters = lookalike_clusters(samples, [0] * len(samples), partners=3, rng=random.Random(0))
    assert sorted(i for c in clusters for i in c) == list(range(len(samples)))  # each image once
    assert all(len(c) <= 4 for c in clusters)
    # 4 images per star colour and clusters of 4: the greedy pass groups most of them whole
    pure = sum(len({_color(samples[i]) for i in c}) == 1 for c in clusters)
    assert pure >= len(COLORS) - 2, [[_color(samples[i]) for i in c] for c in clusters]
    # what a random partition of the same images gives, for contrast
    rng = random.Random(0)
    order = list(range(len(samples)))
    rng.shuffle(order)
    random_pure = sum(len({_color(samples[i]) for i in order[k:k + 4]}) == 1 for k in range(0, len(order), 4))
    assert random_pure < pure


def test_partners_come_from_the_seeds_negative_group_only() -> None:
    samples = _world(n_per_color=4)
    # the two halves of every colour sit in different groups
    seen: Counter[str] = Counter()
    groups = []
    for s in samples:
        groups.append(seen[_color(s)] % 2)
        seen[_color(s)] += 1
    clusters = lookalike_clusters(samples, groups, partners=3, rng=random.Random(0))
    assert all(len({groups[i] for i in c}) == 1 for c in clusters)
    # each group holds 2 images per colour: look-alike pairs, then strangers
    assert sum(len({_color(samples[i]) for i in c[:2]}) == 1 for c in clusters) >= len(clusters) - 2


def test_images_alone_in_their_group_stay_random_singletons() -> None:
    samples = _world(n_per_color=2)
    clusters = lookalike_clusters(samples, list(range(len(samples))), partners=3, rng=random.Random(0))
    assert sorted(len(c) for c in clusters) == [1] * len(samples)


def test_batches_are_full_and_the_rest_is_returned() -> None:
    samples = _world(n_per_color=5)  # 40 images
    batches, rest = lookalike_batches(samples, [0] * 40, batch_size=16, partners=3, rng=random.Random(0))
    assert [len(b) for b in batches] == [16, 16] and len(rest) == 8
    assert sorted([i for b in batches for i in b] + rest) == list(range(40))
    with pytest.raises(ValueError, match="batch_size"):
        lookalike_batches(samples, [0] * 40, batch_size=0, partners=3, rng=random.Random(0))
    with pytest.raises(ValueError, match="groups"):
        lookalike_clusters(samples, [0], partners=3, rng=random.Random(0))


def test_windows_carry_their_leftovers_and_drop_the_last_partial_batch() -> None:
    samples = _world(n_per_color=5)  # 40 images in windows of 12, 12, 12, 4
    windows = [[(s, 0) for s in samples[k:k + 12]] for k in range(0, 40, 12)]
    batches = list(window_batches(windows, batch_size=8, partners=1, rng=random.Random(0)))
    assert [len(b) for b in batches] == [8] * 5
    ids = [s.image_id for b in batches for s in b]
    assert len(ids) == len(set(ids)) == 40


def test_the_trainer_reads_an_epoch_of_a_ray_dataset_as_look_alike_batches(ray_session: None) -> None:
    import ray

    from reir.training.config import TrainConfig
    from reir.training.trainer import micro_batches, sample_to_row

    samples = _world(n_per_color=4)  # 32 images
    ds = ray.data.from_items([sample_to_row(s, 0) for s in samples])
    cfg = TrainConfig(data_root="-", batch_size=8, lookalike_partners=3, lookalike_window=32)
    batches = list(micro_batches(ds.iterator(), cfg, epoch=0, rng=random.Random(0)))
    assert [len(b) for b in batches] == [8] * 4
    assert sorted(s.image_id for b in batches for s in b) == sorted(s.image_id for s in samples)
    pure = sum(len({_color(s) for s in b[k:k + 4]}) == 1 for b in batches for k in (0, 4))
    assert pure >= len(COLORS) - 2
    # without look-alikes: shuffled rows, every full batch, nothing about colours
    plain = list(micro_batches(ds.iterator(), cfg.model_copy(update={"lookalike_partners": 0}), 0, random.Random(0)))
    assert [len(b) for b in plain] == [8] * 4


def test_with_filler_changes_only_the_share_of_expressions_it_is_asked_to() -> None:
    import numpy as np

    from reir.data.noise import FILLER_WORDS
    from reir.training.trainer import with_filler

    samples = _world(8)
    before = [list(s.refs) for s in samples]
    same = with_filler(samples, 0.0, np.random.default_rng(0))
    assert same is samples
    filled = with_filler(samples, 0.5, np.random.default_rng(0))
    pairs = [(a, b) for s, f in zip(samples, filled) for a, b in zip(s.refs, f.refs)]
    changed = [(a, b) for a, b in pairs if a != b]
    assert 0.35 < len(changed) / len(pairs) < 0.65
    for (text, ref), (new, new_ref) in changed:
        assert new_ref == ref and text.rstrip(".?!") in new
        assert set(new.replace(text.rstrip(".?!"), " ").strip(" .?!").split()) <= set(FILLER_WORDS)
    assert [(s.image_id, s.boxes, s.labels) for s in filled] == [(s.image_id, s.boxes, s.labels) for s in samples]
    assert [s.refs for s in samples] == before  # the inputs are not changed


def test_filler_never_takes_an_expression_past_the_token_bound() -> None:
    import numpy as np

    from reir.model import create_model
    from reir.training.trainer import FILLER_MAX_TOKENS, filler_fits, with_filler

    _, processor = create_model("tiny")
    fits = filler_fits(processor)
    short, long_ = "the red circle", " ".join(["the red circle left of the blue square"] * 5)
    assert processor.token_counts([long_])[0] > FILLER_MAX_TOKENS
    assert fits([(short, "where is " + short), (short, "hey " * 30 + short)]) == [True, False]
    assert fits([(long_, "please " + long_)]) == [False]  # already past the bound: nothing may be added
    samples = _world(4)
    kept = with_filler(samples, 1.0, np.random.default_rng(0), fits=lambda pairs: [False] * len(pairs))
    assert [s.refs for s in kept] == [s.refs for s in samples]
    filled = with_filler(samples, 1.0, np.random.default_rng(0), fits=fits)
    counts = [processor.token_counts([t])[0] for s in filled for t, _ in s.refs]
    assert max(counts) <= FILLER_MAX_TOKENS and any(a != b for s, f in zip(samples, filled) for a, b in zip(s.refs, f.refs))
