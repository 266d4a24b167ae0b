"""reir vs the baselines on a tiny model and a tiny generated benchmark (real milvus-lite)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reir.data.formats import load_samples, test_queries
from reir.data.synth import generate
from reir.evaluation.comparison import (
    QualityConfig,
    baseline_answers,
    encode_gallery,
    run_comparison,
    select_queries,
    write_index,
)
from reir.model import create_model

KEYS = {"BR@1@0.5", "BR@5@0.5", "BR@10@0.5", "seconds_per_query", "num_queries"}


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("quality") / "data"
    generate(root, num_images=16, test_fraction=0.5, image_size=64, seed=3, discovery_queries=0)
    return root


@pytest.fixture(scope="module")
def rerank_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a (fresh) re-ranker, so reir's re-rank stage runs too."""
    torch.manual_seed(1)
    model, processor = create_model("tiny")
    model.add_reranker(hidden_size=16)
    path = tmp_path_factory.mktemp("models") / "tiny-rerank"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_rankings_are_well_formed(bench_root: Path, rerank_checkpoint: Path, tmp_path: Path) -> None:
    samples = load_samples(bench_root, "test")
    sizes = {s.image_id: (s.width, s.height) for s in samples}
    encoded = encode_gallery(rerank_checkpoint, samples, top_k=5, batch_size=4)
    assert encoded.images == len(samples) and encoded.failures == 0
    gallery = encoded.instance_gallery()
    assert write_index(encoded, tmp_path / "idx.db") == len(gallery.boxes)
    answers = baseline_answers(rerank_checkpoint, gallery)
    model, processor = create_model(rerank_checkpoint)
    model.eval()
    for q in test_queries(bench_root)[:4]:
        for name, answer in answers.items():
            preds = answer(q.text, 10)
            ids = [p.image_id for p in preds]
            assert len(preds) == min(10, len(gallery.image_ids)), name
            assert len(set(ids)) == len(ids) and set(ids) <= set(sizes), name  # one box per gallery image
            assert all(s1 >= s2 for s1, s2 in zip([p.score for p in preds], [p.score for p in preds[1:]])), name
            for p in preds:
                x, y, w, h = p.box
                width, height = sizes[p.image_id]
                assert w > 0 and h > 0 and x >= -1e-3 and y >= -1e-3, name
                assert x + w <= width + 1e-3 and y + h <= height + 1e-3, name
        # the scan's first answer is the best-scoring stored instance of the whole gallery
        with torch.no_grad():
            text = model.encode_text(**processor.text([q.text])).embeddings
            logits = model.score(text, torch.from_numpy(gallery.embeddings))[0].numpy()
        best = int(np.argmax(logits))
        top = answers["rec_scan"](q.text, 1)[0]
        assert tuple(top.box) == pytest.approx(tuple(gallery.boxes[best]))
        assert top.image_id == gallery.image_ids[int(np.searchsorted(gallery.starts, best, side="right")) - 1]


def test_run_comparison_reports_every_system(bench_root: Path, rerank_checkpoint: Path, tiny_checkpoint: Path,
                                             tmp_path: Path) -> None:  # fmt: skip
    lines: list[str] = []
    cfg = QualityConfig(data_root=bench_root, model_dir=rerank_checkpoint, work_dir=tmp_path,
                        weak_model_dir=tiny_checkpoint, max_queries=5, top_k_instances=5, batch_size=4)  # fmt: skip
    out = run_comparison(cfg, echo=lines.append)
    assert set(out) == {"reir", "reir_ann", "two_stage", "rec_scan", "weak", "setup"}
    for name in ("reir", "reir_ann", "two_stage", "rec_scan", "weak"):
        m = out[name]
        assert set(m) == KEYS | {"slices"}, name  # the generated benchmark has families and regimes
        assert {"in_family", "heldout_family"} <= set(m["slices"]), name
        assert m["num_queries"] == 5 and m["seconds_per_query"] > 0, name
        assert 0.0 <= m["BR@1@0.5"] <= m["BR@5@0.5"] <= m["BR@10@0.5"] <= 1.0, name
    assert out["setup"]["gallery_images"] == len(load_samples(bench_root, "test"))
    systems = ["| reir", "| reir_ann", "| two_stage", "| rec_scan", "| weak"]
    table = next(line for line in lines if line.startswith("| system | BR@1")).splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == systems
    heldout = lines[-1].splitlines()  # in-family vs held-out, one row per system
    assert "heldout_family BR@1" in heldout[0]
    assert [row.split(" | ")[0] for row in heldout[2:]] == systems


def test_select_queries_is_a_seeded_ordered_sample(bench_root: Path) -> None:
    queries = test_queries(bench_root)
    some = select_queries(queries, 3, seed=0)
    assert len(some) == 3 and some == select_queries(queries, 3, seed=0)
    assert [queries.index(q) for q in some] == sorted(queries.index(q) for q in some)
    assert select_queries(queries, None, seed=0) == queries
    with pytest.raises(ValueError, match="max_queries"):
        select_queries(queries, 0, seed=0)
