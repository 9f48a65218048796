"""A 600 MB instance in with STOW-RS and out with WADO-RS costs the gateway bounded memory (measured).

The instance is made sparse (header written, the pixel data a hole), so making it is fast;
it goes over the wire as 600 MB all the same. The gateway runs as its own process; its RSS
is sampled every 20 ms during each transfer. Bound checked: growth over the RSS before the
transfer stays under 100 MB (the README states the per-request buffers: 64 KiB network
chunks in; out, stored bytes go by sendfile with no buffer).
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from tests.integration.web_node import WRITER_TOKEN, auth_section, bearer, hashes

FRAMES, ROWS, COLS = 1200, 512, 512  # 1200 x 512 x 512 x 2 bytes = 600 MiB of pixels
BOUND = 100 * 1024 * 1024


def make_big(path: Path) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "BIG1", "Big^Instance", "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = ROWS, COLS, FRAMES
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.save_as(path, enforce_file_format=True)
    length = FRAMES * ROWS * COLS * 2
    with open(path, "r+b") as f:
        f.seek(0, 2)
        f.write(b"\xe0\x7f\x10\x00OW\x00\x00" + length.to_bytes(4, "little"))
        f.truncate(f.tell() + length)  # a hole: zeros on read, no disk written
    return ds


class PeakRSS:
    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    @property
    def growth(self) -> int:
        return self.peak - self.base


@pytest.mark.slow
def test_600_mb_instance_in_and_out_with_bounded_memory(gateway_factory, tmp_path):
    gw = gateway_factory(http={"auth": auth_section(hashes())})
    big = tmp_path / "big.dcm"
    ds = make_big(big)
    size = big.stat().st_size
    assert size > 600 * 1024 * 1024
    boundary = "big-boundary"

    def upload():
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with open(big, "rb") as f:
            while chunk := f.read(1024 * 1024):
                yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {**bearer(WRITER_TOKEN), "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    with PeakRSS(gw.proc.pid) as stow_mem:
        r = httpx.post(f"{gw.http_url}/dicom-web/studies", content=upload(), headers=headers, timeout=600)
    assert r.status_code == 200, r.text
    stored = list((gw.config_path.parent / "var" / "store").rglob("*.dcm"))
    assert len(stored) == 1 and stored[0].stat().st_size == size

    want = hashlib.sha256()
    with open(big, "rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            want.update(chunk)
    got, received = hashlib.sha256(), 0
    url = f"{gw.http_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    with PeakRSS(gw.proc.pid) as wado_mem:
        with httpx.stream("GET", url, headers={**bearer(WRITER_TOKEN), "Accept": "application/dicom"},
                          timeout=600) as resp:
            assert resp.status_code == 200
            assert int(resp.headers["content-length"]) == size
            for chunk in resp.iter_bytes(1024 * 1024):
                got.update(chunk)
                received += len(chunk)
    assert received == size and got.hexdigest() == want.hexdigest()
    print(f"\n600 MB instance: gateway RSS growth STOW-RS {stow_mem.growth / 2**20:.1f} MiB, "
          f"WADO-RS {wado_mem.growth / 2**20:.1f} MiB (bound {BOUND / 2**20:.0f} MiB)")
    assert stow_mem.growth < BOUND, f"STOW-RS grew the gateway by {stow_mem.growth / 2**20:.0f} MiB"
    assert wado_mem.growth < BOUND, f"WADO-RS grew the gateway by {wado_mem.growth / 2**20:.0f} MiB"
