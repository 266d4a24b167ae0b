"""``reir index add PATH``: a folder of your own photos -> the default index, told in plain words.

The ingestion itself is the one pipeline every source uses (:func:`run_ingestion` over
:func:`reir.ingestion.gallery.list_image_dir`); this module only counts what a folder
holds before the run and turns the run's summary into a few lines a person reads:
how many images were indexed, skipped (already indexed, unchanged) or failed, and why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from reir.ingestion.gallery import IMAGE_SUFFIXES
from reir.ingestion.pipeline import IngestSummary

MAX_REASONS = 5  # failed files named in the summary; the dead-letter file has all of them


@dataclass(frozen=True)
class FolderScan:
    images: int  # files with an image suffix (decoded or not, they are all tried)
    ignored: int  # other files, and anything under hidden folders
    kinds: dict[str, int]  # image suffix -> count, for the progress line


def scan_folder(root: Path) -> FolderScan:
    """What :func:`list_image_dir` will pick up under ``root`` and what it will leave."""
    kinds: Counter[str] = Counter()
    ignored = 0
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
        if hidden or path.suffix.lower() not in IMAGE_SUFFIXES:
            ignored += 1
        else:
            kinds[path.suffix.lower()] += 1
    return FolderScan(images=sum(kinds.values()), ignored=ignored, kinds=dict(sorted(kinds.items())))


def describe_scan(root: Path, scan: FolderScan) -> str:
    kinds = ", ".join(f"{n} {suffix.lstrip('.')}" for suffix, n in scan.kinds.items())
    return f"found {scan.images} images under {root} ({kinds}); {scan.ignored} other files ignored"


def summary_lines(summary: IngestSummary, scan: FolderScan) -> list[str]:
    """The run's outcome: indexed / skipped / failed counts, failure reasons, what serves it."""
    lines = [
        (f"indexed {summary.images} images ({summary.instances} instances) "
         f"in {summary.seconds:.1f} s; skipped {summary.unchanged} already indexed; "
         f"failed {summary.failures}; ignored {scan.ignored} non-image files"),
    ]
    for dead in summary.dead_letter[:MAX_REASONS]:
        lines.append(f"  failed: {dead.uri}: {dead.error}")
    if summary.failures > MAX_REASONS:
        lines.append(f"  ... and {summary.failures - MAX_REASONS} more (--dead-letter FILE lists all)")
    if summary.deleted:
        lines.append(f"removed {summary.deleted} images no longer in the folder")
    where = f"{summary.alias} -> {summary.collection}" if summary.alias else summary.collection
    state = "serving" if summary.promoted or not summary.alias else f"NOT promoted ({summary.check})"
    lines.append(f"index {where}: {summary.rows_in_store} rows, {state}")
    return lines
