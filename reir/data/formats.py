"""Public file-format API of ``reir.data`` (see docs/interfaces.md).

Records and strict loaders live in :mod:`reir.data.records`; samples and queries
assembled from a benchmark directory in :mod:`reir.data.samples`. Other packages
import from here so that split stays an internal detail.
"""

from __future__ import annotations

from reir.data.records import (
    Annotation,
    DiscoveryQuery,
    Match,
    RefEntry,
    Sentence,
    entry_to_dict,
    load_coco,
    load_discovery,
    load_reircoco,
    save_reircoco,
    validate_coco,
)
from reir.data.samples import ImageSample, Query, load_samples, negative_groups, test_queries

__all__ = [
    "Annotation",
    "DiscoveryQuery",
    "ImageSample",
    "Match",
    "Query",
    "RefEntry",
    "Sentence",
    "entry_to_dict",
    "load_coco",
    "load_discovery",
    "load_reircoco",
    "load_samples",
    "negative_groups",
    "save_reircoco",
    "test_queries",
    "validate_coco",
]
