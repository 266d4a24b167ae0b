"""Bookkeeping shared by the encoder (producer) and the sink (consumer) of instance rows.

Kept free of torch so Ray Data write tasks, which only need these names, start fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from reir.platform import schema as S

STATUS = "status"
ERROR = "error"
STATUS_OK, STATUS_FAILED, STATUS_EMPTY = "ok", "failed", "empty"
# Schema columns plus the bookkeeping columns; status rows have rank -1 and no pk.
OUTPUT_COLUMNS: tuple[str, ...] = (*S.SCALAR_FIELDS, *S.CONTEXT_FIELDS, S.EMBEDDING, STATUS, ERROR)


@dataclass(frozen=True)
class DeadLetter:
    """An image that could not be ingested, and why."""

    image_id: str
    uri: str
    error: str
