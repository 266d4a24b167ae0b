"""``reir demo``: the whole platform end to end on embedded defaults.

synth -> train stage 1 and stage 2 (Ray Train + DeepSpeed) -> ingest the test gallery
(Ray Data -> milvus-lite in server mode) -> Ray Serve -> every test query over HTTP ->
BR@k table, metrics.json, example answers and a picture of three queries.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from reir.settings import DEMO_REFERENCE_MINUTES, DEMO_STAGE_MINUTES

# The demo's re-ranker recipe: batches of 128 expressions from one negative group (shared hard
# negatives), lr 2.5e-3. bench/rerank.py trains its default variant with the same. At lr 4e-3
# (until 2026-11-30) two of four seeds failed on the demo's stage-2 model: BR@1 32.9 and 27.5%
# against 67.4 and 66.6%, the loss stalling from ~500 steps; at 2.5e-3 every seed tried learned
# (bench/results/rerank-lr-seeds-demo-stage2-2cpu-2026-11-30.json).
# 11 hard negatives per expression (reir train's default: 15): at equal steps they scored as 15
# (BR@1 mean 63.9 against 64.2% over two seeds) and a step took 0.170 against 0.194-0.208 s, so a
# slow hour's time cap trains more steps (bench/results/rerank-negatives-11-demo-stage2-2cpu-2026-11-30.json).
# A new re-ranker's form otherwise (context relation, one instance-set layer): reir.model.modeling's
# NEW_RERANKER_* defaults.
RERANK_RECIPE: dict[str, Any] = {"batch_size": 128, "lr": 2.5e-3, "warmup_steps": 20, "weight_decay": 0.01,
                                 "rerank_negatives": 11, "model_overrides": {"rerank": {"hidden_size": 128, "text_layers": 1}}}
# Everything but training (data, Ray, ingestion, Serve, 2,404 HTTP queries, discover mode,
# evaluation): 2.5 min on a 2-core machine on 2026-11-29.
DEMO_OVERHEAD_S = 3 * 60
STEP_TIME_CAP = 2.0  # fixed_steps: a stage stops at this many times its minutes, steps reached or not
# keep_budget: what the run spends outside the training loops after a stage starts, set aside
# before the stage's share of the time left is worked out. Measured in a slow hour of a 2-core
# AMD machine (2026-11-30, `make demo` 25.3 min): stages 1 and 2 start and check-point in
# 20-22 s each; the re-ranker's stage spends 78 s on its start, the frozen model's features of
# the training images and calibration; ingestion, Serve, 2,404 HTTP queries, discover mode,
# evaluation and the picture take 86 s. (The re-ranker's features grow with the training
# images: 62-65 s for 2,600 against 33-38 s for 1,600.) Since 2026-11-30 20:00 the features
# take 48 s for 2,600 images against 59 s (texts encoded in batches of similar length, hard
# negatives mined within each group), so both set-asides shrink by what that saves.
STAGE_SETUP_S = (22.0, 22.0, 73.0)
RERANK_FEATURE_S_PER_IMAGE = 0.021  # the re-ranker's stage: features of each extra training image
# After training, the run's steps run on the trained model (ingestion, 2,404 HTTP queries, discover
# mode), so they take longer where its training steps did: in 18 runs on 2-core machines
# (2026-11-28..30) 60-66 s where stage 1's steady step took 0.38-0.39 s, 66-84 s at 0.41-0.49 s.
# Once stage 1 has run, the set-aside is AFTER_TRAINING_S_PER_STEP times its step (every run's
# within 6 s, most above), between AFTER_TRAINING_MIN_S and AFTER_TRAINING_MAX_S; before,
# AFTER_TRAINING_S. A flat 90 s left 24-30 s of a fast hour's 20 minutes unused.
AFTER_TRAINING_S = 90.0
AFTER_TRAINING_S_PER_STEP = 180.0
AFTER_TRAINING_MIN_S, AFTER_TRAINING_MAX_S = 60.0, 180.0
BUDGET_MARGIN_S = 25.0  # the run aims this far inside its budget: the set-asides above are estimates
EXTRA_DATA = "data_extra"  # DemoConfig.extra_images: their benchmark's folder under out
STAGE_EXTRA_DATA = "data_stage_extra"  # DemoConfig.stage_extras: their benchmark's folder under out
DEFAULT_TEST_IMAGES = 400  # the demo's test split, whatever num_images (at most a fifth of them)
DEFAULT_EXTRA_IMAGES = 1000  # DemoConfig.rerank_extra_images: at most this many by default
BUDGET_FLOOR = 0.6  # keep_budget: a stage trains at least this share of its minutes, whatever is left


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo_out"
    num_images: int = 2000
    test_images: int | None = None  # the test split; None: DEFAULT_TEST_IMAGES, at most a fifth of num_images
    # The last train images (by id), held back from stages 1 and 2 for the re-ranker's stage alone.
    # 0: not adopted on one end-to-end run (docs/decisions.md, "make demo on 3,000 images").
    rerank_only_images: int = 0
    # More training images, generated apart (seed + 1, chunks as large as the test split), for the
    # re-ranker's stage alone: stage 2 never fits them, so their features look like a new gallery's.
    # None: as many as the train split holds, at most DEFAULT_EXTRA_IMAGES (extra_images).
    rerank_extra_images: int | None = None
    # More training images for stages 1 and 2 alone, generated apart (seed + 2, chunks as large as
    # the test split): in the same steps each image is seen fewer times, and the stored vectors
    # generalize better. The re-ranker trains on the train split and its own extra images. With
    # 1,000 (2026-11-30, four runs in slow hours): BR@1 67.7-72.1% against 63.6-69.1% for the
    # recipe before (docs/decisions.md).
    # None: as many as the train split holds, at most DEFAULT_EXTRA_IMAGES (stage_extras).
    stage_extra_images: int | None = None
    train_minutes: float = DEMO_REFERENCE_MINUTES
    stage1_share: float = DEMO_STAGE_MINUTES[0] / DEMO_REFERENCE_MINUTES
    rerank_share: float = DEMO_STAGE_MINUTES[2] / DEMO_REFERENCE_MINUTES
    # Each stage trains for the steps a reference 2-core machine reaches in its share of the
    # minutes (stage 1, stage 2, re-ranker), scaled with train_minutes, and stops at STEP_TIME_CAP
    # times its minutes at the latest. With the minutes alone (fixed_steps False) a machine half
    # as fast trains half the steps: on one such machine (2026-11-25) stage 2 reached 392 of
    # 940 steps and the ANN order fell from 4.9% to 1.0% BR@1 (docs/benchmarks.md, `make demo`).
    fixed_steps: bool = True
    # ... and with keep_budget each stage also stops when its share (by its minutes) of the time
    # left before the run's budget is spent (stage_time_cap), so a machine slower than the
    # reference trains fewer steps instead of overrunning the 20 minutes. Until 2026-11-30 the
    # run took what the steps took: 18.6-18.9 min in the 2-core machines' fastest hours, 23-35 min
    # in slow ones (bench/results/demo-train-speed-2cpu-2026-11-29.json).
    keep_budget: bool = True
    # 600 / 940 / 3,500 since the embedding probes (2026-11-27). On the plain-torch replica,
    # stage 1 at 600 instead of 300 steps raised BR@5/10 from 53.4 / 60.3% to 58.0 / 67.7%, and
    # 3,500 re-ranker steps instead of 2,000 BR@1 from 21.4% to 30.3%
    # (bench/results/embedding-probes-replica-2cpu-2026-11-27.json). End to end on one 2-core
    # machine: 31.8% BR@1 in 24.9 min (stage 1 0.58 s/step, stage 2 0.59, re-ranker 0.114);
    # 400 / 700 / 3,000 steps took about 19 min there and gave only 19.1%.
    # Re-ranker 2,000 steps since its instance-set layer (2026-11-28): a step costs about 1.6x,
    # and on the demo's stage-2 model 2,000 steps with the layer gave BR@1 56.2% against 49.6%
    # for 3,500 without it (plain-torch replica, bench/results/rerank-instance-set-replica-2cpu-2026-11-28.json).
    # Re-ranker 1,800 since 2026-11-29 (the demo's 20 minutes; 2,000 gave 69.3% BR@1 in 21.0 min).
    # 1,400 tied 1,800 on one frozen stage-2 model (68.2 / 66.0% BR@1 on two seeds against
    # 67.1%), but end to end it gave 64.4% and discover F1 54.3% (the presence head starts from
    # the re-ranker): bench/results/rerank-steps-2cpu-2026-11-29.json.
    stage_steps: tuple[int, int, int] = (600, 940, 1800)
    # Discover mode's presence head, trained after the re-ranker in the same stage (its minutes
    # include it). Its instance-set layer (2026-11-28) took discover F1 from 71.6 to 81.6%, and a
    # step from 40 to ~100 ms; by 3,000 steps it fits its ~700 training queries to a loss of 0.01.
    # 1,000 steps since 2026-11-29 (the demo's 20 minutes): discover F1 70.4, 78.4 and 79.2% in
    # three end-to-end runs at 1,000, 81.8% in one at 1,500, 82.9 and 83.0% at 3,000 (100 test
    # queries each; bench/results/demo-train-speed-2cpu-2026-11-29.json).
    presence_steps: int = 1000
    model: str = "small"
    # Scene regimes of the training split (reir.data.layouts; None: the generator's mixture);
    # the held-out ones appear in the test split only.
    regimes: dict[str, float] | None = None
    heldout_regimes: tuple[str, ...] = ("row",)
    seed: int = 0
    batch_size: int = 16
    # stage 2: look-alike images per image of a batch (reir.training.batching); 0: random batches
    lookalike_partners: int = 0
    top_k: int = 10
    http_port: int = 8000
    query_concurrency: int = 4

    def __post_init__(self) -> None:
        if self.rerank_extra_images is not None and self.rerank_extra_images < 0:
            raise ValueError(f"rerank_extra_images {self.rerank_extra_images}: must be >= 0")
        if self.stage_extra_images is not None and self.stage_extra_images < 0:
            raise ValueError(f"stage_extra_images {self.stage_extra_images}: must be >= 0")
        if self.test_images is not None and not 1 <= self.test_images < self.num_images:
            raise ValueError(f"test_images {self.test_images}: the test split needs 1 to {self.num_images - 1} "
                             f"of the {self.num_images} images (num_images)")

    @property
    def test_split(self) -> int:
        """Images in the test split: ``test_images``, or by default 400 and at most a fifth."""
        return self.test_images if self.test_images is not None else min(DEFAULT_TEST_IMAGES, self.num_images // 5)

    @property
    def test_fraction(self) -> float:
        """``test_split`` as the share of ``num_images`` that the generator takes."""
        return self.test_split / self.num_images

    @property
    def extra_images(self) -> int:
        """The re-ranker's extra training images (``rerank_extra_images``, or by default as many
        as the train split holds, at most ``DEFAULT_EXTRA_IMAGES``)."""
        return self._extras(self.rerank_extra_images)

    @property
    def stage_extras(self) -> int:
        """Stages 1 and 2's extra training images (``stage_extra_images``, or by default as many
        as the train split holds, at most ``DEFAULT_EXTRA_IMAGES``)."""
        return self._extras(self.stage_extra_images)

    def _extras(self, given: int | None) -> int:
        """Extra images generated apart: ``given``, or as many as the train split holds, at most
        ``DEFAULT_EXTRA_IMAGES``."""
        return given if given is not None else min(DEFAULT_EXTRA_IMAGES, self.num_images - self.test_split)

    @property
    def stage_train_images(self) -> int | None:
        """The train images stages 1 and 2 train on (the first, by id; None: all)."""
        train = self.num_images - self.test_split
        return train - self.rerank_only_images if 0 < self.rerank_only_images < train else None

    @property
    def budget_s(self) -> float:
        """The whole run's expected length: the training minutes plus the fixed overhead."""
        return self.train_minutes * 60 + DEMO_OVERHEAD_S


