"""Re-ranker (plain class), discovery answers and the in-process query pipeline."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from reir.platform.schema import InstanceRow
from reir.platform.store import Hit, MilvusStore
from reir.serving.pipeline import Candidates, LocalStages, QueryPipeline, QueryRequest, answer
from reir.serving.rerank import Reranker, ann_order, discover_gate_for, discover_threshold_for
from reir.serving.retriever import Calibration, EncodedQuery, QueryEncoder
from tests.platform.fakes import BIAS, SCALE, FakeModel, FakeProcessor

CAL = Calibration(SCALE, BIAS)


class RelationModel(FakeModel):
    """Fake model with the ``ReirModel.rerank_logits`` signature and a re-ranker that
    understands "left"/"right": an instance's x-centre relative to the others of its image
    decides its logit."""

    reranker = "trained"

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def rerank_logits(self, input_ids: Any, attention_mask: Any, emb: torch.Tensor, boxes: torch.Tensor,
                      objectness: torch.Tensor, mask: torch.Tensor, text_index: Any = None,
                      presence: bool = False) -> torch.Tensor:
        self.calls.append({"texts": list(input_ids), "emb": emb, "boxes": boxes, "objectness": objectness,
                           "mask": mask})
        sign = -1.0 if "left" in input_ids[0] else 1.0
        out = torch.full(mask.shape, float("-inf"))
        for i in range(mask.shape[0]):
            cx = boxes[i, :, 0][mask[i]]
            extreme = float(cx.min() if sign < 0 else cx.max())
            for j in range(int(mask[i].sum())):
                out[i, j] = 4.0 if float(boxes[i, j, 0]) == extreme else -4.0 + sign * float(boxes[i, j, 0])
        return out


def _hit(image_id: str, rank: int, x: float, ann: float, dim: int = 3) -> Hit:
    return Hit(pk=f"v:{image_id}:{rank}", image_id=image_id, uri=f"/nowhere/{image_id}.jpg", box=(x, 0.0, 10.0, 10.0),
               score=ann, instance_score=0.5, model_version="v", embedding=np.eye(dim, dtype=np.float32)[rank % dim])


def test_reranker_feeds_context_and_reorders_by_relation() -> None:
    model = RelationModel()
    # image A: instances at x=0 (rank 0) and x=60 (rank 1); image B: one instance at x=30.
    context = {"A": [_hit("A", 0, 0.0, 0.0), _hit("A", 1, 60.0, 0.0)], "B": [_hit("B", 0, 30.0, 0.0)]}
    candidates = [_hit("A", 1, 60.0, 0.9), _hit("B", 0, 30.0, 0.5)]  # the ANN missed A's left instance
    reranker = Reranker(model, FakeProcessor(), calibration=CAL, image_size=lambda image_id, rows: (100.0, 50.0))
    assert reranker.can_rerank
    scored = reranker.rerank("the thing on the left", candidates, context)
    assert scored[0][0].pk == "v:A:0"  # found through its image's context, ranked first by the relation
    assert {h.pk for h, _ in scored} == {"v:A:0", "v:A:1", "v:B:0"}
    assert next(h for h, _ in scored if h.pk == "v:A:1").score == 0.9  # candidates keep their ANN hit
    call = model.calls[0]
    assert call["texts"] == ["the thing on the left"]  # one expression, every image row scored for it
    assert call["emb"].shape == (2, 2, 3) and call["mask"].tolist() == [[True, True], [True, False]]
    assert torch.allclose(call["boxes"][0, 1], torch.tensor([0.65, 0.1, 0.1, 0.2]))  # cxcywh / (100, 50)
    assert call["objectness"][0, 0] == pytest.approx(0.5)
    assert all(0.0 < p < 1.0 for _, p in scored)
    right = reranker.rerank("the one on the right", candidates, context)
    assert right[0][0].pk in ("v:A:1", "v:B:0") and right[-1][0].pk == "v:A:0"


def test_reranker_without_model_support_keeps_ann_order_with_calibrated_scores() -> None:
    candidates = [_hit("A", 0, 0.0, 0.2), _hit("B", 0, 0.0, 0.8)]
    untrained = RelationModel()
    untrained.reranker = None  # type: ignore[assignment]  # a checkpoint without a trained re-ranker
    for model in (FakeModel(), untrained):
        reranker = Reranker(model, FakeProcessor(), calibration=CAL)
        assert not reranker.can_rerank
        scored = reranker.rerank("anything", candidates, {})
        assert [h.image_id for h, _ in scored] == ["B", "A"]
        assert scored[0][1] == pytest.approx(1 / (1 + np.exp(-(SCALE * 0.8 + BIAS))))


def test_candidates_missing_from_context_are_dropped_not_misranked() -> None:
    model = RelationModel()
    reranker = Reranker(model, FakeProcessor(), calibration=CAL, image_size=lambda i, r: (100.0, 100.0))
    scored = reranker.rerank("left", [_hit("A", 0, 0.0, 0.9), _hit("gone", 0, 0.0, 0.8)], {"A": [_hit("A", 0, 0, 0)]})
    assert [h.image_id for h, _ in scored] == ["A"]


def test_images_with_many_rows_keep_their_candidates() -> None:
    model = RelationModel()
    rows = [_hit("A", r, float(r), 0.0) for r in range(10)]
    reranker = Reranker(model, FakeProcessor(), calibration=CAL, image_size=lambda i, r: (100.0, 100.0),
                        max_instances=4)
    scored = reranker.rerank("left", [_hit("A", 9, 9.0, 0.9)], {"A": rows})
    assert "v:A:9" in {h.pk for h, _ in scored} and len(scored) == 4


def test_answer_rank_dedupes_and_discover_groups_by_image_over_threshold() -> None:
    a0, a1, a_dup, b0, c0 = (_hit("A", 0, 0.0, 0), _hit("A", 1, 50.0, 0), _hit("A", 2, 0.5, 0), _hit("B", 0, 0, 0),
                             _hit("C", 0, 0, 0))
    scored = [(a0, 0.95), (a_dup, 0.9), (b0, 0.7), (a1, 0.6), (c0, 0.2)]
    ranked = answer(scored, mode="rank", top_k=3, threshold=0.5, dedupe_iou=0.9)
    assert [(r.image_id, r.pk) for r in ranked] == [("A", "v:A:0"), ("B", "v:B:0"), ("A", "v:A:1")]
    found = answer(scored, mode="discover", top_k=1, threshold=0.5, dedupe_iou=0.9)
    assert [(r.image_id, r.box, r.score) for r in found] == [("A", a0.box, 0.95), ("B", b0.box, 0.7)]
    assert answer(scored, mode="discover", top_k=10, threshold=0.99, dedupe_iou=0.9) == []
    # The query-level gate: nothing when no candidate reaches it, else every image over the threshold.
    assert answer(scored, mode="discover", top_k=10, threshold=0.5, dedupe_iou=0.9, gate=0.96) == []
    gated = answer(scored, mode="discover", top_k=10, threshold=0.5, dedupe_iou=0.9, gate=0.95)
    assert [r.image_id for r in gated] == ["A", "B"]
    assert len(answer(scored, mode="rank", top_k=10, threshold=0.5, dedupe_iou=0.9, gate=0.99)) == 4  # rank: no gate


def test_discover_threshold_comes_from_the_checkpoint_when_present(tmp_path: Path) -> None:
    assert discover_threshold_for(tmp_path, 0.5) == 0.5
    (tmp_path / "calibration.json").write_text(json.dumps({"discover_threshold": 0.73}))
    assert discover_threshold_for(tmp_path, 0.5) == 0.73
    (tmp_path / "calibration.json").write_text(json.dumps({"discover_threshold": 7}))
    assert discover_threshold_for(tmp_path, 0.5) == 0.5
    assert discover_gate_for(tmp_path) == 0.0  # a checkpoint calibrated before the gate: no gate
    (tmp_path / "calibration.json").write_text(json.dumps({"discover_threshold": 0.4, "discover_gate": 0.97}))
    assert discover_gate_for(tmp_path) == 0.97
    (tmp_path / "calibration.json").write_text(json.dumps({"discover_threshold": 0.4, "discover_gate": "high"}))
    assert discover_gate_for(tmp_path) == 0.0


def test_ann_order_breaks_ties_by_pk() -> None:
    assert [h.pk for h, _ in ann_order([_hit("B", 0, 0, 0.5), _hit("A", 0, 0, 0.5)], CAL)] == ["v:A:0", "v:B:0"]


@pytest.fixture
def local_pipeline(tmp_path: Path) -> QueryPipeline:
    """Two images in milvus-lite, each a red and a blue instance; A has red on the left."""
    store = MilvusStore(str(tmp_path / "p.db"), "rows", dim=8)
    model = RelationModel()
    encoder = QueryEncoder(model, FakeProcessor(), model_version="v")
    red, blue = encoder.encode(["red", "blue"])
    rows = []
    for image_id, (red_x, blue_x) in {"A": (0.0, 50.0), "B": (50.0, 0.0)}.items():
        for rank, (x, emb) in enumerate([(red_x, red), (blue_x, blue)]):
            rows.append(InstanceRow(image_id=image_id, uri=f"/nowhere/{image_id}.jpg", box=(x, 0.0, 40.0, 40.0),
                                    score=0.9, rank=rank, model_version="v", embedding=emb).to_dict())
    store.upsert(rows)
    store.build_index("FLAT")
    store.load()
    reranker = Reranker(model, FakeProcessor(), calibration=encoder.calibration)
    return QueryPipeline(LocalStages(encoder, store, reranker, discover_threshold=0.5), candidates=10)


def test_pipeline_rank_discover_and_rerank_in_process(local_pipeline: QueryPipeline) -> None:
    ann = asyncio.run(local_pipeline.run(QueryRequest("red left", top_k=4, rerank=False)))
    assert not ann.reranked and ann.candidates == 4 and {"encode", "search", "total"} <= set(ann.timings_ms)
    reranked = asyncio.run(local_pipeline.run(QueryRequest("red left", top_k=4, rerank=True)))
    assert reranked.reranked and "rerank" in reranked.timings_ms
    best = reranked.results[0]
    assert (best.image_id, best.box[0]) in {("A", 0.0), ("B", 0.0)}  # a leftmost instance wins
    found = asyncio.run(local_pipeline.run(QueryRequest("red left", top_k=1, mode="discover", rerank=True)))
    assert found.threshold == 0.5 and len({r.image_id for r in found.results}) == len(found.results)
    assert all(r.score >= 0.5 for r in found.results) and found.results and found.gate == 0.0
    # A query-level gate over the best score answers nothing; at the best score, the same answer.
    stages = local_pipeline.stages
    top = max(r.score for r in found.results)
    for gate, expected, total in ((top, found.results, found.total), (min(1.0, top + 1e-6), [], 0)):
        gated = QueryPipeline(LocalStages(stages.encoder, stages.store, stages.reranker, discover_threshold=0.5,
                                          discover_gate=gate), candidates=10)  # type: ignore[attr-defined]
        out = asyncio.run(gated.run(QueryRequest("red left", top_k=1, mode="discover", rerank=True)))
        assert out.gate == gate and out.results == expected and out.total == total


def test_local_pipeline_from_config_matches_the_index(tmp_path: Path, fake_checkpoint: Path) -> None:
    from reir.platform.config import MilvusConfig, ServeConfig
    from reir.serving.pipeline import local_pipeline
    from tests.platform.fakes import fake_loader
    from tests.serving.conftest import COLLECTION, fill_store

    fill_store(tmp_path / "l.db", fake_checkpoint, fake_loader)
    cfg = ServeConfig(model_path=str(fake_checkpoint), milvus=MilvusConfig(uri=str(tmp_path / "l.db"),
                                                                           collection=COLLECTION))
    pipeline = local_pipeline(cfg, loader=fake_loader)
    try:
        outcome = asyncio.run(pipeline.run(QueryRequest("blue", top_k=1)))
        assert outcome.results[0].image_id == "img_blue" and outcome.threshold is None
        found = asyncio.run(pipeline.run(QueryRequest("blue", mode="discover")))
        assert found.threshold == 0.5 and [r.image_id for r in found.results] == ["img_blue"]
    finally:
        pipeline.stages.store.close()  # type: ignore[attr-defined]


class _PoolStages:
    """Injected QueryStages that record the pools the pipeline asks for."""

    def __init__(self) -> None:
        self.top_n: list[int] = []
        self.reranked: list[int] = []
        self.presence: list[bool] = []

    async def info(self) -> dict[str, Any]:
        return {"model_version": "v", "calibration": {"scale": 1.0, "bias": 0.0, "exact": True},
                "discover_threshold": 0.5, "can_rerank": True}

    async def encode(self, text: str) -> EncodedQuery:
        return EncodedQuery(text, np.ones(2, dtype=np.float32))

    async def search(self, text: str, top_n: int, flt: Any, head: int,
                     presence: bool = False) -> tuple[EncodedQuery, Candidates]:
        encoded = await self.encode(text)
        return encoded, await self.candidates(encoded, top_n, flt, head, presence)

    async def candidates(self, query: EncodedQuery, top_n: int, flt: Any, head: int,
                         presence: bool = False) -> Candidates:
        self.presence.append(presence)
        self.top_n.append(top_n)
        hits = [Hit(f"p{i}", f"img{i}", f"/g/{i}.png", (0.0, 0.0, 4.0, 4.0), 1.0 - i / 1e4, 0.5, "v")
                for i in range(top_n)]
        self.reranked.append(head)
        return Candidates(hits, [(h, 0.9 if i % 3 == 0 else 0.1) for i, h in enumerate(hits[:head])])

    async def health(self) -> dict[str, Any]:
        return {}


def test_discover_mode_searches_and_reranks_its_own_wider_pool() -> None:
    stages = _PoolStages()
    pipeline = QueryPipeline(stages, candidates=20, rerank_candidates=10,  # type: ignore[arg-type]
                             discover_candidates=300, discover_rerank_candidates=120)
    ranked = asyncio.run(pipeline.run(QueryRequest(query="q", top_k=5)))
    found = asyncio.run(pipeline.run(QueryRequest(query="q", mode="discover")))
    assert stages.top_n == [20, 300] and stages.reranked == [10, 120]
    assert stages.presence == [False, True]  # discover mode asks for the presence head
    assert len(ranked.results) == 5
    # every re-ranked image at or above the threshold: 1 in 3 of the 120, in pages of top_k
    assert found.total == 40 and len(found.results) == 10 and found.next_offset == 10
    pages, offset = [found.results], found.next_offset
    while offset is not None:
        page = asyncio.run(pipeline.run(QueryRequest(query="q", mode="discover", top_k=15, offset=offset)))
        assert page.total == 40
        pages.append(page.results)
        offset = page.next_offset
    every = [r for p in pages for r in p]
    assert [len(p) for p in pages] == [10, 15, 15] and len({r.image_id for r in every}) == 40
    assert all(r.score >= 0.5 for r in every) and [r.score for r in every] == sorted((r.score for r in every),
                                                                                    reverse=True)
    beyond = asyncio.run(pipeline.run(QueryRequest(query="q", mode="discover", offset=40)))
    assert beyond.results == [] and beyond.total == 40 and beyond.next_offset is None
    second = asyncio.run(pipeline.run(QueryRequest(query="q", top_k=5, offset=5)))  # rank mode pages too
    assert [r.image_id for r in second.results] == [f"img{i}" for i in range(5, 10)] and second.total is None


class _CountingModel:
    """The real tiny model behind an injected wrapper that counts text-tower forwards."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.text_forwards = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        self.text_forwards += 1
        return self.model.encode_text(input_ids, attention_mask)

    def rerank_logits(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("text") is None:  # the model re-encodes through its own encode_text
            self.text_forwards += 1
        return self.model.rerank_logits(*args, **kwargs)


def test_the_encoded_query_reaches_the_reranker_without_a_second_text_forward() -> None:
    from reir.model.factory import create_model

    torch.manual_seed(0)
    model, processor = create_model("tiny")
    model.add_reranker(hidden_size=16, num_relations=4)
    model.eval()
    counting = _CountingModel(model)
    encoder = QueryEncoder(counting, processor, model_version="v")  # type: ignore[arg-type]
    reranker = Reranker(counting, processor, calibration=Calibration())
    query = encoder.encode_queries(["the red square left of the circle"])[0]
    assert query.token_states is not None and counting.text_forwards == 1
    dim = query.embedding.shape[0]
    rng = np.random.default_rng(0)
    context = {f"i{k}": [Hit(f"v:i{k}:{r}", f"i{k}", "/x.jpg", (10.0 * r, 5.0, 20.0, 20.0), 0.3, 0.8, "v",
                             embedding=rng.normal(size=dim).astype(np.float32), image_size=(64.0, 48.0))
                         for r in range(3)] for k in range(2)}  # fmt: skip
    candidates = [rows[0] for rows in context.values()]
    from_text = reranker.rerank(query.text, candidates, context)
    assert counting.text_forwards == 2
    from_states = reranker.rerank(query, candidates, context)
    assert counting.text_forwards == 2  # the token states were used, nothing re-encoded
    assert [h.pk for h, _ in from_states] == [h.pk for h, _ in from_text]
    assert np.allclose([p for _, p in from_states], [p for _, p in from_text], atol=1e-5)


def test_the_memory_index_context_as_arrays_reranks_as_the_rows_do(tmp_path: Path) -> None:
    """``MilvusStore.context_arrays`` (the in-memory index's arrays) gives the re-ranker the same
    input and the same answer as ``context`` (a Hit per row); without the index, or for an image
    it does not hold, there are no arrays and the rows are read."""
    from dataclasses import replace

    from reir.platform.memory_index import AnnSpec, ContextArrays
    from reir.platform.store import SearchFilter

    dim, per_image = 8, 4
    vecs = np.random.default_rng(0).normal(size=(30 * per_image, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    rows = [InstanceRow(f"img{i // per_image}", f"/g/{i // per_image}.jpg", (float(i % 13) * 7, 2.0, 9.0, 5.0),
                        0.1 + (i % 5) / 10, i % per_image, "v", vecs[i], image_size=(120.0 + i // per_image, 90.0),
                        n_instances=per_image).to_dict() for i in range(len(vecs))]  # fmt: skip
    flt = SearchFilter(model_version="v")
    with MilvusStore(str(tmp_path / "idx.db"), "instances", dim=dim) as store:
        store.upsert(rows)
        store.build_index("FLAT")
        store.load()
        best = store.search(vecs[5] + vecs[17], 12, flt)[0]
        assert store.context_arrays(best, model_version="v") is None  # no in-memory index yet
        store.use_memory_index("on", model_version="v", wait=True, ann=AnnSpec(min_rows=10_000))
        best = store.search(vecs[5] + vecs[17], 12, flt)[0]
        packed = store.context_arrays(best, model_version="v")
        by_image = store.context(best, model_version="v")
        assert isinstance(packed, ContextArrays) and len(packed.heads) == len(by_image) < len(best)
        assert [h.image_id for h in packed.heads] == list(dict.fromkeys(h.image_id for h in best))
        assert {k: [(r.pk, r.box, r.instance_score) for r in v] for k, v in packed.as_dict().items()} == \
            {k: [(r.pk, r.box, r.instance_score) for r in v] for k, v in by_image.items()}
        for text in ("the one on the left", "the one on the right"):
            model = RelationModel()
            reranker = Reranker(model, FakeProcessor(), calibration=CAL)
            from_arrays, from_rows = reranker.rerank(text, best, packed), reranker.rerank(text, best, by_image)
            assert [(h.pk, h.score, h.box, p) for h, p in from_arrays] == [(h.pk, h.score, h.box, p) for h, p in from_rows]
            assert len(from_arrays) == per_image * len(packed.heads)
            # rows made when read, in any order of reading
            assert [from_arrays[k][0].pk for k in (-1, 0, 2)] == [from_rows[k][0].pk for k in (-1, 0, 2)]
            assert [h.pk for h, _ in from_arrays[1:4]] == [h.pk for h, _ in from_rows[1:4]]
            for key in ("emb", "boxes", "objectness", "mask"):
                assert torch.equal(model.calls[0][key], model.calls[1][key])
        # an image over the re-ranker's max_instances: the arrays go the rows' way (candidates kept)
        small = Reranker(RelationModel(), FakeProcessor(), calibration=CAL, max_instances=2)
        assert [(h.pk, p) for h, p in small.rerank("left", best, packed)] == \
            [(h.pk, p) for h, p in small.rerank("left", best, by_image)]
        stale = replace(best[0], row=(best[0].row + 1) % len(vecs))  # a row holding another pk now (a reload)
        assert store.context_arrays([stale, *best[1:]], model_version="v") is None
