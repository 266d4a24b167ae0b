"""The real query path (tiny model, milvus-lite store, re-ranker) on long queries and dense images.

A query longer than the text tower reads is answered, flagged ``truncated`` in the HTTP answer,
logged once and counted; an image with more than 10 stored instances keeps all of them in the
keyed context fetch and the re-rank.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from reir.model import create_model
from reir.platform.config import MilvusConfig, ServeConfig
from reir.platform.modeling import load_reir_model
from reir.platform.store import MilvusStore
from reir.serving.http import HttpSettings, create_http_app
from reir.serving.pipeline import QueryPipeline, QueryRequest, local_pipeline
from reir.serving.rerank import Reranker
from reir.serving.retriever import Calibration
from tests.serving.conftest import COLLECTION, fill_store

LONG = " ".join(["the small red circle left of the big blue square"] * 5)


class CountingMetrics:
    """StageMetrics that keeps what the pipeline reports."""

    def __init__(self) -> None:
        self.truncated = 0

    def observe(self, timings_s: object, candidates: int) -> None:
        return None

    def count_localize_errors(self, reason: str, count: int) -> None:
        return None

    def count_truncated(self) -> None:
        self.truncated += 1


def test_a_long_query_is_answered_flagged_logged_once_and_counted(
    tmp_path: Path, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill_store(tmp_path / "t.db", tiny_checkpoint, load_reir_model)
    cfg = ServeConfig(model_path=str(tiny_checkpoint), milvus=MilvusConfig(uri=str(tmp_path / "t.db"),
                                                                           collection=COLLECTION))
    local = local_pipeline(cfg)
    counts = CountingMetrics()
    pipeline = QueryPipeline(local.stages, metrics=counts)
    try:
        with caplog.at_level(logging.WARNING, logger="reir.serving.pipeline"):
            outcome = asyncio.run(pipeline.run(QueryRequest(LONG, top_k=3)))
        assert outcome.truncated and len(outcome.results) == 3
        (record,) = [r for r in caplog.records if "query truncated" in r.getMessage()]
        assert "tokens, the model reads 32" in record.getMessage()
        assert counts.truncated == 1
        assert not asyncio.run(pipeline.run(QueryRequest("the red square", top_k=3))).truncated
        assert counts.truncated == 1

        client = TestClient(create_http_app(pipeline, settings=HttpSettings()))
        assert client.post("/v1/search", json={"query": LONG, "top_k": 2}).json()["truncated"] is True
        assert client.post("/v1/search", json={"query": "a circle", "top_k": 2}).json()["truncated"] is False
        assert counts.truncated == 2
    finally:
        local.stages.store.close()  # type: ignore[attr-defined]


def test_images_with_more_than_ten_instances_keep_all_in_context_and_rerank(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    version = fill_store(tmp_path / "d.db", tiny_checkpoint, load_reir_model, top_k=16, nms_iou=1.0)
    with MilvusStore(str(tmp_path / "d.db"), COLLECTION) as store:
        store.load()
        query = np.ones((1, store.dim), dtype=np.float32) / np.sqrt(store.dim)
        hits = store.search(query, 5)[0]
        assert hits and all(h.n_instances == 16 for h in hits)
        context = store.context(hits, model_version=version)
        assert {len(rows) for rows in context.values()} == {16}
        assert [r.pk.rsplit(":", 1)[1] for r in context[hits[0].image_id]] == [str(k) for k in range(16)]

    model, processor = create_model(str(tiny_checkpoint))
    model.add_reranker(hidden_size=16, num_relations=4)
    model.eval()
    scored = Reranker(model, processor, calibration=Calibration()).rerank("the red circle", hits, context)
    assert len(scored) == 16 * len({h.image_id for h in hits})  # every stored instance scored
    capped = Reranker(model, processor, calibration=Calibration(), max_instances=12).rerank("x", hits, context)
    assert len(capped) == 12 * len({h.image_id for h in hits})