class _Clock:
    """Prints each step with the time spent and the run's budget (20 min for `make demo`)."""

    def __init__(self, console: Console, steps: int, budget_s: float) -> None:
        self.console, self.steps, self.step, self.started = console, steps, 0, time.monotonic()
        self.budget_s = budget_s

    def begin(self, what: str) -> None:
        self.step += 1
        used = time.monotonic() - self.started
        self.console.rule(f"[bold]step {self.step}/{self.steps}: {what}  "
                          f"[dim]({used / 60:.1f} of {self.budget_s / 60:.0f} min used)")

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    import ray

    from reir.data.formats import test_queries
    from reir.data.synth import generate, progress_total
    from reir.evaluation.metrics import write_metrics_json
    from reir.evaluation.runner import evaluate_predictions, rec_accuracy_for
    from reir.evaluation.slices import evaluate_slices, read_heldout
    from reir.platform.milvus_server import EmbeddedMilvus
    from reir.platform.raylocal import init_ray
    from reir.progress import progress_bar

    console = Console()
    clock = _Clock(console, 8, cfg.budget_s)
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"

    clock.begin(f"generate the synthetic benchmark ({cfg.num_images - cfg.test_split} train and {cfg.test_split} test "
                "images)")
    with progress_bar("synth: draw, then plan", total=progress_total(cfg.num_images)) as advance:
        generate(data, num_images=cfg.num_images, test_fraction=cfg.test_fraction, seed=cfg.seed, progress=advance,
                 regimes=cfg.regimes, heldout_regimes=cfg.heldout_regimes)
    for folder, count, seed, what in ((EXTRA_DATA, cfg.extra_images, cfg.seed + 1, "the re-ranker"),
                                      (STAGE_EXTRA_DATA, cfg.stage_extras, cfg.seed + 2, "stages 1 and 2")):
        if not count:
            continue
        # the generator keeps one test image whatever test_fraction: one more
        with progress_bar(f"synth: {count} more train images for {what}", total=progress_total(count + 1)) as advance:
            generate(out / folder, num_images=count + 1, test_fraction=0.0, seed=seed, progress=advance,
                     regimes=cfg.regimes, heldout_regimes=cfg.heldout_regimes, train_chunk=cfg.test_split)
    queries = test_queries(data)
    console.print(f"{len(queries)} test queries, each unique across the whole test gallery")

    init_ray(4, local=True)  # the demo's milvus-lite and files are on this machine
    try:
        model_dir = _train(cfg, data, out, clock)
        with EmbeddedMilvus(out / "milvus") as milvus:
            clock.begin("ingest the test gallery through Ray Data into Milvus")
            summary = _ingest(model_dir, data, milvus.uri)
            console.print(summary)
            clock.begin("start Ray Serve and send every test query over HTTP")
            predictions, answers, ann_predictions, discovery = _query_over_http(cfg, model_dir, milvus.uri, queries,
                                                                                progress_bar, data)
    finally:
        ray.shutdown()

    clock.begin("evaluate")
    metrics = evaluate_predictions(predictions, queries)
    metrics.update(rec_accuracy_for(model_dir, queries))
    # The same service with re-ranking switched off per request: what the re-ranker adds.
    metrics.update({f"ANN_{k}": v for k, v in evaluate_predictions(ann_predictions, queries).items()})
    metrics["num_queries"] = len(queries)
    # In-family vs held-out phrasing families and scene regimes (meta.json says which are held out).
    metrics["slices"] = evaluate_slices(predictions, queries, heldout=read_heldout(data))
    metrics["discovery"] = discovery
    metrics["train_steps"] = _steps_trained(out / "runs", cfg)
    metrics["wall_seconds"] = round(clock.seconds, 1)
    _report(console, metrics, queries, answers)
    write_metrics_json(out / "metrics.json", metrics)
    clock.begin("draw three queries with their top answers")
    from reir.evaluation.visualize import draw_examples

    picture = draw_examples(out / "examples.png", queries[:3], [answers[q.query_id] for q in queries[:3]])
    console.print(f"picture: {picture}\nmetrics: {out / 'metrics.json'}\n"
                  f"demo finished in {clock.seconds / 60:.1f} min (budget {clock.budget_s / 60:.0f} min)")
    return metrics


