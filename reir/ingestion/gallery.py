"""Gallery sources: which images to ingest, as ``(image_id, uri, metadata)`` items, and byte reading.

Readers (exactly one per job, see :class:`IngestConfig`): a directory tree, a JSON-lines
image list, a manifest table (jsonl / csv / parquet: ``uri`` + optional ``image_id`` +
metadata columns) and COCO / REIRCOCO annotation files. Annotations given beside another
source list nothing: their image ids are checked against the gallery's
(:func:`check_annotation_ids`). Paths may be local, ``http(s)://``
or any URI a pyarrow filesystem understands (``s3://``, ``gs://``, ``file://``...): bytes are
read by :func:`reir.platform.uri.read_uri` (size cap, deadline), so the reading node needs no
copy of the gallery.

Listing happens on the driver (cheap, deterministic order, and the incremental planner
joins it with the ledger); reading happens in Ray Data tasks, where an unreadable file
becomes an ``error`` value on its row instead of a failed task, so one missing file never
aborts an ingestion run. Reading also computes the content hash used for incremental
re-indexing and drops images whose hash is already indexed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reir.errors import AnnotationMismatch
from reir.platform import schema as S
from reir.platform.config import IngestConfig
from reir.platform.uri import filesystem_for, join_uri, read_uri

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
CONTENT_HASH = "content_hash"
PREV_HASH = "prev_hash"
PREV_INSTANCES = "prev_instances"
# Columns of a decoded batch (read_and_decode): the model's input pixels and the original size.
PIXELS = "pixels"
ORIGINAL_W = "original_w"
ORIGINAL_H = "original_h"
_MANIFEST_FORMATS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class GalleryItem:
    image_id: str
    uri: str
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)


def list_gallery(cfg: IngestConfig) -> list[GalleryItem]:
    """All items of the configured source, sorted by image_id, truncated to ``cfg.limit``."""
    fields = cfg.milvus.metadata_fields
    if cfg.image_list is not None:
        items = _from_image_list(cfg.image_list)
    elif cfg.gallery_root is not None:
        items = list_image_dir(cfg.gallery_root, cfg.split)
    elif cfg.manifest is not None:
        items = read_manifest(cfg.manifest, fields)
    elif cfg.annotations is not None:
        items = read_annotations(cfg.annotations, cfg.annotations_root, split=cfg.split, metadata_fields=fields)
    else:  # IngestConfig validation makes this unreachable
        raise ValueError("no gallery source configured")
    ids = [item.image_id for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate image_id in gallery; ids must be unique")
    if cfg.annotations is not None and cfg.annotations_check_only:
        check_annotation_ids(ids, list(_annotation_records(cfg.annotations, cfg.split)), cfg.annotations)
    items = [_with_metadata(item, fields) for item in items]
    items.sort(key=lambda item: item.image_id)
    return items[: cfg.limit] if cfg.limit is not None else items


def _with_metadata(item: GalleryItem, fields: Mapping[str, str]) -> GalleryItem:
    """Every declared field present and typed (defaults for sources without metadata)."""
    meta = {name: S.coerce_metadata(kind, item.metadata.get(name)) for name, kind in fields.items()}
    return GalleryItem(item.image_id, item.uri, meta)


# Image ids travel in URLs (``/v1/images/{id}``), filters and logs: one portable alphabet.
_ID_CHARS = re.compile(r"[^A-Za-z0-9_.\-]+")
# Separates a normalized id from its hash; outside _ID_CHARS, so an id that needed no change
# can never equal one that did.
ID_HASH_SEP = "~"
_ID_HASH_LEN = 10
_MAX_SEGMENT = 80
_MAX_ID_LEN = 200  # + the hash suffix, under S.MAX_IMAGE_ID_LEN


def image_id_for(relative: str) -> str:
    """A readable id that is safe in URLs and filters, from a relative path without suffix.

    Folders stay; each segment is folded to ASCII and any other run of characters becomes
    ``_``. When that changed anything, ``~`` and a hash of the original path follow
    (``2024/a trip/IMG 1`` -> ``2024/a_trip/IMG_1~3f9c01d2ab``), so two names that fold
    alike (``a trip`` / ``a_trip``) keep distinct ids. The hash is of the path, not the
    bytes, so an edited photo keeps its id. Ids stay under the schema's 256 characters.
    """
    segments = []
    for segment in relative.replace("\\", "/").split("/"):
        ascii_ = unicodedata.normalize("NFKD", segment).encode("ascii", "ignore").decode()
        segments.append(_ID_CHARS.sub("_", ascii_).strip("._")[:_MAX_SEGMENT] or "_")
    folded = "/".join(segments)[:_MAX_ID_LEN]
    if folded == relative:
        return folded
    digest = hashlib.sha256(relative.encode("utf-8", "surrogateescape")).hexdigest()[:_ID_HASH_LEN]
    return f"{folded}{ID_HASH_SEP}{digest}"


def list_image_dir(root: Path, split: str | None = None) -> list[GalleryItem]:
    """A synthetic benchmark (``root/images/{split}``, id = file stem) or any image folder tree.

    In a plain directory (searched recursively, hidden files and folders skipped) the id
    is :func:`image_id_for` of the path relative to ``root`` without suffix; where two
    files differ only by suffix (``IMG_1.jpg``, ``IMG_1.png``) both keep their suffix.
    The ``uri`` is the file's absolute path, whatever characters it holds.
    """
    root = Path(root)
    synthetic = root / "images" / split if split else None
    base = synthetic if synthetic is not None and synthetic.is_dir() else root
    if not base.is_dir():
        raise FileNotFoundError(f"gallery directory not found: {base}")
    # One scandir walk on strings (no Path per file, no realpath per file): 100k files in
    # about a second. Folders are resolved once; a file's uri is its folder's real path + name.
    files: list[tuple[str, str]] = []  # (path relative to base, absolute uri)
    real_base = os.path.realpath(base)
    for folder, dirs, names in os.walk(real_base, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_folder = os.path.relpath(folder, real_base)
        prefix = "" if rel_folder == "." else rel_folder.replace(os.sep, "/") + "/"
        real_folder = os.path.realpath(folder)  # a folder reached through a link: its real path
        for name in names:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                continue
            path = os.path.join(real_folder, name)
            if os.path.isfile(path):
                files.append((prefix + name, os.path.realpath(path) if os.path.islink(path) else path))
    if not files:
        raise FileNotFoundError(f"no images under {base}")
    files.sort()
    stems = [os.path.splitext(rel)[0] for rel, _ in files]
    taken = Counter(stems)  # stems shared by files that differ only by suffix
    return [
        GalleryItem(image_id=image_id_for(stem if taken[stem] == 1 else rel), uri=uri)
        for stem, (rel, uri) in zip(stems, files, strict=True)
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


def _filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for a local path or a URI (http(s) included)."""
    return filesystem_for(uri)


