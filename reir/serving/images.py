"""Gallery images behind a non-local uri (``http(s)://``, ``s3://``...), for the image route.

The route proxies rather than redirects: a gallery on an internal web server or a private
bucket is reachable from the cluster, not from the user's browser. Only uris stored in the
index get here (the route looks the image id up first), the read is capped and has a
deadline (:func:`reir.platform.uri.read_uri`), and only bytes that decode as an image
format PIL knows are served, with that format's media type, so a stored uri can never make
the service answer arbitrary content (HTML, SVG with script) under its own origin.
"""

from __future__ import annotations

import asyncio
import io
import warnings
from dataclasses import dataclass

from PIL import Image

from reir.platform.uri import read_uri

PROXY_TIMEOUT_S = 10.0  # a page waits for its thumbnails; a slow origin is an error, not a hang
PROXY_MAX_BYTES = 32 << 20


@dataclass(frozen=True)
class FetchedImage:
    data: bytes
    media_type: str


def image_media_type(data: bytes) -> str | None:
    """``image/...`` of bytes PIL recognizes from their header, else None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                kind = img.format or ""
        except (OSError, ValueError, Image.DecompressionBombError):
            return None
    media = Image.MIME.get(kind)
    return media if media is not None and media.startswith("image/") else None


async def fetch_image(
    uri: str, *, timeout_s: float = PROXY_TIMEOUT_S, max_bytes: int = PROXY_MAX_BYTES
) -> FetchedImage | None:
    """The image at ``uri`` (off the event loop), or None when its bytes are not an image.

    Raises :class:`reir.platform.uri.UriReadError` when the source cannot be read.
    """
    data = await asyncio.to_thread(read_uri, uri, timeout_s=timeout_s, max_bytes=max_bytes)
    media = image_media_type(data)
    return None if media is None else FetchedImage(data, media)
