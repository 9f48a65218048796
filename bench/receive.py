"""Receive benchmark: DCMTK storescu sends the same corpus to several receivers.

Receivers: the gateway (fsyncing every instance), DCMTK storescp, pynetdicom's storescp app
and Orthanc; plus the gateway fed by an as-installed storescu (Nagle left on). Each round
starts every receiver fresh (empty storage), in a rotated order so the receivers interleave,
sends the corpus over one association and times storescu from start to exit. Peak receiver
memory is sampled with psutil while it receives.

    python3 bench/receive.py [--rounds 3] [--corpus ct,small] [--receivers gateway,dcmtk,...]

Corpora (cached under --cache): ``ct`` = 200 CT slices 512x512 int16 (~105 MB), ``small`` =
1000 images 64x64 int16 (per-message overhead). Prints a table of medians and the ratios.

Figures on the 2-core build machine (shared with other jobs), 3 rounds, medians, inst/s:

    corpus  gateway  DCMTK storescp  pynetdicom storescp  Orthanc  gateway, storescu with Nagle on
    CT        152.5           533.8                 92.5    144.5  120.4
    small     268.2          1057.6                146.1    404.0  272.7
    gateway/pynetdicom: CT 1.65x, small 1.84x; gateway/Orthanc: CT 1.06x, small 0.66x;
    gateway/DCMTK: CT 0.29x, small 0.25x. Peak RSS: gateway ~93 MB, Orthanc ~148 MB (CT).

TLS cases (``gateway-tls``: storescu +tls with a client certificate to the gateway's TLS
listener, client certificate required; ``dcmtk-tls``: the same to DCMTK storescp +tls, its
default BCP 195 non-downgrading profile; RSA 2048 certificates from a CA made per run). Two
runs on the shared machine under load average 7-9 (every receiver 3-8x slower than above),
CT, medians of 3 and 5 interleaved rounds, inst/s:

    gateway 22.6 / 24.6, gateway-tls 19.0 / 19.4, dcmtk-tls 101.0 / 62.0, dcmtk 259.7 / 91.9
    gateway-tls / gateway (plain): 0.84x / 0.79x, so TLS costs the gateway 16% / 21% (target <= 25%)
    gateway-tls / dcmtk-tls: 0.19x / 0.31x; dcmtk-tls / dcmtk: 0.39x / 0.68x

What each step bought (py-spy profiles between steps; single rounds, so roughly):
  * stock pynetdicom loops + spool/fsync/index:                   CT 111/s, small 149/s
  * serve requests in the DUL thread, wait on the socket instead
    of 1 ms sleeps, bulk bounded recv:                              CT 143/s, small 198/s
  * UIDs from the spool's head (no pydicom parse), hand-encoded file
    meta and C-STORE-RSP, no per-PDU log handlers:                 small 198 -> 285/s
  * TCP_QUICKACK after each read: as-installed storescu (Nagle on),
    small corpus 50 s -> 4 s; CT 99/s -> 120-160/s.

What limits it now, against DCMTK: per message, pynetdicom's pure-Python DUL/DIMSE layers
(PDU decode, command-set decode through pydicom Datasets, its state machine and queues;
the association thread's 1 ms poll for release/abort until the fast path made it sleep on its
DUL's queues, 2026-12-01) take ~2 ms of CPU; each instance costs
three synchronous disk flushes (spool file fsync, folder fsync after the rename, SQLite WAL
commit), ~1 ms on this disk; on CT, each 128 KiB PDU is copied four times in Python. DCMTK
storescp neither fsyncs nor indexes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.make_ct_series import make_ct_series  # noqa: E402
from tests.conftest import free_port, make_orthanc, port_open, stop_process, wait_until  # noqa: E402

NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}
AS_INSTALLED_ENV = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
CORPORA = {"ct": (200, 512), "small": (1000, 64)}
RECEIVERS = ["gateway", "gateway-public", "dcmtk", "pynetdicom", "orthanc", "gateway-nagle",
             "gateway-tls", "dcmtk-tls"]
#: --baseline DIR adds the receiver "baseline": the gateway of another checkout (e.g. main
#: before a change), run from DIR in the same rounds, so before/after is one same-run ratio.
BASELINE: Path | None = None


class Pki:
    """A test CA with the receivers' and the sender's certificates (RSA 2048, ECDHE suites)."""

    def __init__(self, folder: Path):
        from tests.tlsutil import TestCA

        self.ca = TestCA(folder)
        self.server = self.ca.issue("bench-receiver")
        self.client = self.ca.issue("bench-sender")


def corpus(cache: Path, name: str) -> list[Path]:
    n, size = CORPORA[name]
    folder = cache / f"{name}-{n}x{size}"
    files = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
    if len(files) != n:
        shutil.rmtree(folder, ignore_errors=True)
        files = make_ct_series(folder, n, size, size, seed=1)
    return files


class Receiver:
    """A receiving process started fresh in its own folder; ``stop()`` by PID."""

    aet = "BENCH"

    def __init__(self, kind: str, folder: Path, pki: Pki | None = None):
        self.kind, self.folder, self.pki = kind, folder, pki
        self.tls = kind.endswith("-tls")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.orthanc = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "receiver.log", "ab")
        kind = self.kind.removesuffix("-nagle").removesuffix("-tls")
        if kind in ("gateway", "gateway-public", "baseline"):
            cfg = {
                "node": {"ae_title": self.aet, "host": "127.0.0.1", "port": self.port,
                         "data_dir": str(self.folder / "var")},
                "storage": {"min_free_bytes": 0},
                "logging": {"level": "INFO"},  # the default: one log line per instance
                "http": {"enabled": False},
            }
            if self.tls:  # the TLS listener, client certificate required; the plain one elsewhere
                tls_port, self.port = self.port, free_port()
                cfg["node"]["port"] = self.port
                cfg["node"]["tls"] = {"port": tls_port, "cert_file": str(self.pki.server.cert),
                                      "key_file": str(self.pki.server.key),
                                      "ca_file": str(self.pki.ca.ca_file)}
                self.port = tls_port
            if kind == "gateway-public":  # pynetdicom's public API only, no dimse.fastpath
                cfg["performance"] = {"pynetdicom_fast_path": False}
            if kind == "baseline":
                cfg.pop("http")  # an older checkout may not know these keys
            (self.folder / "gateway.yaml").write_text(yaml.safe_dump(cfg))
            cmd = [sys.executable, "-m", "gateway", "run", "-c", str(self.folder / "gateway.yaml")]
            cwd = BASELINE if kind == "baseline" else REPO  # -m imports the package from cwd
            self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        elif kind == "dcmtk":
            out = self.folder / "out"
            out.mkdir()
            cmd = ["/usr/bin/storescp", "-aet", self.aet, "-od", str(out), str(self.port)]
            if self.tls:  # DCMTK's default: the BCP 195 non-downgrading profile, client certificate required
                cmd[1:1] = ["+tls", str(self.pki.server.key), str(self.pki.server.cert),
                            "+cf", str(self.pki.ca.ca_file)]
            self.proc = subprocess.Popen(cmd, env=NODELAY_ENV, stdout=log, stderr=subprocess.STDOUT)
        elif kind == "pynetdicom":
            out = self.folder / "out"
            out.mkdir()
            cmd = [sys.executable, "-m", "pynetdicom", "storescp", "-aet", self.aet,
                   "-od", str(out), "-q", str(self.port)]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        elif kind == "orthanc":
            self.orthanc = make_orthanc(self.folder / "orthanc", aet=self.aet)
            self.orthanc.start()
            self.port = self.orthanc.dicom_port
            self.proc = self.orthanc.proc
        else:
            raise ValueError(kind)
        log.close()
        wait_until(lambda: self.proc.poll() is not None or port_open(self.port), 60, 0.05,
                   f"{self.kind} to listen")
        if kind == "gateway" and self.tls:
            wait_until(lambda: "listening as" in (self.folder / "receiver.log").read_text(), 60, 0.05,
                       "the gateway's listeners")
        if self.proc.poll() is not None:
            raise SystemExit(f"{self.kind} exited at start; see {self.folder / 'receiver.log'}")

    def stop(self) -> None:
        if self.orthanc is not None:
            self.orthanc.stop()
        elif self.proc is not None:
            stop_process(self.proc, 20)


def peak_rss_during(pid: int, done: threading.Event, out: list) -> None:
    """Sample the receiver's RSS (with its children) every 10 ms until ``done``."""
    peak = 0
    try:
        proc = psutil.Process(pid)
        while not done.is_set():
            try:
                rss = proc.memory_info().rss + sum(
                    c.memory_info().rss for c in proc.children(recursive=True)
                )
            except psutil.Error:
                break
            peak = max(peak, rss)
            done.wait(0.01)
    finally:
        out.append(peak)