def _join(base_uri: str, relative: str) -> str:
    """Resolve a manifest/annotation entry against the directory of the file that lists it."""
    return join_uri(base_uri, relative)


def read_manifest(uri: str, metadata_fields: Mapping[str, str]) -> list[GalleryItem]:
    """A jsonl / csv / parquet table with a ``uri`` column (+ ``image_id``, metadata columns).

    Relative URIs are relative to the manifest's directory; without ``image_id`` the id
    is the URI's path without suffix. Declared metadata fields must be columns.
    """
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    suffix = posixpath.splitext(uri.split("?", 1)[0])[1].lower()
    kind = _MANIFEST_FORMATS.get(suffix)
    if kind is None:
        raise ValueError(f"manifest {uri}: unknown format {suffix!r} (use {sorted(_MANIFEST_FORMATS)})")
    fs, path = _filesystem(uri)
    if kind == "parquet":
        table = pq.read_table(path, filesystem=fs)
    else:
        with fs.open_input_stream(path) as stream:
            table = pjson.read_json(stream) if kind == "json" else pcsv.read_csv(stream)
    columns = set(table.column_names)
    if "uri" not in columns:
        raise ValueError(f"manifest {uri}: needs a 'uri' column, has {sorted(columns)}")
    missing = sorted(set(metadata_fields) - columns)
    if missing:
        raise ValueError(f"manifest {uri}: declared metadata fields missing as columns: {missing}")
    ignored = sorted(columns - set(metadata_fields) - {"uri", "image_id"})
    if ignored:
        log.info("manifest %s: columns not declared as metadata_fields are ignored: %s", uri, ignored)
    items: list[GalleryItem] = []
    for n, row in enumerate(table.select([c for c in table.column_names if c not in ignored]).to_pylist(), 1):
        if not row.get("uri"):
            raise ValueError(f"manifest {uri}: row {n} has no uri")
        image_uri = _join(uri, str(row["uri"]))
        image_id = row.get("image_id")
        if image_id in (None, ""):
            image_id = image_id_for(posixpath.splitext(str(row["uri"]).split("://", 1)[-1].lstrip("/"))[0])
        items.append(GalleryItem(str(image_id), image_uri, {k: row.get(k) for k in metadata_fields}))
    if not items:
        raise ValueError(f"manifest {uri} lists no images")
    return items


def check_annotation_ids(gallery_ids: Sequence[str], annotated_ids: Sequence[str], source: Path | str) -> None:
    """Stop when the ground truth ``source`` names none of the gallery's images; warn (counts and
    three examples) when it names some that are not there. Either way the ids disagree
    somewhere, and BR@k over such an index is wrong without any error of its own."""
    gallery, annotated = set(gallery_ids), sorted(set(annotated_ids))
    common = gallery.intersection(annotated)
    if not common:
        raise AnnotationMismatch(
            f"{source}: none of its {len(annotated)} image ids is in the gallery ({len(gallery)} images), e.g. "
            f"annotations {annotated[:3]} vs gallery {sorted(gallery)[:3]}; the ids must be the same (for a folder: "
            "the file path without suffix)")
    missing = [i for i in annotated if i not in gallery]
    if missing:
        log.warning("%s: %d of %d annotated image ids are not in the gallery (%d images; %d in common), e.g. %s",
                    source, len(missing), len(annotated), len(gallery), len(common), missing[:3])