def _train(cfg: DemoConfig, data: Path, out: Path, clock: _Clock) -> Path:
    from reir.training.config import TrainConfig
    from reir.training.trainer import run_training

    budget = cfg.train_minutes * 60
    common: dict[str, Any] = {"data_root": str(data), "output_dir": str(out / "runs"), "batch_size": cfg.batch_size,
                              "cpus_per_worker": 2.0, "epochs": 1000, "seed": cfg.seed,
                              # One worker: ZeRO has nothing to partition, and ZeRO 2's flat buffers
                              # cost ~6% of a stage-2 step (0.343 against 0.322 s, 2026-11-29).
                              "zero_stage": 0,
                              "log_every": 25}
    seconds = (budget * cfg.stage1_share, budget * (1 - cfg.stage1_share - cfg.rerank_share), budget * cfg.rerank_share)

    step_s: float | None = None  # stage 1's steady step, once it has run: the machine's speed this hour

    def limits(stage: int) -> dict[str, Any]:  # worked out as the stage starts: what is left depends on the clock
        left = training_time_left(cfg, clock.seconds, stage, step_s) if cfg.keep_budget else None
        return _limits(cfg, stage, seconds, left)

    stage_extra = [str(out / STAGE_EXTRA_DATA)] if cfg.stage_extras else []
    stage_limits = limits(0)
    clock.begin(f"train stage 1 (detection + REC), {_say(stage_limits)}")
    stage1 = run_training(TrainConfig(model=cfg.model, stage="1", run_name="stage1", train_images=cfg.stage_train_images,
                                      extra_train_roots=stage_extra, **stage_limits, **common))
    step_s = _steady_step_s(Path(stage1))
    stage_limits = limits(1)
    clock.begin(f"train stage 2 (CLIA), {_say(stage_limits)}")
    stage2 = run_training(TrainConfig(model=str(stage1), stage="2", run_name="stage2", warmup_steps=10, lr=3e-4,
                                      train_images=cfg.stage_train_images, extra_train_roots=stage_extra,
                                      lookalike_partners=cfg.lookalike_partners, **stage_limits, **common))
    presence = _recipe_steps(cfg)["presence"]
    stage_limits = limits(2)
    clock.begin(f"train the re-ranker, then discover mode's presence head ({presence} steps), on the frozen "
                f"stage-2 model, {_say(stage_limits)}")
    extra = [str(out / EXTRA_DATA)] if cfg.extra_images else []
    return Path(run_training(TrainConfig(model=str(stage2), stage="rerank", run_name="rerank", **stage_limits,
                                         rerank_discovery_steps=presence, extra_train_roots=extra,
                                         **{**common, **RERANK_RECIPE})))  # a local output_dir: a Path