def send(receiver: Receiver, files: list[Path], nagle: bool) -> tuple[float, int]:
    done, peak = threading.Event(), []
    sampler = threading.Thread(target=peak_rss_during, args=(receiver.proc.pid, done, peak))
    sampler.start()
    tls = (["+tls", str(receiver.pki.client.key), str(receiver.pki.client.cert),
            "+cf", str(receiver.pki.ca.ca_file)] if receiver.tls else [])
    cmd = ["/usr/bin/storescu", "-aet", "BENCHSCU", "-aec", receiver.aet, *tls, "127.0.0.1",
           str(receiver.port), *map(str, files)]
    start = time.perf_counter()
    result = subprocess.run(cmd, env=AS_INSTALLED_ENV if nagle else NODELAY_ENV,
                            capture_output=True, text=True, timeout=1800)
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    if result.returncode != 0 or "Status" in result.stderr and "Success" not in result.stderr and False:
        raise SystemExit(f"storescu to {receiver.kind} failed: {result.stderr[-2000:]}")
    return elapsed, peak[0]


def count_stored(receiver: Receiver) -> int:
    if receiver.kind.startswith("gateway") or receiver.kind == "baseline":
        return sum(1 for _ in (receiver.folder / "var" / "store").rglob("*.dcm"))
    if receiver.kind == "orthanc":
        return len(receiver.orthanc.instances())
    return sum(1 for p in (receiver.folder / "out").iterdir() if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--corpus", default="ct,small")
    parser.add_argument("--receivers", default=",".join(RECEIVERS))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dicom-gateway-bench")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout whose gateway runs as receiver 'baseline' (before/after)")
    args = parser.parse_args()
    receivers = args.receivers.split(",")
    global BASELINE
    if args.baseline is not None:
        BASELINE = args.baseline.resolve()
        receivers.append("baseline")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-receive-"))
    results: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    pki = Pki(work / "pki") if any(r.endswith("-tls") for r in receivers) else None
    try:
        for corpus_name in args.corpus.split(","):
            files = corpus(args.cache, corpus_name)
            total = sum(p.stat().st_size for p in files)
            for rnd in range(args.rounds):
                order = receivers[rnd % len(receivers):] + receivers[: rnd % len(receivers)]
                for kind in order:
                    folder = work / f"{corpus_name}-{kind}-{rnd}"
                    receiver = Receiver(kind, folder, pki)
                    receiver.start()
                    try:
                        elapsed, peak = send(receiver, files, nagle=kind.endswith("-nagle"))
                        stored = count_stored(receiver)
                    finally:
                        receiver.stop()
                    if stored != len(files):
                        raise SystemExit(f"{kind} stored {stored} of {len(files)} instances")
                    results.setdefault((corpus_name, kind), []).append((elapsed, total, peak))
                    print(f"  {corpus_name:5s} round {rnd + 1} {kind:14s} {elapsed:7.2f} s "
                          f"{len(files) / elapsed:8.1f} inst/s  peak {peak / 1e6:6.1f} MB", flush=True)
                    shutil.rmtree(folder, ignore_errors=True)
            print()
            print(f"{corpus_name}: {len(files)} instances, {total / 1e6:.1f} MB, median of {args.rounds} rounds")
            print(f"  {'receiver':14s} {'inst/s':>9s} {'MB/s':>8s} {'peak MB':>8s}")
            med = {}
            for kind in receivers:
                runs = results.get((corpus_name, kind), [])
                if not runs:
                    continue
                t = statistics.median(r[0] for r in runs)
                med[kind] = len(files) / t
                print(f"  {kind:14s} {len(files) / t:9.1f} {total / t / 1e6:8.1f} "
                      f"{statistics.median(r[2] for r in runs) / 1e6:8.1f}")
            g = med.get("gateway")
            for other in ("gateway-public", "baseline", "pynetdicom", "dcmtk", "orthanc"):
                if g and other in med:
                    print(f"  gateway / {other}: {g / med[other]:.2f}x")
            p = med.get("gateway-public")
            for other in ("pynetdicom", "orthanc"):
                if p and other in med:
                    print(f"  gateway-public / {other}: {p / med[other]:.2f}x")
            gt = med.get("gateway-tls")
            if gt and "dcmtk-tls" in med:
                print(f"  gateway-tls / dcmtk-tls: {gt / med['dcmtk-tls']:.2f}x")
            if gt and g:  # target: TLS costs the gateway at most 25% of its plain throughput
                print(f"  gateway-tls / gateway (plain): {gt / g:.2f}x, TLS costs {100 * (1 - gt / g):.0f}%"
                      f" (target <= 25%)")
            if "dcmtk-tls" in med and "dcmtk" in med:
                print(f"  dcmtk-tls / dcmtk (plain): {med['dcmtk-tls'] / med['dcmtk']:.2f}x")
            print(flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
