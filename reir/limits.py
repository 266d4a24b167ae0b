"""Request limits the CLI and the service share, so a command never sends what the server refuses.

Kept import-light (the CLI reads them to build its options). ``ServeConfig.max_top_k``
defaults to :data:`MAX_TOP_K` (a test keeps the two equal); a deployment may raise it.
"""

from __future__ import annotations

MAX_TOP_K = 100  # results per query (the service's default ceiling)
MAX_BATCH_QUERIES = 16  # queries per POST /v1/search/batch
# A page's offset (discover mode answers every image above its threshold, in pages of top_k):
# no pool is larger (ServeConfig.discover_candidates <= 16,384), so no answer is longer.
MAX_OFFSET = 16_384
