"""Ray Serve end to end: real Serve, real HTTP, real milvus-lite, real tiny model."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from ray import serve

from reir.ingestion.encoder import InstanceEncoder
from reir.platform.config import MilvusConfig, ServeConfig
from reir.platform.milvus_server import free_port
from reir.platform.modeling import ModelLoader, load_reir_model, model_version_for
from reir.platform.schema import ROW_FIELDS, rows_from_columns
from reir.platform.store import MilvusStore
from reir.serving.app import app_for, build_app
from tests.platform.fakes import COLORS, fake_loader, quadrant_image

COLLECTION = "gallery"
IMAGE_SIZE = (64, 48)


def _fill_store(db: Path, ckpt: Path, loader: ModelLoader) -> str:
    """Encode one image per colour (that colour top-left) straight into a lite file."""
    model, processor = loader(str(ckpt))
    version = model_version_for(ckpt)
    enc = InstanceEncoder(model, processor, model_version=version, top_k=4)
    ids, blobs = [], []
    for name in COLORS:
        buf = io.BytesIO()
        quadrant_image((name, "black", "black", "black"), size=IMAGE_SIZE).save(buf, format="PNG")
        ids.append(f"img_{name}")
        blobs.append(buf.getvalue())
    cols = enc.rows_for_batch({
        "image_id": np.array(ids, dtype=object), "uri": np.array([f"/g/{i}.png" for i in ids], dtype=object),
        "bytes": np.array(blobs, dtype=object),
    })  # fmt: skip
    with MilvusStore(str(db), COLLECTION, dim=enc.embedding_dim) as store:
        store.upsert(rows_from_columns({k: cols[k] for k in ROW_FIELDS}))
        store.build_index("FLAT")
    return version  # the store is closed: the Serve replica may now open the file


@pytest.fixture(scope="module")
def serve_url(ray_session: None) -> Iterator[str]:
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def tiny_app(serve_url: str, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    db = tmp_path_factory.mktemp("serve") / "tiny.db"
    version = _fill_store(db, tiny_checkpoint, load_reir_model)
    # Exactly what `serve run reir.serving.app:build_app key=value ...` passes: strings.
    app = build_app({
        "model_path": str(tiny_checkpoint), "milvus_uri": str(db), "milvus_collection": COLLECTION,
        "num_cpus_encoder": "0.5", "num_cpus_searcher": "0.25", "num_cpus_ingress": "0.25",
    })  # fmt: skip
    serve.run(app, name="tiny", route_prefix="/tiny")
    yield f"{serve_url}/tiny", version
    serve.delete("tiny")


@pytest.fixture(scope="module")
def fake_app(serve_url: str, fake_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    db = tmp_path_factory.mktemp("serve") / "fake.db"
    _fill_store(db, fake_checkpoint, fake_loader)
    cfg = ServeConfig(
        model_path=str(fake_checkpoint), milvus=MilvusConfig(uri=str(db), collection=COLLECTION),
        num_cpus_encoder=0.25, num_cpus_searcher=0.25, num_cpus_ingress=0.25, candidates=10,
    )  # fmt: skip
    serve.run(app_for(cfg, loader=fake_loader), name="fake", route_prefix="/fake")
    yield f"{serve_url}/fake"
    serve.delete("fake")


def test_search_over_http_with_the_tiny_model(tiny_app: tuple[str, str]) -> None:
    url, version = tiny_app
    resp = requests.post(f"{url}/v1/search", json={"query": "the red square on the left", "top_k": 5}, timeout=60)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model_version"] == version and body["took_ms"] > 0
    results = body["results"]
    assert 1 <= len(results) <= 5
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    for r in results:
        x, y, w, h = r["box"]
        assert r["image_id"].startswith("img_") and r["uri"] == f"/g/{r['image_id']}.png"
        assert 0 <= x and 0 <= y and x + w <= IMAGE_SIZE[0] + 1e-3 and y + h <= IMAGE_SIZE[1] + 1e-3


def test_concurrent_queries_are_batched_and_all_answered(tiny_app: tuple[str, str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    url, _ = tiny_app
    queries = [f"object number {i}" for i in range(12)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        codes = list(pool.map(lambda q: requests.post(f"{url}/v1/search", json={"query": q, "top_k": 3}, timeout=60).status_code, queries))
    assert codes == [200] * len(queries)


def test_validation_and_health_over_http(tiny_app: tuple[str, str]) -> None:
    url, version = tiny_app
    bad_top_k = requests.post(f"{url}/v1/search", json={"query": "x", "top_k": 0}, timeout=30)
    assert bad_top_k.status_code == 422 and bad_top_k.json()["detail"][0]["field"] == "top_k"
    assert requests.post(f"{url}/v1/search", json={"query": "x", "top_k": 101}, timeout=30).status_code == 422
    unknown = requests.post(f"{url}/v1/search", json={"query": "x", "filter": "pk != ''"}, timeout=30)
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["field"] == "filter"
    health = requests.get(f"{url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok", "model_version": version}


def test_fake_model_app_returns_the_right_box(fake_app: str) -> None:
    resp = requests.post(f"{fake_app}/v1/search", json={"query": "yellow", "top_k": 1}, timeout=60)
    assert resp.status_code == 200, resp.text
    (best,) = resp.json()["results"]
    assert best["image_id"] == "img_yellow" and best["box"] == [0.0, 0.0, 32.0, 24.0]
