"""A deterministic fake of the ``reir.model`` contract (numpy only) for runtime tests.

Each image has 4 instances, its quadrants; an instance embedding encodes the
quadrant's mean colour, and a colour word ("red", "blue", ...) encodes to the same
direction as a quadrant of that colour, so retrieval results are predictable.
``score`` is SigLIP-style affine: ``10 * cos - 5``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from reir.model.boxes import BoxMode, convert

DIM = 8
SCALE, BIAS = 10.0, -5.0
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
# Quadrants in normalized cxcywh, in objectness order (top-left is the "best" object).
QUADRANTS = np.array(
    [[0.25, 0.25, 0.5, 0.5], [0.75, 0.25, 0.5, 0.5], [0.25, 0.75, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]
)
OBJECTNESS = np.array([3.0, 2.0, 1.0, 0.0])


def color_embedding(rgb: np.ndarray) -> np.ndarray:
    vec = np.zeros(DIM, dtype=np.float32)
    vec[:3] = np.asarray(rgb, dtype=np.float32) / 255.0 - 0.5
    vec[3] = 0.1
    return vec / np.linalg.norm(vec)


@dataclass
class FakeInstance:
    box_xywh: list[float]
    score: float
    embedding: np.ndarray
    rank: int


@dataclass
class FakeInstanceOutput:
    boxes: np.ndarray
    objectness_logits: np.ndarray
    embeddings: np.ndarray


@dataclass
class FakeTextOutput:
    embeddings: np.ndarray


class FakeModel:
    def encode_images(self, pixel_values: np.ndarray) -> FakeInstanceOutput:
        b = pixel_values.shape[0]
        s = pixel_values.shape[-1] // 2
        embs = np.zeros((b, 4, DIM), dtype=np.float32)
        for i in range(b):
            for q, (y, x) in enumerate([(0, 0), (0, s), (s, 0), (s, s)]):
                mean = pixel_values[i, :, y : y + s, x : x + s].mean(axis=(1, 2)) * 255.0
                embs[i, q] = color_embedding(mean)
        boxes = np.broadcast_to(QUADRANTS, (b, 4, 4)).copy()
        return FakeInstanceOutput(boxes, np.broadcast_to(OBJECTNESS, (b, 4)).copy(), embs)

    def encode_text(self, input_ids: Any, attention_mask: Any) -> FakeTextOutput:
        return FakeTextOutput(np.stack([self._text_embedding(str(t)) for t in input_ids]))

    @staticmethod
    def _text_embedding(text: str) -> np.ndarray:
        for word in text.lower().split():
            if word in COLORS:
                return color_embedding(np.asarray(COLORS[word]))
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        vec = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
        return vec / np.linalg.norm(vec)

    def score(self, text_emb: Any, inst_emb: Any) -> np.ndarray:
        return SCALE * np.asarray(text_emb) @ np.asarray(inst_emb).T + BIAS


class FakeProcessor:
    image_size = 16

    def images(self, images: list[Image.Image]) -> np.ndarray:
        size = (self.image_size, self.image_size)
        arrays = [np.asarray(im.convert("RGB").resize(size, Image.NEAREST), dtype=np.float32) for im in images]
        return np.stack(arrays).transpose(0, 3, 1, 2) / 255.0

    def text(self, texts: list[str]) -> dict[str, Any]:
        return {"input_ids": list(texts), "attention_mask": None}

    def postprocess(
        self, output: FakeInstanceOutput, sizes: list[tuple[int, int]], top_k: int | None = None,
        nms_iou: float = 0.7, min_score: float | None = None,
    ) -> list[list[FakeInstance]]:
        out: list[list[FakeInstance]] = []
        for b, (w, h) in enumerate(sizes):
            order = np.argsort(-output.objectness_logits[b])[: 10 if top_k is None else top_k]
            xywh = convert(output.boxes[b], BoxMode.CXCYWH_NORM, BoxMode.XYWH_ABS, width=w, height=h)
            probs = 1.0 / (1.0 + np.exp(-output.objectness_logits[b]))
            out.append([
                FakeInstance([float(v) for v in xywh[q]], float(probs[q]), output.embeddings[b, q], rank)
                for rank, q in enumerate(order)
            ])  # fmt: skip
        return out


def save_fake_checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"kind": "fake", "dim": DIM}))
    return directory


def fake_loader(path: str) -> tuple[FakeModel, FakeProcessor]:
    """A picklable ModelLoader (module-level function) for Ray actors and Serve replicas."""
    config = json.loads((Path(path) / "config.json").read_text())
    if config.get("kind") != "fake":
        raise ValueError(f"{path} is not a fake checkpoint")
    return FakeModel(), FakeProcessor()


def quadrant_image(colors: tuple[str, str, str, str], size: tuple[int, int] = (64, 48)) -> Image.Image:
    """An image whose quadrants (TL, TR, BL, BR) have the given colour names."""
    w, h = size
    img = Image.new("RGB", size)
    for (x, y), name in zip([(0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)], colors, strict=True):
        img.paste(COLORS[name], (x, y, x + w // 2, y + h // 2))
    return img
