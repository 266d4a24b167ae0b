"""The PrometheusRule's rules pass `promtool check rules`, and `promtool test rules`
evaluates them on synthetic series (tests/ops/promtool/*_test.yaml): each alert fires
where it should and stays silent otherwise."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "k8s" / "monitoring" / "prometheusrule.yaml"
UNIT_TESTS = sorted((Path(__file__).parent / "promtool").glob("*_test.yaml"))


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package: prometheus; .ci/run installs it)")
    return path


def _groups() -> list[dict[str, Any]]:
    return yaml.safe_load(RULES.read_text())["spec"]["groups"]


def _run_unit_tests(promtool: str, tmp: Path, groups: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    rules = tmp / "reir-alerts.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    files = []
    for test in UNIT_TESTS:
        spec = yaml.safe_load(test.read_text())
        spec["rule_files"] = [str(rules)]
        files.append(tmp / test.name)
        files[-1].write_text(yaml.safe_dump(spec))
    return subprocess.run([promtool, "test", "rules", *map(str, files)], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip


def test_rules_pass_promtool_check(promtool: str, tmp_path: Path) -> None:
    rules = tmp_path / "reir-alerts.yaml"
    rules.write_text(yaml.safe_dump({"groups": _groups()}))
    proc = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{sum(len(g['rules']) for g in _groups())} rules found" in proc.stdout


def test_alerts_fire_on_synthetic_series_and_stay_silent_otherwise(promtool: str, tmp_path: Path) -> None:
    proc = _run_unit_tests(promtool, tmp_path, _groups())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("SUCCESS") == len(UNIT_TESTS)


def test_every_alert_is_tested_firing_and_silent() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for test in UNIT_TESTS:
        for case in yaml.safe_load(test.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check["exp_alerts"] else silent).add(check["alertname"])
    alerts = {r["alert"] for g in _groups() for r in g["rules"]}
    assert alerts == fires == silent


def test_unit_tests_notice_a_changed_threshold(promtool: str, tmp_path: Path) -> None:
    """Guard against unit tests that pass whatever the rules say."""
    groups = _groups()
    for group in groups:
        for rule in group["rules"]:
            if rule["alert"] == "ReirQueryErrorRateHigh":
                rule["expr"] = rule["expr"].replace("> 0.02", "> 0.5")
    assert _run_unit_tests(promtool, tmp_path, groups).returncode != 0


def test_every_alert_links_to_its_runbook_section() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    headings = re.findall(r"^#+ (.+)$", runbook, re.MULTILINE)
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
    for group in _groups():
        for rule in group["rules"]:
            link = rule["annotations"]["runbook"]
            assert link == f"docs/runbook.md#{rule['alert'].lower()}"
            assert link.split("#")[1] in anchors, f"docs/runbook.md has no section {rule['alert']}"
