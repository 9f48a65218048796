"""bench/forward.py's DICOMweb case: STOW-RS of the CT corpus to Orthanc's DICOMweb plugin.

Three senders, interleaved over rounds with the order rotated, each to a freshly emptied
target Orthanc (DICOMweb plugin):

- gateway: one ``Sender`` pass over the queued corpus in a child process (stored files
  streamed as they are, ``max_request_bytes`` per request, one kept-alive connection);
- dicomweb-client: ``DICOMwebClient.store_instances`` with 50 data sets per call, in a child
  process that reads the files with pydicom first (that client takes data sets);
- Orthanc: a second Orthanc holding the study pushes it with its own STOW-RS client
  (``POST /dicom-web/servers/target/stow``, synchronous);
- curl-prebuilt, a sender with no work of its own: curl uploads a multipart body built before
  the clock starts (every instance, a Content-Length per part, one chunked request: the shape
  Orthanc's own client sends). When the gateway delivers about as fast, its own work is not
  what limits it; the receiving Orthanc's ingest is. (It is no floor: one 105 MB request can
  be slower for Orthanc than the gateway's two.)

The yardstick is the **delivered** time, the same for all three: from the moment the sender
starts sending (after Python start-up for the two child processes) to the moment the target
holds every instance (its ``/statistics`` polled every 20 ms from a thread). Each tool's own
figure is shown too: the in-process send time of the two Python senders, and the synchronous
REST call for Orthanc, which is rounded UP to Orthanc's job polling: the DICOMweb plugin's
``SingleFunctionJob::Step`` sleeps 500 ms between checks of its worker thread, so a push that
takes 1.1 s is reported as ~1.5 s; the delivered time does not carry that penalty.

Options: ``--gateway-variants 8,32,64L`` adds gateway passes with other ``max_request_bytes``
(MiB; ``L`` = Content-Length instead of chunked) to the same interleaved rounds;
``--target-setting KEY=JSON`` (repeatable) changes the receiving Orthanc's configuration,
which is the same for all senders (e.g. ``StoreMD5ForAttachments=false``).

Prints medians, the ratios gateway/dicomweb-client and gateway/Orthanc, the load average
before and after, peak RSS of each child, and the gateway's peak RSS for several
``max_request_bytes`` (memory must stay flat as requests grow).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import threading
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
    start_wall, start = time.time(), time.monotonic()
    sent = sender.run_once()
    elapsed = time.monotonic() - start
    requests = sender.transport.requests
    sender.close()
    print(json.dumps({"sent": sent, "send_seconds": elapsed, "requests": requests,
                      "start_wall": start_wall, "peak_rss_mb": _peak_rss_mb()}))


def client_store(url: str, folder: str, per_call: int) -> None:
    """Child: dicomweb-client store_instances, ``per_call`` data sets per call; prints JSON."""
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    files = sorted(Path(folder).glob("*.dcm"))
    client = DICOMwebClient(url)
    start_wall, start = time.time(), time.monotonic()
    stored = 0
    for i in range(0, len(files), per_call):
        datasets = [pydicom.dcmread(f) for f in files[i:i + per_call]]
        answer = client.store_instances(datasets)
        stored += len(answer.get("ReferencedSOPSequence", []))
    elapsed = time.monotonic() - start
    print(json.dumps({"sent": stored, "send_seconds": elapsed, "start_wall": start_wall,
                      "peak_rss_mb": _peak_rss_mb()}))


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


class _Delivery:
    """Polls the target's instance count from a thread; ``done_wall`` is when it reached ``n``."""

    def __init__(self, orthanc, n: int, timeout: float = 600):
        self.orthanc, self.n, self.done_wall = orthanc, n, None
        self._stop = threading.Event()
        self._deadline = time.monotonic() + timeout
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            if _count(self.orthanc) >= self.n:
                self.done_wall = time.time()
                return
            time.sleep(0.02)

    def wait(self, timeout: float = 60) -> float | None:
        self._thread.join(timeout)
        self._stop.set()
        return self.done_wall


_PREBUILT_BOUNDARY = "prebuilt-5c2d9a"


def _write_prebuilt_body(files: list[Path], path: Path) -> None:
    """The whole corpus as one STOW-RS body (a Content-Length per part), for curl-prebuilt."""
    with open(path, "wb") as out:
        for f in files:
            data = f.read_bytes()
            out.write(f"--{_PREBUILT_BOUNDARY}\r\nContent-Type: application/dicom\r\n"
                      f"Content-Length: {len(data)}\r\n\r\n".encode() + data + b"\r\n")
        out.write(f"--{_PREBUILT_BOUNDARY}--\r\n".encode())


