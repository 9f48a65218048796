"""End-to-end latency: sidecar rename in the inbox -> the PACS (Orthanc) answered C-STORE Success.

Starts Orthanc and `dicom-gateway run` (real processes, loopback ports), sends a small CT
series with DCMTK storescu, then drops jobs one after another (a bool mask each) and reads
from the gateway's log when each derived object was sent. Prints p50/p95/max latency, jobs
per minute and the poll interval, with the target p50 <= poll/2 + 300 ms, and checks that
no job was lost or duplicated.

    .venv/bin/python bench/end_to_end.py [--jobs 50] [--poll 2] [--slices 20] [--size 128]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import Dcmtk, GatewayProcess, gateway_config, make_ct_series, make_orthanc  # noqa: E402


def sent_times(log: str, dest: str) -> dict[str, float]:
    """SOP Instance UID -> wall-clock time of the gateway's 'sent ... to DEST' line."""
    times = {}
    for line in log.splitlines():
        if " sent " not in f" {line} " or dest not in line:
            continue
        stamp = line.split(" ", 1)[0]
        try:
            when = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f").timestamp()
        except ValueError:
            continue
        for word in line.replace(",", " ").split():
            if word.count(".") >= 3 and word.replace(".", "").isdigit():
                times.setdefault(word, when)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--poll", type=float, default=2.0, help="inbox.poll_interval_seconds")
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=60.0, help="per-job bound")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    orthanc = make_orthanc(work / "orthanc")
    orthanc.start()
    gw = GatewayProcess(gateway_config(
        work, destinations={"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}},
        routes={"results": ["pacs"]}, inbox={"poll_interval_seconds": args.poll},
        logging={"level": "INFO"},
    ))
    gw.start()
    try:
        paths = make_ct_series(work / "ct", args.slices, args.size, args.size)
        result = Dcmtk().storescu(gw.port, gw.ae_title, *paths)
        if result.returncode != 0:
            print("storescu failed:", result.stderr)
            return 1
        series = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
        inbox = work / "inbox"
        inbox.mkdir(exist_ok=True)
        done = inbox / "done"
        latencies, lost = [], []
        rng = np.random.default_rng(1)
        bench_start = time.time()
        for k in range(args.jobs):
            name = f"job{k:03d}"
            mask = rng.random((args.slices, args.size, args.size)) > 0.7
            np.save(inbox / f"{name}.npy", mask)
            time.sleep(random.uniform(0, args.poll))  # land at a random phase of the poll
            tmp = inbox / f".{name}.yaml.tmp"
            tmp.write_text(yaml.safe_dump({"source": {"series_instance_uid": series}}))
            dropped = time.time()
            os.rename(tmp, inbox / f"{name}.yaml")
            deadline = time.monotonic() + args.timeout
            sent_at = None
            while time.monotonic() < deadline and sent_at is None:
                result_file = done / f"{name}.result.yaml"
                if result_file.exists():
                    uids = [v for v in _walk(yaml.safe_load(result_file.read_text()))]
                    times = sent_times(gw.log(), "pacs")
                    hits = [times[u] for u in uids if u in times]
                    if hits:
                        sent_at = min(hits)
                        break
                time.sleep(0.02)
            if sent_at is None:
                lost.append(name)
            else:
                latencies.append(sent_at - dropped)
        elapsed = time.time() - bench_start
        in_pacs = len(orthanc.instances())  # only results are routed to it
    finally:
        gw.stop()
        orthanc.stop()

    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")  # noqa: E731
    p50 = statistics.median(latencies) if latencies else float("nan")
    target = args.poll / 2 + 0.3
    print(f"jobs {args.jobs}, poll interval {args.poll:g} s, mask ({args.slices}, {args.size}, {args.size}) bool -> SEG")
    print(f"latency sidecar rename -> Orthanc C-STORE success: p50 {p50 * 1000:.0f} ms, "
          f"p95 {p(0.95) * 1000:.0f} ms, max {latencies[-1] * 1000 if latencies else float('nan'):.0f} ms")
    print(f"target p50 <= poll/2 + 300 ms = {target * 1000:.0f} ms: "
          f"{'met' if p50 <= target else 'NOT met'} (ratio p50/target {p50 / target:.2f})")
    print(f"throughput {len(latencies) / elapsed * 60:.1f} jobs/min (one job at a time, including the random phase wait)")
    print(f"lost jobs: {len(lost)} {lost[:5]}; derived objects in Orthanc: {in_pacs} (expected {args.jobs}: none lost, none duplicated)")
    return 0 if not lost and in_pacs == args.jobs else 1


def _walk(value):
    """Every UID-looking string in the result YAML (the format lists the new UIDs)."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v)
    elif isinstance(value, str) and value.count(".") >= 3 and value.replace(".", "").isdigit():
        yield value


if __name__ == "__main__":
    raise SystemExit(main())
