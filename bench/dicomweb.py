"""DICOMweb server benchmark: the gateway against Orthanc's DICOMweb plugin, and against its own C-STORE receive.

The same 200-instance CT corpus (512x512 int16, ~105 MB) is stored with STOW-RS, one request
per 50 instances, into a fresh gateway and a fresh Orthanc (DICOMweb plugin); the gateway's
own C-STORE receive of the corpus (DCMTK storescu, one association) is timed too; then the
series is retrieved with WADO-RS from each (``transfer-syntax=*``: stored bytes) and read to
the end. Every round starts every server fresh, in a rotated order; medians over rounds,
ratios from the same run, peak server RSS (psutil, sampled every 10 ms).

    python3 bench/dicomweb.py [--rounds 3] [--wado-repeats 3]

Targets (issue 13): STOW-RS >= 1.0x Orthanc and >= 0.8x the gateway's C-STORE receive;
WADO-RS series retrieve >= 1.5x Orthanc.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
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


def wado(server, study: str, series: str, expect_bytes: int) -> tuple[float, int]:
    """Retrieve the series with curl (a C client, so the servers are what is measured), body to /dev/null."""
    url = f"{server.url}/studies/{study}/series/{series}"
    cmd = ["/usr/bin/curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", "-H",
           f"Accept: {ACCEPT_STORED}", url]
    with Peak(server.proc.pid) as peak:
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        elapsed = time.perf_counter() - start
    status, size = result.stdout.split()
    if status != "200" or int(size) < expect_bytes:
        raise SystemExit(f"WADO-RS from {type(server).__name__}: status {status}, {size} bytes")
    return elapsed, peak.peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--wado-repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dicom-gateway-bench")
    args = parser.parse_args()
    files = corpus(args.cache, "ct")
    total = sum(p.stat().st_size for p in files)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, series = first.StudyInstanceUID, first.SeriesInstanceUID
    work = Path(tempfile.mkdtemp(prefix="bench-dicomweb-"))
    requests = bodies(files, work / "bodies")
    res: dict[str, list[tuple[float, int]]] = {}
    tasks = ["stow-gateway", "stow-orthanc", "cstore-gateway"]
    try:
        for rnd in range(args.rounds):
            gw, orth, gw_dimse = (Gateway(work / f"gw-{rnd}"), OrthancWeb(work / f"orthanc-{rnd}"),
                                  Gateway(work / f"gwd-{rnd}"))
            for server in (gw, orth, gw_dimse):
                server.start()
            try:
                order = tasks[rnd % 3:] + tasks[: rnd % 3]
                for task in order:
                    if task == "stow-gateway":
                        out = stow(gw, requests)
                    elif task == "stow-orthanc":
                        out = stow(orth, requests)
                    else:
                        out = cstore(gw_dimse, files)
                    res.setdefault(task, []).append(out)
                    print(f"  round {rnd + 1} {task:15s} {out[0]:7.2f} s {len(files) / out[0]:8.1f} inst/s "
                          f"peak {out[1] / 1e6:6.1f} MB", flush=True)
                for server, name in ((gw, "gateway"), (orth, "orthanc"), (gw_dimse, "gateway (C-STORE)")):
                    if server.stored() != len(files):
                        raise SystemExit(f"{name} stored {server.stored()} of {len(files)}")
                for rep in range(args.wado_repeats):
                    pair = [("wado-gateway", gw), ("wado-orthanc", orth)]
                    if (rnd + rep) % 2:
                        pair.reverse()
                    for task, server in pair:
                        out = wado(server, study, series, total)
                        res.setdefault(task, []).append(out)
                        print(f"  round {rnd + 1} {task:15s} {out[0]:7.2f} s {total / out[0] / 1e6:8.1f} MB/s "
                              f"peak {out[1] / 1e6:6.1f} MB", flush=True)
            finally:
                for server in (gw, orth, gw_dimse):
                    server.stop()
                shutil.rmtree(work / f"gw-{rnd}", ignore_errors=True)
                shutil.rmtree(work / f"orthanc-{rnd}", ignore_errors=True)
                shutil.rmtree(work / f"gwd-{rnd}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(task: str) -> float:
        return statistics.median(t for t, _ in res[task])

    def peak(task: str) -> float:
        return max(p for _, p in res[task]) / 1e6

    n = len(files)
    print()
    print(f"corpus: {n} CT instances, {total / 1e6:.1f} MB; STOW-RS {PER_REQUEST} per request; "
          f"medians of {args.rounds} rounds ({args.wado_repeats} WADO reads per round)")
    print(f"  {'':28s} {'median s':>9s} {'inst/s':>8s} {'MB/s':>7s} {'peak MB':>8s}")
    rows = [("STOW-RS into gateway", "stow-gateway"), ("STOW-RS into Orthanc", "stow-orthanc"),
            ("C-STORE into gateway", "cstore-gateway"), ("WADO-RS series, gateway", "wado-gateway"),
            ("WADO-RS series, Orthanc", "wado-orthanc")]
    for label, task in rows:
        t = med(task)
        print(f"  {label:28s} {t:9.2f} {n / t:8.1f} {total / t / 1e6:7.1f} {peak(task):8.1f}")
    ratios = {
        "STOW-RS gateway / Orthanc (target >= 1.0x)": med("stow-orthanc") / med("stow-gateway"),
        "STOW-RS gateway / its C-STORE (target >= 0.8x)": med("cstore-gateway") / med("stow-gateway"),
        "WADO-RS gateway / Orthanc (target >= 1.5x)": med("wado-orthanc") / med("wado-gateway"),
    }
    for label, value in ratios.items():
        print(f"  {label}: {value:.2f}x")
    print(json.dumps({k: round(v, 3) for k, v in ratios.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