def _variant(spec: str) -> tuple[str, int, bool]:
    """'8' -> ('gateway-8MiB', 8 MiB, chunked); '64L' -> ('gateway-64MiB-length', 64 MiB, not chunked)."""
    length = spec.upper().endswith("L")
    mib = int(spec.rstrip("Ll"))
    return f"gateway-{mib}MiB" + ("-length" if length else ""), mib << 20, not length


def _setting(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    return key, json.loads(value)


def run(args, folder: Path, files: list[Path], env: dict, bench_file: str) -> None:
    """The DICOMweb case of bench/forward.py (``--dicomweb``)."""
    import yaml

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_orthanc

    from gateway import config as config_mod
    from gateway.storage import sendfiles

    plugin = ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"]
    target_settings = dict(_setting(t) for t in (getattr(args, "target_setting", None) or []))
    target = make_orthanc(folder / "dw-target", aet="TARGET", Plugins=plugin,
                          DicomWeb={"Enable": True, "Root": "/dicom-web/"}, **target_settings)
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

        # one destination per gateway variant, all queued with the corpus in one data folder
        variants = {"gateway": ("web", 64 << 20, True)}
        for spec in (getattr(args, "gateway_variants", None) or "").split(","):
            if spec.strip():
                name, size, chunked = _variant(spec.strip())
                variants[name] = (name, size, chunked)

        def gateway_config(dests: dict, tag: str) -> Path:
            cfg = {"node": {"ae_title": "BENCH", "data_dir": str(folder / "dw-gw")},
                   "storage": {"min_free_bytes": 0}, "http": {"enabled": False},
                   "destinations": {d: {"type": "dicomweb", "url": url, "max_request_bytes": size,
                                        "chunked": chunked} for d, size, chunked in dests.values()},
                   "logging": {"level": "WARNING"}}
            path = folder / f"dw-gateway-{tag}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            return path

        default_cfg = gateway_config(variants, "rounds")
        config = config_mod.load(default_cfg)
        for dest, _, _ in variants.values():
            report = sendfiles.queue_files(config, dest, [files[0].parent])
            assert report.queued == len(files) and not report.problems, report

        def one(tool: str, cfg_path: Path = default_cfg, dest: str = "web") -> dict:
            _clear(target)
            if tool in variants or tool == "sweep":
                import sqlite3

                if tool in variants:
                    dest = variants[tool][0]
                with sqlite3.connect(config.db_path) as conn:
                    conn.execute("UPDATE queue SET state='pending', attempts=0, next_attempt_at=0, "
                                 "last_error=NULL WHERE destination = ?", (dest,))
                cmd = [sys.executable, bench_file, "_dwpass", str(cfg_path), dest]
            elif tool == "dicomweb-client":
                cmd = [sys.executable, bench_file, "_dwclient", url, str(files[0].parent), "50"]
            elif tool == "curl-prebuilt":
                cmd = ["curl", "-sS", "-o", str(folder / "prebuilt-answer.json"), "-w", "%{http_code}",
                       "-X", "POST", "-T", str(prebuilt_body), "-H", "Expect:",
                       "-H", "Transfer-Encoding: chunked", "-H", "Accept: application/dicom+json",
                       "-H", f'Content-Type: multipart/related; type="application/dicom"; boundary={_PREBUILT_BOUNDARY}',
                       f"{url}/studies"]
            else:
                cmd = None
            delivery = _Delivery(target, len(files))
            start = time.monotonic()
            if cmd is None:
                out = {"start_wall": time.time()}
                _rest(source, "POST", "/dicom-web/servers/target/stow",
                      json.dumps({"Resources": [study], "Synchronous": True}).encode())
                out["sent"] = len(files)
                out["send_seconds"] = time.monotonic() - start  # the synchronous REST call
            elif tool == "curl-prebuilt":
                out = {"start_wall": time.time()}
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
                if proc.returncode != 0 or proc.stdout.strip() != "200":
                    raise SystemExit(f"curl exited {proc.returncode}, HTTP {proc.stdout}: {proc.stderr[-2000:]}")
                out["sent"] = len(files)
                out["send_seconds"] = time.monotonic() - start
            else:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
                if proc.returncode != 0:
                    raise SystemExit(f"{tool} exited {proc.returncode}: {proc.stderr[-2000:]}")
                out = json.loads(proc.stdout.strip().splitlines()[-1])
            out["seconds"] = time.monotonic() - start
            done_wall = delivery.wait()
            if done_wall is None or _count(target) != len(files) or out["sent"] != len(files):
                raise SystemExit(f"{tool}: sent {out['sent']}, target holds {_count(target)} of {len(files)}")
            out["delivered"] = done_wall - out["start_wall"]
            return out

        prebuilt_body = folder / "prebuilt-body.bin"
        _write_prebuilt_body(files, prebuilt_body)
        tools = [*variants, "dicomweb-client", "orthanc-stow", "curl-prebuilt"]
        load_before = os.getloadavg()
        print(f"\nDICOMweb (STOW-RS) to Orthanc's DICOMweb plugin: {len(files)} instances, {total_mb:.1f} MB; "
              f"{args.rounds} rounds, order rotated each round; receiving Orthanc settings: "
              f"{target_settings or 'defaults'}; load average {load_before[0]:.2f} {load_before[1]:.2f}")
        results: dict[str, list[dict]] = {t: [] for t in tools}
        for r in range(args.rounds):
            order = tools[r % len(tools):] + tools[: r % len(tools)]
            for tool in order:
                res = one(tool)
                results[tool].append(res)
                print(f"  round {r + 1} {tool:22} delivered {res['delivered']:6.2f} s, own figure "
                      f"{res['send_seconds']:6.2f} s, process {res['seconds']:6.2f} s", flush=True)
        load_after = os.getloadavg()
        med = {t: statistics.median(x["seconds"] for x in v) for t, v in results.items()}
        send = {t: statistics.median(x["send_seconds"] for x in v) for t, v in results.items()}
        dlv = {t: statistics.median(x["delivered"] for x in v) for t, v in results.items()}
        peak = {t: max(x["peak_rss_mb"] for x in v) for t, v in results.items() if "peak_rss_mb" in v[0]}
        peak["orthanc-stow"] = _vm_hwm_mb(source.proc.pid)
        peak["curl-prebuilt"] = float("nan")  # not measured: curl streams the prebuilt body from disk
        print(f"\n  medians; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
        print(f"  {'tool':22} {'delivered':>9} {'inst/s':>7} {'MB/s':>6} {'own fig.':>9} {'process':>8} "
              f"{'peak RSS MB':>12}")
        for tool in tools:
            print(f"  {tool:22} {dlv[tool]:9.2f} {len(files) / dlv[tool]:7.1f} {total_mb / dlv[tool]:6.1f} "
                  f"{send[tool]:9.2f} {med[tool]:8.2f} {peak[tool]:12.0f}")
        print("  (own figure: in-process send time; for orthanc-stow its synchronous REST call, rounded up "
              "by its 500 ms job polling)")
        for tool in variants:
            print(f"  ratio {tool}/dicomweb-client: delivered {dlv['dicomweb-client'] / dlv[tool]:.2f}x, "
                  f"own figures {send['dicomweb-client'] / send[tool]:.2f}x, "
                  f"processes {med['dicomweb-client'] / med[tool]:.2f}x")
            print(f"  ratio {tool}/Orthanc STOW-RS client: delivered {dlv['orthanc-stow'] / dlv[tool]:.2f}x, "
                  f"own figures {send['orthanc-stow'] / send[tool]:.2f}x, "
                  f"processes {med['orthanc-stow'] / med[tool]:.2f}x")
        print("  (orthanc-stow peak RSS is the source Orthanc's lifetime high-water mark, corpus upload included)")
        for tool in variants:
            print(f"  {tool} delivered in {dlv[tool] / dlv['curl-prebuilt']:.2f}x the time of curl uploading the "
                  f"prebuilt body (near or below 1: the receiver's ingest, not the sender, sets the pace)")

        sizes = [int(x) for x in str(getattr(args, "memory_sizes", "1,16,64,256")).split(",") if x.strip()]
        print("\n  gateway peak RSS by max_request_bytes (memory must not grow with the request size):")
        for size in sizes:
            cfg_path = gateway_config({"web": ("web", size << 20, True)}, f"sweep-{size}")
            runs = [one("sweep", cfg_path) for _ in range(max(1, args.rounds // 2))]
            res = min(runs, key=lambda x: x["peak_rss_mb"])
            print(f"    {size:4d} MiB: {res['requests']:4d} requests, peak RSS {res['peak_rss_mb']:6.1f} MB, "
                  f"send {statistics.median(x['send_seconds'] for x in runs):.2f} s, delivered "
                  f"{statistics.median(x['delivered'] for x in runs):.2f} s", flush=True)
    finally:
        source.stop()
        target.stop()
