"""The slice of the ``reir.model`` contract the runtime uses, as Protocols, plus loading.

Ingestion and serving depend on these Protocols rather than on ``reir.model`` classes,
so they can be tested with a deterministic fake model injected by constructor, and the
model package can evolve behind ``docs/interfaces.md``.

Model versions identify the embedding space of stored rows: the checkpoint directory
name plus a short hash of its config and weights files. Two checkpoints with the same
name but different weights get different versions, so rows never mix spaces.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image


class InstanceLike(Protocol):
    """``reir.model`` ``Instance``: box in absolute pixels ``[x, y, w, h]``."""

    box_xywh: Sequence[float]
    score: float
    embedding: np.ndarray
    rank: int


class ImageModel(Protocol):
    def encode_images(self, pixel_values: Any) -> Any: ...


class ImageProcessor(Protocol):
    def images(self, images: list[Image.Image]) -> Any: ...

    # top_k / min_score None: the processor's own stored-instance policy
    def postprocess(
        self, output: Any, sizes: list[tuple[int, int]], top_k: int | None = None, nms_iou: float = 0.7,
        min_score: float | None = None,
    ) -> list[list[InstanceLike]]: ...


class TextModel(Protocol):
    def encode_text(self, input_ids: Any, attention_mask: Any) -> Any: ...

    def score(self, text_emb: Any, inst_emb: Any) -> Any: ...


class TextProcessor(Protocol):
    def text(self, texts: list[str]) -> dict[str, Any]: ...


# (checkpoint path) -> (model, processor); must be picklable (Ray ships it to actors).
ModelLoader = Callable[[str], tuple[Any, Any]]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_VERSION_CHARS = re.compile(r"[^A-Za-z0-9_.\-]+")


def load_reir_model(path: str) -> tuple[Any, Any]:
    """Default :data:`ModelLoader`: ``reir.model.create_model`` in eval mode."""
    from reir.model import create_model  # heavy (torch, transformers): import on use

    model, processor = create_model(path)
    if hasattr(model, "eval"):
        model.eval()
    return model, processor


def load_reir_image_model(path: str) -> tuple[Any, Any]:
    """The ingestion encoders' :data:`ModelLoader`: the checkpoint's image side only, in eval
    mode (``create_model(path, vision_only=True)``). It skips the text tower's weights and,
    for a conv backbone, transformers' modeling modules: an encoder process starts about
    5 s sooner on a 2-core machine and holds less memory."""
    from reir.model import create_model

    model, processor = create_model(path, vision_only=True)
    model.eval()
    return model, processor


def input_size_for(path: str | Path) -> int | None:
    """The square input size a reir checkpoint's processor resizes images to (its
    ``preprocessor_config.json``), or None when the checkpoint does not say (another model)."""
    return _reir_setting(path, "preprocessor_config.json", ("processor_class", "ReirProcessor"), "image_size")


def embedding_dim_for(path: str | Path) -> int | None:
    """The embedding size a reir checkpoint's rows will have (its ``config.json``), or None
    when the checkpoint does not say (another model)."""
    return _reir_setting(path, "config.json", ("model_type", "reir"), "embed_dim")


def _reir_setting(path: str | Path, file: str, kind: tuple[str, str], key: str) -> int | None:
    """A positive integer ``key`` of the checkpoint's ``file`` when that file's ``kind[0]`` field
    is ``kind[1]`` (a reir checkpoint), else None."""
    try:
        config = json.loads((Path(path) / file).read_text())
    except (OSError, ValueError):
        return None
    value = config.get(key) if config.get(kind[0]) == kind[1] else None
    return int(value) if isinstance(value, int) and value > 0 else None


def model_version_for(path: str | Path, *, hash_chars: int = 10) -> str:
    """``"{dir name}-{hash}"`` of a checkpoint directory's config + weights files.

    Only directories are accepted: a preset name like ``"tiny"`` means freshly
    initialized random weights, which would not match between ingestion and serving.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(
            f"model path {str(path)!r} is not a checkpoint directory; save a model with "
            "save_pretrained(dir) and pass that dir so ingestion and serving share weights"
        )
    files = sorted(
        p for p in root.iterdir()
        if p.is_file() and (p.suffix == ".json" or p.suffix in _WEIGHT_SUFFIXES)
    )  # fmt: skip
    if not files:
        raise ValueError(f"no config/weights files in {root}")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    name = _VERSION_CHARS.sub("_", root.resolve().name).strip("_") or "model"
    return f"{name[:80]}-{digest.hexdigest()[:hash_chars]}"
