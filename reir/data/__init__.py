"""Data: the synthetic REIR benchmark, file formats and training samples."""

from __future__ import annotations

from reir.data.formats import (
    Annotation,
    DiscoveryQuery,
    ImageSample,
    Match,
    Query,
    RefEntry,
    Sentence,
    load_coco,
    load_discovery,
    load_reircoco,
    load_samples,
    negative_groups,
    save_reircoco,
    test_queries,
    validate_coco,
)
from reir.data.vocab import VOCABULARY

__all__ = [
    "VOCABULARY",
    "Annotation",
    "DiscoveryQuery",
    "ImageSample",
    "Match",
    "Query",
    "RefEntry",
    "Sentence",
    "load_coco",
    "load_discovery",
    "load_reircoco",
    "load_samples",
    "negative_groups",
    "save_reircoco",
    "test_queries",
    "validate_coco",
]
