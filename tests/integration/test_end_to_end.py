"""The product as a user meets it: modality -> gateway -> AI inbox -> PACS.

Real programs only: DCMTK storescu is the modality, Orthanc the PACS, `dicom-gateway run`
a subprocess; results are checked through Orthanc's REST API.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import yaml

from tests.conftest import wait_until

N_SLICES = 60


def drop_job(inbox: Path, name: str, array: np.ndarray, sidecar: dict) -> None:
    """Write like an AI tool should: the array first, the sidecar last by rename."""
    inbox.mkdir(parents=True, exist_ok=True)
    np.save(inbox / f"{name}.npy", array)
    tmp = inbox / f".{name}.yaml.tmp"
    tmp.write_text(yaml.safe_dump(sidecar))
    os.rename(tmp, inbox / f"{name}.yaml")


def study_instances(orthanc, study_uid: str) -> list[str]:
    return orthanc.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}})


def test_modality_to_pacs_through_the_inbox(tmp_path, dcmtk, orthanc, ct_series, gateway_factory):
    gw = gateway_factory(
        destinations={"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}},
        routes={"results": ["pacs"]},
        inbox={"poll_interval_seconds": 1},
    )
    # The modality sends a 60-slice CT series.
    paths = ct_series(N_SLICES)
    result = dcmtk.storescu(gw.port, gw.ae_title, *paths)
    assert result.returncode == 0, result.stderr
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    study_uid, series_uid = str(sources[0].StudyInstanceUID), str(sources[0].SeriesInstanceUID)
    source_uids = {ds.SOPInstanceUID for ds in sources}

    # The AI tool drops three results: a bool mask, a uint16 map and an RGB overlay.
    rng = np.random.default_rng(7)
    mask = np.zeros((N_SLICES, 512, 512), dtype=bool)
    mask[10:50, 150:350, 180:330] = rng.random((40, 200, 150)) > 0.3
    heat = rng.integers(0, 4096, size=(N_SLICES, 512, 512), dtype=np.uint16)
    overlay = rng.integers(0, 256, size=(4, 512, 512, 3), dtype=np.uint8)
    inbox = Path(gw.config_path).parent / gw.config["inbox"]["path"]
    src = {"series_instance_uid": series_uid}
    drop_job(inbox, "mask", mask, {"source": src, "series_description": "e2e mask",
                                    "segments": [{"label": "lesion"}]})
    drop_job(inbox, "heat", heat, {"source": src, "kind": "secondary_capture", "bits_stored": 12,
                                    "series_description": "e2e heat"})
    drop_job(inbox, "overlay", overlay, {"source": src, "photometric_interpretation": "RGB",
                                          "series_description": "e2e overlay"})

    # Within a bounded wait the PACS holds the three derived objects in the source study
    # (only results are routed to it: routes.received is empty).
    def derived_in_orthanc():
        ids = study_instances(orthanc, study_uid)
        return ids if len(ids) >= 3 else None

    try:
        ids = wait_until(derived_in_orthanc, 120, 0.5, "Orthanc to hold the 3 derived objects")
    except AssertionError:
        raise AssertionError(gw.log()[-3000:]) from None
    assert len(ids) == 3, ids
    derived = {}
    for orthanc_id in ids:
        ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(orthanc_id)))
        if ds.SOPInstanceUID not in source_uids:
            derived[ds.SeriesDescription] = ds
    assert set(derived) == {"e2e mask", "e2e heat", "e2e overlay"}, gw.log()[-3000:]

    # Every SOP Instance UID (and series) is new, and each object sits in the source study.
    new_uids = {ds.SOPInstanceUID for ds in derived.values()}
    assert len(new_uids) == 3 and not new_uids & source_uids
    for ds in derived.values():
        assert ds.StudyInstanceUID == study_uid
        assert ds.SeriesInstanceUID != series_uid
        assert ds.PatientID == sources[0].PatientID

    # Decoded pixels equal what was dropped.
    seg = hd.seg.Segmentation.from_dataset(derived["e2e mask"])
    source_order = [ds.SOPInstanceUID for ds in sources]  # ct_series writes ascending z
    got = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=source_order, segment_numbers=[1], assert_missing_frames_are_empty=True
    )[..., 0]
    np.testing.assert_array_equal(got.astype(bool), mask)
    np.testing.assert_array_equal(derived["e2e heat"].pixel_array, heat)
    np.testing.assert_array_equal(derived["e2e overlay"].pixel_array, overlay)

    # status: nothing pending, nothing failed.
    status = gw.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    pacs = report["destinations"]["pacs"]
    assert (pacs["pending"], pacs["sending"], pacs["failed"]) == (0, 0, 0), pacs
    assert pacs["sent"] == 3
    assert report["inbox"]["done"] == 3 and report["inbox"]["failed"] == 0

    # The log tells each object's story with its UIDs, one line per step.
    log = gw.log()
    for uid in new_uids:
        story = [line for line in log.splitlines() if uid in line]
        assert any("derived" in line for line in story), story
        assert any("sent" in line and "pacs" in line for line in story), story

    # SIGTERM: a clean exit 0 within 10 s.
    os.kill(gw.proc.pid, signal.SIGTERM)
    start = time.monotonic()
    code = gw.proc.wait(timeout=10)
    assert code == 0, gw.log()[-2000:]
    assert time.monotonic() - start < 10
