"""Shared fixtures: real peers (Orthanc, DCMTK, dciodvfy), a synthetic CT series, the gateway process.

Every fixture that starts a process stops it by PID; every wait polls against a monotonic
deadline. A missing peer program fails the test (never skips): CI installs them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from scripts.make_ct_series import make_ct_series  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parent.parent
# pynetdicom installs Python scripts named storescu/echoscu/storescp that can shadow DCMTK's
# on PATH: the DCMTK programs are always taken from the Debian package's folder.
DCMTK_DIR = Path("/usr/bin")


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05, what: str = ""):
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or predicate}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def require_program(path: str | Path) -> str:
    """The absolute path of a peer program; fails (not skips) when it is not installed."""
    path = Path(path)
    found = shutil.which(str(path)) if not path.is_absolute() else (str(path) if path.exists() else None)
    if not found:
        pytest.fail(f"{path} is not installed: run the README's test command (scripts/test.sh)")
    return found


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGTERM, wait, then SIGKILL: by PID, always bounded."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    return proc.returncode


# --------------------------------------------------------------------------- DCMTK


class Dcmtk:
    """Runs DCMTK programs with TCP_NODELAY=1 (Debian's DCMTK leaves Nagle on otherwise)."""

    env = {**os.environ, "TCP_NODELAY": "1"}

    def path(self, program: str) -> str:
        return require_program(DCMTK_DIR / program)

    def run(self, program: str, *args, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
        cmd = [self.path(program), *map(str, args)]
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr[-2000:]}")
        return result

    def echoscu(self, port: int, called: str, calling: str = "ECHOSCU", timeout: float = 30):
        return self.run("echoscu", "-aet", calling, "-aec", called, "127.0.0.1", port, timeout=timeout)

    def storescu(self, port: int, called: str, *files, calling: str = "STORESCU", extra=(), timeout: float = 300):
        """Send files (or folders, with +sd) in one association."""
        return self.run(
            "storescu", "-aet", calling, "-aec", called, *extra, "127.0.0.1", port, *files, timeout=timeout
        )

    def start_storescp(self, port: int, out_dir: Path, aet: str = "STORESCP") -> subprocess.Popen:
        out_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [self.path("storescp"), "-aet", aet, "-od", str(out_dir), str(port)],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: port_open(port) or proc.poll() is not None, 15, what="storescp to listen")
        assert proc.poll() is None, "storescp exited at start"
        return proc


@pytest.fixture(scope="session")
def dcmtk() -> Dcmtk:
    return Dcmtk()


@pytest.fixture
def storescp(dcmtk, tmp_path):
    """Factory: start DCMTK storescp on a free port; stopped by PID at teardown."""
    procs = []

    def start(port: int | None = None, aet: str = "STORESCP"):
        port = port or free_port()
        out = tmp_path / f"storescp-{port}"
        proc = dcmtk.start_storescp(port, out, aet)
        procs.append(proc)
        return port, out, proc

    yield start
    for proc in procs:
        stop_process(proc)


# --------------------------------------------------------------------------- dciodvfy


def dciodvfy_errors(path: Path) -> list[str]:
    """dicom3tools' IOD checker: the ``Error`` lines it prints for ``path`` (empty = valid)."""
    exe = require_program("/usr/bin/dciodvfy")
    result = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


@pytest.fixture(scope="session")
def dciodvfy():
    return dciodvfy_errors


# --------------------------------------------------------------------------- Orthanc


@dataclass
class Orthanc:
    dicom_port: int
    http_port: int
    aet: str
    folder: Path
    proc: subprocess.Popen | None = None
    log: Path | None = None
    config_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            body = resp.read()
            if resp.headers.get_content_type() == "application/json":
                return json.loads(body)
            return body

    def post(self, path: str, data: bytes | dict, timeout: float = 30):
        if isinstance(data, dict):
            data = json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
            try:
                return json.loads(body)
            except ValueError:
                return body

    def instances(self) -> list[str]:
        return self.get("/instances")

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc's id of the instance with this SOP Instance UID, or None."""
        found = self.post(
            "/tools/lookup", sop_instance_uid.encode()
        )
        for item in found:
            if item.get("Type") == "Instance":
                return item["ID"]
        return None

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.get(f"/instances/{orthanc_id}/file")

    def ready(self) -> bool:
        try:
            return bool(self.get("/system", timeout=1))
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def start(self, timeout: float = 60) -> None:
        exe = require_program("/usr/sbin/Orthanc")
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [exe, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        log.close()
        wait_until(lambda: self.proc.poll() is not None or self.ready(), timeout, 0.1, "Orthanc REST API")
        if self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited at start: {self.log.read_text()[-2000:]}")
        wait_until(lambda: port_open(self.dicom_port), timeout, 0.05, "Orthanc DICOM port")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=20)
            self.proc = None


