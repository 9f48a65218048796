"""An AI tool with no shared volume: QIDO to find, WADO to fetch, POST the mask, poll the job — against `run`."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pydicom
import yaml
from dicomweb_client.api import DICOMwebClient

from tests.conftest import wait_until
from tests.integration.web_node import WRITER_TOKEN, auth_section, bearer, hashes


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_ai_job_over_http(gateway_factory, ct_series):
    gw = gateway_factory(http={"auth": auth_section(hashes())}, inbox={"poll_interval_seconds": 0.2})
    base = gw.http_url
    client = DICOMwebClient(f"{base}/dicom-web", headers=bearer())
    paths = ct_series(4, rows=32, columns=32)
    client.store_instances([pydicom.dcmread(p) for p in paths])

    # the AI tool: find the series, fetch it, make a mask, post the job
    series = client.search_for_series(search_filters={"Modality": "CT"})
    assert len(series) == 1
    s = pydicom.Dataset.from_json(series[0])
    fetched = client.retrieve_series(s.StudyInstanceUID, s.SeriesInstanceUID)
    assert len(fetched) == 4
    volume = np.stack([d.pixel_array for d in sorted(fetched, key=lambda d: float(d.ImagePositionPatient[2]))])
    mask = (volume > volume.mean()).astype(np.uint8)
    sidecar = yaml.safe_dump({"source": {"series_instance_uid": str(s.SeriesInstanceUID)},
                              "segments": [{"label": "bright"}]})
    files = {"array": ("mask.npy", _npy(mask), "application/octet-stream"),
             "sidecar": ("mask.yaml", sidecar.encode(), "application/yaml")}
    r = httpx.post(f"{base}/api/inbox/jobs", files=files, data={"name": "mask-1"}, headers=bearer(), timeout=30)
    assert r.status_code == 202, r.text
    assert r.json() == {"name": "mask-1", "state": "queued"} and r.headers["location"] == "/api/inbox/jobs/mask-1"

    def done():
        got = httpx.get(f"{base}/api/inbox/jobs/mask-1", headers=bearer(), timeout=10).json()
        return got if got["state"] in ("done", "failed") else None

    answer = wait_until(done, 60, 0.2, "the job to finish")
    assert answer["state"] == "done", answer
    result = answer["result"]
    assert result["series_instance_uid"] != s.SeriesInstanceUID
    seg = client.retrieve_instance(result["study_instance_uid"], result["series_instance_uid"],
                                   result["sop_instance_uid"])
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == s.SeriesInstanceUID
    found = client.search_for_series(s.StudyInstanceUID, search_filters={"Modality": "SEG"})
    assert [pydicom.Dataset.from_json(f).SeriesInstanceUID for f in found] == [result["series_instance_uid"]]

    # the same name again: 409, nothing new dropped; a name not given: a unique one is chosen
    r = httpx.post(f"{base}/api/inbox/jobs", files=files, data={"name": "mask-1"}, headers=bearer(), timeout=30)
    assert r.status_code == 409 and "already exists" in r.json()["detail"]
    r = httpx.post(f"{base}/api/inbox/jobs", files=files, headers=bearer(), timeout=30)
    assert r.status_code == 202 and r.json()["name"].startswith("job-")


def test_bad_jobs_are_refused_with_the_inbox_sentence(gateway_factory):
    gw = gateway_factory(http={"auth": auth_section(hashes())})
    base = gw.http_url
    good = _npy(np.zeros((2, 4, 4), np.uint8))
    cases = [
        ({"array": ("a.npy", good), "sidecar": ("a.yaml", b"source: [unclosed\n")}, 400, "not valid YAML"),
        ({"array": ("a.npy", b"hello"), "sidecar": ("a.yaml", b"source: {series_instance_uid: '1.2.3'}\n")},
         400, "neither a .npy nor a .npz"),
        ({"array": ("a.npy", good[:-5]), "sidecar": ("a.yaml", b"source: {series_instance_uid: '1.2.3'}\n")},
         400, "truncated"),
        ({"sidecar": ("a.yaml", b"source: {series_instance_uid: '1.2.3'}\n")}, 400, "lacks the file field(s) array"),
    ]
    for files, status, words in cases:
        r = httpx.post(f"{base}/api/inbox/jobs", files=files, headers=bearer(WRITER_TOKEN), timeout=30)
        assert r.status_code == status and words in r.json()["detail"], r.text
    r = httpx.post(f"{base}/api/inbox/jobs", files=cases[0][0], data={"name": "../x"}, headers=bearer(), timeout=30)
    assert r.status_code == 400 and "job name" in r.json()["detail"]
    inbox = gw.config_path.parent / gw.config["inbox"]["path"]
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == []
    assert not [p for p in inbox.iterdir() if p.name.startswith(".upload-")]
    assert httpx.get(f"{base}/api/inbox/jobs/nope", headers=bearer(), timeout=10).status_code == 404
    r = httpx.post(f"{base}/api/inbox/jobs", files=cases[0][0], timeout=30)
    assert r.status_code == 401
