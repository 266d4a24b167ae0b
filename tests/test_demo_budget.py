"""`make demo`'s time budget: each training stage's time cap (reir.demo.stage_time_cap, _limits)."""

from __future__ import annotations

import pytest

from reir.demo import (
    AFTER_TRAINING_MAX_S,
    AFTER_TRAINING_MIN_S,
    AFTER_TRAINING_S,
    BUDGET_FLOOR,
    STEP_TIME_CAP,
    DemoConfig,
    _limits,
    after_training_s,
    stage_setup_s,
    stage_time_cap,
    training_time_left,
)

MINUTES_S = (210.0, 330.0, 480.0)  # the demo's stage minutes, in seconds


def test_share_of_what_is_left_by_the_stages_minutes() -> None:
    # as much left as the stages' minutes: each stage gets its own
    assert stage_time_cap(0, MINUTES_S, sum(MINUTES_S)) == pytest.approx(210.0)
    # 20% less left: every stage still to run gives up 20%
    assert stage_time_cap(0, MINUTES_S, 0.8 * sum(MINUTES_S)) == pytest.approx(168.0)
    assert stage_time_cap(1, MINUTES_S, 0.8 * 810.0) == pytest.approx(264.0)
    # the last stage takes all that is left
    assert stage_time_cap(2, MINUTES_S, 400.0) == pytest.approx(400.0)


def test_floor_and_cap() -> None:
    assert stage_time_cap(1, MINUTES_S, -50.0) == pytest.approx(330.0 * BUDGET_FLOOR)
    assert stage_time_cap(2, MINUTES_S, 10_000.0) == pytest.approx(480.0 * STEP_TIME_CAP)


def test_limits_by_mode() -> None:
    steps = DemoConfig().stage_steps
    assert _limits(DemoConfig(), 1, MINUTES_S, 0.8 * 810.0) == {"max_steps": steps[1], "time_budget_s": pytest.approx(264.0)}
    assert _limits(DemoConfig(keep_budget=False), 1, MINUTES_S, None) == {"max_steps": steps[1],
                                                                          "time_budget_s": 330.0 * STEP_TIME_CAP}
    assert _limits(DemoConfig(fixed_steps=False), 1, MINUTES_S, None) == {"time_budget_s": 330.0}


REFERENCE_STEP_S = 0.38  # stage 1's steady step on the reference machine's fast hours


def _run(slowness: float, keep_budget: bool) -> tuple[float, list[float]]:
    """A whole `make demo` on a machine whose steps take ``slowness`` times the reference's, with
    the set-up and after-training times the set-asides assume, as reir.demo._train works it out
    (stage 1's step known from stage 2 on): (wall seconds, share of each stage's steps trained)."""
    cfg = DemoConfig(keep_budget=keep_budget)
    clock = 30.0  # synthetic data and Ray's start
    trained = []
    step_s = None
    for stage in range(3):
        left = training_time_left(cfg, clock, stage, step_s) if keep_budget else None
        cap = _limits(cfg, stage, MINUTES_S, left)["time_budget_s"]
        needed = MINUTES_S[stage] * slowness
        loop = min(needed, cap)
        trained.append(loop / needed)
        clock += stage_setup_s(cfg, stage) + loop
        step_s = REFERENCE_STEP_S * slowness
    return clock + after_training_s(step_s), trained


@pytest.mark.parametrize("slowness", [1.3, 1.6])
def test_a_slower_machine_trains_less_within_the_budget(slowness: float) -> None:
    wall, trained = _run(slowness, keep_budget=True)
    assert wall <= DemoConfig().budget_s
    assert all(share < 1.0 for share in trained)
    assert max(trained) - min(trained) < 0.05  # the cut falls on every stage alike
    late, _ = _run(slowness, keep_budget=False)
    assert late > DemoConfig().budget_s  # what it did before keep_budget


def test_a_fast_machine_trains_every_step() -> None:
    wall, trained = _run(0.8, keep_budget=True)
    assert trained == [1.0, 1.0, 1.0]
    assert wall < DemoConfig().budget_s