def make_orthanc(folder: Path, aet: str = "ORTHANC", **extra) -> Orthanc:
    folder.mkdir(parents=True, exist_ok=True)
    orthanc = Orthanc(dicom_port=free_port(), http_port=free_port(), aet=aet, folder=folder)
    config = {
        "Name": f"test-{orthanc.dicom_port}",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpServerEnabled": True,
        "HttpPort": orthanc.http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": orthanc.dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "UnknownSopClassAccepted": True,
        "Plugins": [],
        "LuaScripts": [],
        "StableAge": 1,
        "DicomModalities": {},
        "HttpTimeout": 30,
        "StorageCompression": False,
        **extra,
    }
    orthanc.config_path = folder / "orthanc.json"
    orthanc.config_path.write_text(json.dumps(config, indent=2))
    orthanc.log = folder / "orthanc.log"
    return orthanc


@pytest.fixture
def orthanc_factory(tmp_path):
    """Factory: start an Orthanc with its own folders and free loopback ports."""
    started: list[Orthanc] = []

    def start(name: str = "orthanc", aet: str = "ORTHANC", **extra) -> Orthanc:
        orthanc = make_orthanc(tmp_path / name, aet=aet, **extra)
        orthanc.start()
        started.append(orthanc)
        return orthanc

    yield start
    for orthanc in started:
        orthanc.stop()


@pytest.fixture
def orthanc(orthanc_factory) -> Orthanc:
    return orthanc_factory()


# --------------------------------------------------------------------------- synthetic data


@pytest.fixture
def ct_series(tmp_path):
    """Factory: ``ct_series(n, rows=512, columns=512, ...)`` -> list of paths in ascending z."""
    counter = iter(range(1000))

    def make(n: int, rows: int = 512, columns: int = 512, **kw) -> list[Path]:
        return make_ct_series(tmp_path / f"ct-{next(counter)}", n, rows, columns, **kw)

    return make


# --------------------------------------------------------------------------- the gateway


def gateway_config(tmp_path: Path, **sections) -> Path:
    """Write a gateway YAML config under tmp_path with free ports; ``sections`` override keys."""
    config = {
        "node": {"ae_title": "GATEWAY", "host": "127.0.0.1", "port": free_port(), "data_dir": "var",
                 "network_timeout_seconds": 30},
        "storage": {"min_free_bytes": 0},
        "inbox": {"path": "inbox", "poll_interval_seconds": 0.5},
        "retry": {"max_attempts": 5, "initial_backoff_seconds": 0.5, "max_backoff_seconds": 2},
        "forward": {"poll_interval_seconds": 0.2},
        "logging": {"level": "INFO"},
        "http": {"port": free_port()},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class GatewayProcess:
    config_path: Path
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    _offset: int = 0

    @property
    def config(self) -> dict:
        return yaml.safe_load(self.config_path.read_text())

    @property
    def port(self) -> int:
        return self.config["node"]["port"]

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.config['http']['port']}"

    @property
    def ae_title(self) -> str:
        return self.config["node"]["ae_title"]

    def start(self, timeout: float = 30) -> None:
        self.log_path = self.config_path.parent / "gateway.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.config_path.parent,
        )
        log.close()
        http = self.config.get("http") or {}
        http_port = http.get("port") if http.get("enabled", True) else None
        # Each port is probed until it answers, then left alone: a bare connect costs the
        # public-API listener a pynetdicom association, and twenty a second starved the start.
        waiting = [self.port] + ([http_port] if http_port is not None else [])

        def listening() -> bool:
            while waiting and port_open(waiting[0]):
                waiting.pop(0)
            return not waiting

        wait_until(lambda: self.proc.poll() is not None or listening(), timeout, 0.05,
                   "the gateway to listen")
        if self.proc.poll() is not None:
            raise AssertionError(f"gateway exited at start: {self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        code = stop_process(self.proc, timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def cli(self, *args, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *map(str, args), "-c", str(self.config_path)],
            capture_output=True, text=True, timeout=timeout,
        )


@pytest.fixture
def gateway_factory(tmp_path):
    """Factory: write a config (overrides as keyword sections) and start ``dicom-gateway run``."""
    started: list[GatewayProcess] = []

    def start(folder: Path | None = None, start: bool = True, **sections) -> GatewayProcess:
        folder = folder or tmp_path / f"gw{len(started)}"
        folder.mkdir(parents=True, exist_ok=True)
        gw = GatewayProcess(gateway_config(folder, **sections))
        if start:
            gw.start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()
