"""The ingestion progress line and its samples (the rate over time)."""

from __future__ import annotations

import io
import threading

from reir.ingestion.progress import Progress, format_eta, progress_line


def test_progress_line_reports_rate_eta_and_failures() -> None:
    line = progress_line(1_480, 2, 4_000, elapsed=20.0, rate=96.3, width=10)
    assert line.startswith("[####......]  37% 1,480/4,000 images  96.3 img/s  ETA 00:26")
    assert line.endswith("(2 failed)")
    assert "ETA --:--" in progress_line(0, 0, 100, elapsed=3.0, rate=0.0)
    assert "100% 5/5" in progress_line(5, 0, 5, elapsed=1.0, rate=5.0) and "ETA 00:00" in progress_line(5, 0, 5, 1, 5)
    assert format_eta(3_725) == "1:02:05" and format_eta(float("inf")) == "--:--"
    assert progress_line(0, 0, 0, elapsed=1.0, rate=0.0, width=4).startswith("[####] 100% 0/0 images")  # a no-op rerun


class Counter:
    def __init__(self) -> None:
        self.done = 0
        self.lock = threading.Lock()

    def __call__(self) -> tuple[int, int]:
        with self.lock:
            self.done += 10
            return self.done, 0


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_in_place_on_a_terminal_and_keeps_samples() -> None:
    out = Terminal()
    with Progress(Counter(), total=100, interval_s=0.01, stream=out) as progress:
        while len(progress.samples) < 5:
            threading.Event().wait(0.01)
    text = out.getvalue()
    assert text.count("\r[") >= 5 and text.endswith("\n")
    counts = [n for _, n in progress.samples]
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] >= 50
    assert all(b[0] >= a[0] for a, b in zip(progress.samples, progress.samples[1:]))


def test_progress_writes_lines_elsewhere_and_survives_a_failing_count() -> None:
    calls = {"n": 0}

    def flaky() -> tuple[int, int]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise TimeoutError("guard busy")
        return 40, 1

    out = io.StringIO()  # not a terminal: one line per reading
    with Progress(flaky, total=40, interval_s=30.0, stream=out) as progress:
        pass  # the exit's reading is the first one, and it fails: skipped
    progress.tick()
    assert out.getvalue().count("\n") == 1 and "\r" not in out.getvalue()
    assert out.getvalue().startswith("ingest progress: [") and "40/40 images" in out.getvalue()
    assert "(1 failed)" in out.getvalue() and progress.samples[-1][1] == 40
