"""bench/forward.py's DICOMweb case: STOW-RS of the CT corpus to Orthanc's DICOMweb plugin.

Three senders, interleaved over rounds with the order rotated, each to a freshly emptied
target Orthanc (DICOMweb plugin):

- gateway: one ``Sender`` pass over the queued corpus in a child process (stored files
  streamed as they are, ``max_request_bytes`` per request, one kept-alive connection);
- dicomweb-client: ``DICOMwebClient.store_instances`` with 50 data sets per call, in a child
  process that reads the files with pydicom first (that client takes data sets);
- Orthanc: a second Orthanc holding the study pushes it with its own STOW-RS client
  (``POST /dicom-web/servers/target/stow``, synchronous).

Prints medians (process wall time including start-up, and the in-process send time), the
ratios gateway/dicomweb-client and gateway/Orthanc, peak RSS of each child, and the gateway's
peak RSS for several ``max_request_bytes`` (memory must stay flat as requests grow).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = ["gateway", "dicomweb-client", "orthanc-stow"]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gateway_pass(config_path: str, dest: str) -> None:
    """Child: one DICOMweb sender pass over everything queued for ``dest``; prints JSON."""
    from gateway import config as config_mod
    from gateway.forward.sender import Sender

    config = config_mod.load(config_path)
    sender = Sender(config, dest)
    start = time.monotonic()
    sent = sender.run_once()
    elapsed = time.monotonic() - start
    requests = sender.transport.requests
    sender.close()
    print(json.dumps({"sent": sent, "send_seconds": elapsed, "requests": requests,
                      "peak_rss_mb": _peak_rss_mb()}))


def client_store(url: str, folder: str, per_call: int) -> None:
    """Child: dicomweb-client store_instances, ``per_call`` data sets per call; prints JSON."""
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    files = sorted(Path(folder).glob("*.dcm"))
    client = DICOMwebClient(url)
    start = time.monotonic()
    stored = 0
    for i in range(0, len(files), per_call):
        datasets = [pydicom.dcmread(f) for f in files[i:i + per_call]]
        answer = client.store_instances(datasets)
        stored += len(answer.get("ReferencedSOPSequence", []))
    elapsed = time.monotonic() - start
    print(json.dumps({"sent": stored, "send_seconds": elapsed, "peak_rss_mb": _peak_rss_mb()}))


def _rest(orthanc, method: str, path: str, body: bytes | None = None, timeout: float = 600):
    req = urllib.request.Request(orthanc.url + path, data=body, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        data = resp.read()
    return json.loads(data) if data[:1] in (b"{", b"[") else data


def _clear(orthanc) -> None:
    for study in _rest(orthanc, "GET", "/studies"):
        _rest(orthanc, "DELETE", f"/studies/{study}")


def _count(orthanc) -> int:
    return int(_rest(orthanc, "GET", "/statistics")["CountInstances"])


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(args, folder: Path, files: list[Path], env: dict, bench_file: str) -> None:
    """The DICOMweb case of bench/forward.py (``--dicomweb``)."""
    import yaml

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_orthanc

    from gateway import config as config_mod
    from gateway.storage import sendfiles

    plugin = ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"]
    target = make_orthanc(folder / "dw-target", aet="TARGET", Plugins=plugin,
                          DicomWeb={"Enable": True, "Root": "/dicom-web/"})
    target.start()
    source = make_orthanc(folder / "dw-source", aet="SOURCE", Plugins=plugin,
                          DicomWeb={"Enable": True, "Root": "/dicom-web/",
                                    "Servers": {"target": [f"{target.url}/dicom-web/"]}})
    source.start()
    try:
        url = f"{target.url}/dicom-web"
        for f in files:
            _rest(source, "POST", "/instances", f.read_bytes())
        study = _rest(source, "GET", "/studies")[0]
        total_mb = sum(f.stat().st_size for f in files) / 1e6

        def gateway_config(max_request_bytes: int) -> Path:
            cfg = {"node": {"ae_title": "BENCH", "data_dir": str(folder / "dw-gw")},
                   "storage": {"min_free_bytes": 0}, "http": {"enabled": False},
                   "destinations": {"web": {"type": "dicomweb", "url": url,
                                            "max_request_bytes": max_request_bytes}},
                   "logging": {"level": "WARNING"}}
            path = folder / f"dw-gateway-{max_request_bytes}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            return path

        default_cfg = gateway_config(64 * 1024 * 1024)
        config = config_mod.load(default_cfg)
        report = sendfiles.queue_files(config, "web", [files[0].parent])
        assert report.queued == len(files) and not report.problems, report

        def one(tool: str, cfg_path: Path = default_cfg) -> dict:
            _clear(target)
            if tool == "gateway":
                import sqlite3

                with sqlite3.connect(config.db_path) as conn:
                    conn.execute("UPDATE queue SET state='pending', attempts=0, next_attempt_at=0, "
                                 "last_error=NULL")
                cmd = [sys.executable, bench_file, "_dwpass", str(cfg_path), "web"]
            elif tool == "dicomweb-client":
                cmd = [sys.executable, bench_file, "_dwclient", url, str(files[0].parent), "50"]
            else:
                cmd = None
            start = time.monotonic()
            if cmd is None:
                _rest(source, "POST", "/dicom-web/servers/target/stow",
                      json.dumps({"Resources": [study], "Synchronous": True}).encode())
                out = {"sent": len(files)}
            else:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
                if proc.returncode != 0:
                    raise SystemExit(f"{tool} exited {proc.returncode}: {proc.stderr[-2000:]}")
                out = json.loads(proc.stdout.strip().splitlines()[-1])
            out["seconds"] = time.monotonic() - start
            deadline = time.monotonic() + 60
            while _count(target) < len(files) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _count(target) != len(files) or out["sent"] != len(files):
                raise SystemExit(f"{tool}: sent {out['sent']}, target holds {_count(target)} of {len(files)}")
            return out

        print(f"\nDICOMweb (STOW-RS) to Orthanc's DICOMweb plugin: {len(files)} instances, {total_mb:.1f} MB; "
              f"{args.rounds} rounds, order rotated each round")
        results: dict[str, list[dict]] = {t: [] for t in TOOLS}
        for r in range(args.rounds):
            order = TOOLS[r % len(TOOLS):] + TOOLS[: r % len(TOOLS)]
            for tool in order:
                res = one(tool)
                results[tool].append(res)
                extra = f" (send {res['send_seconds']:.2f} s)" if "send_seconds" in res else ""
                print(f"  round {r + 1} {tool:16} {res['seconds']:6.2f} s{extra}", flush=True)
        med = {t: statistics.median(x["seconds"] for x in v) for t, v in results.items()}
        send = {t: statistics.median(x["send_seconds"] for x in v) for t, v in results.items()
                if "send_seconds" in v[0]}
        peak = {t: max(x["peak_rss_mb"] for x in v) for t, v in results.items() if "peak_rss_mb" in v[0]}
        peak["orthanc-stow"] = _vm_hwm_mb(source.proc.pid)
        print(f"\n  {'tool':18} {'inst/s':>8} {'MB/s':>8} {'seconds':>8} {'send s':>8} {'peak RSS MB':>12}")
        for tool in TOOLS:
            s = send.get(tool)
            print(f"  {tool:18} {len(files) / med[tool]:8.1f} {total_mb / med[tool]:8.1f} {med[tool]:8.2f} "
                  f"{(f'{s:8.2f}' if s else '       -')} {peak[tool]:12.0f}")
        print(f"  ratio gateway/dicomweb-client (process): {med['dicomweb-client'] / med['gateway']:.2f}x; "
              f"send only: {send['dicomweb-client'] / send['gateway']:.2f}x")
        print(f"  ratio gateway/Orthanc STOW-RS client:    {med['orthanc-stow'] / med['gateway']:.2f}x "
              f"(process); gateway send only: {med['orthanc-stow'] / send['gateway']:.2f}x")
        print("  (orthanc-stow peak RSS is the source Orthanc's lifetime high-water mark, corpus upload included)")

        print("\n  gateway peak RSS by max_request_bytes (memory must not grow with the request size):")
        for size in (1 << 20, 16 << 20, 64 << 20, 256 << 20):
            cfg_path = gateway_config(size)
            runs = [one("gateway", cfg_path) for _ in range(max(1, args.rounds // 2))]
            res = min(runs, key=lambda x: x["peak_rss_mb"])
            print(f"    {size >> 20:4d} MiB: {res['requests']:4d} requests, peak RSS {res['peak_rss_mb']:6.1f} MB, "
                  f"send {statistics.median(x['send_seconds'] for x in runs):.2f} s", flush=True)
    finally:
        source.stop()
        target.stop()