def test_the_test_split_keeps_its_size_and_the_stages_their_images() -> None:
    assert DemoConfig().test_fraction == pytest.approx(0.2) and DemoConfig().stage_train_images is None
    big = DemoConfig(num_images=3000, rerank_only_images=1000)
    assert round(big.num_images * big.test_fraction) == 400  # the test split stays 400 images
    assert big.stage_train_images == 1600  # of 2,600: stages 1 and 2 leave the last 1,000 to the re-ranker
    small = DemoConfig(num_images=60, rerank_only_images=1000)
    assert round(small.num_images * small.test_fraction) == 12  # at most a fifth
    assert small.stage_train_images is None  # nothing left to hold back: every stage trains on all


def test_an_explicit_test_split_is_taken_as_given_or_refused() -> None:
    assert DemoConfig(num_images=3000, test_images=900).test_split == 900  # above a fifth: asked for, so kept
    for bad in (0, 60):
        with pytest.raises(ValueError, match="test_images"):
            DemoConfig(num_images=60, test_images=bad)


def test_the_reranker_stage_sets_aside_time_for_its_extra_images() -> None:
    plain, extra = DemoConfig(rerank_extra_images=0), DemoConfig(rerank_extra_images=1000)
    assert stage_setup_s(extra, 0) == stage_setup_s(plain, 0)  # stages 1 and 2 never see them
    assert stage_setup_s(extra, 2) > stage_setup_s(plain, 2)  # their features are worked out first
    # Less time is left to train every stage, so the whole run still ends within its budget.
    left = [training_time_left(c, 100.0, 0) for c in (plain, extra)]
    assert left[1] == pytest.approx(left[0] - (stage_setup_s(extra, 2) - stage_setup_s(plain, 2)))


def test_the_extra_images_follow_the_train_split_unless_set() -> None:
    assert DemoConfig().extra_images == 1000  # 1,600 train images: the default's ceiling
    assert DemoConfig(num_images=60).extra_images == 48  # a small demo: as many as its 48 train images
    assert DemoConfig(num_images=60, rerank_extra_images=0).extra_images == 0
    assert DemoConfig(rerank_extra_images=2000).extra_images == 2000  # a value given is taken as given
    with pytest.raises(ValueError, match="rerank_extra_images"):
        DemoConfig(rerank_extra_images=-1)


def test_stage_extra_images_are_for_stages_1_and_2_and_refused_below_zero() -> None:
    from reir.settings import DemoSettings

    assert DemoConfig().stage_extras == DemoConfig(**DemoSettings().model_dump()).stage_extras == 1000
    assert DemoConfig(num_images=60).stage_extras == 48  # a small demo: as many as its 48 train images
    cfg = DemoConfig(**DemoSettings(stage_extra_images=0).model_dump())
    assert cfg.stage_extras == 0
    # the re-ranker's stage trains on its own extra images: no more features to set time aside for
    assert stage_setup_s(DemoConfig(), 2) == stage_setup_s(cfg, 2)
    with pytest.raises(ValueError, match="stage_extra_images"):
        DemoConfig(stage_extra_images=-1)
    with pytest.raises(ValueError, match="stage_extra_images"):
        DemoSettings(stage_extra_images=-1)


def test_the_time_after_training_follows_stage_1s_step() -> None:
    assert after_training_s(None) == AFTER_TRAINING_S  # stage 1 has not run: the flat set-aside
    fast, slow, slower = after_training_s(0.38), after_training_s(0.49), after_training_s(0.6)
    assert AFTER_TRAINING_MIN_S <= fast < slow < AFTER_TRAINING_S < slower <= AFTER_TRAINING_MAX_S
    # measured after training in 2-core runs: 60 s at a 0.38 s step, 78-84 s at 0.46-0.49 s
    assert 60.0 <= fast <= 75.0 and slow >= 84.0
    assert after_training_s(0.01) == AFTER_TRAINING_MIN_S and after_training_s(5.0) == AFTER_TRAINING_MAX_S
    # a fast hour's later stages get what the flat set-aside left unused
    gained = training_time_left(DemoConfig(), 300.0, 1, 0.38) - training_time_left(DemoConfig(), 300.0, 1)
    assert gained == pytest.approx(AFTER_TRAINING_S - fast)
