from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from reir.ingestion.pipeline import run_ingestion
from reir.platform.config import IngestConfig, MilvusConfig
from reir.platform.milvus_server import EmbeddedMilvus
from reir.platform.modeling import model_version_for
from reir.platform.store import MilvusStore, SearchFilter
from tests.platform.fakes import fake_loader

TOP_K = 3


def _config(root: Path, ckpt: Path, uri: str, **extra: object) -> IngestConfig:
    fields: dict[str, object] = {
        "gallery_root": root, "split": "test", "model_path": str(ckpt),
        "milvus": MilvusConfig(uri=uri, collection="gallery", index_type="HNSW"),
        "batch_size": 4, "num_encoders": 2, "num_cpus_per_encoder": 0.5, "top_k_instances": TOP_K,
        "dead_letter_path": root / "dead.jsonl",
    }  # fmt: skip
    return IngestConfig.model_validate({**fields, **extra})


def test_ingest_real_tiny_model_into_lite_file_and_rerun_is_idempotent(
    tmp_path: Path, tiny_checkpoint: Path, ray_session: None, make_gallery: Callable[..., Path]
) -> None:
    root = make_gallery(tmp_path / "synth", n=9, corrupt=1)
    db = tmp_path / "idx.db"
    cfg = _config(root, tiny_checkpoint, str(db))

    first = run_ingestion(cfg)
    assert (first.images, first.failures) == (9, 1)
    assert first.instances == first.rows_in_store == 9 * TOP_K
    assert first.model_version == model_version_for(tiny_checkpoint)
    assert [d.image_id for d in first.dead_letter] == ["bad000"]
    assert json.loads((root / "dead.jsonl").read_text())["image_id"] == "bad000"
    assert first.images_per_s > 0

    # Same primary keys whatever the parallelism: a full re-encode upserts, never duplicates.
    second = run_ingestion(cfg.model_copy(update={"num_encoders": 1, "incremental": False}))
    assert (second.images, second.instances, second.failures) == (9, 9 * TOP_K, 1)
    # Incremental (the default): nothing changed, nothing is encoded.
    third = run_ingestion(cfg)
    assert (third.images, third.instances, third.failures, third.unchanged) == (0, 0, 0, 10)
    assert third.rows_in_store == 9 * TOP_K and third.dead_letter_total == 1

    with MilvusStore(str(db), "gallery") as store:  # the server is gone: file usable again
        store.load()
        assert store.count() == 9 * TOP_K
        assert store.index_type() == "HNSW"
        row = store.get([f"{first.model_version}:img004:0"])[0]
        np.testing.assert_allclose(np.linalg.norm(row["embedding"]), 1.0, atol=1e-4)


def test_a_new_lite_collection_is_indexed_flat_by_default_and_searchable_after_the_run(
    tmp_path: Path, tiny_checkpoint: Path, ray_session: None, make_gallery: Callable[..., Path]
) -> None:
    root = make_gallery(tmp_path / "auto", n=4, corrupt=0)
    db = tmp_path / "auto.db"
    cfg = _config(root, tiny_checkpoint, str(db), milvus=MilvusConfig(uri=str(db), collection="gallery"))
    summary = run_ingestion(cfg)
    assert summary.rows_in_store == 4 * TOP_K
    with MilvusStore(str(db), "gallery") as store:
        assert store.index_type() == "FLAT"  # milvus-lite's AUTOINDEX
        store.load()  # a reopened lite file starts released
        row = store.get([f"{summary.model_version}:img002:0"])[0]
        hits = store.search(np.asarray(row["embedding"], dtype=np.float32), 1, SearchFilter(model_version=summary.model_version))
        assert hits[0][0].pk == row["pk"]