def _limits(cfg: DemoConfig, stage: int, seconds: Sequence[float], left_s: float | None) -> dict[str, Any]:
    """``max_steps`` / ``time_budget_s`` of one stage: the minutes alone, or the stage's steps
    (scaled with the minutes) with a time cap: ``STEP_TIME_CAP`` times its minutes, or with
    ``left_s`` (keep_budget: the training time left before the run's budget) what
    :func:`stage_time_cap` allows."""
    if not cfg.fixed_steps:
        return {"time_budget_s": seconds[stage]}
    steps = _recipe_steps(cfg)[RECIPE_STAGES[stage]]
    cap = seconds[stage] * STEP_TIME_CAP if left_s is None else stage_time_cap(stage, seconds, left_s)
    return {"max_steps": steps, "time_budget_s": cap}


def training_time_left(cfg: DemoConfig, elapsed_s: float, stage: int, step_s: float | None = None) -> float:
    """Seconds of training left for ``stage`` and the stages after it, ``elapsed_s`` into the run:
    the budget less the margin, the remaining stages' set-up and the steps after training
    (:func:`after_training_s` of ``step_s``, stage 1's steady step where known)."""
    setup = sum(stage_setup_s(cfg, k) for k in range(stage, len(STAGE_SETUP_S)))
    return cfg.budget_s - BUDGET_MARGIN_S - elapsed_s - after_training_s(step_s) - setup


