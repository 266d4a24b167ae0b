"""Progress display for long CLI work (rich), as a context manager yielding ``advance(n)``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

REFRESH_S = 0.1


@contextmanager
def progress_bar(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    # Redrawn by advance (at most REFRESH_S apart), not by rich's refresh thread: the work inside
    # may fork processes (reir.data.synth), which it does only from a process without threads.
    with Progress(*columns, transient=False, auto_refresh=False) as progress:
        task = progress.add_task(label, total=total)
        drawn = [0.0]

        def advance(n: int = 1) -> None:
            progress.advance(task, n)
            now = time.monotonic()
            if now - drawn[0] >= REFRESH_S:
                drawn[0] = now
                progress.refresh()

        yield advance
