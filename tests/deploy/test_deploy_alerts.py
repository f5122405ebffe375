"""The alert and recording rules, loaded by promtool (Debian's prometheus package; make system): they
parse, and their unit tests (deploy/prometheus/tests/*.test.yaml) pass. Every alert has a test in which
it fires on the series of its failure and one in which it stays silent; every recording rule has a test
of its value."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "gmco-alerts.yaml"
TESTS = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.test.yaml"))


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool missing: `make system` installs Debian's prometheus package, which has it")
    return path


def run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_promtool_checks_the_rules(promtool):
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass(promtool):
    assert TESTS
    result = run(promtool, "test", "rules", *map(str, TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_in_a_test_and_stays_silent_in_another():
    fired: set[str] = set()
    silent: set[str] = set()
    exprs = ""
    for path in TESTS:
        doc = yaml.safe_load(path.read_text())
        assert [str((path.parent / f).resolve()) for f in doc["rule_files"]] == [str(RULES)]
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else silent).add(case["alertname"])
            exprs += " ".join(case["expr"] for case in test.get("promql_expr_test", []))
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert alerts - fired == set(), "alerts no test fires"
    assert alerts - silent == set(), "alerts no test shows silent on healthy series"
    records = {r["record"] for r in rules() if "record" in r}
    assert {r for r in records if r not in exprs} == set(), "recording rules no test evaluates"