def after_training_s(step_s: float | None) -> float:
    """The time set aside for the run's steps after training: ``AFTER_TRAINING_S`` while stage 1's
    steady step ``step_s`` is unknown, else ``AFTER_TRAINING_S_PER_STEP`` times it, bounded."""
    if step_s is None or step_s <= 0:
        return AFTER_TRAINING_S
    return min(AFTER_TRAINING_MAX_S, max(AFTER_TRAINING_MIN_S, AFTER_TRAINING_S_PER_STEP * step_s))


def stage_setup_s(cfg: DemoConfig, stage: int) -> float:
    """What ``stage`` spends outside its training loop (``STAGE_SETUP_S``; the re-ranker's stage
    also computes the features of ``extra_images`` more training images)."""
    return STAGE_SETUP_S[stage] + (RERANK_FEATURE_S_PER_IMAGE * cfg.extra_images if stage == 2 else 0.0)


def stage_time_cap(stage: int, seconds: Sequence[float], left_s: float, *, floor: float = BUDGET_FLOOR,
                   cap: float = STEP_TIME_CAP) -> float:
    """The seconds stage ``stage`` may train for: its share, by the stages' minutes ``seconds``
    (in seconds), of ``left_s``, the training time left for it and the stages after it; at
    least ``floor`` and at most ``cap`` times its own minutes. A stage that finishes its steps
    early leaves its time to the next ones."""
    own = seconds[stage]
    share = max(0.0, left_s) * own / sum(seconds[stage:])
    return min(own * cap, max(own * floor, share))


