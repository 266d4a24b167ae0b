"""Gallery sources: which images to ingest, as ``(image_id, uri)`` items, and byte reading.

Listing happens on the driver (cheap, deterministic order); reading happens in Ray
Data tasks, where an unreadable file becomes an ``error`` value on its row instead of a
failed task, so one missing file never aborts an ingestion run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reir.platform.config import IngestConfig

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class GalleryItem:
    image_id: str
    uri: str


def list_gallery(cfg: IngestConfig) -> list[GalleryItem]:
    """All items of the configured source, sorted by image_id, truncated to ``cfg.limit``."""
    if cfg.image_list is not None:
        items = _from_image_list(cfg.image_list)
    elif cfg.gallery_root is not None:
        items = list_image_dir(cfg.gallery_root, cfg.split)
    else:  # IngestConfig validation makes this unreachable
        raise ValueError("no gallery source configured")
    ids = [item.image_id for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate image_id in gallery; ids must be unique")
    items.sort(key=lambda item: item.image_id)
    return items[: cfg.limit] if cfg.limit is not None else items


def list_image_dir(root: Path, split: str | None = None) -> list[GalleryItem]:
    """A synthetic benchmark (``root/images/{split}``, id = file stem) or any image dir.

    In a plain directory (searched recursively) the id is the path relative to
    ``root`` without suffix, which equals the stem for flat directories and stays
    unique for nested ones.
    """
    root = Path(root)
    synthetic = root / "images" / split if split else None
    base = synthetic if synthetic is not None and synthetic.is_dir() else root
    if not base.is_dir():
        raise FileNotFoundError(f"gallery directory not found: {base}")
    files = [p for p in base.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"no images under {base}")
    return [
        GalleryItem(image_id=p.relative_to(base).with_suffix("").as_posix(), uri=str(p.resolve()))
        for p in files
    ]


def _from_image_list(path: Path) -> list[GalleryItem]:
    items: list[GalleryItem] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not record.get("image_id") or not record.get("uri"):
            raise ValueError(f"{path}:{n}: expected {{'image_id': ..., 'uri': ...}}")
        items.append(GalleryItem(str(record["image_id"]), str(record["uri"])))
    return items


def _read_local(uri: str) -> bytes:
    path = uri.removeprefix("file://")
    if "://" in path:
        raise ValueError(f"unsupported uri scheme: {uri}")
    return Path(path).read_bytes()


def read_image_bytes(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Ray Data batch fn: ``{image_id, uri}`` -> ``{image_id, uri, bytes, error}``."""
    data: list[bytes] = []
    errors: list[str] = []
    for uri in batch["uri"]:
        try:
            data.append(_read_local(str(uri)))
            errors.append("")
        except Exception as exc:  # noqa: BLE001 - recorded per image, a failure downstream
            data.append(b"")
            errors.append(f"{type(exc).__name__}: {exc}"[:500])
    return {
        "image_id": np.asarray(batch["image_id"], dtype=object),
        "uri": np.asarray(batch["uri"], dtype=object),
        "bytes": np.asarray(data, dtype=object),
        "error": np.asarray(errors, dtype=object),
    }