@pytest.mark.parametrize("layout", ["fused", "staged"])
def test_ingest_with_injected_loader_through_a_server_uri(
    tmp_path: Path, fake_checkpoint: Path, ray_session: None, make_gallery: Callable[..., Path], layout: str
) -> None:
    """Both layouts of the stream (fused: the CPU default; staged: read tasks -> actors -> write
    tasks, the GPU default) write the same rows, ledger and failures."""
    root = make_gallery(tmp_path / "plain", n=5, corrupt=1, synthetic_split=None)
    with EmbeddedMilvus(tmp_path / "srv.db") as server:
        cfg = _config(root, fake_checkpoint, server.uri, num_encoders=1, pipeline=layout, batch_size=2)
        summary = run_ingestion(cfg, loader=fake_loader)
        assert summary.pipeline == layout
        assert (summary.images, summary.instances, summary.failures) == (5, 5 * TOP_K, 1)
        assert [d.image_id for d in summary.dead_letter] == ["bad000"]
        again = run_ingestion(cfg, loader=fake_loader)  # the ledger holds every image: nothing to encode
        assert (again.images, again.unchanged, again.dead_letter_total) == (0, 6, 1)
        with MilvusStore(server.uri, "gallery") as store:
            assert store.count(SearchFilter(model_version=summary.model_version)) == 5 * TOP_K


def test_all_images_failing_is_reported_not_raised(
    tmp_path: Path, fake_checkpoint: Path, ray_session: None, make_gallery: Callable[..., Path]
) -> None:
    root = make_gallery(tmp_path / "bad", n=0, corrupt=2)
    summary = run_ingestion(_config(root, fake_checkpoint, str(tmp_path / "idx.db"), num_encoders=1), loader=fake_loader)
    assert (summary.images, summary.instances, summary.failures, summary.rows_in_store) == (0, 0, 2, 0)


def test_empty_gallery_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        run_ingestion(IngestConfig(gallery_root=tmp_path / "empty", model_path=str(tmp_path)))


def _refs(path: Path, image_ids: list[str]) -> Path:
    """A REIRCOCO ground truth naming ``image_ids`` (test split)."""
    box = {"ann_id": 1, "bbox": [0.0, 0.0, 8.0, 8.0], "category_name": "circle", "category_id": 0}
    path.write_text(json.dumps([
        {"image_id": i, "file_name": f"images/test/{i}.jpg", "height": 48, "width": 64, "split": "test",
         "sentences": [{"sent_id": f"s-{i}", "raw": "the red one", "matches": []}], "ref_anno": box,
         "det_anno": [box]} for i in image_ids]))  # fmt: skip
    return path


def test_ingest_stops_when_the_annotations_name_no_gallery_image(
    tmp_path: Path, tiny_checkpoint: Path, ray_session: None, make_gallery: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from reir.cli import _run, app

    root = make_gallery(tmp_path / "g", n=3, corrupt=0)
    refs = _refs(tmp_path / "refs.json", ["139", "285", "632"])  # COCO's numeric ids beside file-stem ids
    db = tmp_path / "idx.db"
    args = ["ingest", "--gallery", str(root), "--annotations", str(refs), "--model", str(tiny_checkpoint),
            "--milvus-uri", str(db)]
    assert _run(lambda: app(args, standalone_mode=False)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert "none of its 3 image ids is in the gallery (3 images), e.g. annotations ['139', '285', '632'] vs " \
           "gallery ['img000', 'img001', 'img002']" in err
    assert not db.exists()  # stopped before anything was written


def test_ingest_warns_when_only_some_annotated_images_are_in_the_gallery(
    tmp_path: Path, fake_checkpoint: Path, ray_session: None, make_gallery: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    root = make_gallery(tmp_path / "g", n=4, corrupt=0)
    refs = _refs(tmp_path / "refs.json", ["img000", "img003", "gone1", "gone2", "gone3", "gone4"])
    cfg = _config(root, fake_checkpoint, str(tmp_path / "idx.db"), num_encoders=1, annotations=refs)
    with caplog.at_level(logging.WARNING, logger="reir.ingestion.gallery"):
        summary = run_ingestion(cfg, loader=fake_loader)
    assert (summary.images, summary.rows_in_store) == (4, 4 * TOP_K)  # the gallery itself is ingested
    (warning,) = [r.getMessage() for r in caplog.records if "annotated image ids" in r.getMessage()]
    assert warning.endswith("4 of 6 annotated image ids are not in the gallery (4 images; 2 in common), "
                            "e.g. ['gone1', 'gone2', 'gone3']")

