from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest

from reir.ingestion.encoder import InstanceEncoder
from reir.platform.modeling import load_reir_model
from reir.platform.schema import ROW_FIELDS, rows_from_columns
from reir.platform.store import Hit, MilvusStore
from reir.serving.pipeline import LocalStages, QueryPipeline, QueryRequest, answer
from reir.serving.rerank import Reranker, ann_order
from reir.serving.retriever import Calibration, QueryEncoder, Result
from tests.platform.fakes import BIAS, SCALE, FakeModel, FakeProcessor, quadrant_image


def _hit(pk: str, image_id: str, box: tuple[float, float, float, float], score: float) -> Hit:
    return Hit(pk, image_id, f"/g/{image_id}.jpg", box, score, 0.9, "v")


def test_ann_answer_orders_by_logit_and_dedupes_per_image() -> None:
    hits = [
        _hit("a0", "a", (0, 0, 10, 10), 0.50),
        _hit("a1", "a", (0, 0, 10, 10.5), 0.49),  # near-duplicate of a0: dropped
        _hit("a2", "a", (20, 20, 10, 10), 0.40),  # another object of the same image: kept
        _hit("b0", "b", (0, 0, 10, 10), 0.45),  # same box, other image: kept
        _hit("c0", "c", (0, 0, 5, 5), 0.10),
    ]
    cal = Calibration(scale=10.0, bias=-2.0)
    results = answer(ann_order(hits, cal), mode="rank", top_k=3, threshold=0.5, dedupe_iou=0.9)
    assert [r.pk for r in results] == ["a0", "b0", "a2"]
    top = results[0]
    assert top.logit == pytest.approx(3.0, abs=1e-6) and top.score == pytest.approx(1 / (1 + np.exp(-3.0)))
    assert top.ann_score == 0.5 and top.to_wire() == {"image_id": "a", "uri": "/g/a.jpg", "box": [0, 0, 10, 10], "score": top.score,
                                                   "refined": False}


def test_calibration_probe_recovers_affine_score_and_flags_others() -> None:
    model = FakeModel()
    cal = Calibration.probe(model.score, 8)
    assert cal.exact and cal.scale == pytest.approx(SCALE) and cal.bias == pytest.approx(BIAS)
    cubic = Calibration.probe(lambda t, i: (np.asarray(t) @ np.asarray(i).T) ** 3, 8)
    assert not cubic.exact and (cubic.scale, cubic.bias) == (1.0, 0.0)


def _jpeg_bytes(colors: tuple[str, str, str, str]) -> bytes:
    buf = io.BytesIO()
    quadrant_image(colors).save(buf, format="PNG")
    return buf.getvalue()


def _fill(store: MilvusStore, version: str, galleries: dict[str, tuple[str, str, str, str]]) -> None:
    enc = InstanceEncoder(FakeModel(), FakeProcessor(), model_version=version, top_k=4)
    ids = list(galleries)
    cols = enc.rows_for_batch({
        "image_id": np.array(ids, dtype=object), "uri": np.array([f"/g/{i}.png" for i in ids], dtype=object),
        "bytes": np.array([_jpeg_bytes(galleries[i]) for i in ids], dtype=object),
    })  # fmt: skip
    store.ensure_collection(enc.embedding_dim)
    store.upsert(rows_from_columns({k: cols[k] for k in ROW_FIELDS}))


def test_retriever_with_fake_model_finds_the_coloured_box(tmp_path: Path) -> None:
    with MilvusStore(str(tmp_path / "idx.db"), "gallery") as store:
        _fill(store, "fake-1", {
            "reds": ("red", "black", "black", "red"),
            "blue": ("black", "black", "blue", "black"),
            "mixed": ("green", "yellow", "black", "white"),
        })  # fmt: skip
        _fill(store, "other-2", {"decoy": ("blue", "blue", "blue", "blue")})  # another model's rows
        store.load()
        encoder = QueryEncoder(FakeModel(), FakeProcessor(), model_version="fake-1")
        reranker = Reranker(FakeModel(), FakeProcessor(), calibration=encoder.calibration)
        pipeline = QueryPipeline(LocalStages(encoder, store, reranker, discover_threshold=0.5), candidates=20)

        def search(text: str, top_k: int) -> list[Result]:
            return asyncio.run(pipeline.run(QueryRequest(text, top_k=top_k))).results

        blue = search("the blue square", top_k=1)
        assert [(r.image_id, r.box) for r in blue] == [("blue", (0.0, 24.0, 32.0, 24.0))]
        assert blue[0].score == pytest.approx(1 / (1 + np.exp(-(SCALE + BIAS))), rel=1e-4)

        reds = search("red", top_k=2)  # two red boxes in one image, both returned
        assert {(r.image_id, r.box) for r in reds} == {("reds", (0.0, 0.0, 32.0, 24.0)), ("reds", (32.0, 24.0, 32.0, 24.0))}
        many = [search("yellow", top_k=5), search("white", top_k=5)]
        assert many[0][0].image_id == many[1][0].image_id == "mixed"
        assert all(r.image_id != "decoy" for rs in many for r in rs)
        assert len(search("blue", top_k=50)) == 12  # all of fake-1's instances, no dupes


def test_query_encoder_with_real_tiny_model(tiny_checkpoint: Path) -> None:
    model, processor = load_reir_model(str(tiny_checkpoint))
    enc = QueryEncoder(model, processor, model_version="tiny")
    emb = enc.encode(["the small blue triangle left of the red square", "a dog"])
    assert emb.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    cal = enc.calibration
    assert cal.exact
    assert cal.scale == pytest.approx(float(model.logit_scale.exp().clamp(max=100.0)), rel=1e-4)
    assert cal.bias == pytest.approx(float(model.logit_bias), abs=1e-4)
    with pytest.raises(ValueError):
        enc.encode([])


def test_local_pipeline_from_config_and_serve_args(tmp_path: Path, fake_checkpoint: Path) -> None:
    from reir.platform.config import MilvusConfig, ServeConfig
    from reir.platform.modeling import model_version_for
    from reir.serving.app import serve_config_from_args
    from reir.serving.pipeline import local_pipeline
    from tests.platform.fakes import fake_loader

    version = model_version_for(fake_checkpoint)
    db = tmp_path / "idx.db"
    with MilvusStore(str(db), "gallery") as store:
        _fill(store, version, {"g": ("green", "black", "black", "black")})
    cfg = serve_config_from_args(
        {"model_path": str(fake_checkpoint), "uri": str(db), "collection": "gallery", "candidates": "7"}
    )
    assert cfg.milvus == MilvusConfig(uri=str(db), collection="gallery") and cfg.candidates == 7
    assert ServeConfig.model_validate(cfg.model_dump()) == cfg
    pipeline = local_pipeline(cfg, loader=fake_loader)
    try:
        outcome = asyncio.run(pipeline.run(QueryRequest("green", top_k=1)))
        (best,) = outcome.results
        assert (best.image_id, best.box) == ("g", (0.0, 0.0, 32.0, 24.0))
        assert outcome.model_version == version
        # milvus-lite: memory_index auto answered it from the in-memory index, loaded before the query
        memory = pipeline.stages.store.memory_index  # type: ignore[attr-defined]
        assert memory is not None and memory.status().rows == 4 and memory.status().answered == 1
    finally:
        pipeline.stages.store.close()  # type: ignore[attr-defined]
