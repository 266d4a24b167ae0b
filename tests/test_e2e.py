"""End to end on real components: synth -> Ray Train + DeepSpeed (stage 1 and 2) ->
Ray Data ingestion into milvus-lite (server mode) -> Ray Serve over HTTP -> evaluation."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from reir.data.synth import generate
    from reir.training.config import TrainConfig
    from reir.training.trainer import run_training

    root = tmp_path_factory.mktemp("e2e")
    data = root / "data"
    generate(data, num_images=30, test_fraction=0.3, image_size=64, seed=3, discovery_queries=5)
    common = {"data_root": str(data), "output_dir": str(root / "runs"), "batch_size": 4, "epochs": 1,
              "warmup_steps": 1, "log_every": 1}
    # stage 1 in fp32, stage 2 under CPU bf16 autocast (on whatever CPU runs the test); stage 2
    # batches look-alike images (their expressions begin alike) from windows of 8 rows
    stage1 = run_training(TrainConfig(model="tiny", stage="1", run_name="s1", max_steps=3, cpu_bf16="off", **common))
    stage2 = run_training(TrainConfig(model=str(stage1), stage="2", run_name="s2", max_steps=2, cpu_bf16="on",
                                      lookalike_partners=1, lookalike_window=8, **common))
    # min IoU 0: a 5-step tiny model localizes nothing, yet every expression must still train the re-ranker
    reranked = run_training(TrainConfig(model=str(stage2), stage="rerank", run_name="rr", max_steps=2,
                                        rerank_min_iou=0.0, rerank_negatives=3, rerank_discovery_steps=2, **common))
    return data, reranked


def test_training_writes_loadable_checkpoints(trained: tuple[Path, Path]) -> None:
    from reir.model import create_model

    _, model_dir = trained
    args = json.loads((model_dir / "training_args.json").read_text())
    assert args["config"]["stage"] == "rerank" and args["stats"]["steps"] == 2
    assert args["stats"]["loss"] > 0 and "loss_rerank_ce" in args["stats"]
    stage2_args = json.loads((model_dir.parent.parent / "s2" / "model" / "training_args.json").read_text())
    assert stage2_args["stats"]["loss"] > 0 and "loss_clia" in stage2_args["stats"]
    assert stage2_args["config"]["lookalike_partners"] == 1 and stage2_args["stats"]["steps"] == 2
    assert stage2_args["stats"]["bf16_autocast"] is True
    stage1_args = json.loads((model_dir.parent.parent / "s1" / "model" / "training_args.json").read_text())
    assert stage1_args["stats"]["bf16_autocast"] is False
    calibration = json.loads((model_dir / "calibration.json").read_text())
    assert 0.0 < calibration["discover_threshold"] < 1.0
    # synth's training discovery queries reached the workers: discover mode's own loss and threshold
    assert "loss_discovery_bce" in args["stats"] and calibration["source"] == "discovery queries"
    assert args["stats"]["presence_steps"] == 2 and calibration["head"] == "presence"
    assert calibration["discover_threshold"] == calibration["discovery"]["discover_threshold"]
    assert calibration["discovery"]["num_queries"] > 0 and 0.0 < calibration["referent"]["discover_threshold"] < 1.0
    model, processor = create_model(str(model_dir))
    assert model.reranker is not None and model.presence is not None  # both heads ship in the checkpoint
    assert processor.image_size == 64  # the tiny preset's shape came through every stage


def test_ingest_serve_search_and_evaluate(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from ray import serve

    from reir.data.formats import test_queries
    from reir.evaluation.discovery import evaluate_discovery
    from reir.evaluation.metrics import Prediction
    from reir.evaluation.runner import evaluate_index, evaluate_predictions, rec_accuracy_for
    from reir.ingestion.pipeline import run_ingestion
    from reir.platform.config import IngestConfig, MilvusConfig
    from reir.platform.milvus_server import EmbeddedMilvus
    from reir.platform.store import MilvusStore
    from reir.serving.app import build_app
    from reir.serving.lifecycle import wait_until_routed

    data, model_dir = trained
    images = sorted((data / "images" / "test").glob("*.jpg"))
    with EmbeddedMilvus(tmp_path / "milvus") as milvus:
        summary = run_ingestion(IngestConfig(gallery_root=data, split="test", model_path=str(model_dir),
                                             milvus=MilvusConfig(uri=milvus.uri), top_k_instances=5))
        assert summary.images == len(images) and summary.failures == 0
        store = MilvusStore(milvus.uri, "reir_instances")
        assert store.count() == summary.instances > 0
        store.close()

        serve.run(build_app({"model_path": str(model_dir), "milvus_uri": milvus.uri}), name="e2e",
                  route_prefix="/")
        wait_until_routed("http://127.0.0.1:8000")
        try:
            queries = test_queries(data)
            url = "http://127.0.0.1:8000/v1/search"

            def ask(text: str) -> list[dict]:
                resp = requests.post(url, json={"query": text, "top_k": 10}, timeout=60)
                assert resp.status_code == 200, resp.text
                return resp.json()["results"]

            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(ask, [q.text for q in queries]))
            # `reir eval --discover --url`: the service answers at its calibrated threshold
            found_http = evaluate_discovery(data, model_dir, milvus_uri=milvus.uri, collection="reir_live",
                                            url="http://127.0.0.1:8000", echo=lambda _: None)
        finally:
            serve.delete("e2e")
        # `reir evaluate` without --url runs the service's query path in process: same answers.
        inprocess = evaluate_index(data, model_dir, milvus_uri=milvus.uri, collection="reir_live", url=None,
                                   out=None, echo=lambda _: None)
        found = evaluate_discovery(data, model_dir, milvus_uri=milvus.uri, collection="reir_live",
                                   png=tmp_path / "curve.png", out=tmp_path / "discovery.json", echo=lambda _: None)

    # Discovery in process (every threshold from 0) and over HTTP (the service's threshold) score
    # the calibrated point alike; the in-process curve reaches lower thresholds.
    calibrated = json.loads((model_dir / "calibration.json").read_text())["discover_threshold"]
    assert found["at_calibrated_threshold"] == found_http["at_calibrated_threshold"]
    assert found["at_calibrated_threshold"]["threshold"] == pytest.approx(calibrated)
    assert found["num_queries"] == 5 and found["seconds_per_query"] > 0
    # the same answers at the calibrated threshold, split by what each query names
    assert found["by_kind"] == found_http["by_kind"] and sum(r["queries"] for r in found["by_kind"].values()) == 5
    assert found["pool_recall"] >= found["at_calibrated_threshold"]["recall"] and "pool_recall" not in found_http
    assert min(c["threshold"] for c in found["curve"]) < calibrated <= min(c["threshold"] for c in found_http["curve"])
    assert json.loads((tmp_path / "discovery.json").read_text())["num_queries"] == 5
    assert (tmp_path / "curve.png").stat().st_size > 0

    valid_ids = {p.stem for p in images}
    for ans in answers:
        assert 1 <= len(ans) <= 10
        assert all(a["image_id"] in valid_ids and len(a["box"]) == 4 for a in ans)
        assert [a["score"] for a in ans] == sorted((a["score"] for a in ans), reverse=True)
    predictions = {q.query_id: [Prediction(a["image_id"], a["box"]) for a in ans] for q, ans in zip(queries, answers)}
    metrics = evaluate_predictions(predictions, queries)
    metrics.update(rec_accuracy_for(model_dir, queries))
    assert {"BR@1@0.5", "BR@10@0.9", "REC_Acc@0.5"} <= set(metrics)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["BR@1@0.5"] <= metrics["BR@5@0.5"] <= metrics["BR@10@0.5"]
    assert metrics["BR@10@0.9"] <= metrics["BR@10@0.5"]
    assert {k: inprocess[k] for k in metrics} == metrics


def test_a_time_budgeted_rerank_stage_stops_both_phases_within_it(trained: tuple[Path, Path]) -> None:
    """`--minutes` on the rerank stage bounds the re-ranker and the presence head together:
    each used to measure the whole budget from its own start (up to twice the minutes)."""
    from reir.training.config import TrainConfig
    from reir.training.trainer import run_training

    data, reranked = trained
    budget = 4.0
    model_dir = run_training(TrainConfig(
        model=str(reranked.parent.parent / "s2" / "model"), stage="rerank", run_name="rr-budget", data_root=str(data),
        output_dir=str(reranked.parent.parent), batch_size=4, warmup_steps=1, log_every=10_000, rerank_min_iou=0.0,
        rerank_negatives=3, max_steps=1_000_000, rerank_discovery_steps=1_000_000, time_budget_s=budget))
    stats = json.loads((Path(model_dir) / "training_args.json").read_text())["stats"]
    assert 1 < stats["presence_steps"] < 1_000_000 and 1 < stats["steps"] < 1_000_000  # both stopped on time
    # one overshooting step per phase at most beyond the budget (a tiny step takes milliseconds)
    assert budget <= stats["seconds"] < budget + 1.0
    assert stats["presence_seconds"] < budget / 2  # its share: what the re-ranker left of the total
