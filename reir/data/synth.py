"""Synthetic REIR benchmark: scenes of colored shapes with exact referring expressions.

``generate(out_dir)`` writes the layout of docs/interfaces.md ("Synthetic benchmark
on disk"). Everything is a function of ``seed``: each image draws from its own
``default_rng([seed, stream, index])`` so results do not depend on ordering.

Ground truth: test sentences name exactly one instance of the whole test gallery
(and no other instance is even borderline, see ``reir.data.semantics``); train
sentences are made the same way, unique within a chunk of training images as large as
the test gallery, so training sees the test distribution of detail and the CLIA loss
never treats a true match in another image of the batch as a negative (an expression
unique among N images rarely matches anything in the few images of a batch); their
``matches`` list the referent (``meta.json: splits.train.matches_scope``); discovery
queries list every clear match in the test gallery (zero, or two and more). Training
discovery queries (``split: "train"``) are drawn the same way inside each chunk of training
images (``group``: the chunk's index, the negative group of ``reir.data.negative_groups``)
and phrased only in training families; they teach discover mode's presence decision.

Additions to the documented schema: ``sentences[].program`` (the structured
expression, ``Expr.to_program()``), entry ``background``, ``det_anno[].attributes``
= {shape, color, size, visible_fraction}; COCO files use integer image ids (the
number in "syn000123"), keep the string id in ``images[].image_key`` and also carry
``background`` and ``attributes``; category ids are 0-based indices of ``SHAPES``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reir.data.layouts import REGIMES, mixture_problems, pick_regime, split_mixture
from reir.data.phrasing import describe_query, describe_test, describe_train, describe_train_query, phrasing_meta
from reir.data.referring import (
    TestPlanner,
    discovery_expr,
)
from reir.data.scene import Rendered, sample_scene
from reir.data.semantics import (
    REL_NO_OFFSET,
    REL_YES_OFFSET,
    SIZE_NO_RATIO,
    SIZE_YES_RATIO,
    SUP_NO_OFFSET,
    SUP_YES_OFFSET,
    Expr,
    Gallery,
    Obj,
    Scene,
)
from reir.data.vocab import BACKGROUNDS, COLORS, SHAPES, SIZES, VOCABULARY

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
# Random streams: one per purpose so adding draws to one never shifts another.
_SCENE, _TEXT, _SPLIT, _DISCOVERY, _WORDS, _REGIME, _TRAIN_DISCOVERY, _TRAIN_QUERY_WORDS = 0, 1, 2, 3, 4, 5, 6, 7
P_TWO_TEST_TARGETS = 0.5
P_TRAIN_OBJECT = 0.9
TRAIN_PHRASINGS = 2  # gallery-unique expressions tried per training object
MIN_TRAIN_CHUNK = 50
EMPTY_DISCOVERY_FRACTION = 0.25
_QUERY_WORDS = 10  # stream of discovery query text: phrasing draws never shift the query choice

# Called with the steps finished since the last call (rich's advance(n)): each image counts
# twice, once drawn and once its expressions are planned (the longer part), so a progress bar
# of progress_total(num_images) moves through both.
Progress = Callable[[int], None]


def progress_total(num_images: int) -> int:
    """The steps ``generate`` reports to its ``progress`` for ``num_images`` images."""
    return 2 * num_images


# Train mixture of scene regimes (reir.data.layouts): half the classic 3-8 scattered
# objects, half denser and more look-alike scenes, because outside test sets are; "row" is
# held out. Measured with `make demo` (14 min of training, 2026-11-25): without the classic
# half ({"sparse": 0.3, "dense": 0.25, "lookalike": 0.2, "cluster": 0.15, "border": 0.1})
# the model was worse on every regime, dense and held-out "row" included (BR@1 5.7 vs 11.7%
# dense, 6.0 vs 21.5% row): within a short budget the classic scenes carry the learning.
DEFAULT_REGIMES: dict[str, float] = {"classic": 0.5, "sparse": 0.1, "dense": 0.15, "lookalike": 0.1,
                                     "cluster": 0.1, "border": 0.05}
DEFAULT_HELDOUT: tuple[str, ...] = ("row",)
HELDOUT_TEST_SHARE = 0.25  # of test images, split evenly over the held-out regimes


@dataclass(frozen=True)
class SynthConfig:
    """Generation settings; ``regimes`` weighs the train split's scene regimes and
    ``heldout_regimes`` appear only in the test split (``HELDOUT_TEST_SHARE`` of it)."""

    num_images: int = 2000
    test_fraction: float = 0.2
    image_size: int = 128
    seed: int = 0
    discovery_queries: int = 100
    train_discovery_queries: int = 200  # per chunk of training images
    regimes: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_REGIMES))
    heldout_regimes: tuple[str, ...] = DEFAULT_HELDOUT
    # Training images per chunk within which each training expression is unique (the chunks
    # are negative groups); None: as many as the test split holds (at least MIN_TRAIN_CHUNK),
    # so a training expression says as much as a test query must.
    train_chunk: int | None = None

    def mixture(self, split: str) -> dict[str, float]:
        """Regime weights of ``split`` (the test split adds the held-out regimes)."""
        return split_mixture(self.regimes, self.heldout_regimes, split, HELDOUT_TEST_SHARE)


@dataclass
class SynthSummary:
    out_dir: str
    config: SynthConfig
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    discovery: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    processes: int = 1  # that drew the images and planned the expressions
    stale_removed: int = 0  # images an earlier run left in out_dir/images (_remove_stale_images)


@dataclass
class _Item:
    """One generated image with its scene and bookkeeping."""

    index: int
    split: str
    rendered: Rendered
    sentences: dict[int, list[Expr]] = field(default_factory=dict)  # object index -> exprs

    @property
    def scene(self) -> Scene:
        return self.rendered.scene

    @property
    def file_name(self) -> str:
        return _file_name(self.split, self.scene.image_id)

    @property
    def regime(self) -> str:
        """Name of the scene regime the image was drawn from (reir.data.layouts)."""
        return self.rendered.regime


def _file_name(split: str, image_id: str) -> str:
    return f"images/{split}/{image_id}.jpg"


IMAGE_PREFIX = "syn"  # every generated image's key and file name start with it


def image_key(index: int) -> str:
    return f"{IMAGE_PREFIX}{index:06d}"


def _rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def _assign_splits(cfg: SynthConfig) -> list[str]:
    n_test = round(cfg.num_images * cfg.test_fraction)
    if cfg.num_images >= 2:
        n_test = min(max(n_test, 1), cfg.num_images - 1)  # both splits non-empty
    test = set(_rng(cfg.seed, _SPLIT).permutation(cfg.num_images)[:n_test].tolist())
    return ["test" if k in test else "train" for k in range(cfg.num_images)]


# Drawing the images and planning the expressions (2,000 images: ~25 s in one process on a
# 2-core machine, most of it planning) run in processes on the machine's cores from this many
# images on. Every image and every chunk of images draws from its own random stream, so the
# output is the same either way.
PARALLEL_MIN_IMAGES = 400
_RENDER_CHUNK = 50

Job = tuple[int, str, str, int, int, str]  # (index, split, regime, image size, seed, out dir)


@contextmanager
def _process_pool(num_images: int, workers: int | None) -> Iterator[tuple[ProcessPoolExecutor | None, int]]:
    """``workers`` processes (None: the cores, for a benchmark of ``PARALLEL_MIN_IMAGES`` and
    more) and their count, or (None, 1): this process does everything. Forked ones (spawned ones would re-import
    the caller's main script), and only from a process without other threads, whose locks a
    child could inherit held."""
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if num_images >= PARALLEL_MIN_IMAGES else 1
    if workers < 2 or threading.active_count() > 1:
        yield None, 1
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield pool, workers


def _render_all(cfg: SynthConfig, out: Path, progress: Progress | None,
                pool: ProcessPoolExecutor | None) -> list[_Item]:  # fmt: skip
    mixtures = {split: cfg.mixture(split) for split in ("train", "test")}
    # Own stream: choosing a regime never shifts the scene, text or split draws.
    jobs = [(k, split, pick_regime(mixtures[split], _rng(cfg.seed, _REGIME, k)), cfg.image_size, cfg.seed, str(out))
            for k, split in enumerate(_assign_splits(cfg))]
    rendered = pool.map(_render_one, jobs, chunksize=_RENDER_CHUNK) if pool else map(_render_one, jobs)
    items: list[_Item] = []
    next_ann = 1
    for (k, split, *_), r in zip(jobs, rendered, strict=True):
        objs = r.scene.objects
        r.scene.objects = [dataclasses.replace(o, ann_id=next_ann + j) for j, o in enumerate(objs)]
        next_ann += len(objs)
        items.append(_Item(k, split, r))
        if progress is not None:
            progress(1)
    return items


def _render_one(job: Job) -> Rendered:
    """Draw image ``k`` of the benchmark and write it; the image itself is not kept."""
    k, split, regime, size, seed, out = job
    rendered = sample_scene(image_key(k), size, _rng(seed, _SCENE, k), regime)
    assert rendered.image is not None
    rendered.image.save(Path(out) / _file_name(split, rendered.scene.image_id), "JPEG", quality=90)
    return dataclasses.replace(rendered, image=None)


Sentences = dict[int, list[Expr]]  # object index -> expressions


def _choose_sentences(by_split: dict[str, list[_Item]], seed: int, chunk_size: int,
                      pool: ProcessPoolExecutor | None, progress: Progress | None) -> None:  # fmt: skip
    """Each test image's and each training image's expressions (``_Item.sentences``): the test
    gallery is planned as one, the training images in chunks of ``chunk_size``; ``progress``
    hears of each group's images as the group is done."""
    train = by_split["train"]
    groups = [("test", by_split["test"])] + [("train", train[k:k + chunk_size]) for k in range(0, len(train), chunk_size)]
    jobs = [(kind, [it.scene for it in group], [it.index for it in group], seed) for kind, group in groups]
    for (_, group), chosen in zip(groups, pool.map(_plan, jobs) if pool else map(_plan, jobs), strict=True):
        for it, sentences in zip(group, chosen, strict=True):
            it.sentences = sentences
        if progress is not None:
            progress(len(group))


def _plan(job: tuple[str, list[Scene], list[int], int]) -> list[Sentences]:
    kind, scenes, indices, seed = job
    choose = _test_sentences if kind == "test" else _train_sentences
    planner = TestPlanner(Gallery(scenes))
    return [choose(planner, s, len(scene.objects), _rng(seed, _TEXT, index))
            for s, (scene, index) in enumerate(zip(scenes, indices, strict=True))]


def _test_sentences(planner: TestPlanner, s: int, num_objects: int, rng: np.random.Generator) -> Sentences:
    """1-2 targets of test image ``s``, each with one gallery-unique expression."""
    sentences: Sentences = {}
    wanted = 1 + int(rng.random() < P_TWO_TEST_TARGETS)
    for i in rng.permutation(num_objects).tolist():
        expr = planner.expression(s, i, rng)
        if expr is not None:
            sentences[i] = [expr]
            if len(sentences) >= wanted:
                break
    return sentences


def _train_sentences(planner: TestPlanner, s: int, num_objects: int, rng: np.random.Generator) -> Sentences:
    """Gallery-style expressions of training image ``s``: unique within its chunk of images."""
    sentences: Sentences = {}
    for i in range(num_objects):
        if rng.random() >= P_TRAIN_OBJECT:
            continue
        exprs: list[Expr] = []
        for _ in range(TRAIN_PHRASINGS):
            expr = planner.expression(s, i, rng)
            if expr is not None and expr not in exprs:
                exprs.append(expr)
        if exprs:
            sentences[i] = exprs
    return sentences


def _anno(obj: Obj, visible: float) -> dict[str, Any]:
    return {
        "ann_id": obj.ann_id,
        "bbox": list(obj.box),
        "category_name": obj.shape,
        "category_id": SHAPES.index(obj.shape),
        "attributes": {"shape": obj.shape, "color": obj.color, "size": obj.size,
                       "visible_fraction": round(visible, 4)},
    }


def _entries(item: _Item, rng: np.random.Generator, next_sent: list[int]) -> list[dict[str, Any]]:
    """reircoco.json entries of one image (one per target instance)."""
    scene = item.scene
    dets = [_anno(o, v) for o, v in zip(scene.objects, item.rendered.visible)]
    out = []
    describe = describe_train if item.split == "train" else describe_test  # test: train + held-out family
    for i, exprs in sorted(item.sentences.items()):
        sentences = []
        for expr in exprs:
            for family, raw in describe(expr, rng):
                sentences.append({
                    "sent_id": f"sent{next_sent[0]:07d}", "raw": raw, "family": family,
                    "matches": [{"image_id": scene.image_id, "ann_id": scene.objects[i].ann_id}],
                    "program": expr.to_program(),
                })
                next_sent[0] += 1
        out.append({
            "image_id": scene.image_id, "file_name": item.file_name,
            "height": scene.height, "width": scene.width, "split": item.split,
            "background": scene.background, "regime": item.regime, "sentences": sentences,
            "ref_anno": dets[i], "det_anno": dets,
        })
    return out


def _coco(items: list[_Item], split: str) -> dict[str, Any]:
    images, annotations = [], []
    for it in items:
        sc = it.scene
        images.append({"id": it.index, "file_name": it.file_name, "width": sc.width,
                       "height": sc.height, "image_key": sc.image_id, "background": sc.background})
        for obj, vis, pix in zip(sc.objects, it.rendered.visible, it.rendered.pixels):
            annotations.append({
                "id": obj.ann_id, "image_id": it.index, "category_id": SHAPES.index(obj.shape),
                "bbox": list(obj.box), "area": float(pix), "iscrowd": 0,
                "attributes": _anno(obj, vis)["attributes"],
            })
    categories = [{"id": k, "name": s, "supercategory": "shape"} for k, s in enumerate(SHAPES)]
    info = {"description": f"reir synthetic REIR benchmark ({split})", "version": GENERATOR_VERSION}
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def _discovery(items: list[_Item], cfg: SynthConfig) -> list[dict[str, Any]]:
    """The test gallery's discovery queries (any phrasing family)."""
    return _discovery_queries(items, cfg.discovery_queries, _rng(cfg.seed, _DISCOVERY),
                              lambda k: _rng(cfg.seed, _QUERY_WORDS, k), describe_query, split="test", prefix="disc")


def _train_discovery(chunks: list[list[_Item]], cfg: SynthConfig) -> list[dict[str, Any]]:
    """``cfg.train_discovery_queries`` per chunk of training images, complete over the chunk,
    phrased in training families only (held-out families stay held out)."""
    out: list[dict[str, Any]] = []
    for g, chunk in enumerate(chunks):
        for q in _discovery_queries(chunk, cfg.train_discovery_queries, _rng(cfg.seed, _TRAIN_DISCOVERY, g),
                                    lambda k, g=g: _rng(cfg.seed, _TRAIN_QUERY_WORDS, g * 1_000_003 + k),
                                    describe_train_query, split="train", prefix=f"tdisc{g:03d}_"):  # fmt: skip
            out.append({**q, "group": g})
    return out


def _discovery_queries(items: list[_Item], count: int, rng: np.random.Generator,
                       words: Callable[[int], np.random.Generator], phrase: Callable[..., tuple[str, str]], *,
                       split: str, prefix: str) -> list[dict[str, Any]]:  # fmt: skip
    """``count`` distinct category-level queries over ``items`` (``EMPTY_DISCOVERY_FRACTION`` of
    them with no match), each with every clear match among ``items``."""
    gallery = Gallery([it.scene for it in items])
    n_empty = round(count * EMPTY_DISCOVERY_FRACTION)
    queries: list[dict[str, Any]] = []
    seen: set[Expr] = set()
    for q in range(count * 20):
        if len(queries) >= count:
            break
        found = discovery_expr(gallery, rng, want_empty=len(queries) < n_empty)
        if found is None or found[0] in seen:
            continue
        expr, hits = found
        seen.add(expr)
        matches = [{"image_id": gallery.scenes[s].image_id, "ann_id": gallery.scenes[s].objects[i].ann_id,
                    "bbox": list(gallery.scenes[s].objects[i].box)} for s, i in hits]
        article = "a" if rng.random() < 0.5 else "the"
        family, raw = phrase(expr, words(len(queries)), article)
        queries.append({"query_id": f"{prefix}{len(queries):04d}", "split": split, "raw": raw, "family": family,
                        "matches": matches, "program": expr.to_program()})
    return queries


def _write_json(path: Path, obj: Any) -> None:
    # json.dumps uses the C encoder; json.dump to a file would take the slow Python path.
    path.write_text(json.dumps(obj, separators=(",", ":")))


def _split_stats(
    items: list[_Item], entries: list[dict[str, Any]], scope: str, chunk_size: int | None = None
) -> dict[str, Any]:
    extra = {} if chunk_size is None else {"chunk_size": chunk_size}
    counts = [len(it.scene.objects) for it in items] or [0]
    # Per regime, how many images got at least one target: dense and look-alike scenes
    # are the hardest to describe uniquely, so this shows whether they are covered.
    referred = {e["image_id"] for e in entries}
    with_refs = Counter(it.regime for it in items if it.scene.image_id in referred)
    return {**extra,
        "num_images": len(items),
        "num_instances": sum(len(it.scene.objects) for it in items),
        "num_refs": len(entries),
        "num_sentences": sum(len(e["sentences"]) for e in entries),
        "matches_scope": scope,
        "objects_per_image": {"min": min(counts), "mean": round(float(np.mean(counts)), 3), "max": max(counts)},
        "images_with_refs": dict(sorted(with_refs.items())),
    }


def _regime_meta(cfg: SynthConfig, by_split: dict[str, list[_Item]]) -> dict[str, Any]:
    """Mixtures, recipes and per-split image counts of the scene regimes."""
    counts = {split: dict(sorted(Counter(it.regime for it in items).items())) for split, items in by_split.items()}
    used = sorted({*cfg.regimes, *cfg.heldout_regimes})
    return {
        "train_mixture": dict(cfg.regimes), "heldout": list(cfg.heldout_regimes),
        "test_mixture": {k: round(v, 6) for k, v in sorted(cfg.mixture("test").items())},
        "heldout_test_share": HELDOUT_TEST_SHARE if cfg.heldout_regimes else 0.0,
        "counts": counts, "definitions": {name: REGIMES[name].describe() for name in used},
    }


def _meta(cfg: SynthConfig, splits: dict[str, Any], discovery: dict[str, int],
          by_split: dict[str, list[_Item]]) -> dict[str, Any]:
    return {
        "seed": cfg.seed, "num_images": cfg.num_images, "image_size": cfg.image_size,
        "test_fraction": cfg.test_fraction, "generator_version": GENERATOR_VERSION,
        "splits": splits, "discovery": discovery,
        "categories": SHAPES, "category_id_base": 0, "colors": COLORS, "sizes": SIZES,
        "backgrounds": BACKGROUNDS, "vocabulary": VOCABULARY,
        "coco_image_id": "integer index of 'synNNNNNN'; the string id is images[].image_key",
        "box_format": "xywh absolute pixels, tight bounds of the whole (amodal) shape within the "
                      "image: a shape cut by the image border (border regime) is boxed by its "
                      "in-image part, and its cut-off pixels count as hidden in visible_fraction",
        "regimes": _regime_meta(cfg, by_split),
        "phrasing": phrasing_meta(),
        "semantics": {
            "relation_yes_offset": REL_YES_OFFSET, "relation_no_offset": REL_NO_OFFSET,
            "superlative_yes_offset": SUP_YES_OFFSET, "superlative_no_offset": SUP_NO_OFFSET,
            "size_yes_ratio": SIZE_YES_RATIO, "size_no_ratio": SIZE_NO_RATIO,
            "definition": "reir.data.semantics.evaluate (three-valued; matches = YES, no MAYBE)",
        },
    }


def _coco_with_regimes(items: list[_Item], split: str) -> dict[str, Any]:
    """The COCO file of ``split`` with each ``images[]`` record's scene regime."""
    coco = _coco(items, split)
    for record, it in zip(coco["images"], items, strict=True):
        record["regime"] = it.regime
    return coco


def generate(
    out_dir: str | Path,
    *,
    num_images: int = 2000,
    test_fraction: float = 0.2,
    image_size: int = 128,
    seed: int = 0,
    discovery_queries: int = 100,
    train_discovery_queries: int = 200,
    regimes: Mapping[str, float] | None = None,
    heldout_regimes: tuple[str, ...] = DEFAULT_HELDOUT,
    progress: Progress | None = None,
    workers: int | None = None,
    train_chunk: int | None = None,
) -> SynthSummary:
    """Write the synthetic benchmark to ``out_dir``; ``progress(n)`` as images are drawn and
    planned (``progress_total(num_images)`` steps in all).
    ``regimes`` (train mixture) defaults to ``DEFAULT_REGIMES``. ``workers``: processes that
    draw and plan (``_process_pool``; the output does not depend on it). ``train_chunk``: see
    :class:`SynthConfig` (a benchmark of training images only, ``test_fraction=0``, needs it to
    plan expressions as specific as another benchmark's test queries)."""
    start = time.perf_counter()
    mixture = dict(DEFAULT_REGIMES if regimes is None else regimes)
    cfg = SynthConfig(num_images, test_fraction, image_size, seed, discovery_queries, train_discovery_queries,
                      mixture, tuple(heldout_regimes), train_chunk)
    problems = mixture_problems(cfg.regimes, cfg.heldout_regimes)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if train_chunk is not None and train_chunk < 1:
        problems.append(f"train_chunk must be >= 1, got {train_chunk}")
    if num_images < 1 or not 0.0 <= test_fraction <= 1.0 or image_size < 32 or problems:
        raise ValueError(f"invalid synth config {cfg}: {'; '.join(problems)}")
    out = Path(out_dir)
    for split in ("train", "test"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    with _process_pool(num_images, workers) as (pool, processes):
        items = _render_all(cfg, out, progress, pool)
        by_split = {s: [it for it in items if it.split == s] for s in ("train", "test")}
        chunk = train_chunk or max(MIN_TRAIN_CHUNK, len(by_split["test"]))
        _choose_sentences(by_split, seed, chunk, pool, progress)
    stale = _remove_stale_images(out, items)
    entries: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    next_sent = [0]
    for it in items:
        entries[it.split] += _entries(it, _rng(seed, _WORDS, it.index), next_sent)
    discovery = _discovery(by_split["test"], cfg) if by_split["test"] else []
    train_chunks = [by_split["train"][k:k + chunk] for k in range(0, len(by_split["train"]), chunk)]
    train_discovery = _train_discovery(train_chunks, cfg)
    _write_json(out / "reircoco.json", entries["train"] + entries["test"])
    for split in ("train", "test"):
        _write_json(out / f"instances_{split}.json", _coco_with_regimes(by_split[split], split))
    _write_json(out / "discovery.json", {"queries": discovery + train_discovery})
    n_empty = sum(not q["matches"] for q in discovery)
    disc_stats = {"total": len(discovery), "empty": n_empty, "multi": len(discovery) - n_empty,
                  "train": len(train_discovery), "train_empty": sum(not q["matches"] for q in train_discovery)}
    scope = {"train": f"chunk of {chunk} train images", "test": "gallery"}
    splits = {
        "train": _split_stats(by_split["train"], entries["train"], scope["train"], chunk),
        "test": _split_stats(by_split["test"], entries["test"], scope["test"]),
    }
    _write_json(out / "meta.json", _meta(cfg, splits, disc_stats, by_split))
    return SynthSummary(str(out), cfg, splits, disc_stats, time.perf_counter() - start, processes, stale)


def _remove_stale_images(out: Path, items: list[_Item]) -> int:
    """Removes the generator's images (``syn*.jpg``) under ``out/images/{split}/`` that this run
    did not write: an earlier run into the same folder with another ``num_images``,
    ``test_fraction`` or seed drew other images, or put an image in the other split, and the
    test folder is the gallery ``reir ingest`` indexes. (A run of 3,000 images into the folder
    of one of 2,000 left 323 such images in images/test, and the demo indexed them as
    distractors that no ground truth names.) Other files are left alone. Returns the count."""
    written = {out / it.file_name for it in items}
    removed = 0
    for split in ("train", "test"):
        for path in (out / "images" / split).glob(f"{IMAGE_PREFIX}*.jpg"):
            if path not in written:
                path.unlink()
                removed += 1
    if removed:
        log.warning("synth: removed %d images an earlier run left in %s/images", removed, out)
    return removed


def load_gallery(root: str | Path, split: str) -> Gallery:
    """Scenes of ``split`` rebuilt from ``instances_{split}.json`` (attributes + boxes)."""
    with open(Path(root) / f"instances_{split}.json") as f:
        coco = json.load(f)
    scenes: dict[int, Scene] = {}
    for img in coco["images"]:
        scenes[img["id"]] = Scene(img["image_key"], img["width"], img["height"], img["background"])
    for ann in sorted(coco["annotations"], key=lambda a: a["id"]):
        attrs = ann["attributes"]
        obj = Obj(attrs["shape"], attrs["color"], attrs["size"], tuple(ann["bbox"]), ann["id"])
        scenes[ann["image_id"]].objects.append(obj)
    return Gallery([scenes[k] for k in sorted(scenes)])
