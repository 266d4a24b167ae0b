"""Public file-format API of ``reir.data`` (see docs/interfaces.md).

Records and strict loaders live in :mod:`reir.data.records`; samples assembled from a
benchmark directory in :mod:`reir.data.samples`; evaluation queries (every acceptable
target of a sentence) in :mod:`reir.data.queries`; training sources in
other formats (REIRCOCO, RefCOCO/+/g, SOREC, COCO) in :mod:`reir.data.sources`. Other
packages import from here so that split stays an internal detail.
"""

from __future__ import annotations

from reir.data.queries import Query, queries_from_reircoco
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
from reir.data.samples import ImageSample, load_samples, negative_groups, test_queries
from reir.data.sources import (
    SOURCE_KINDS,
    LabelSpace,
    load_coco_source,
    load_plain_pickle,
    load_refer_source,
    load_reircoco_source,
    load_sorec_source,
    load_source,
    load_synthetic_source,
)

__all__ = [
    "SOURCE_KINDS",
    "Annotation",
    "DiscoveryQuery",
    "ImageSample",
    "LabelSpace",
    "Match",
    "Query",
    "RefEntry",
    "Sentence",
    "entry_to_dict",
    "load_coco",
    "load_coco_source",
    "load_discovery",
    "load_plain_pickle",
    "load_refer_source",
    "load_reircoco",
    "load_reircoco_source",
    "load_samples",
    "load_sorec_source",
    "load_source",
    "load_synthetic_source",
    "negative_groups",
    "queries_from_reircoco",
    "save_reircoco",
    "test_queries",
    "validate_coco",
]
