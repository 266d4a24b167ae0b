"""reir.ops.jobrun: runs the command for real, passes its exit code through, reports
the outcome through an injected pusher (the Pushgateway itself: test_live_metrics.py)."""

from __future__ import annotations

import sys

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from reir.ops.jobrun import main, push_to, run_and_report
from reir.platform.milvus_server import free_port


class Recorder:
    def __init__(self) -> None:
        self.pushes: list[tuple[str, str, str]] = []

    def __call__(self, gateway: str, job: str, registry: CollectorRegistry) -> None:
        self.pushes.append((gateway, job, generate_latest(registry).decode()))


def _exit(code: int) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.exit({code})"]


def test_success_pushes_ok_and_the_success_time() -> None:
    rec = Recorder()
    outcome = run_and_report(_exit(0), job="reir-index", gateway="gw:9091", push=rec)
    assert (outcome.returncode, outcome.status) == (0, "ok")
    ((gateway, job, text),) = rec.pushes
    assert (gateway, job) == ("gw:9091", "reir-index")
    assert 'reir_index_runs_total{status="ok"} 1.0' in text
    values = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert values["reir_index_last_success_timestamp_seconds"] == pytest.approx(outcome.finished_at)


def test_failure_pushes_failed_and_keeps_the_last_success_time_untouched() -> None:
    rec = Recorder()
    outcome = run_and_report(_exit(3), job="reir-index", gateway="gw:9091", push=rec)
    assert (outcome.returncode, outcome.status) == (3, "failed")
    ((_, _, text),) = rec.pushes
    assert 'reir_index_runs_total{status="failed"} 1.0' in text
    assert "reir_index_last_success_timestamp_seconds" not in text


def test_missing_program_is_a_failed_run() -> None:
    rec = Recorder()
    outcome = run_and_report(["/nonexistent/reir-command"], job="reir-index", gateway="gw", push=rec)
    assert outcome.returncode == 127 and 'status="failed"' in rec.pushes[0][2]


def test_no_gateway_no_push_and_unreachable_gateway_is_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    assert run_and_report(_exit(0), job="j", gateway=None, push=rec).returncode == 0 and rec.pushes == []
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    assert run_and_report(_exit(5), job="j", gateway=closed, push=push_to).returncode == 5
    assert "could not push" in caplog.text


def test_cli_passes_the_exit_code_and_needs_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--job", "j", "--", *_exit(4)]) == 4
    with pytest.raises(SystemExit) as exc:
        main(["--job", "j"])
    assert exc.value.code == 2 and "give the command" in capsys.readouterr().err


def test_the_summary_the_command_leaves_pushes_its_collection_rows(tmp_path) -> None:
    # The command writes what `reir ingest` writes to $REIR_JOB_SUMMARY; jobrun pushes the rows.
    script = ("import json, os; json.dump({'collection': 'reir_instances__v3', 'rows_in_store': 1234}, "
              "open(os.environ['REIR_JOB_SUMMARY'], 'w'))")  # fmt: skip
    rec = Recorder()
    outcome = run_and_report([sys.executable, "-c", script], job="reir-index", gateway="gw", push=rec)
    assert outcome.summary == {"collection": "reir_instances__v3", "rows_in_store": 1234}
    values = {(s.name, tuple(s.labels.items())): s.value
              for fam in text_string_to_metric_families(rec.pushes[0][2]) for s in fam.samples}  # fmt: skip
    assert values[("reir_index_collection_rows", (("collection", "reir_instances__v3"),))] == 1234
    # A failed run pushes no rows (its collection was not promoted), nor does garbage in the file.
    rec = Recorder()
    run_and_report([sys.executable, "-c", script + "; raise SystemExit(1)"], job="j", gateway="gw", push=rec)
    assert "reir_index_collection_rows" not in rec.pushes[0][2]
    garbage = "import os; open(os.environ['REIR_JOB_SUMMARY'], 'w').write('{not json')"
    rec = Recorder()
    assert run_and_report([sys.executable, "-c", garbage], job="j", gateway="gw", push=rec).summary == {}
    assert "reir_index_collection_rows" not in rec.pushes[0][2] and 'status="ok"' in rec.pushes[0][2]


def test_a_schedule_before_the_first_published_model_skips_quietly(tmp_path) -> None:
    """The re-index schedules run `--skip-unless-exists /models/reir/current`: before the
    first `reir model publish` they neither run nor push (no ReirReindexFailed page)."""
    marker = tmp_path / "ran"
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'w').close(); raise SystemExit(3)"]
    missing = str(tmp_path / "current")
    # An unreachable gateway would only log; the point is that nothing runs at all.
    assert main(["--job", "j", "--skip-unless-exists", missing, "--", *command]) == 0
    assert not marker.exists()
    (tmp_path / "current").mkdir()
    assert main(["--job", "j", "--skip-unless-exists", missing, "--", *command]) == 3
    assert marker.exists()
