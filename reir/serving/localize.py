"""The localize stage: refine the boxes of the top results by zooming on small ones.

Runs after re-ranking on the first ``LocalizeConfig.max_results`` answers. The stored box
of a result came from the text-free visual branch at the model's input size; for an
instance that covers a small fraction of its image, the model is run again on an enlarged
window around it, conditioned on the query (:func:`reir.model.localize.zoom_refine`), and
the refined box replaces the stored one. Large boxes are left alone (their image header
is read, never decoded).

Images are read from the row's ``uri`` on the replica that runs the stage (a local path,
``file://``, ``http(s)://`` or a pyarrow filesystem URI). An image that cannot be read keeps
its stored box and is reported as an ``unreadable`` error; a model failure keeps every box
and reports ``failed``: the stage never fails a query.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image

from reir.model import images
from reir.model.localize import BatchLocalizer, InstanceLocalizer, ZoomSpec, as_box, is_small, zoom_refine
from reir.platform.config import LocalizeConfig
from reir.platform.schema import Box
from reir.platform.uri import DEFAULT_MAX_BYTES, is_local, read_uri

log = logging.getLogger(__name__)

UNREADABLE, FAILED, UNAVAILABLE = "unreadable", "failed", "unavailable"
ImageReader = Callable[[str], Image.Image]


@dataclass(frozen=True)
class BoxUpdate:
    """The localize stage's answer for one result: its (possibly refined) box."""

    box: Box
    refined: bool = False
    error: str = ""  # "", UNREADABLE or FAILED


class ImageReadError(OSError):
    pass


def open_image(
    uri: str, *, max_pixels: int = images.MAX_IMAGE_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES
) -> Image.Image:
    """Open an image lazily (header only): a local file in place, any other URI read first
    (size-capped by :func:`reir.platform.uri.read_uri`)."""
    try:
        source = uri if is_local(uri) else read_uri(uri, max_bytes=max_bytes)
        return images.open_image(source, max_pixels=max_pixels)
    except (images.ImageDecodeError, OSError) as exc:  # OSError: read_uri's (404, size cap, deadline)
        raise ImageReadError(f"{uri}: {exc}") from exc


def decode(img: Image.Image) -> Image.Image:
    """Fully decode to upright RGB, the way ingestion did (truncated files fail here)."""
    try:
        return images.to_upright_rgb(img)
    except images.ImageDecodeError as exc:
        raise ImageReadError(str(exc)) from exc


class Localizer:
    """``localize(query, [(uri, box)]) -> [BoxUpdate]`` with an injected batch localizer."""

    def __init__(
        self, localizer: BatchLocalizer, *, spec: ZoomSpec, open_image: ImageReader = open_image,
    ) -> None:  # fmt: skip
        self.localizer = localizer
        self.spec = spec
        self.open_image = open_image

    @classmethod
    def from_config(cls, model: object, processor: object, cfg: LocalizeConfig) -> Localizer:
        spec = ZoomSpec(small_area_fraction=cfg.small_area_fraction, zoom_factor=cfg.zoom_factor,
                        steps=cfg.zoom_steps, converge_iou=cfg.converge_iou)
        localizer = InstanceLocalizer(model, processor, top_k=cfg.top_k_instances, min_prior_iou=cfg.min_prior_iou)
        max_pixels = cfg.max_image_pixels
        return cls(localizer, spec=spec, open_image=lambda uri: open_image(uri, max_pixels=max_pixels))

    def localize(self, query: str, items: Sequence[tuple[str, Sequence[float]]]) -> list[BoxUpdate]:
        boxes = [as_box(box) for _, box in items]
        updates = [BoxUpdate(box) for box in boxes]
        images: dict[str, Image.Image | None] = {}
        todo: list[int] = []
        for i, (uri, box) in enumerate(zip((u for u, _ in items), boxes, strict=True)):
            if self._small_in(uri, box, images):
                todo.append(i)
            elif uri in images and images[uri] is None:
                updates[i] = BoxUpdate(box, error=UNREADABLE)
        if not todo:
            return updates
        readable = [image for i in todo if (image := images[items[i][0]]) is not None]  # all of them, by _small_in
        try:
            zoomed = zoom_refine(self.localizer, readable, [boxes[i] for i in todo], query, self.spec)
        except Exception:  # the stored boxes still answer the query
            log.exception("localize failed for %d boxes; keeping the stored boxes", len(todo))
            return [BoxUpdate(u.box, error=FAILED) if i in todo else u for i, u in enumerate(updates)]
        for i, result in zip(todo, zoomed, strict=True):
            updates[i] = BoxUpdate(result.box, refined=result.refined)
        return updates

    def _small_in(self, uri: str, box: Box, cache: dict[str, Image.Image | None]) -> bool:
        """Whether ``box`` is small in the image at ``uri``; decodes it into ``cache`` if so.

        ``cache[uri]`` is None for an unreadable image; a large box's image is not decoded
        (and not cached) unless another, small box of the same image needs it.
        """
        if uri in cache:
            image = cache[uri]
            return image is not None and is_small(box, image.size, self.spec.small_area_fraction)
        try:
            header = self.open_image(uri)
        except OSError as exc:
            log.warning("localize: %s", exc)
            cache[uri] = None
            return False
        try:
            if not is_small(box, header.size, self.spec.small_area_fraction):
                return False
            cache[uri] = decode(header)
        except OSError as exc:
            log.warning("localize: %s: %s", uri, exc)
            cache[uri] = None
        finally:
            header.close()
        return cache[uri] is not None
