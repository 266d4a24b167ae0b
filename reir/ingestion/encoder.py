"""Plain (Ray-free) image -> instance-rows encoder used by the ingestion actors.

Output is columnar, one row per instance, in the ``reir.platform.schema`` layout plus
two bookkeeping columns (``status``, ``error``). Every input image yields at least one
row: its instances (``status == "ok"``, ranks 0..K-1), or one status row
(``"failed"`` for unreadable/undecodable images, ``"empty"`` when the model kept no
instance) with ``rank == -1`` and a zero embedding. Status rows let the sink count
images and failures exactly without a side channel; sinks must not store them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from reir.ingestion.gallery import ORIGINAL_H, ORIGINAL_W, PIXELS
from reir.ingestion.records import (
    ERROR,
    OUTPUT_COLUMNS,
    STATUS_EMPTY,
    STATUS_FAILED,
    STATUS_OK,
    DeadLetter,
)
from reir.model.images import MAX_IMAGE_PIXELS, decode_image
from reir.platform import schema as S
from reir.platform.modeling import ImageModel, ImageProcessor, InstanceLike

log = logging.getLogger(__name__)

# Columns the encoder consumes; every other input column is copied onto each output row.
_CONSUMED = frozenset({"image_id", "uri", "bytes", ERROR, PIXELS, ORIGINAL_W, ORIGINAL_H})


class InstanceEncoder:
    """Encodes image batches into instance rows with one model; counts and skips bad images."""

    def __init__(
        self,
        model: ImageModel,
        processor: ImageProcessor,
        *,
        model_version: str,
        top_k: int | None = None,
        min_score: float | None = None,
        nms_iou: float = 0.7,
        device: str = "cpu",
        bf16: bool = False,
        max_pixels: int = MAX_IMAGE_PIXELS,
        model_batch: int | None = None,
    ) -> None:
        self.model = model
        # Images per model call: a batch of rows_for_batch is encoded in chunks of this many
        # (None: the whole batch at once), so a writer's batch can be larger than the model's.
        self.model_batch = model_batch
        self.processor = processor
        self.model_version = model_version
        self.top_k = top_k  # None: the processor's policy (the checkpoint's)
        self.min_score = min_score
        self.nms_iou = nms_iou
        self.device = device
        self.bf16 = bf16
        self.max_pixels = max_pixels
        self.dead_letter: list[DeadLetter] = []
        self.images = 0
        self.instances = 0
        self._dim: int | None = None

    @property
    def failures(self) -> int:
        return len(self.dead_letter)

    @property
    def embedding_dim(self) -> int:
        """Embedding size, probed once on a blank image (status rows need it up front)."""
        if self._dim is None:
            probe = self.encode([Image.new("RGB", (32, 32))], [(32, 32)])
            if not probe or not probe[0]:
                raise RuntimeError("model returned no instance for the probe image")
            self._dim = int(np.asarray(probe[0][0].embedding).reshape(-1).shape[0])
        return self._dim

    def encode(
        self, images: list[Image.Image], sizes: Sequence[tuple[int, int]]
    ) -> list[list[InstanceLike]]:
        """Instances per image; ``sizes`` are the original ``(width, height)``."""
        with torch.inference_mode():
            pixel_values = self.processor.images(images)
            if self.device != "cpu" and isinstance(pixel_values, torch.Tensor):
                pixel_values = pixel_values.to(self.device, non_blocking=True)
            with torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.bf16):
                output = self.model.encode_images(pixel_values)
            return self.processor.postprocess(
                output, sizes=list(sizes), top_k=self.top_k, nms_iou=self.nms_iou, min_score=self.min_score
            )

    def rows_for_batch(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """``{image_id, uri, bytes | pixels[, error], ...}`` columns -> instance + status row columns.

        ``bytes`` (the files) are decoded here; ``pixels`` with ``original_w``/``original_h``
        (decoded by the read tasks, :func:`reir.ingestion.gallery.read_and_decode`) go straight
        to the model. Any other input column (content hash, metadata) is copied onto each of
        the image's rows.
        """
        if "image_id" not in batch:  # an empty block (every image of it was unchanged)
            return _RowBuilder(self.model_version, self.embedding_dim).columns()
        passthrough = [name for name in batch if name not in _CONSUMED]
        builder = _RowBuilder(self.model_version, self.embedding_dim, passthrough)
        decoded: list[tuple[str, str, Image.Image, tuple[int, int]]] = []
        errors = batch.get(ERROR)
        pixels = batch.get(PIXELS)
        for i, (image_id, uri) in enumerate(zip(batch["image_id"], batch["uri"], strict=True)):
            image_id, uri = str(image_id), str(uri)
            builder.extras[image_id] = [batch[name][i] for name in passthrough]
            if errors is not None and errors[i]:
                self._fail(builder, image_id, uri, str(errors[i]))
                continue
            try:
                if pixels is not None:
                    size = (int(batch[ORIGINAL_W][i]), int(batch[ORIGINAL_H][i]))
                    decoded.append((image_id, uri, Image.fromarray(np.asarray(pixels[i], dtype=np.uint8)), size))
                else:
                    img = decode_image(batch["bytes"][i], max_pixels=self.max_pixels)
                    decoded.append((image_id, uri, img, img.size))
            except Exception as exc:  # noqa: BLE001 - any bad input is one skipped image, not a crash
                self._fail(builder, image_id, uri, f"{type(exc).__name__}: {exc}")
        self._encode_into(builder, decoded)
        return builder.columns()

    def _encode_into(self, builder: _RowBuilder, decoded: list[tuple[str, str, Image.Image, tuple[int, int]]]) -> None:
        if not decoded:
            return
        step = self.model_batch or len(decoded)
        if len(decoded) > step:
            for start in range(0, len(decoded), step):
                self._encode_into(builder, decoded[start : start + step])
            return
        try:
            per_image = self.encode([img for _, _, img, _ in decoded], [size for *_, size in decoded])
        except Exception:  # noqa: BLE001 - isolated below, image by image
            # One poison image must not sink its batch: retry one by one to isolate it.
            log.warning("batch encode failed; retrying %d images one by one", len(decoded))
            for item in decoded:
                self._encode_one(builder, *item)
            return
        for (image_id, uri, _, size), instances in zip(decoded, per_image, strict=True):
            self._add(builder, image_id, uri, instances, size)

    def _encode_one(self, builder: _RowBuilder, image_id: str, uri: str, img: Image.Image,
                    size: tuple[int, int]) -> None:  # fmt: skip
        try:
            instances = self.encode([img], [size])[0]
        except Exception as exc:  # noqa: BLE001 - recorded in the dead-letter list
            self._fail(builder, image_id, uri, f"{type(exc).__name__}: {exc}")
            return
        self._add(builder, image_id, uri, instances, size)

    def _add(self, builder: _RowBuilder, image_id: str, uri: str, instances: list[InstanceLike],
             size: tuple[int, int]) -> None:  # fmt: skip
        self.images += 1
        self.instances += len(instances)
        if not instances:
            builder.add_status(image_id, uri, STATUS_EMPTY, "")
        # Size and count travel with every row: the query path then needs no image file and
        # fetches an image's context by primary key (ranks 0..n-1).
        context = (float(size[0]), float(size[1]), len(instances))
        for inst in instances:
            builder.add_instance(image_id, uri, inst, context)

    def _fail(self, builder: _RowBuilder, image_id: str, uri: str, error: str) -> None:
        error = error[:500]
        log.warning("skipping image %s (%s): %s", image_id, uri, error)
        self.dead_letter.append(DeadLetter(image_id, uri, error))
        builder.add_status(image_id, uri, STATUS_FAILED, error)


class _RowBuilder:
    """Accumulates rows column by column (Ray Data batches are dicts of arrays)."""

    def __init__(self, model_version: str, dim: int, passthrough: Sequence[str] = ()) -> None:
        self.model_version = model_version
        self.dim = dim
        self.passthrough = list(passthrough)
        self.extras: dict[str, list[Any]] = {}  # image_id -> passthrough values
        self.cols: dict[str, list[Any]] = {name: [] for name in (*OUTPUT_COLUMNS, *self.passthrough)}

    def _append(self, image_id: str, uri: str, box: Sequence[float], score: float, rank: int,
                embedding: np.ndarray, status: str, error: str,
                context: tuple[float, float, int] = (0.0, 0.0, 0)) -> None:  # fmt: skip
        pk = S.make_pk(self.model_version, image_id, rank) if rank >= 0 else ""
        values = (pk, image_id, uri, *(float(v) for v in box), float(score), int(rank),
                  self.model_version, *context, embedding, status, error)  # fmt: skip
        for name, value in zip(OUTPUT_COLUMNS, values, strict=True):
            self.cols[name].append(value)
        for name, value in zip(self.passthrough, self.extras.get(image_id, ()), strict=True):
            self.cols[name].append(value)

    def add_instance(self, image_id: str, uri: str, inst: InstanceLike,
                     context: tuple[float, float, int] = (0.0, 0.0, 0)) -> None:  # fmt: skip
        emb = np.asarray(inst.embedding, dtype=np.float32).reshape(-1)
        if emb.shape[0] != self.dim:
            raise ValueError(f"embedding dim {emb.shape[0]} != {self.dim}")
        box = [float(v) for v in inst.box_xywh]
        self._append(image_id, uri, box, inst.score, int(inst.rank), emb, STATUS_OK, "", context)

    def add_status(self, image_id: str, uri: str, status: str, error: str) -> None:
        zeros = np.zeros(self.dim, dtype=np.float32)
        self._append(image_id, uri, (0.0, 0.0, 0.0, 0.0), 0.0, -1, zeros, status, error)

    def columns(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, values in self.cols.items():
            if name == S.EMBEDDING:
                out[name] = np.stack(values).astype(np.float32) if values else np.zeros((0, self.dim), np.float32)
            elif name in S.BOX_FIELDS or name in (S.SCORE, S.IMAGE_W, S.IMAGE_H):
                out[name] = np.asarray(values, dtype=np.float32)
            elif name in (S.RANK, S.N_INSTANCES):
                out[name] = np.asarray(values, dtype=np.int64)
            elif name in self.passthrough:
                out[name] = np.asarray(values)
            else:
                out[name] = np.asarray(values, dtype=object)
        return out
