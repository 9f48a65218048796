"""The files an operator installs: Prometheus alert rules, the Grafana dashboard, the systemd unit."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from gateway import metrics
from tests.conftest import REPO, require_program
from tests.unit.test_metrics import exercised_sample_names

ALERTS = REPO / "contrib/prometheus/alerts.yml"
ALERTS_TEST = REPO / "contrib/prometheus/alerts_test.yml"
GRAFANA = REPO / "contrib/grafana/dicom-gateway.json"
METRIC = re.compile(r"\b(dicom_gateway_[a-z0-9_]+|up)\b")


def test_alert_rules_load_with_promtool():
    promtool = require_program("/usr/bin/promtool")
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


def test_alert_rules_fire_on_synthetic_series():
    """Each alert fires when its condition holds long enough and stays silent otherwise."""
    promtool = require_program("/usr/bin/promtool")
    result = subprocess.run([promtool, "test", "rules", str(ALERTS_TEST)], capture_output=True,
                            text=True, timeout=60, cwd=ALERTS_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    tested = set(re.findall(r"alertname: (\w+)", ALERTS_TEST.read_text()))
    declared = set(re.findall(r"- alert: (\w+)", ALERTS.read_text()))
    assert declared == tested, f"alerts without a promtool test: {declared - tested}"


def test_alert_rules_name_only_exposed_metrics(tmp_path):
    exposed = exercised_sample_names(tmp_path) | {"up"}
    used = set(METRIC.findall(ALERTS.read_text()))
    assert used and used <= exposed, f"alerts use metrics the gateway does not expose: {used - exposed}"


def test_grafana_dashboard_queries_name_exposed_metrics(tmp_path):
    dashboard = json.loads(GRAFANA.read_text())
    exposed = exercised_sample_names(tmp_path) | {"up"}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 15
    for panel in dashboard["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            names = set(METRIC.findall(target["expr"]))
            assert names, f"panel {panel['title']!r}: query names no metric: {target['expr']}"
            assert names <= exposed, f"panel {panel['title']!r} names unknown metrics {names - exposed}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    # every metric the gateway declares is on some panel (build_info picks the instances)
    queries = exprs + [v["query"] for v in dashboard["templating"]["list"]]
    missing = [name for name in metrics.NAMES
               if not any(re.search(rf"\b{name.removesuffix('_total')}(_total|_bucket)?\b", q) for q in queries)]
    assert not missing, f"metrics on no Grafana panel: {missing}"

UNIT = REPO / "contrib/systemd/dicom-gateway.service"


def _unit_for_verify(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart pointing at this checkout's installed command (verify needs it to exist)."""
    import sys

    exe = Path(sys.executable).parent / "dicom-gateway"
    assert exe.exists(), f"{exe} missing: install the package (scripts/test.sh)"
    text = UNIT.read_text()
    assert "ExecStart=/opt/dicom-gateway/bin/dicom-gateway run" in text
    unit = tmp_path / "dicom-gateway.service"
    unit.write_text(text.replace("/opt/dicom-gateway/bin/dicom-gateway", str(exe)))
    return unit


def test_systemd_unit_verifies_clean(tmp_path):
    analyze = require_program("/usr/bin/systemd-analyze")
    unit = _unit_for_verify(tmp_path)
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    # unknown or misspelled directives are only warnings to verify: there must be none
    assert result.stderr.strip() == "" and result.stdout.strip() == "", result.stderr + result.stdout


def test_systemd_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a misspelled directive and a missing program are reported."""
    analyze = require_program("/usr/bin/systemd-analyze")
    unit = _unit_for_verify(tmp_path)
    unit.write_text(unit.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilegez=yes"))
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                            timeout=60)
    assert "Unknown key 'NoNewPrivilegez'" in result.stderr


def test_systemd_unit_is_hardened(tmp_path):
    analyze = require_program("/usr/bin/systemd-analyze")
    text = UNIT.read_text()
    for directive in ("Type=notify", "User=dicom-gateway", "NoNewPrivileges=yes", "ProtectSystem=strict",
                      "ReadWritePaths=/var/lib/dicom-gateway", "StateDirectory=dicom-gateway",
                      "Restart=on-failure", "RestartPreventExitStatus=2", "PrivateTmp=yes",
                      "CapabilityBoundingSet=\n"):
        assert directive in text, directive
    result = subprocess.run([analyze, "security", "--offline=true", str(_unit_for_verify(tmp_path))],
                            capture_output=True, text=True, timeout=60)
    level = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert level, result.stdout[-2000:] + result.stderr
    assert float(level.group(1)) <= 2.0, result.stdout  # systemd rates <= 2.0 "OK"
    sysusers = (REPO / "contrib/systemd/dicom-gateway.sysusers.conf").read_text()
    assert re.search(r"^u dicom-gateway ", sysusers, re.M)
