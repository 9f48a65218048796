"""Forward throughput: the gateway's queue vs DCMTK storescu vs pynetdicom's storescu app.

All three send the same synthetic CT corpus (default 200 instances of 512x512 int16) to one
DCMTK storescp (TCP_NODELAY=1, writing to a temporary folder), interleaved over several
rounds; the order rotates every round. Each run is a fresh process (startup included), so
the three are measured alike; the gateway's own pass time (queue claim to last outcome
committed, what a running daemon pays) is shown as well. Prints median instances/s and MB/s
and the ratios gateway/pynetdicom-storescu and gateway/DCMTK-storescu.

    python3 bench/forward.py [--instances 200] [--rounds 3] [--size 512] [--orthanc] [--dicomweb | --dicomweb-only]
                             [--gateway-variants 8,32,64L] [--target-setting KEY=JSON ...] [--memory-sizes 1,16,64,256]

``--dicomweb`` adds the STOW-RS case (``bench/dicomweb_case.py``): the same corpus to Orthanc's
DICOMweb plugin from the gateway's queue, from dicomweb-client (50 per call) and from a second
Orthanc's own STOW-RS client, with peak memory and the gateway's memory per request size.

Not a test: nothing here asserts a time. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ENV = {**os.environ, "TCP_NODELAY": "1"}
#: --baseline DIR: another checkout's gateway pass as tool "baseline" (before/after, same run).
BASELINE: Path | None = None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {timeout:g}s")


def gateway_pass(config_path: str, dest: str) -> None:
    """Child process: one sender pass over everything queued for ``dest``; prints JSON."""
    from gateway import config as config_mod
    from gateway.forward import sender as forward

    config = config_mod.load(config_path)
    sender = forward.Sender(config, dest)
    start = time.monotonic()
    sent = sender.run_once()
    elapsed = time.monotonic() - start
    sender.close()
    print(json.dumps({"sent": sent, "pass_seconds": elapsed}))


class Target:
    """A receiving peer the tools send to; ``count()`` says how many instances it holds."""

    name = ""
    port = 0
    aet = ""

    def count(self) -> int:
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class Storescp(Target):
    name = "storescp"

    def __init__(self, folder: Path):
        self.out = folder / "storescp-out"
        self.out.mkdir(parents=True)
        self.port, self.aet = free_port(), "STORESCP"
        self.proc = subprocess.Popen(
            ["/usr/bin/storescp", "-aet", self.aet, "-od", str(self.out), str(self.port)],
            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def count(self) -> int:
        return sum(1 for _ in self.out.iterdir())

    def clear(self) -> None:
        for f in self.out.iterdir():
            f.unlink()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=15)


class Orthanc(Target):
    name = "orthanc"

    def __init__(self, folder: Path):
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import (
            make_orthanc,  # the test suite's Orthanc config, same settings
        )

        self.o = make_orthanc(folder / "orthanc")
        self.o.start()
        self.port, self.aet = self.o.dicom_port, self.o.aet

    def count(self) -> int:
        return int(self.o.get("/statistics")["CountInstances"])

    def clear(self) -> None:
        for study in self.o.get("/studies"):
            req = urllib.request.Request(f"{self.o.url}/studies/{study}", method="DELETE")
            urllib.request.urlopen(req, timeout=60).read()

    def stop(self) -> None:
        self.o.stop()


def run_tool(tool: str, target: Target, files: list[Path], folder: Path) -> dict:
    """Run one tool once; return wall seconds (and the gateway's pass time)."""
    result = {}
    if tool in ("gateway", "gateway-public", "baseline"):
        config = folder / (f"gateway-public-{target.name}.yaml" if tool == "gateway-public"
                           else f"gateway-{target.name}.yaml")
        db_path = folder / "gw" / "gateway.sqlite3"
        import sqlite3

        with sqlite3.connect(db_path) as conn:  # every row due again, as if just received
            conn.execute("UPDATE queue SET state='pending', attempts=0, next_attempt_at=0, last_error=NULL")
        script = BASELINE / "bench" / "forward.py" if tool == "baseline" else __file__
        cmd = [sys.executable, str(script), "_pass", str(config), target.name]
    elif tool == "dcmtk-storescu":
        cmd = ["/usr/bin/storescu", "-aet", "BENCH", "-aec", target.aet, "127.0.0.1",
               str(target.port), *map(str, files)]
    elif tool == "pynetdicom-storescu":
        cmd = [sys.executable, "-m", "pynetdicom", "storescu", "-aet", "BENCH", "-aec", target.aet,
               "-cx", "127.0.0.1", str(target.port), *map(str, files)]
    else:
        raise ValueError(tool)
    start = time.monotonic()
    proc = subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True, timeout=900)
    result["seconds"] = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{tool} exited {proc.returncode}: {proc.stderr[-2000:]}")
    if tool in ("gateway", "gateway-public", "baseline"):
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        if out["sent"] != len(files):
            raise SystemExit(f"gateway sent {out['sent']} of {len(files)}")
        result["pass_seconds"] = out["pass_seconds"]
    deadline = time.monotonic() + 60
    while target.count() < len(files) and time.monotonic() < deadline:
        time.sleep(0.1)
    got = target.count()
    if got < len(files):
        raise SystemExit(f"{tool}: {target.name} holds {got} of {len(files)} instances")
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_pass":
        gateway_pass(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) > 1 and sys.argv[1] in ("_dwpass", "_dwclient"):
        sys.path.insert(0, str(REPO / "bench"))
        import dicomweb_case

        if sys.argv[1] == "_dwpass":
            dicomweb_case.gateway_pass(sys.argv[2], sys.argv[3])
        else:
            dicomweb_case.client_store(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=512, help="rows and columns of each slice")
    parser.add_argument("--orthanc", action="store_true", help="also send to Orthanc")
    parser.add_argument("--dicomweb", action="store_true",
                        help="also the DICOMweb case: STOW-RS to Orthanc's DICOMweb plugin from the gateway's "
                        "queue, dicomweb-client (50 per call) and Orthanc's own STOW-RS client")
    parser.add_argument("--dicomweb-only", action="store_true", help="only the DICOMweb case")
    parser.add_argument("--gateway-variants", default="",
                        help="DICOMweb case: more gateway passes in the same rounds, max_request_bytes in MiB, "
                        "comma-separated; a trailing L sends Content-Length instead of chunked (e.g. 8,32,64L)")
    parser.add_argument("--target-setting", action="append", default=[], metavar="KEY=JSON",
                        help="DICOMweb case: a setting of the receiving Orthanc (the same for every sender), "
                        "e.g. StoreMD5ForAttachments=false; repeatable")
    parser.add_argument("--memory-sizes", default="1,16,64,256",
                        help="DICOMweb case: max_request_bytes (MiB) of the gateway's peak-RSS sweep")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout whose gateway pass runs as tool 'baseline' (before/after)")
    args = parser.parse_args()
    global BASELINE
    BASELINE = args.baseline.resolve() if args.baseline else None

    import yaml

    from gateway import config as config_mod
    from gateway.storage import sendfiles
    from scripts.make_ct_series import make_ct_series

    folder = Path(tempfile.mkdtemp(prefix="bench-forward-"))
    targets: list[Target] = []
    try:
        files = make_ct_series(folder / "corpus", args.instances, args.size, args.size)
        total_mb = sum(f.stat().st_size for f in files) / 1e6
        if args.dicomweb or args.dicomweb_only:
            sys.path.insert(0, str(REPO / "bench"))
            import dicomweb_case
        if args.dicomweb_only:
            dicomweb_case.run(args, folder, files, ENV, __file__)
            return
        targets.append(Storescp(folder))
        if args.orthanc:
            targets.append(Orthanc(folder))
        dests = {t.name: {"ae_title": t.aet, "host": "127.0.0.1", "port": t.port} for t in targets}
        for t in targets:
            cfg = {"node": {"ae_title": "BENCH", "data_dir": str(folder / "gw")},
                   "storage": {"min_free_bytes": 0}, "destinations": dests,
                   "logging": {"level": "WARNING"}}
            (folder / f"gateway-{t.name}.yaml").write_text(yaml.safe_dump(cfg))
            public = {**cfg, "performance": {"pynetdicom_fast_path": False}}
            (folder / f"gateway-public-{t.name}.yaml").write_text(yaml.safe_dump(public))
        config = config_mod.load(folder / f"gateway-{targets[0].name}.yaml")
        for t in targets:
            report = sendfiles.queue_files(config, t.name, [folder / "corpus"])
            assert report.queued == len(files) and not report.problems, report

        tools = ["gateway", "gateway-public", "dcmtk-storescu", "pynetdicom-storescu"]
        if BASELINE is not None:
            tools.append("baseline")
        print(f"corpus: {len(files)} instances, {args.size}x{args.size} int16, {total_mb:.1f} MB; "
              f"{args.rounds} rounds, order rotated each round; cpus: {os.cpu_count()}")
        for target in targets:
            times: dict[str, list[float]] = {t: [] for t in tools}
            passes: dict[str, list[float]] = {}
            for r in range(args.rounds):
                order = tools[r % len(tools):] + tools[: r % len(tools)]
                for tool in order:
                    target.clear()
                    res = run_tool(tool, target, files, folder)
                    times[tool].append(res["seconds"])
                    if "pass_seconds" in res:
                        passes.setdefault(tool, []).append(res["pass_seconds"])
                    print(f"  round {r + 1} {target.name:8} {tool:20} {res['seconds']:6.2f} s"
                          + (f" (pass {res['pass_seconds']:.2f} s)" if "pass_seconds" in res else ""),
                          flush=True)
            med = {t: statistics.median(v) for t, v in times.items()}
            print(f"\nto {target.name} (medians of {args.rounds}, process wall time incl. startup):")
            print(f"  {'tool':22} {'inst/s':>8} {'MB/s':>8} {'seconds':>8}")
            for tool in tools:
                print(f"  {tool:22} {len(files) / med[tool]:8.1f} {total_mb / med[tool]:8.1f} {med[tool]:8.2f}")
            pm = {tool: statistics.median(v) for tool, v in passes.items()}
            for tool, gp in pm.items():
                label = f"{tool} pass (daemon)"
                print(f"  {label:22} {len(files) / gp:8.1f} {total_mb / gp:8.1f} {gp:8.2f}")
            print(f"  ratio gateway/pynetdicom-storescu: {med['pynetdicom-storescu'] / med['gateway']:.2f}x")
            print(f"  ratio gateway/dcmtk-storescu:      {med['dcmtk-storescu'] / med['gateway']:.2f}x")
            print(f"  ratio gateway pass/dcmtk-storescu: {med['dcmtk-storescu'] / pm['gateway']:.2f}x")
            print(f"  ratio gateway-public pass/dcmtk-storescu: {med['dcmtk-storescu'] / pm['gateway-public']:.2f}x")
            if "baseline" in pm:
                print(f"  ratio gateway pass/baseline pass: {pm['baseline'] / pm['gateway']:.2f}x")
            print()
        if args.dicomweb:
            dicomweb_case.run(args, folder, files, ENV, __file__)
    finally:
        for t in targets:
            t.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
