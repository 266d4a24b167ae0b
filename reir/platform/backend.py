"""What a Milvus backend is, and the defaults that suit it (used by :mod:`reir.platform.store`).

milvus-lite (a ``.db`` file, or ``milvus-lite server`` by URI) is one process: reir builds
it a FLAT index for ``AUTOINDEX`` (exact; the searcher answers unfiltered searches from its
in-memory index), its scalar queries scan, so it stays the embedded default for small
galleries. A Milvus server (standalone or cluster) gets HNSW with M 16 / efConstruction 200.
HNSW is searched with ``ef`` = ``HNSW_EF`` (or the top-N when larger): FAISS's default of 64
is below a top-100 and gave recall@100 0.18 on 100k random vectors (``bench/query_scale.py
measure --recall``; docs/query-path.md).

Each model version's rows live in their own partition (``mv_<version>``) of collections
created with the context fields (``image_w``/``image_h``/``n_instances``), so a search for one
version names the partition instead of carrying a scalar filter. Older collections keep
their rows in ``_default`` and are searched with the ``model_version`` filter.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Any

from reir.platform import schema as S

DEFAULT_PARTITION = "_default"
# HNSW ef per top-N: recall@100 on random unit vectors needs far more than the top-N
# itself; model embeddings (clustered) reach 0.95 earlier. See docs/query-path.md.
HNSW_EF = 512
SERVER_INDEX: tuple[str, dict[str, Any]] = ("HNSW", {"M": 16, "efConstruction": 200})
# milvus-lite's AUTOINDEX: FLAT (exact). Its own HNSW (FAISS) took 65 s to build per 100k rows
# for recall@100 0.68 and searches only 1.2-1.6x faster, searches the searcher answers from its
# in-memory index anyway (docs/decisions.md); FLAT builds in about a second.
LITE_INDEX = "FLAT"
_PARTITION_CHARS = re.compile(r"[^A-Za-z0-9_]")


def is_lite_version(server_version: str) -> bool:
    """``get_server_version()`` of milvus-lite says so (``milvus_lite-3.2.2``); pip's Milvus 2.3.5
    standalone (a real server with real indexes) answers ``v2.3.5-lite``, hence the prefix test."""
    return server_version.lower().startswith("milvus_lite")


def partition_for(model_version: str) -> str:
    """A valid, stable partition name for a model version (Milvus allows [A-Za-z0-9_], 255 chars).

    The readable part is lossy (any other char becomes ``_``), so a short hash of the exact
    version keeps two versions that differ only there apart.
    """
    readable = _PARTITION_CHARS.sub("_", model_version)[:80]
    digest = hashlib.sha1(model_version.encode()).hexdigest()[:10]
    return f"mv_{readable}_{digest}"


def auto_index(lite: bool, requested: str, current: str | None = None) -> tuple[str, dict[str, Any]]:
    """The index a collection should have: the requested one, or the backend's for
    ``AUTOINDEX``: HNSW on a server; on milvus-lite the index it has (``current``; one built by
    an older reir is lite's FAISS HNSW: rebuilding would release a collection that may be
    serving), else FLAT (see :data:`LITE_INDEX`)."""
    if requested != "AUTOINDEX":
        return requested, {}
    if lite:
        return current or LITE_INDEX, {}
    return SERVER_INDEX[0], dict(SERVER_INDEX[1])


def search_params(index_type: str | None, top_n: int, lite: bool, overrides: dict[str, Any]) -> dict[str, Any]:
    """Per-search parameters for the index in place; ``overrides`` (configuration) win."""
    params: dict[str, Any] = {}
    # (a lite collection indexed as "AUTOINDEX" holds the FAISS HNSW that lite built for it before)
    if index_type == "HNSW" or (lite and index_type == "AUTOINDEX"):
        params["ef"] = max(top_n, HNSW_EF)
    elif index_type == "IVF_FLAT":
        params["nprobe"] = 16
    params.update(overrides)
    return {"metric_type": S.METRIC, "params": params}


@dataclass
class Layout:
    """A collection's facts that every search needs, read once and kept (see ``MAX_AGE_S``).

    ``fields``: its field names; ``partitions``: its partition names; ``index_type``: of the
    vector field, None without one. ``has_context``: rows carry image size and count.
    ``schema``: the fields as ``describe_collection`` gives them (name, type...), in order.
    """

    index_type: str | None
    fields: frozenset[str]
    partitions: frozenset[str]
    read_at: float = field(default_factory=time.monotonic)
    schema: tuple[dict[str, Any], ...] = ()

    # An alias may be moved to another collection by another process (the catalog's
    # promote); re-reading now and then is what notices it without a call per search.
    MAX_AGE_S = 30.0

    @property
    def has_context(self) -> bool:
        return set(S.CONTEXT_FIELDS) <= self.fields

    @property
    def has_packed_context(self) -> bool:
        """Rank-0 rows carry their image's packed context (:data:`reir.platform.schema.PACKED_CONTEXT`)."""
        return self.has_context and S.PACKED_CONTEXT in self.fields

    @property
    def stale(self) -> bool:
        return time.monotonic() - self.read_at > self.MAX_AGE_S

    def partition_of(self, model_version: str | None) -> str | None:
        """The partition that holds exactly this version's rows, when the layout has one."""
        if model_version is None or not self.has_context:
            return None
        name = partition_for(model_version)
        return name if name in self.partitions else None
