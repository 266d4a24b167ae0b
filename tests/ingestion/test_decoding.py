"""Robust decoding: every awkward or hostile file either decodes to upright RGB or is one dead letter."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reir.ingestion.encoder import InstanceEncoder, decode_image
from reir.ingestion.records import ERROR, STATUS
from reir.model import images
from reir.serving import localize
from tests.platform.fakes import FakeModel, FakeProcessor, quadrant_image


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (a decompression bomb never inflated)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _exif_rotated() -> bytes:
    """A 40x20 JPEG, red on the left, whose EXIF says 'rotate 90 degrees clockwise' (6)."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(img, "JPEG", quality=95, exif=exif)


GOOD: dict[str, bytes] = {
    "gray": _save(Image.new("L", (30, 20), 128), "PNG"),
    "cmyk": _save(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG"),
    "palette": _save(quadrant_image(("red", "green", "blue", "white")).convert("P"), "PNG"),
    "gray16": _save(Image.fromarray(np.full((20, 30), 65535, dtype=np.uint16)), "PNG"),
    "rgba": _save(Image.new("RGBA", (30, 20), (255, 0, 0, 255)), "PNG"),
    "exif": _exif_rotated(),
    "bilevel": _save(Image.new("1", (30, 20), 1), "PNG"),
    "webp": _save(Image.new("RGB", (30, 20), (0, 255, 0)), "WEBP", lossless=True),
    "gray_jpeg": _save(Image.new("L", (30, 20), 200), "JPEG"),
    "la": _save(Image.new("LA", (30, 20), (255, 255)), "PNG"),
    "gif": _save(quadrant_image(("red", "green", "blue", "white")), "GIF"),
}
BAD: dict[str, tuple[bytes, str]] = {
    "zero_byte": (b"", "zero-byte"),
    "corrupt": (b"\xff\xd8\xff this is not a jpeg", "UnidentifiedImageError"),
    "truncated": (_save(quadrant_image(("red",) * 4, size=(256, 256)), "PNG")[:300], "OSError"),
    "bomb": (_png_header_only(40_000, 40_000), "pixel limit"),  # over Pillow's hard cap too
    "large": (_png_header_only(12_000, 10_000), "pixel limit: 12000x10000"),  # over ours (100 M) only
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_awkward_modes_decode_to_rgb(name: str) -> None:
    img = decode_image(GOOD[name])
    assert img.mode == "RGB"


def test_pixel_values_survive_mode_conversion() -> None:
    assert decode_image(GOOD["gray16"]).getpixel((0, 0)) == (255, 255, 255)  # 16-bit full scale, not clipped
    assert decode_image(GOOD["rgba"]).getpixel((0, 0)) == (255, 0, 0)
    r, g, b = decode_image(GOOD["cmyk"]).getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red
    upright = decode_image(GOOD["exif"])
    assert upright.size == (20, 40)  # rotated by its EXIF orientation
    top = upright.getpixel((10, 5))
    assert top[0] > 200 and top[2] < 60  # the red left half is now on top


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_raise(name: str) -> None:
    data, reason = BAD[name]
    with pytest.raises(Exception, match=reason if reason[0].islower() else None) as info:
        decode_image(data)
    assert reason in f"{type(info.value).__name__}: {info.value}"


def test_pixel_limit_is_configurable() -> None:
    data = _save(Image.new("RGB", (100, 100)), "PNG")
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ValueError, match="pixel limit"):
        decode_image(data, max_pixels=9_999)


def test_encoder_turns_each_bad_file_into_one_dead_letter() -> None:
    enc = InstanceEncoder(FakeModel(), FakeProcessor(), model_version="fake-1", top_k=2)
    files = {**{k: v for k, v in GOOD.items()}, **{k: v for k, (v, _) in BAD.items()}}
    ids = sorted(files)
    cols = enc.rows_for_batch({
        "image_id": np.array(ids, dtype=object),
        "uri": np.array([f"/g/{i}" for i in ids], dtype=object),
        "bytes": np.array([files[i] for i in ids], dtype=object),
        "content_hash": np.array([f"h-{i}" for i in ids], dtype=object),
    })  # fmt: skip
    assert enc.images == len(GOOD) and enc.failures == len(BAD)
    reasons = {d.image_id: d.error for d in enc.dead_letter}
    assert set(reasons) == set(BAD)
    for name, (_, reason) in BAD.items():
        assert reason in reasons[name]
        assert reason in cols[ERROR][cols["image_id"] == name][0]
    ok = cols[STATUS] == "ok"
    assert ok.sum() == 2 * len(GOOD)
    # passthrough columns follow their image onto every row
    assert all(h == f"h-{i}" for h, i in zip(cols["content_hash"], cols["image_id"], strict=True))


def test_one_decode_for_ingestion_and_serving(tmp_path: Path) -> None:
    """Bytes (ingestion) and a path (the serving localize stage) decode to the same pixels."""
    path = tmp_path / "rotated photo ünï.jpg"
    path.write_bytes(GOOD["exif"])
    from_bytes = decode_image(GOOD["exif"])
    from_path = images.decode_image(path)
    from_serving = localize.decode(localize.open_image(str(path)))
    assert from_bytes.size == from_path.size == from_serving.size == (20, 40)
    assert np.array_equal(np.asarray(from_bytes), np.asarray(from_serving))
    with Image.open(path) as header:  # the re-ranker's image size: upright, from the header only
        assert header.size == (40, 20) and images.upright_size(header) == (20, 40)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(BAD["corrupt"][0])
    with pytest.raises(images.ImageDecodeError, match="not a readable image"):
        images.decode_image(bad)
    with pytest.raises(localize.ImageReadError, match="broken.jpg"):
        localize.open_image(str(bad))


def test_webp_and_gray_keep_their_pixels() -> None:
    assert decode_image(GOOD["webp"]).getpixel((3, 3)) == (0, 255, 0)
    assert decode_image(GOOD["gray_jpeg"]).getpixel((3, 3))[0] in range(195, 206)


def _photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A smooth random picture (a JPEG's DCT scaling behaves as on a photograph)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[1] // 32, size[0] // 32, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def _model_input(data: bytes, size: int) -> np.ndarray:
    """What the encoder feeds the model without reader-side decoding (full decode, then resize)."""
    return np.asarray(decode_image(data).resize((size, size), Image.Resampling.BILINEAR))


@pytest.mark.parametrize("name", sorted(GOOD))
def test_decode_for_input_matches_the_full_decode_on_small_files(name: str) -> None:
    pixels, original = images.decode_for_input(GOOD[name], 16)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    assert original == decode_image(GOOD[name]).size
    assert np.array_equal(pixels, _model_input(GOOD[name], 16))  # no draft below 2x the input size


def test_decode_for_input_drafts_large_jpegs_close_to_the_full_decode() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    data = _save(_photo((640, 480)), "JPEG", quality=90, exif=exif)
    pixels, original = images.decode_for_input(data, 64)
    assert original == (480, 640)  # the upright picture's size, from before the reduced decode
    full = _model_input(data, 64)
    diff = np.abs(pixels.astype(int) - full.astype(int))
    assert 0 < diff.mean() < 3.0 and np.percentile(diff, 99) < 16  # a reduced decode, nearly the same pixels
    for name, (data, reason) in BAD.items():
        with pytest.raises(images.ImageDecodeError, match=reason if name != "truncated" else "cannot decode"):
            images.decode_for_input(data, 64)


def test_reader_decodes_and_the_encoder_takes_pixels() -> None:
    """read_and_decode (read tasks) then rows_for_batch on pixels == rows_for_batch on bytes."""
    import tempfile

    from reir.ingestion.gallery import ORIGINAL_W, PIXELS, read_and_decode

    files = {"q0": _save(quadrant_image(("red", "green", "blue", "white"), size=(64, 48)), "PNG"),
             "q1": _save(quadrant_image(("yellow", "black", "white", "red"), size=(40, 40)), "PNG"),
             "bad": BAD["corrupt"][0]}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        uris = []
        for image_id, data in files.items():
            (Path(tmp) / image_id).write_bytes(data)
            uris.append(str(Path(tmp) / image_id))
        uris.append(str(Path(tmp) / "missing.png"))
        ids = [*files, "missing"]
        batch = {"image_id": np.array(ids, dtype=object), "uri": np.array(uris, dtype=object)}
        decoded = read_and_decode(batch, input_size=16, max_pixels=10_000)
    assert "bytes" not in decoded and decoded[PIXELS].shape == (4, 16, 16, 3)
    assert list(decoded[ORIGINAL_W]) == [64, 40, 0, 0]
    assert "UnidentifiedImageError" in decoded[ERROR][2] and "missing.png" in decoded[ERROR][3]
    assert not decoded[PIXELS][2:].any()

    by_pixels = InstanceEncoder(FakeModel(), FakeProcessor(), model_version="fake-1", top_k=4)
    rows = by_pixels.rows_for_batch(decoded)
    by_bytes = InstanceEncoder(FakeModel(), FakeProcessor(), model_version="fake-1", top_k=4)
    reference = by_bytes.rows_for_batch({**batch, "bytes": np.array([*files.values(), b""], dtype=object),
                                         ERROR: np.array(["", "", "", "FileNotFoundError: missing.png"], dtype=object)})
    assert (by_pixels.images, by_pixels.failures) == (by_bytes.images, by_bytes.failures) == (2, 2)
    ok = rows[STATUS] == "ok"
    assert list(rows["pk"][ok]) == list(reference["pk"][reference[STATUS] == "ok"])
    # boxes are in the original pixels; embeddings from the 16 px input (the fake's quadrant colours)
    assert np.allclose(rows["box_w"][ok], reference["box_w"][reference[STATUS] == "ok"])
    assert np.allclose(rows["embedding"][ok], reference["embedding"][reference[STATUS] == "ok"], atol=0.05)
    assert "content_hash" in rows and "pixels" not in rows