RECIPE_STAGES = ("stage1", "stage2", "rerank", "presence")  # the keys of _recipe_steps, stage 1 first


def _recipe_steps(cfg: DemoConfig) -> dict[str, int]:
    """The recipe's steps of stage 1, stage 2, the re-ranker and the presence head, scaled with
    the training minutes."""
    scale = cfg.train_minutes / DEMO_REFERENCE_MINUTES
    counts = (*cfg.stage_steps, cfg.presence_steps)
    return {k: max(1, round(n * scale)) for k, n in zip(RECIPE_STAGES, counts, strict=True)}


def _steps_trained(runs: Path, cfg: DemoConfig) -> dict[str, dict[str, int]]:
    """Each stage's steps, trained and in the recipe (scaled with the minutes): keep_budget, or
    a time cap, stops a stage early on a slow machine, and the figures should say so."""
    recipe = _recipe_steps(cfg)
    stats: dict[str, Any] = {}
    for run in ("stage1", "stage2", "rerank"):
        stats[run] = _run_stats(runs / run / "model")
    trained = {run: stats[run].get("steps") for run in ("stage1", "stage2", "rerank")}
    trained["presence"] = stats["rerank"].get("presence_steps")
    return {k: {"trained": int(v), "recipe": recipe[k]} for k, v in trained.items() if v is not None}


def _run_stats(model_dir: Path) -> dict[str, Any]:
    """A trained stage's stats (its checkpoint's ``training_args.json``), or {} without one."""
    path = model_dir / "training_args.json"
    return json.loads(path.read_text()).get("stats", {}) if path.is_file() else {}


def _steady_step_s(model_dir: Path) -> float | None:
    """A trained stage's steady step in seconds, or None."""
    value = _run_stats(model_dir).get("steady_step_s")
    return float(value) if value else None


def _say(limits: dict[str, Any]) -> str:
    minutes = limits["time_budget_s"] / 60
    return f"{limits['max_steps']} steps (at most {minutes:.1f} min)" if "max_steps" in limits else f"{minutes:.1f} min"


def _ingest(model_dir: Path, data: Path, milvus_uri: str) -> Any:
    from reir.ingestion.pipeline import run_ingestion
    from reir.platform.config import IngestConfig, MilvusConfig

    return run_ingestion(IngestConfig(gallery_root=data, split="test", model_path=str(model_dir),
                                      milvus=MilvusConfig(uri=milvus_uri), batch_size=32))