def _annotation_records(path: Path, split: str | None) -> dict[str, dict[str, Any]]:
    """Image id -> image record of a COCO instances file or a REIRCOCO list (``split``'s entries)."""
    data = json.loads(Path(path).read_text())
    records: dict[str, dict[str, Any]] = {}
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        for image in data["images"]:
            records[str(image.get("image_key", image["id"]))] = image
    elif isinstance(data, list):
        for entry in data:
            if split is None or entry.get("split") in (None, split):
                records.setdefault(str(entry["image_id"]), entry)
    else:
        raise ValueError(f"{path}: neither a COCO instances file nor a REIRCOCO list")  # noqa: TRY004 - bad content
    if not records:
        raise ValueError(f"{path}: no images" + (f" in split {split!r}" if split else ""))
    return records


def read_annotations(
    path: Path, root: Path | None = None, *, split: str | None = None, metadata_fields: Mapping[str, str] = {}
) -> list[GalleryItem]:
    """Images of a COCO instances file (``{"images": [...]}``) or a REIRCOCO ref list.

    COCO ids are ``image_key`` when present (the synthetic benchmark's), else the numeric
    ``id``; REIRCOCO ids are the entries' ``image_id`` and, with ``split``, only entries of
    that split are taken. Metadata fields are taken from the image record when present.
    """
    records = _annotation_records(path, split)
    base = Path(root) if root is not None else Path(path).resolve().parent
    return [
        GalleryItem(image_id, str((base / rec["file_name"]).resolve()), {k: rec.get(k) for k in metadata_fields})
        for image_id, rec in records.items()
    ]


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def read_image_bytes(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Ray Data batch fn: ``{image_id, uri, ...}`` -> ``{..., bytes, error, content_hash}``.

    Rows whose ``prev_hash`` (the ledger's hash, if the planner added it) equals the new
    hash are dropped: that image is already indexed as it is. Other columns pass through.
    """
    data: list[bytes] = []
    errors: list[str] = []
    hashes: list[str] = []
    for uri in batch["uri"]:
        try:
            raw = read_uri(str(uri))
            data.append(raw)
            errors.append("")
            hashes.append(content_hash(raw))
        except Exception as exc:  # noqa: BLE001 - recorded per image, a failure downstream
            data.append(b"")
            errors.append(f"{type(exc).__name__}: {exc}"[:500])
            hashes.append("")
    out = {name: np.asarray(values) for name, values in batch.items()}
    out.update(
        image_id=np.asarray(batch["image_id"], dtype=object),
        uri=np.asarray(batch["uri"], dtype=object),
        bytes=np.asarray(data, dtype=object),
        error=np.asarray(errors, dtype=object),
        **{CONTENT_HASH: np.asarray(hashes, dtype=object)},
    )
    if PREV_HASH in batch:
        prev = np.asarray(batch[PREV_HASH], dtype=object)
        keep = (out[CONTENT_HASH] == "") | (out[CONTENT_HASH] != prev)
        out = {name: values[keep] for name, values in out.items()}
    return out


def read_and_decode(batch: Mapping[str, Any], *, input_size: int, max_pixels: int) -> dict[str, np.ndarray]:
    """Ray Data batch fn: :func:`read_image_bytes`, then decode each image to the model's input.

    ``{image_id, uri, ...}`` -> ``{..., pixels [B, S, S, 3] uint8, original_w, original_h, error,
    content_hash}``: decoding (JPEG draft mode, EXIF, RGB, the square resize) runs here, in the
    read tasks, beside the encoder actors instead of in front of their model, and a batch
    crosses to them as ``S x S`` pixels instead of file bytes. An image that does not decode
    gets its ``error`` (a dead letter downstream) and zero pixels.
    """
    from reir.model.images import decode_for_input  # numpy + Pillow only (the package is lazy)

    out = read_image_bytes(batch)
    n = len(out["uri"])
    pixels = np.zeros((n, input_size, input_size, 3), dtype=np.uint8)
    widths, heights = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    errors = out["error"]
    for i in range(n):
        if errors[i]:
            continue
        try:
            pixels[i], (widths[i], heights[i]) = decode_for_input(out["bytes"][i], input_size, max_pixels=max_pixels)
        except Exception as exc:  # noqa: BLE001 - one undecodable image is one dead letter
            errors[i] = f"{type(exc).__name__}: {exc}"[:500]
    del out["bytes"]
    out.update({PIXELS: pixels, ORIGINAL_W: widths, ORIGINAL_H: heights})
    return out
