"""The localize stage: the plain Localizer, the pipeline's handling of it, and over real
Serve HTTP (fake model injected by the loader, real milvus-lite, real image files)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from reir.model.localize import Box, InstanceLocalizer, Localization, ZoomSpec
from reir.platform.modeling import model_version_for
from reir.platform.schema import EMBEDDING, IMAGE_ID, MODEL_VERSION, RANK, SCORE, URI, rows_from_columns
from reir.platform.store import Hit, MilvusStore
from reir.serving.lifecycle import wait_until_routed
from reir.serving.localize import FAILED, UNAVAILABLE, UNREADABLE, BoxUpdate, Localizer
from reir.serving.pipeline import Candidates, QueryPipeline, QueryRequest
from reir.serving.retriever import EncodedQuery
from tests.platform.fakes import FakeModel, FakeProcessor, color_embedding

SIZE = (128, 96)
YELLOW_AT = (80, 54, 12, 10)  # the object; the stored box below is a coarse guess around it
STORED_SMALL = (68.0, 44.0, 16.0, 12.0)  # 1.6% of the image: small
STORED_LARGE = (0.0, 0.0, 64.0, 48.0)  # 25%: left alone
# zoom x3 on STORED_SMALL: a 48x36 window at (52, 32); the fake model's instances are the
# crop's quadrants and the yellow object lies in the bottom-right one: (24, 18, 24, 18) in
# the crop, (76, 50, 24, 18) in the image.
REFINED = [76.0, 50.0, 24.0, 18.0]


def _gallery(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    small = Image.new("RGB", SIZE)
    x, y, w, h = YELLOW_AT
    small.paste((255, 255, 0), (x, y, x + w, y + h))
    small.save(folder / "small.png")
    Image.new("RGB", SIZE, (0, 0, 255)).save(folder / "large.png")
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return {name: str(folder / f"{name}.png") for name in ("small", "large", "bad")}


def _fake_localizer(**spec: Any) -> Localizer:
    return Localizer(InstanceLocalizer(FakeModel(), FakeProcessor()), spec=ZoomSpec(**{"steps": 1, **spec}))


def test_localizer_refines_small_boxes_and_keeps_large_and_unreadable_ones(tmp_path: Path) -> None:
    uris = _gallery(tmp_path)
    opened: list[str] = []

    def track(uri: str) -> Image.Image:
        opened.append(uri)
        return Image.open(uri)

    localizer = Localizer(InstanceLocalizer(FakeModel(), FakeProcessor()), spec=ZoomSpec(steps=1), open_image=track)
    updates = localizer.localize("yellow", [
        (uris["small"], STORED_SMALL), (uris["large"], STORED_LARGE), (uris["bad"], STORED_SMALL),
        ("s3://bucket/x.png", STORED_SMALL), (str(tmp_path / "missing.png"), STORED_SMALL),
        (uris["small"], STORED_LARGE),
    ])  # fmt: skip
    assert updates[0] == BoxUpdate(tuple(REFINED), refined=True)  # type: ignore[arg-type]
    assert updates[1] == BoxUpdate(STORED_LARGE) and updates[5] == BoxUpdate(STORED_LARGE)
    assert updates[2] == updates[3] == updates[4] == BoxUpdate(STORED_SMALL, error=UNREADABLE)
    assert opened.count(uris["small"]) == 1  # one read per image per query


def test_localizer_rejects_remote_uris_with_the_default_reader(tmp_path: Path) -> None:
    (update,) = _fake_localizer().localize("yellow", [("s3://bucket/x.png", STORED_SMALL)])
    assert update == BoxUpdate(STORED_SMALL, error=UNREADABLE)


def test_a_failing_model_keeps_every_stored_box(tmp_path: Path) -> None:
    uris = _gallery(tmp_path)

    def broken(crops: Sequence[Image.Image], text: str, priors: Sequence[Box | None] | None) -> list[Localization]:
        raise RuntimeError("CUDA error: out of memory")

    updates = Localizer(broken, spec=ZoomSpec()).localize("yellow", [(uris["small"], STORED_SMALL),
                                                                      (uris["large"], STORED_LARGE)])
    assert updates == [BoxUpdate(STORED_SMALL, error=FAILED), BoxUpdate(STORED_LARGE)]


class _Stages:
    """Injected QueryStages: fixed hits, ANN order, and a scripted localize stage."""

    def __init__(self, localize: Any) -> None:
        self._localize = localize
        self.seen: list[list[tuple[str, Box]]] = []

    async def info(self) -> dict[str, Any]:
        return {"model_version": "v", "calibration": {"scale": 1.0, "bias": 0.0, "exact": True},
                "discover_threshold": 0.5, "can_rerank": False}

    async def encode(self, text: str) -> EncodedQuery:
        return EncodedQuery(text, np.ones(2, dtype=np.float32))

    async def search(self, text: str, top_n: int, flt: Any, head: int,
                     presence: bool = False) -> tuple[EncodedQuery, Candidates]:
        encoded = await self.encode(text)
        return encoded, await self.candidates(encoded, top_n, flt, head)

    async def candidates(self, query: EncodedQuery, top_n: int, flt: Any, head: int,
                         presence: bool = False) -> Candidates:
        assert head == 0, "not asked to re-rank"
        return Candidates([Hit(f"p{i}", f"img{i}", f"/g/{i}.png", (0.0, 0.0, 4.0, 4.0), 1.0 - i / 10, 0.5, "v")
                           for i in range(4)])  # fmt: skip

    async def localize(self, query: str, items: list[tuple[str, Box]]) -> list[BoxUpdate]:
        self.seen.append(items)
        return self._localize(items)

    async def health(self) -> dict[str, Any]:
        return {}


class _Counts:
    def __init__(self) -> None:
        self.errors: dict[str, int] = {}
        self.stages: set[str] = set()

    def observe(self, timings_s: dict[str, float], candidates: int) -> None:
        self.stages |= set(timings_s)

    def count_localize_errors(self, reason: str, count: int) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + count

    def count_truncated(self) -> None:
        return None


def _run(stages: _Stages, counts: _Counts, localize_results: int = 2) -> Any:
    pipeline = QueryPipeline(stages, metrics=counts, localize_results=localize_results)
    return asyncio.run(pipeline.run(QueryRequest(query="q", top_k=4, rerank=False)))


def test_pipeline_applies_updates_to_the_head_and_counts_errors() -> None:
    moved = (1.0, 1.0, 2.0, 2.0)
    stages = _Stages(lambda items: [BoxUpdate(moved, refined=True), BoxUpdate(items[1][1], error=UNREADABLE)])
    counts = _Counts()
    outcome = _run(stages, counts)
    assert [len(s) for s in stages.seen] == [2]  # only the first localize_results results
    assert [(r.box, r.refined) for r in outcome.results] == [
        (moved, True), ((0.0, 0.0, 4.0, 4.0), False), ((0.0, 0.0, 4.0, 4.0), False), ((0.0, 0.0, 4.0, 4.0), False)]
    assert counts.errors == {UNREADABLE: 1} and "localize" in outcome.timings_ms and "localize" in counts.stages


def test_pipeline_answers_with_stored_boxes_when_the_stage_is_down() -> None:
    def down(items: list[tuple[str, Box]]) -> list[BoxUpdate]:
        raise ConnectionError("replica gone")

    counts = _Counts()
    outcome = _run(_Stages(down), counts, localize_results=3)
    assert [r.refined for r in outcome.results] == [False] * 4 and counts.errors == {UNAVAILABLE: 3}
    off = _Stages(down)
    assert "localize" not in _run(off, _Counts(), localize_results=0).timings_ms and off.seen == []


@pytest.fixture(scope="module")
def localize_app(serve_url: str, fake_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from reir.serving.app import app_for, serve_config_from_args
    from tests.platform.fakes import fake_loader

    root = tmp_path_factory.mktemp("localize_app")
    ckpt = root / "ckpt"
    shutil.copytree(fake_checkpoint, ckpt)
    version = model_version_for(ckpt)
    uris = _gallery(root / "gallery")
    rows = {"small": (STORED_SMALL, (255, 255, 0)), "large": (STORED_LARGE, (255, 200, 0)),
            "bad": (STORED_SMALL, (200, 255, 0))}
    columns: dict[str, Any] = {
        IMAGE_ID: [f"img_{n}" for n in rows], URI: [uris[n] for n in rows], RANK: [0] * 3, MODEL_VERSION: [version] * 3,
        SCORE: [0.9] * 3, EMBEDDING: np.stack([color_embedding(np.asarray(c)) for _, c in rows.values()]),
        **{f: [box[i] for box, _ in rows.values()] for i, f in enumerate(("box_x", "box_y", "box_w", "box_h"))},
    }  # fmt: skip
    with MilvusStore(str(root / "loc.db"), "gallery", dim=8) as store:
        store.upsert(rows_from_columns(columns))
        store.build_index("FLAT")
    cfg = serve_config_from_args({
        "model_path": str(ckpt), "milvus_uri": str(root / "loc.db"), "milvus_collection": "gallery",
        "num_cpus_encoder": "0.1", "num_cpus_searcher": "0.1", "num_cpus_ingress": "0.1",
        "localize": {"enabled": True, "zoom_steps": 1, "min_prior_iou": 0.0},
    })  # fmt: skip
    serve.run(app_for(cfg, loader=fake_loader), name="localize", route_prefix="/localize")
    wait_until_routed(f"{serve_url}/localize")
    yield f"{serve_url}/localize"
    serve.delete("localize")


def test_search_over_http_refines_small_boxes_only(localize_app: str) -> None:
    resp = requests.post(f"{localize_app}/v1/search", json={"query": "yellow", "top_k": 3}, timeout=60)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    by_image = {r["image_id"]: r for r in body["results"]}
    assert by_image.keys() == {"img_small", "img_large", "img_bad"}
    assert by_image["img_small"]["box"] == REFINED and by_image["img_small"]["refined"] is True
    assert by_image["img_large"]["box"] == list(STORED_LARGE) and by_image["img_large"]["refined"] is False
    # a corrupt image: the stored box, not an error response
    assert by_image["img_bad"]["box"] == list(STORED_SMALL) and by_image["img_bad"]["refined"] is False
    assert "localize" in body["timings_ms"]
