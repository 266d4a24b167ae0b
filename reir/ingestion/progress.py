"""Progress of an ingestion run: images encoded so far, the rate, the time left.

The encoder actors already report every batch to the run's :class:`~reir.ingestion.guard.FailureGuard`
actor; a driver thread reads its counts every ``interval_s`` and writes them to stderr: a
one-line bar redrawn in place on a terminal, one line each time elsewhere (a Kubernetes
job's log, CI). Every reading is kept as a ``(seconds since start, images done)`` sample,
so a run's rate over time can be plotted afterwards (``IngestSummary.progress``).

``total`` is what the run expects to encode: the listed images minus those the ledger
already holds. An image changed since it was indexed is counted as held until its read task
finds the new content, so the bar can end a little short of 100 % on an incremental run.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from typing import Self, TextIO

log = logging.getLogger(__name__)

CountFn = Callable[[], tuple[int, int]]  # -> (images tried, images failed)


def format_eta(seconds: float) -> str:
    if math.isnan(seconds) or math.isinf(seconds):  # no rate yet
        return "--:--"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def progress_line(done: int, failed: int, total: int, elapsed: float, rate: float, width: int = 24) -> str:
    """``[#########.......]  37% 1,480/4,000 images  96.3 img/s  ETA 00:26  (2 failed)``."""
    frac = min(done / total, 1.0) if total > 0 else 1.0  # nothing to encode: done
    filled = round(frac * width)
    eta = (total - done) / rate if rate > 0 and total > done else (0.0 if total <= done else float("inf"))
    failures = f"  ({failed:,} failed)" if failed else ""
    return (f"[{'#' * filled}{'.' * (width - filled)}] {frac:4.0%} {done:,}/{total:,} images  "
            f"{rate:.1f} img/s  ETA {format_eta(eta)}  elapsed {format_eta(elapsed)}{failures}")  # fmt: skip


class Progress:
    """A driver thread that shows ``count()`` against ``total`` every ``interval_s`` seconds."""

    def __init__(self, count: CountFn, total: int, *, interval_s: float = 10.0, stream: TextIO | None = None,
                 window_s: float = 30.0) -> None:  # fmt: skip
        self.count = count
        self.total = total
        self.interval_s = interval_s
        self.window_s = window_s  # the rate shown is over the last window (the steady rate, not the start-up)
        self.stream = stream if stream is not None else sys.stderr
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0
        self._inplace = bool(getattr(self.stream, "isatty", lambda: False)())

    def __enter__(self) -> Self:
        self._start = time.monotonic()
        self.samples = [(0.0, 0)]
        self._thread = threading.Thread(target=self._run, name="reir-ingest-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)
        self.tick()  # the final count
        if self._inplace:
            self.stream.write("\n")
            self.stream.flush()

    def rate(self) -> float:
        """Images/s over the last ``window_s`` seconds of samples."""
        if len(self.samples) < 2:
            return 0.0
        t_end, n_end = self.samples[-1]
        earlier = [s for s in self.samples if s[0] <= t_end - self.window_s] or self.samples[:1]
        t0, n0 = earlier[-1]
        return (n_end - n0) / (t_end - t0) if t_end > t0 else 0.0

    def tick(self) -> None:
        try:
            done, failed = self.count()
        except Exception as exc:  # noqa: BLE001 - progress must never stop the run
            log.debug("progress count failed: %s", exc)
            return
        elapsed = time.monotonic() - self._start
        self.samples.append((round(elapsed, 2), int(done)))
        line = progress_line(int(done), int(failed), self.total, elapsed, self.rate())
        self.stream.write(("\r" + line) if self._inplace else f"ingest progress: {line}\n")
        self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()
