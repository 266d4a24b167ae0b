"""Run an index job and push its outcome to a Prometheus Pushgateway.

``python -m reir.ops.jobrun --job reir-index --pushgateway URL -- reir ingest --gallery ... --alias reir_live``

A scheduled re-index ends, so Prometheus cannot scrape it; it pushes instead
(ARCHITECTURE.md, "Metrics and where they go"). Each run replaces the group's
``reir_index_runs_total`` family (so the one series there says how the *last* run
ended: ``status="ok"`` or ``"failed"``) and, on success only, sets
``reir_index_last_success_timestamp_seconds``; a failed run leaves the last success
time in place, which is what the staleness alert measures. The command's exit code
is passed through; a Pushgateway that cannot be reached is logged, never fatal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, pushadd_to_gateway

from reir.platform import telemetry as T

log = logging.getLogger(__name__)

OK, FAILED = "ok", "failed"


@dataclass(frozen=True)
class RunOutcome:
    returncode: int
    seconds: float
    finished_at: float
    summary: dict[str, Any] = field(default_factory=dict)  # what the command wrote to $REIR_JOB_SUMMARY

    @property
    def status(self) -> str:
        return OK if self.returncode == 0 else FAILED


def outcome_registry(outcome: RunOutcome) -> CollectorRegistry:
    """The figures one run pushes (catalog names from :mod:`reir.platform.telemetry`)."""
    registry = CollectorRegistry()
    runs = Counter(
        T.INDEX_RUNS_TOTAL.name.removesuffix("_total"), T.INDEX_RUNS_TOTAL.description,
        T.INDEX_RUNS_TOTAL.tag_keys, registry=registry,
    )  # fmt: skip
    runs.labels(status=outcome.status).inc()
    if outcome.status == OK:
        last = Gauge(
            T.INDEX_LAST_SUCCESS_TIMESTAMP_SECONDS.name, T.INDEX_LAST_SUCCESS_TIMESTAMP_SECONDS.description,
            registry=registry,
        )  # fmt: skip
        last.set(outcome.finished_at)
        collection, rows = outcome.summary.get("collection"), outcome.summary.get("rows_in_store")
        if isinstance(collection, str) and collection and isinstance(rows, int):
            gauge = Gauge(
                T.INDEX_COLLECTION_ROWS.name, T.INDEX_COLLECTION_ROWS.description, T.INDEX_COLLECTION_ROWS.tag_keys,
                registry=registry,
            )  # fmt: skip
            gauge.labels(collection=collection).set(rows)
    return registry


Pusher = Callable[[str, str, CollectorRegistry], None]


def push_to(gateway: str, job: str, registry: CollectorRegistry) -> None:
    # POST (pushadd): replaces only the families pushed now, so a failure keeps the last success time.
    pushadd_to_gateway(gateway, job=job, registry=registry, timeout=10)


def run_and_report(command: Sequence[str], *, job: str, gateway: str | None, push: Pusher = push_to) -> RunOutcome:
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="reir-job-") as tmp:
        summary_path = os.path.join(tmp, "summary.json")
        try:
            returncode = subprocess.call(list(command), env={**os.environ, T.JOB_SUMMARY_ENV: summary_path})
        except OSError as exc:  # no such program: a failed run, reported like any other
            print(f"error: {exc}", file=sys.stderr)
            returncode = 127
        summary = _read_summary(summary_path)
    outcome = RunOutcome(returncode=returncode, seconds=time.time() - start, finished_at=time.time(), summary=summary)
    log.info("%s finished with exit code %d after %.0fs", job, returncode, outcome.seconds)
    if gateway:
        try:
            push(gateway, job, outcome_registry(outcome))
        except OSError as exc:  # urllib errors: the job's own result matters more than its report
            log.warning("could not push %s's outcome to %s: %s", job, gateway, exc)
    return outcome


def _read_summary(path: str) -> dict[str, Any]:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:  # the command writes none: only the outcome is pushed
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring the job summary %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reir.ops.jobrun", description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="Pushgateway job name (grouping key)")
    parser.add_argument("--pushgateway", default="", help="host:port or URL; empty: do not push")
    parser.add_argument("--skip-unless-exists", default=None, metavar="PATH",
                        help="exit 0 without running or pushing while PATH is missing (a schedule installed "
                             "before the first model is published stays quiet instead of failing)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.skip_unless_exists and not os.path.exists(args.skip_unless_exists):
        log.info("skipped %s: %s does not exist yet", args.job, args.skip_unless_exists)
        return 0
    return run_and_report(command, job=args.job, gateway=args.pushgateway or None).returncode


if __name__ == "__main__":
    sys.exit(main())
