"""The alert rules and the Grafana board parse, and name only metrics the gateway exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "ops" / "alerts.yml"
BOARD = ROOT / "ops" / "grafana-dashboard.json"
# Names PromQL or Prometheus itself provides.
BUILTIN = {"up", "time"}


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def board_exprs() -> list[str]:
    board = json.loads(BOARD.read_text())
    return [t["expr"] for panel in board["panels"] for t in panel["targets"]]


def metric_names(expr: str) -> set[str]:
    """The series an expression reads: oes_* names, and any bare name followed by { or [."""
    names = set(re.findall(r"\boes_[a-z0-9_]+", expr))
    names |= {n for n in re.findall(r"\b([a-z_][a-z0-9_]*)\s*[{\[]", expr) if n == "up"}
    return names


SERIES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
}


def exported(client: TestClient) -> set[str]:
    """Every series name /metrics declares, whether or not a labelled one has samples yet."""
    text = client.get("/metrics").text
    return {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in SERIES.get(family.type, ("",))
    }


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules() -> None:
    done = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_names_a_runbook_entry_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for rule in rules():
        assert f"#### {rule['alert']}" in readme, rule["alert"]
        assert rule["annotations"]["runbook"] == f"README.md#{rule['alert'].lower()}"


@pytest.mark.parametrize(
    "expr",
    [pytest.param(r["expr"], id=r["alert"]) for r in rules()]
    + [pytest.param(e, id=f"panel-{i}") for i, e in enumerate(board_exprs())],
)
def test_rules_and_panels_read_only_metrics_the_gateway_exports(
    client: TestClient, expr: str
) -> None:
    assert metric_names(expr), f"reads no metric: {expr}"
    ours = metric_names(expr) - BUILTIN
    assert ours <= exported(client), ours - exported(client)


def test_the_board_is_a_grafana_dashboard_with_a_datasource_choice() -> None:
    board = json.loads(BOARD.read_text())
    assert board["uid"] == "oes-partner"
    assert {"name": "datasource", "type": "datasource"}.items() <= board["templating"]["list"][
        0
    ].items()
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
