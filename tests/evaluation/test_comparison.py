"""reir vs the baselines on a tiny model and a tiny generated benchmark (real milvus-lite)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from reir.data.formats import load_samples, test_queries
from reir.data.synth import generate
from reir.evaluation.baseline_models import GalleryReranker
from reir.evaluation.comparison import (
    BaselineSystems,
    QualityConfig,
    encode_gallery,
    gallery_image_vectors,
    run_comparison,
    select_queries,
    shares_weights,
    write_index,
)
from reir.model import create_model
from reir.serving.rerank import Reranker
from reir.serving.retriever import QueryEncoder

KEYS = {"BR@1@0.5", "BR@5@0.5", "BR@10@0.5", "seconds_per_query", "num_queries"}
SYSTEMS = ["reir", "reir_ann", "two_stage", "two_stage_rescored", "rerank_scan", "rerank_scan_cached", "weak"]


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("quality") / "data"
    generate(root, num_images=16, test_fraction=0.5, image_size=64, seed=3, discovery_queries=0)
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny model with a (fresh) re-ranker, as reir serves it, and the same weights plus a
    (fresh) image-level retrieval head: the two-stage system's checkpoint."""
    torch.manual_seed(1)
    model, processor = create_model("tiny")
    model.add_reranker(hidden_size=16)
    root = tmp_path_factory.mktemp("models")
    model.save_pretrained(root / "tiny-rerank")
    processor.save_pretrained(root / "tiny-rerank")
    model.add_image_retrieval(hidden_size=16)
    model.save_pretrained(root / "tiny-two-stage")
    processor.save_pretrained(root / "tiny-two-stage")
    return root / "tiny-rerank", root / "tiny-two-stage"


def test_gallery_reranker_scores_as_the_serving_reranker(bench_root: Path, checkpoints: tuple[Path, Path],
                                                        tmp_path: Path) -> None:  # fmt: skip
    """The scan's batched re-ranker gives, image by image, the serving re-ranker's logits."""
    rerank_dir, _ = checkpoints
    samples = load_samples(bench_root, "test")
    encoded = encode_gallery(rerank_dir, samples, top_k=5, batch_size=4)
    gallery = encoded.instance_gallery()
    model, processor = create_model(rerank_dir)
    model.eval()
    encoder = QueryEncoder(model, processor)
    query = encoder.encode_queries([test_queries(bench_root)[0].text])[0]
    from reir.platform.store import MilvusStore

    write_index(encoded, tmp_path / "idx.db")
    with MilvusStore(str(tmp_path / "idx.db"), "quality") as store:
        store.load()
        rows = store.rows_for_images(list(gallery.image_ids))
    serving = Reranker(model, processor, calibration=encoder.calibration)
    scored = {h.pk: p for h, p in serving.rerank(query, [r for rs in rows.values() for r in rs], rows)}
    every = np.arange(len(gallery.image_ids))
    logits = GalleryReranker(model, gallery).ground(query)(every)
    # the text-free half computed once for the gallery gives the same logits, on any subset
    np.testing.assert_allclose(GalleryReranker(model, gallery, cache=True).ground(query)(every), logits, atol=1e-5)
    some = every[::-3]
    np.testing.assert_allclose(GalleryReranker(model, gallery, cache=True).ground(query)(some), logits[some],
                               atol=1e-5)  # fmt: skip
    for i, image_id in enumerate(gallery.image_ids):
        want = [scored[r.pk] for r in rows[image_id]]
        got = 1.0 / (1.0 + np.exp(-logits[i, : len(want)]))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        assert np.isneginf(logits[i, len(want):]).all()


