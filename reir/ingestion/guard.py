"""The failure-rate guard: an ingestion where most images fail stops early and promotes nothing.

A broken model or an unreadable mount dead-letters every image; without a guard such a run
reads and "encodes" the whole gallery and then looks finished. The encoder actors report
each batch's counts to one shared :class:`FailureGuard` (a zero-CPU Ray actor during a
run); once at least ``min_images`` were tried and more than ``max_rate`` of them failed,
the guard trips, the actor that hears it raises :class:`~reir.errors.IngestionAborted`,
Ray Data stops the job, and the pipeline marks the version ``check_failed`` with the reason.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from reir.errors import IngestionAborted
from reir.platform.catalog import IndexCatalog, IndexVersion
from reir.platform.config import MilvusConfig
from reir.platform.store import MilvusStore

log = logging.getLogger(__name__)


@dataclass
class FailureGuard:
    """Counts tried and failed images across all encoder actors; trips once over the rate."""

    max_rate: float = 0.5
    min_images: int = 20
    keep_errors: int = 3
    tried: int = 0
    failed: int = 0
    first_errors: list[str] = field(default_factory=list)
    tripped: bool = False

    def add(self, tried: int, failed: int, errors: list[str]) -> bool:
        """Record one batch; True when the run must stop (now or already)."""
        self.tried += tried
        self.failed += failed
        room = self.keep_errors - len(self.first_errors)
        if room > 0:
            self.first_errors.extend(errors[:room])
        if self.tried >= self.min_images and self.failed > self.max_rate * self.tried:
            self.tripped = True
        return self.tripped

    def reason(self) -> str:
        rate = self.failed / self.tried if self.tried else 0.0
        first = "; ".join(self.first_errors) or "none recorded"
        return (f"{self.failed} of the first {self.tried} images failed ({rate:.0%} > max_failure_rate "
                f"{self.max_rate:.0%}); first errors: {first}")

    def counts(self) -> tuple[int, int]:
        """(images tried, images failed) so far: the run's progress."""
        return self.tried, self.failed

    def state(self) -> dict[str, Any]:
        return {"tried": self.tried, "failed": self.failed, "tripped": self.tripped, "reason": self.reason()}


def check_batch(guard: Any, tried: int, failed: int, errors: list[str]) -> None:
    """In an encoder actor: report one batch to the guard actor; raise when it has tripped."""
    import ray

    if ray.get(guard.add.remote(tried, failed, errors)):
        raise IngestionAborted("ingestion stopped: " + ray.get(guard.reason.remote()))


def start_guard(max_rate: float, min_images: int) -> Any:
    """The run's shared guard, as a zero-CPU actor (it only counts)."""
    import ray

    return ray.remote(num_cpus=0)(FailureGuard).remote(max_rate=max_rate, min_images=min_images)


def abort_if_tripped(guard: Any, milvus: MilvusConfig, version: IndexVersion | None, listed: int) -> None:
    """After a failed run: when the guard stopped it, fail the version and raise the reason."""
    import ray

    state = ray.get(guard.state.remote())
    if not state["tripped"]:
        return  # some other failure: the caller re-raises it as it is
    reason = f"{state['reason']} ({listed} images listed)"
    if version is not None:
        with MilvusStore.from_config(milvus) as control:
            info = {**json.loads(version.info or "{}"), "check": reason}
            IndexCatalog(control).update(version.name, state="check_failed", info=json.dumps(info))
    log.error("ingestion stopped early, nothing promoted: %s", reason)
    raise IngestionAborted(f"ingestion stopped early, nothing promoted: {reason}") from None
