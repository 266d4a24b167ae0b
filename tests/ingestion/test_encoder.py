from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reir.ingestion.encoder import InstanceEncoder
from reir.ingestion.gallery import list_gallery, list_image_dir, read_image_bytes
from reir.ingestion.records import ERROR, STATUS
from reir.platform import schema as S
from reir.platform.config import IngestConfig
from reir.platform.modeling import load_reir_model, model_version_for
from tests.platform.fakes import DIM, FakeModel, FakeProcessor, quadrant_image


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _batch(images: dict[str, bytes | None]) -> dict[str, np.ndarray]:
    ids = list(images)
    return {
        "image_id": np.array(ids, dtype=object),
        "uri": np.array([f"/g/{i}.jpg" for i in ids], dtype=object),
        "bytes": np.array([images[i] or b"" for i in ids], dtype=object),
        ERROR: np.array(["" if images[i] is not None else "FileNotFoundError: gone" for i in ids], dtype=object),
    }


def test_rows_for_batch_with_fake_model_counts_and_skips_bad_images() -> None:
    enc = InstanceEncoder(FakeModel(), FakeProcessor(), model_version="fake-1", top_k=3)
    good = _jpeg(quadrant_image(("red", "black", "blue", "black"), size=(40, 20)))
    cols = enc.rows_for_batch(_batch({"a": good, "bad": b"\x00garbage", "gone": None, "b": good}))
    ok = cols[STATUS] == "ok"
    assert ok.sum() == 6 and enc.images == 2 and enc.instances == 6 and enc.failures == 2
    assert [d.image_id for d in enc.dead_letter] == ["bad", "gone"]
    assert "gone" in cols[ERROR][cols[S.IMAGE_ID] == "gone"][0]
    assert list(cols[S.PK][ok][:3]) == ["fake-1:a:0", "fake-1:a:1", "fake-1:a:2"]
    # every row carries its image's decoded size and instance count (the query path reads no files)
    assert set(cols[S.IMAGE_W][ok]) == {40.0} and set(cols[S.IMAGE_H][ok]) == {20.0}
    assert set(cols[S.N_INSTANCES][ok]) == {3}
    assert cols[S.EMBEDDING].shape == (8, DIM) and cols[S.EMBEDDING].dtype == np.float32
    # rank 0 is the top-left quadrant in pixels of the original 40x20 image
    first = np.flatnonzero(ok)[0]
    assert [cols[f][first] for f in S.BOX_FIELDS] == [0.0, 0.0, 20.0, 10.0]


def test_the_encoder_stores_by_the_checkpoints_policy_unless_told(tiny_checkpoint: Path) -> None:
    """Unset, the encoder stores what the checkpoint's processor policy keeps (cap, objectness
    floor past the first); a given top_k / min_score wins (IngestConfig passes them through)."""
    model, processor = load_reir_model(str(tiny_checkpoint))
    version = model_version_for(tiny_checkpoint)
    batch = _batch({"x": _jpeg(quadrant_image(("red", "green", "blue", "white")))})
    rows = lambda **kw: int((InstanceEncoder(model, processor, model_version=version, **kw)
                             .rows_for_batch(batch)[STATUS] == "ok").sum())  # fmt: skip
    assert (processor.instance_top_k, processor.instance_min_score) == (16, 0.0)  # the fixture's: a fixed top 16
    assert rows() == 16 and rows(top_k=5) == 5
    assert rows(min_score=0.999) == 1  # the first stays whatever its score
    processor.instance_min_score, processor.instance_top_k = 0.999, 7
    assert rows() == 1 and rows(min_score=0.0) == 7 and rows(top_k=3, min_score=0.0) == 3


def test_real_tiny_model_encoder(tiny_checkpoint: Path) -> None:
    model, processor = load_reir_model(str(tiny_checkpoint))
    version = model_version_for(tiny_checkpoint)
    enc = InstanceEncoder(model, processor, model_version=version, top_k=4)
    cols = enc.rows_for_batch(_batch({"x": _jpeg(quadrant_image(("red", "green", "blue", "white"))), "y": b"nope"}))
    ok = cols[STATUS] == "ok"
    assert ok.sum() == 4 and enc.failures == 1
    emb = cols[S.EMBEDDING][ok]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert emb.shape[1] == enc.embedding_dim == 32
    assert all(0 <= cols[S.BOX_X][i] <= 64 for i in np.flatnonzero(ok))


def test_gallery_listing_synthetic_plain_and_list(tmp_path: Path, make_gallery: Callable[..., Path]) -> None:
    synth = make_gallery(tmp_path / "synth", n=3, corrupt=1)
    (synth / "images" / "train").mkdir()
    (synth / "images" / "train" / "other.jpg").write_bytes(b"x")
    items = list_image_dir(synth, "test")
    assert sorted(i.image_id for i in items) == ["bad000", "img000", "img001", "img002"]  # not train/
    plain = make_gallery(tmp_path / "plain", n=2, corrupt=0, synthetic_split=None)
    (plain / "sub").mkdir()
    quadrant_image(("red",) * 4).save(plain / "sub" / "img000.png")
    ids = sorted(i.image_id for i in list_image_dir(plain))
    assert ids == ["img000", "img001", "sub/img000"]
    listing = tmp_path / "list.jsonl"
    listing.write_text("\n".join(json.dumps({"image_id": f"q{i}", "uri": f"/nowhere/{i}.jpg"}) for i in range(3)))
    cfg = IngestConfig(model_path="/m", image_list=listing, limit=2)
    assert [i.image_id for i in list_gallery(cfg)] == ["q0", "q1"]


def test_read_image_bytes_turns_missing_files_into_errors(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"abc")
    out = read_image_bytes({"image_id": np.array(["a", "b"]), "uri": np.array([str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")])})
    assert out["bytes"][0] == b"abc" and out[ERROR][0] == ""
    assert out["bytes"][1] == b"" and "FileNotFoundError" in out[ERROR][1]


def test_duplicate_ids_rejected(tmp_path: Path) -> None:
    listing = tmp_path / "list.jsonl"
    listing.write_text('{"image_id": "a", "uri": "/x"}\n{"image_id": "a", "uri": "/y"}\n')
    with pytest.raises(ValueError, match="duplicate"):
        list_gallery(IngestConfig(model_path="/m", image_list=listing))
