"""The exceptions that say what went wrong, so callers can map them by type.

Three kinds matter to whoever handles an error:

- the caller's mistake (:class:`UsageError`, HTTP 4xx, CLI exit 2): retrying the same
  thing fails the same way;
- a dependency that is down (:class:`DependencyUnavailable`, HTTP 503 with
  ``Retry-After``, CLI exit 1): the same request may succeed later;
- anything else is a bug or an unusable input found at run time (HTTP 500 with a request
  id, CLI exit 1): nobody should retry it blindly.

The serving stages raise :class:`DependencyUnavailable` themselves where they know a
dependency failed (Milvus unreachable, a Serve replica gone), rather than the HTTP layer
guessing from a catch-all.
"""

from __future__ import annotations


class ReirError(Exception):
    """A user-facing error the CLI prints as one line (exit 1): a missing file, an
    unreachable service, an unusable input found while running."""

    exit_code = 1


class UsageError(ReirError):
    """The command was called wrongly (a bad option value, malformed JSON in a flag): exit 2,
    like the parser's own usage errors."""

    exit_code = 2


class DependencyUnavailable(ReirError):
    """A dependency (Milvus, a Serve replica) is down or overloaded; retry after ``retry_after_s``."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[object, ...]:
        # Raised in one Ray process and re-raised in another: keep the keyword argument.
        return (_rebuild_unavailable, (str(self), self.retry_after_s))


def _rebuild_unavailable(message: str, retry_after_s: float) -> DependencyUnavailable:
    return DependencyUnavailable(message, retry_after_s=retry_after_s)


class IngestionAborted(ReirError):
    """An ingestion stopped early (e.g. its failure rate passed the threshold); nothing was promoted."""


class AnnotationMismatch(ReirError):
    """The ground truth names no image of the gallery (e.g. COCO's numeric ids beside file-stem
    ids): an index built anyway evaluates to zero recall, so the ingestion stops (exit 1)."""
