"""Serve fixtures shared by the serving tests: one Serve instance for the package, and a
fake-model app with API keys (from a secret file), gallery images and a calibration file."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from reir.ingestion.encoder import InstanceEncoder
from reir.platform.auth import hash_key
from reir.platform.milvus_server import free_port
from reir.platform.modeling import ModelLoader, model_version_for
from reir.platform.schema import ROW_FIELDS, rows_from_columns
from reir.platform.store import MilvusStore
from reir.serving.lifecycle import wait_until_routed
from tests.platform.fakes import COLORS, quadrant_image

COLLECTION = "gallery"
IMAGE_SIZE = (64, 48)
SEARCH_KEY, ADMIN_KEY = "test-search-key", "test-admin-key"


def fill_store(db: Path, ckpt: Path, loader: ModelLoader, *, image_dir: Path | None = None, top_k: int = 4,
               nms_iou: float = 0.7) -> str:
    """Encode one image per colour (that colour top-left) straight into a lite file.

    With ``image_dir`` the images are also written there as PNGs and the rows' uris point
    at them (so the image route can stream them); else the uris are ``/g/{id}.png``.
    """
    model, processor = loader(str(ckpt))
    version = model_version_for(ckpt)
    enc = InstanceEncoder(model, processor, model_version=version, top_k=top_k, nms_iou=nms_iou)
    ids, blobs, uris = [], [], []
    for name in COLORS:
        buf = io.BytesIO()
        quadrant_image((name, "black", "black", "black"), size=IMAGE_SIZE).save(buf, format="PNG")
        image_id = f"img_{name}"
        uri = f"/g/{image_id}.png"
        if image_dir is not None:
            image_dir.mkdir(parents=True, exist_ok=True)
            uri = str(image_dir / f"{image_id}.png")
            Path(uri).write_bytes(buf.getvalue())
        ids.append(image_id)
        blobs.append(buf.getvalue())
        uris.append(uri)
    cols = enc.rows_for_batch({
        "image_id": np.array(ids, dtype=object), "uri": np.array(uris, dtype=object),
        "bytes": np.array(blobs, dtype=object),
    })  # fmt: skip
    with MilvusStore(str(db), COLLECTION, dim=enc.embedding_dim) as store:
        store.upsert(rows_from_columns({k: cols[k] for k in ROW_FIELDS}))
        store.build_index("FLAT")
    return version  # the store is closed: the Serve replica may now open the file


@pytest.fixture(scope="package")
def serve_url(ray_session: None) -> Iterator[str]:
    from ray import serve  # imported on use: the stub-backend tests of this package need no Ray

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@dataclass(frozen=True)
class FakeApp:
    url: str
    version: str
    gallery: Path
    search_headers: dict[str, str]
    admin_headers: dict[str, str]


@pytest.fixture(scope="package")
def fake_app(serve_url: str, fake_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeApp]:
    from ray import serve

    from tests.platform.fakes import fake_loader

    root = tmp_path_factory.mktemp("fake_app")
    ckpt = root / "ckpt"
    shutil.copytree(fake_checkpoint, ckpt)
    (ckpt / "calibration.json").write_text(json.dumps({"discover_threshold": 0.1}))
    version = fill_store(root / "fake.db", ckpt, fake_loader, image_dir=root / "gallery")
    keys = root / "secrets" / "api_keys.yaml"
    keys.parent.mkdir()
    keys.write_text(json.dumps([
        {"name": "tests", "sha256": hash_key(SEARCH_KEY), "rate_per_s": 1000, "burst": 1000},
        {"name": "ops", "sha256": hash_key(ADMIN_KEY), "scopes": ["search", "admin"]},
    ]))  # fmt: skip
    from reir.serving.app import app_for, serve_config_from_args

    cfg = serve_config_from_args({
        "model_path": str(ckpt), "milvus_uri": str(root / "fake.db"), "milvus_collection": COLLECTION,
        "num_cpus_encoder": "0.1", "num_cpus_searcher": "0.1", "num_cpus_ingress": "0.1",
        "candidates": "10", "security__api_keys_file": str(keys), "image_roots": [str(root / "gallery")],
        "metadata_fields": {"split": "str"},
        # Ingress + Searcher (one hop): the module's routes, errors and metrics then also cover
        # HandleStages; the one-deployment default is test_app's topology test and the e2e tests'.
        "search_in_ingress": "false",
    })  # fmt: skip
    serve.run(app_for(cfg, loader=fake_loader), name="fake", route_prefix="/fake")
    wait_until_routed(f"{serve_url}/fake")
    yield FakeApp(f"{serve_url}/fake", version, root / "gallery", {"Authorization": f"Bearer {SEARCH_KEY}"},
                  {"Authorization": f"Bearer {ADMIN_KEY}"})
    serve.delete("fake")