def test_rankings_are_well_formed(bench_root: Path, checkpoints: tuple[Path, Path]) -> None:
    rerank_dir, two_stage_dir = checkpoints
    samples = load_samples(bench_root, "test")
    sizes = {s.image_id: (s.width, s.height) for s in samples}
    encoded = encode_gallery(rerank_dir, samples, top_k=5, batch_size=4)
    assert encoded.images == len(samples) and encoded.failures == 0
    gallery = encoded.instance_gallery()
    vectors, _ = gallery_image_vectors(two_stage_dir, samples, gallery, batch_size=4)
    assert vectors.shape == (len(gallery.image_ids), 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    answers = BaselineSystems(rerank_dir, gallery, retriever_dir=two_stage_dir, image_vectors=vectors,
                              rescore_pool=6).answers()  # fmt: skip
    assert set(answers) == {"two_stage", "two_stage_rescored", "rerank_scan", "rerank_scan_cached"}
    for q in test_queries(bench_root)[:4]:
        for name, answer in answers.items():
            preds = answer(q.text, 5)
            ids = [p.image_id for p in preds]
            assert len(preds) == min(5, len(gallery.image_ids)), name
            assert len(set(ids)) == len(ids) and set(ids) <= set(sizes), name  # one box per gallery image
            # best first (two_stage: the retriever's image scores, the others the re-ranker's)
            assert all(a.score >= b.score for a, b in itertools.pairwise(preds)), name
            for p in preds:
                x, y, w, h = p.box
                width, height = sizes[p.image_id]
                assert w > 0 and h > 0 and x >= -1e-3 and y >= -1e-3, name
                assert x + w <= width + 1e-3 and y + h <= height + 1e-3, name
        # the scan's top image is the image holding the best re-ranked instance of the gallery
        scan = answers["rerank_scan"](q.text, len(gallery.image_ids))
        assert len(scan) == len(gallery.image_ids)
        cached = answers["rerank_scan_cached"](q.text, len(gallery.image_ids))
        assert [(p.image_id, p.box) for p in cached] == [(p.image_id, p.box) for p in scan]
        rescored = answers["two_stage_rescored"](q.text, 5)
        # its pool (6 images) is a subset of the gallery: its best cannot beat the scan's best
        assert rescored[0].score <= scan[0].score + 1e-6


def test_two_stage_checkpoint_shares_reir_weights(checkpoints: tuple[Path, Path], tiny_checkpoint: Path) -> None:
    rerank_dir, two_stage_dir = checkpoints
    assert shares_weights(rerank_dir, two_stage_dir)
    assert not shares_weights(tiny_checkpoint, two_stage_dir)


def test_run_comparison_reports_every_system(bench_root: Path, checkpoints: tuple[Path, Path], tiny_checkpoint: Path,
                                             tmp_path: Path) -> None:  # fmt: skip
    rerank_dir, two_stage_dir = checkpoints
    lines: list[str] = []
    cfg = QualityConfig(data_root=bench_root, model_dir=rerank_dir, work_dir=tmp_path, weak_model_dir=tiny_checkpoint,
                        two_stage_model_dir=two_stage_dir, max_queries=5, top_k_instances=5, batch_size=4,
                        rescore_pool=4, scale_images=20, scale_queries=3, pools=(2,), ann_min_rows=0)  # fmt: skip
    out = run_comparison(cfg, echo=lines.append)
    every = [*SYSTEMS[:2], "reir_pool2", *SYSTEMS[2:]]  # reir with a re-rank pool of 2 after reir's own rows
    assert set(out) == {*every, "setup", "scale"}
    for name in every:
        m = out[name]
        assert set(m) == KEYS | {"slices"}, name  # the generated benchmark has families and regimes
        assert {"in_family", "heldout_family"} <= set(m["slices"]), name
        assert m["num_queries"] == 5 and m["seconds_per_query"] > 0, name
        assert 0.0 <= m["BR@1@0.5"] <= m["BR@5@0.5"] <= m["BR@10@0.5"] <= 1.0, name
    setup = out["setup"]
    assert setup["gallery_images"] == len(load_samples(bench_root, "test"))
    assert setup["two_stage_shares_reir_weights"] is True and "image_vectors" not in setup
    recall = setup["two_stage_image_recall"]
    assert 0.0 <= recall["image_R@1"] <= recall["image_R@10"] <= recall["image_R@50"] == 1.0  # 8 test images
    table = next(line for line in lines if line.startswith("| system | BR@1")).splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == [f"| {s}" for s in every]
    heldout = next(line for line in lines if "heldout_family BR@1" in line).splitlines()
    assert [row.split(" | ")[0] for row in heldout[2:]] == [f"| {s}" for s in every]
    scale = out["scale"]
    assert scale["copies"] == 3 and scale["images"] == 3 * setup["gallery_images"]
    assert set(scale["systems"]) == {"reir", "reir_in_memory_index", "reir_pool2", *SYSTEMS[2:-1]}
    assert set(scale["cost_ratio"]) == {f"{a}/{b}" for a in SYSTEMS[4:6]
                                        for b in ("reir", "reir_in_memory_index", "reir_pool2")}  # fmt: skip
    assert all(m["queries"] == 3 and m["ms_per_query"] > 0 for m in scale["systems"].values())


def test_without_a_retriever_there_are_no_two_stage_rows(bench_root: Path, checkpoints: tuple[Path, Path],
                                                         tmp_path: Path) -> None:  # fmt: skip
    cfg = QualityConfig(data_root=bench_root, model_dir=checkpoints[0], work_dir=tmp_path, max_queries=2,
                        top_k_instances=5, batch_size=4)  # fmt: skip
    out = run_comparison(cfg, echo=lambda _: None)
    assert set(out) == {"reir", "reir_ann", "rerank_scan", "rerank_scan_cached", "weak", "setup"}
    assert out["weak"] is None
    # a checkpoint with the head serves as its own two-stage model
    own = QualityConfig(data_root=bench_root, model_dir=checkpoints[1], work_dir=tmp_path / "own", max_queries=2,
                        top_k_instances=5, batch_size=4)  # fmt: skip
    assert {"two_stage", "two_stage_rescored"} <= set(run_comparison(own, echo=lambda _: None))


def test_select_queries_is_a_seeded_ordered_sample(bench_root: Path) -> None:
    queries = test_queries(bench_root)
    some = select_queries(queries, 3, seed=0)
    assert len(some) == 3 and some == select_queries(queries, 3, seed=0)
    assert [queries.index(q) for q in some] == sorted(queries.index(q) for q in some)
    assert select_queries(queries, None, seed=0) == queries
    with pytest.raises(ValueError, match="max_queries"):
        select_queries(queries, 0, seed=0)
