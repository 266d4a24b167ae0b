"""The one way a gallery image becomes pixels: bytes or a path -> upright 8-bit RGB.

Ingestion (the encoder actors), the serving localize stage and the re-ranker's image
size all go through here, so a photo is seen the same way when it is indexed and when it
is queried: EXIF orientation applied (a phone's portrait photo is stored landscape with
an orientation tag; stored boxes are in the upright picture a browser shows), every mode
(grayscale, 16-bit, CMYK, palette, 1-bit, alpha) converted to RGB, any format Pillow
opens (JPEG, PNG, WebP, GIF, BMP, TIFF...). A file that can not be decoded raises
:class:`ImageDecodeError` with the reason, so the caller records one failed image
instead of failing a batch.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Decompression-bomb guard: far above any gallery photo, far below what exhausts RAM.
MAX_IMAGE_PIXELS = 100_000_000
# EXIF orientations 5-8 turn the picture by 90 degrees: width and height swap.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = frozenset({5, 6, 7, 8})


class ImageDecodeError(ValueError):
    """The bytes are not an image Pillow can decode (or are over the pixel limit)."""


def open_image(source: bytes | str | Path | None, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open lazily (the header only) and check the size before any pixel is decoded.

    ``source`` is the file's bytes or a local path (``file://`` allowed). A decompression
    bomb is refused from its header, without inflating it.
    """
    if source is None or (isinstance(source, bytes | bytearray) and not source):
        raise ImageDecodeError("zero-byte file")
    stream: io.BytesIO | str = io.BytesIO(source) if isinstance(source, bytes | bytearray) else (
        str(source).removeprefix("file://"))  # fmt: skip
    with warnings.catch_warnings():
        # Our own limit decides; Pillow's bomb *warning* would otherwise pass silently.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(stream)
        except Image.DecompressionBombError as exc:  # Pillow's own hard cap (2x Image.MAX_IMAGE_PIXELS)
            raise ImageDecodeError(f"image over the pixel limit: {exc}") from exc
        except Image.UnidentifiedImageError as exc:  # its message names a BytesIO object: useless
            raise ImageDecodeError("not a readable image (UnidentifiedImageError: no image format "
                                   "Pillow knows)") from exc
        except (OSError, ValueError, SyntaxError) as exc:  # SyntaxError: some broken headers
            raise ImageDecodeError(f"not a readable image ({type(exc).__name__}: {exc})") from exc
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageDecodeError(f"image over the pixel limit: {w}x{h} > {max_pixels}")
    return img


def to_upright_rgb(img: Image.Image) -> Image.Image:
    """Fully decode an opened image (truncated files fail here) to upright 8-bit RGB."""
    try:
        img.load()
        upright = ImageOps.exif_transpose(img) or img
        return _to_rgb(upright)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"cannot decode image ({type(exc).__name__}: {exc})") from exc


def decode_image(source: bytes | str | Path | None, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Bytes or a local path -> upright 8-bit RGB image, fully decoded now."""
    img = open_image(source, max_pixels=max_pixels)
    try:
        return to_upright_rgb(img)
    finally:
        img.close()


def decode_for_input(
    source: bytes | str | Path | None, size: int, *, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """Bytes or a path -> the model's ``size x size`` RGB input (uint8 ``[S, S, 3]``) and the
    upright picture's original ``(width, height)``.

    The same pixels :func:`decode_image` followed by the processor's square BILINEAR resize
    give, except that a JPEG much larger than ``size`` is decoded at a reduced scale first
    (Pillow's draft mode: the DCT is scaled by 1/2, 1/4 or 1/8 while decoding, never below
    ``size`` on either side). Decoding a 640x480 photo for a 128 px model that way costs a
    fraction of the full decode, and the resize that follows averages the pixels anyway.
    """
    img = open_image(source, max_pixels=max_pixels)
    try:
        original = upright_size(img)
        if img.format == "JPEG" and min(img.size) >= 2 * size:
            # Both sides stay >= size whatever the orientation, so the square resize only shrinks.
            img.draft(None, (size, size))  # mode kept: CMYK and grayscale files stay as they are
        rgb = to_upright_rgb(img)
    finally:
        img.close()
    pixels = np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    return pixels, original


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the picture as shown (EXIF orientation applied), from the header."""
    try:
        orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except (OSError, ValueError, SyntaxError, TypeError):  # a broken EXIF block: as stored
        orientation = 1
    w, h = img.size
    return (h, w) if orientation in _TRANSPOSED else (w, h)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become black, the same for every file that has them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