def _query_over_http(cfg: DemoConfig, model_dir: Path, milvus_uri: str, queries: list[Any], progress_bar: Any,
                     data: Path) -> tuple[dict[str, list[Any]], dict[str, list[dict[str, Any]]],
                                          dict[str, list[Any]], dict[str, Any]]:  # fmt: skip
    from ray import serve

    from reir.client import Client
    from reir.evaluation.metrics import Prediction
    from reir.serving.app import build_app
    from reir.serving.lifecycle import wait_until_routed

    quiet = {"log_level": "WARNING", "enable_access_log": False}  # one line per request would bury the table
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.http_port}, logging_config=quiet)
    serve.run(build_app({"model_path": str(model_dir), "milvus_uri": milvus_uri}), logging_config=quiet)
    wait_until_routed(f"http://127.0.0.1:{cfg.http_port}")
    client = Client(f"http://127.0.0.1:{cfg.http_port}")
    answers: dict[str, list[dict[str, Any]]] = {}
    ann_answers: dict[str, list[dict[str, Any]]] = {}
    try:
        with progress_bar("queries over HTTP", total=len(queries)) as advance, \
                ThreadPoolExecutor(cfg.query_concurrency) as pool:
            def one(q: Any) -> None:
                answers[q.query_id] = client.search(q.text, top_k=cfg.top_k)
                ann_answers[q.query_id] = client.search(q.text, top_k=cfg.top_k, rerank=False)  # ANN order alone
                advance(1)

            list(pool.map(one, queries))
        discovery = _discover_over_http(f"http://127.0.0.1:{cfg.http_port}", data, model_dir, milvus_uri)
    finally:
        serve.shutdown()
    predictions = {qid: [Prediction(r["image_id"], r["box"]) for r in rs] for qid, rs in answers.items()}
    ann = {qid: [Prediction(r["image_id"], r["box"]) for r in rs] for qid, rs in ann_answers.items()}
    return predictions, answers, ann, discovery


def _discover_over_http(url: str, data: Path, model_dir: Path, milvus_uri: str) -> dict[str, Any]:
    """``reir eval --discover --url``: the benchmark's test discovery queries, every page, over
    HTTP; the scores at the service's calibrated threshold and the seconds per query."""
    from reir.evaluation.discovery import evaluate_discovery
    from reir.platform.config import MilvusConfig

    found = evaluate_discovery(data, model_dir, milvus_uri=milvus_uri, collection=MilvusConfig().collection, url=url,
                               echo=lambda _: None)  # fmt: skip
    keep = ("num_queries", "empty_queries", "seconds_per_query", "by_kind")
    return {**found["at_calibrated_threshold"], **{k: found[k] for k in keep if k in found}}


def _report(console: Console, metrics: dict[str, Any], queries: list[Any],
            answers: dict[str, list[dict[str, Any]]]) -> None:
    from reir.evaluation.discovery import format_by_kind
    from reir.evaluation.metrics import format_table, is_hit
    from reir.evaluation.slices import format_slices

    console.print(format_table({k: v for k, v in metrics.items() if k not in ("slices", "discovery", "train_steps")}))
    steps = metrics.get("train_steps") or {}
    if steps:
        console.print("steps trained (of the recipe's): " + ", ".join(f"{k} {v['trained']}/{v['recipe']}"
                                                                     for k, v in steps.items()))
    if metrics.get("slices"):
        console.print("BR@k at IoU 0.5 by slice (held-out: phrasing families and scene regimes never trained on)")
        console.print(format_slices(metrics["slices"]))
    found = metrics.get("discovery")
    if found:
        console.print(f"discover mode, {found['num_queries']} queries ({found['empty_queries']} with no match), at the "
                      f"calibrated threshold {found['threshold']:.3f}: precision {found['precision']:.3f}, recall "
                      f"{found['recall']:.3f}, F1 {found['f1']:.3f}, none right {found['none_accuracy']:.3f}, joint "
                      f"{found['joint']:.3f}; {1000 * found['seconds_per_query']:.0f} ms per query over HTTP")
        for line in format_by_kind(found.get("by_kind") or {}):
            console.print(f"  {line}")
    for q in queries[:5]:
        top = answers[q.query_id][0] if answers[q.query_id] else None
        hit = bool(top and is_hit(top["image_id"], top["box"], q))
        where = f"{top['image_id']} box {[round(v) for v in top['box']]} score {top['score']:.3f}" if top else "-"
        console.print(f"  [{'green' if hit else 'red'}]{'hit ' if hit else 'miss'}[/] \"{q.text}\" -> {where} "
                      f"(truth {q.image_id} {[round(v) for v in q.box]})")
