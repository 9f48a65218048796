"""DICOMweb server benchmark: the gateway against Orthanc's DICOMweb plugin, and against its own C-STORE receive.

The same 200-instance CT corpus (512x512 int16, ~105 MB) is stored with STOW-RS, one request
per 50 instances, into a fresh gateway and a fresh Orthanc (DICOMweb plugin); the gateway's
own C-STORE receive of the corpus (DCMTK storescu, one association) is timed too; then the
series is retrieved with WADO-RS from each (``transfer-syntax=*``: stored bytes) and read to
the end by two clients, the same for both servers: a raw socket reading into one preallocated
buffer and discarding it (the cheapest client: on 2 cores curl's own CPU was a large part of
the retrieve time) and curl to /dev/null. Every round starts every server fresh, in a rotated
order; medians over rounds, ratios from the same run, peak server RSS (psutil, sampled every
10 ms), server and client CPU per retrieve, and the load average (the machine may be shared).

    python3 bench/dicomweb.py [--rounds 3] [--wado-repeats 3] [--wado-only]

Targets (issue 13): STOW-RS >= 1.0x Orthanc and >= 0.8x the gateway's C-STORE receive;
WADO-RS series retrieve >= 1.5x Orthanc.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import psutil
import pydicom
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.receive import NODELAY_ENV, corpus  # noqa: E402
from tests.conftest import free_port, make_orthanc, port_open, stop_process, wait_until  # noqa: E402

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
PER_REQUEST = 50
BOUNDARY = "bench-boundary-7d1e"
ACCEPT_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


class Peak:
    """Peak RSS of a process (and its children) while the block runs."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._done.is_set():
            try:
                rss = self.proc.memory_info().rss + sum(c.memory_info().rss for c in self.proc.children(True))
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            self._done.wait(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join(5)


class Gateway:
    def __init__(self, folder: Path):
        self.folder = folder
        self.port, self.http_port = free_port(), free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def start(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = {"node": {"ae_title": "BENCH", "port": self.port, "data_dir": str(self.folder / "var")},
               "storage": {"min_free_bytes": 0}, "inbox": {"path": str(self.folder / "inbox")},
               "http": {"port": self.http_port}, "logging": {"level": "INFO"}}
        (self.folder / "gateway.yaml").write_text(yaml.safe_dump(cfg))
        log = open(self.folder / "gateway.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(self.folder / "gateway.yaml")],
                                     cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(lambda: self.proc.poll() is not None or (port_open(self.port) and port_open(self.http_port)),
                   60, 0.05, "the gateway")
        if self.proc.poll() is not None:
            raise SystemExit(f"the gateway exited; see {self.folder / 'gateway.log'}")

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc, 30)

    def stored(self) -> int:
        return sum(1 for _ in (self.folder / "var" / "store").rglob("*.dcm"))


class OrthancWeb:
    def __init__(self, folder: Path):
        self.orthanc = make_orthanc(folder, aet="BENCHO", Plugins=[PLUGIN],
                                    DicomWeb={"Enable": True, "Root": "/dicom-web/"})

    @property
    def url(self) -> str:
        return f"{self.orthanc.url}/dicom-web"

    @property
    def proc(self):
        return self.orthanc.proc

    def start(self):
        self.orthanc.start()

    def stop(self):
        self.orthanc.stop()

    def stored(self) -> int:
        return len(self.orthanc.instances())


def bodies(files: list[Path], folder: Path) -> list[Path]:
    """One multipart/related body file per PER_REQUEST instances, written before any timing."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for start in range(0, len(files), PER_REQUEST):
        path = folder / f"stow-{start // PER_REQUEST}.body"
        with open(path, "wb") as f:
            for src in files[start:start + PER_REQUEST]:
                f.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
                f.write(src.read_bytes())
                f.write(b"\r\n")
            f.write(f"--{BOUNDARY}--\r\n".encode())
        out.append(path)
    return out


def stow(server, requests: list[Path]) -> tuple[float, int]:
    """All requests with one curl process (one kept-alive connection); every answer must be 200."""
    ctype = f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    cmd = ["/usr/bin/curl"]
    for i, body in enumerate(requests):
        if i:
            cmd.append("--next")
        cmd += ["-s", "-o", "/dev/null", "-w", "%{http_code}\n", "-H", ctype, "-H", "Accept: application/dicom+json",
                "-H", "Expect:", "--data-binary", f"@{body}", f"{server.url}/studies"]
    with Peak(server.proc.pid) as peak:
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        elapsed = time.perf_counter() - start
    codes = result.stdout.split()
    if codes != ["200"] * len(requests):
        raise SystemExit(f"STOW-RS to {type(server).__name__} answered {codes}: {result.stderr[-500:]}")
    return elapsed, peak.peak


def cstore(gateway: Gateway, files: list[Path]) -> tuple[float, int]:
    cmd = ["/usr/bin/storescu", "-aet", "BENCHSCU", "-aec", "BENCH", "127.0.0.1", str(gateway.port), *map(str, files)]
    with Peak(gateway.proc.pid) as peak:
        start = time.perf_counter()
        result = subprocess.run(cmd, env=NODELAY_ENV, capture_output=True, text=True, timeout=1800)
        elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"storescu failed: {result.stderr[-1000:]}")
    return elapsed, peak.peak


def settle(servers, idle: float = 0.05, timeout: float = 30.0) -> None:
    """Wait (bounded) until every server uses under ``idle`` of a CPU over half a second: work left
    behind by the stores (indexing, series triggers) must not land in the retrieve times."""
    deadline = time.monotonic() + timeout
    procs = [psutil.Process(s.proc.pid) for s in servers]
    while time.monotonic() < deadline:
        before = [sum(p.cpu_times()[:2]) for p in procs]
        time.sleep(0.5)
        if all(sum(p.cpu_times()[:2]) - b < idle * 0.5 for p, b in zip(procs, before)):
            return


def fetch(url: str, accept: str) -> tuple[int, int, float, float]:
    """GET ``url`` on a raw socket into one preallocated buffer, bytes discarded (the cheapest client).

    The request says ``Connection: close`` so every server ends the body by closing (Orthanc
    does anyway; the gateway sends Content-Length, checked here). Returns status, body bytes,
    seconds from connect to EOF, and this process's CPU seconds over the same span.
    """
    parts = urllib.parse.urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    cpu0, start = time.process_time(), time.perf_counter()
    with socket.create_connection((parts.hostname, parts.port), timeout=600) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: {accept}\r\n"
                     "Connection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            n = sock.recv_into(view)
            if not n:
                raise SystemExit(f"{url}: the connection closed inside the response head")
            head += bytes(view[:n])
        head, _, rest = head.partition(b"\r\n\r\n")
        total = len(rest)
        while n := sock.recv_into(view):
            total += n
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length" and int(value) != total:
            raise SystemExit(f"{url}: Content-Length {value.strip()} but {total} body bytes")
    return status, total, elapsed, cpu


def wado(server, study: str, series: str, expect_bytes: int, client: str) -> tuple[float, int, float]:
    """Retrieve the series, body discarded: ``raw`` = ``fetch`` in a child process (timed inside it,
    so interpreter start is not counted), ``curl`` = curl to /dev/null (wall time of the process).
    Returns seconds, the server's peak RSS, and the client's CPU seconds."""
    url = f"{server.url}/studies/{study}/series/{series}"
    if client == "raw":
        cmd = [sys.executable, __file__, "--fetch", url]
    else:
        cmd = ["/usr/bin/curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", "-H",
               f"Accept: {ACCEPT_STORED}", url]
    with Peak(server.proc.pid) as peak:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"WADO-RS from {type(server).__name__} with {client}: {result.stderr[-500:]}")
    fields = result.stdout.split()
    status, size = fields[0], fields[1]
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if client == "raw":
        elapsed, cpu = float(fields[2]), float(fields[3])
    if status != "200" or int(size) < expect_bytes:
        raise SystemExit(f"WADO-RS from {type(server).__name__}: status {status}, {size} bytes")
    return elapsed, peak.peak, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--wado-repeats", type=int, default=3)
    parser.add_argument("--wado-only", action="store_true",
                        help="store the corpus untimed and time only the WADO-RS retrieves")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dicom-gateway-bench")
    parser.add_argument("--fetch", metavar="URL", help=argparse.SUPPRESS)  # the raw client, run as a child
    args = parser.parse_args()
    if args.fetch:
        status, size, elapsed, cpu = fetch(args.fetch, ACCEPT_STORED)
        print(status, size, f"{elapsed:.6f}", f"{cpu:.6f}")
        return 0
    files = corpus(args.cache, "ct")
    total = sum(p.stat().st_size for p in files)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, series = first.StudyInstanceUID, first.SeriesInstanceUID
    work = Path(tempfile.mkdtemp(prefix="bench-dicomweb-"))
    requests = bodies(files, work / "bodies")
    res: dict[str, list[tuple]] = {}
    tasks = ["stow-gateway", "stow-orthanc", "cstore-gateway"]
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)",
          flush=True)
    try:
        for rnd in range(args.rounds):
            gw, orth = Gateway(work / f"gw-{rnd}"), OrthancWeb(work / f"orthanc-{rnd}")
            gw_dimse = None if args.wado_only else Gateway(work / f"gwd-{rnd}")
            servers = [x for x in (gw, orth, gw_dimse) if x is not None]
            for server in servers:
                server.start()
            try:
                order = tasks[rnd % 3:] + tasks[: rnd % 3]
                for task in order:
                    if task == "stow-gateway":
                        out = stow(gw, requests)
                    elif task == "stow-orthanc":
                        out = stow(orth, requests)
                    elif gw_dimse is not None:
                        out = cstore(gw_dimse, files)
                    else:
                        continue
                    if args.wado_only:
                        continue
                    res.setdefault(task, []).append(out)
                    print(f"  round {rnd + 1} {task:15s} {out[0]:7.2f} s {len(files) / out[0]:8.1f} inst/s "
                          f"peak {out[1] / 1e6:6.1f} MB", flush=True)
                for server, name in ((gw, "gateway"), (orth, "orthanc"), (gw_dimse, "gateway (C-STORE)")):
                    if server is not None and server.stored() != len(files):
                        raise SystemExit(f"{name} stored {server.stored()} of {len(files)}")
                settle([gw, orth])
                for rep in range(args.wado_repeats):
                    pair = [("gateway", gw), ("orthanc", orth)]
                    if (rnd + rep) % 2:
                        pair.reverse()
                    for client in ("raw", "curl"):
                        for name, server in pair:
                            task = f"wado-{name}-{client}"
                            proc = psutil.Process(server.proc.pid)
                            cpu0 = sum(proc.cpu_times()[:2])
                            t, pk, client_cpu = wado(server, study, series, total, client)
                            out = (t, pk, client_cpu, sum(proc.cpu_times()[:2]) - cpu0)
                            res.setdefault(task, []).append(out)
                            print(f"  round {rnd + 1} {task:20s} {t:7.3f} s {total / t / 1e6:8.1f} MB/s "
                                  f"peak {pk / 1e6:6.1f} MB  cpu: server {out[3] * 1e3:5.0f} ms "
                                  f"client {client_cpu * 1e3:5.0f} ms", flush=True)
            finally:
                for server in servers:
                    server.stop()
                for name in ("gw", "orthanc", "gwd"):
                    shutil.rmtree(work / f"{name}-{rnd}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(task: str, i: int = 0) -> float:
        return statistics.median(r[i] for r in res[task])

    def peak(task: str) -> float:
        return max(r[1] for r in res[task]) / 1e6

    n = len(files)
    print()
    print(f"corpus: {n} CT instances, {total / 1e6:.1f} MB; STOW-RS {PER_REQUEST} per request; "
          f"medians of {args.rounds} rounds ({args.wado_repeats} WADO reads per round and client)")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    print(f"  {'':34s} {'median s':>9s} {'inst/s':>8s} {'MB/s':>7s} {'peak MB':>8s} {'srv cpu ms':>10s} "
          f"{'cli cpu ms':>10s}")
    rows = [] if args.wado_only else [("STOW-RS into gateway", "stow-gateway"),
                                      ("STOW-RS into Orthanc", "stow-orthanc"),
                                      ("C-STORE into gateway", "cstore-gateway")]
    for client in ("raw", "curl"):
        rows += [(f"WADO-RS series, gateway, {client}", f"wado-gateway-{client}"),
                 (f"WADO-RS series, Orthanc, {client}", f"wado-orthanc-{client}")]
    for label, task in rows:
        t = med(task)
        cpu = f"{med(task, 3) * 1e3:10.0f} {med(task, 2) * 1e3:10.0f}" if task.startswith("wado") else ""
        print(f"  {label:34s} {t:9.3f} {n / t:8.1f} {total / t / 1e6:7.1f} {peak(task):8.1f} {cpu}")
    ratios = {}
    if not args.wado_only:
        ratios["STOW-RS gateway / Orthanc (target >= 1.0x)"] = med("stow-orthanc") / med("stow-gateway")
        ratios["STOW-RS gateway / its C-STORE (target >= 0.8x)"] = med("cstore-gateway") / med("stow-gateway")
    ratios["WADO-RS gateway / Orthanc, raw-socket client (target >= 1.5x)"] = (
        med("wado-orthanc-raw") / med("wado-gateway-raw"))
    ratios["WADO-RS gateway / Orthanc, curl client"] = med("wado-orthanc-curl") / med("wado-gateway-curl")
    ratios["WADO-RS server CPU per retrieve, Orthanc / gateway"] = med("wado-orthanc-raw", 3) / max(
        med("wado-gateway-raw", 3), 1e-3)
    for label, value in ratios.items():
        print(f"  {label}: {value:.2f}x")
    print(json.dumps({k: round(v, 3) for k, v in ratios.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
