"""Operator-facing behaviour of the CLI: sd_notify readiness, JSON logs, send's progress bar, status --watch."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from gateway import sdnotify
from tests.conftest import REPO, gateway_config, port_open, wait_until


def _read_pty(fd: int, until, timeout: float) -> str:
    """Read from a pty master until ``until(text)`` holds or the deadline passes."""
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            out += chunk
            if until(out.decode(errors="replace")):
                break
    return out.decode(errors="replace")


def test_sdnotify_sends_to_a_path_and_an_abstract_socket(tmp_path):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(5)
        assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert server.recv(4096) == b"READY=1"
    name = f"s16-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(5)
        assert sdnotify.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert server.recv(4096) == b"STOPPING=1"
    assert not sdnotify.notify("READY=1", {})  # not under systemd: nothing, no error
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "absent.sock")})


def test_run_notifies_ready_once_the_listener_accepts_and_stopping_on_sigterm(tmp_path):
    config = gateway_config(tmp_path, logging={"level": "INFO", "format": "json"})
    port = json.loads(json.dumps(__import__("yaml").safe_load(config.read_text())))["node"]["port"]
    sock_path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(sock_path))
    server.settimeout(30)
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(config)],
                            env={**os.environ, "NOTIFY_SOCKET": str(sock_path)}, cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = server.recv(4096).decode()
        assert ready.startswith("READY=1\n") and f":{port}" in ready
        assert port_open(port), "READY=1 came before the DICOM listener accepted"
        os.kill(proc.pid, signal.SIGTERM)
        assert server.recv(4096) == b"STOPPING=1"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        server.close()
        log.close()
    # logging.format: json -> every line is one JSON object with the same fields as text lines
    lines = (tmp_path / "run.log").read_text().splitlines()
    assert lines
    entries = [json.loads(line) for line in lines]
    assert all(set(e) >= {"time", "level", "logger", "message"} for e in entries)
    assert any(e["message"].startswith("listening as GATEWAY") for e in entries)
    assert any(e["message"] == "stopped" and e["logger"] == "gateway.service" for e in entries)


def test_logging_format_is_checked(tmp_path):
    config = gateway_config(tmp_path, logging={"level": "INFO", "format": "xml"})
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", "-c", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "logging.format: must be text or json, got 'xml'" in result.stderr


def _send_config(tmp_path: Path) -> Path:
    return gateway_config(tmp_path, destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}})


def test_send_shows_a_progress_bar_on_a_terminal(tmp_path, ct_series):
    files = ct_series(20, rows=128, columns=128)
    config = _send_config(tmp_path)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "send", "pacs", str(files[0].parent), "-c", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, cwd=tmp_path)
        os.close(slave)
        shown = _read_pty(master, lambda t: "20/20 files" in t and "\n" in t.split("20/20 files")[-1], 60)
        stdout = proc.communicate(timeout=60)[0].decode()
    finally:
        os.close(master)
    assert proc.returncode == 0, shown + stdout
    assert "\r[" in shown and "20/20 files" in shown and "MB/s" in shown, shown
    assert "[" + "#" * 10 in shown  # a full bar at the end
    assert "queued SOP" not in shown  # per-file log lines would tear the bar apart
    size = sum(f.stat().st_size for f in files)
    assert stdout.startswith(f"20 instance(s) queued for pacs, 0 skipped ({size / 1e6:.1f} MB in "), stdout


def test_send_prints_one_summary_line_without_a_terminal(tmp_path, ct_series):
    files = ct_series(5, rows=64, columns=64)
    (files[0].parent / "notes.txt").write_text("not dicom")
    config = _send_config(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "send", "pacs", str(files[0].parent), "-c", str(config)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 1  # one file skipped
    assert "\r" not in result.stderr and "files  " not in result.stderr
    assert "notes.txt: skipped, not a DICOM Part 10 file" in result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("5 instance(s) queued for pacs, 1 skipped ("), lines


def test_status_watch_refreshes_until_interrupted(tmp_path, ct_series):
    config = _send_config(tmp_path)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "status", "--watch", "--interval", "0.3", "-c", str(config)],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=tmp_path)
    os.close(slave)
    try:
        first = _read_pty(master, lambda t: "dest pacs: 0 pending" in t, 30)
        assert "\x1b[2J" in first and "dest pacs: 0 pending" in first, first
        files = ct_series(3, rows=64, columns=64)
        sent = subprocess.run(
            [sys.executable, "-m", "gateway", "send", "pacs", *map(str, files), "-c", str(config)],
            capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert sent.returncode == 0, sent.stderr
        later = _read_pty(master, lambda t: "dest pacs: 3 pending" in t, 30)
        assert "dest pacs: 3 pending" in later, later
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)


def test_status_watch_json_prints_one_object_per_refresh(tmp_path):
    config = _send_config(tmp_path)
    # Started with SIGINT ignored, as a background job of a shell without job control is:
    # the watch must still stop on it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "status", "--watch", "--json", "--interval", "0.2", "-c", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
    finally:
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=15)
    for line in lines:
        assert json.loads(line)["destinations"]["pacs"]["pending"] == 0
    assert proc.returncode == 0
    bad = subprocess.run([sys.executable, "-m", "gateway", "status", "--watch", "--interval", "0", "-c",
                          str(config)], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "must be between 0.1 and 3600 seconds, got 0" in bad.stderr
