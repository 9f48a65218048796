"""Real DICOMweb peers against `dicom-gateway run`: Orthanc's DICOMweb plugin and DCMTK + dicomweb-client."""

from __future__ import annotations

import pydicom
from dicomweb_client.api import DICOMwebClient

from tests.conftest import require_program
from tests.integration.web_node import READER_TOKEN, WRITER_TOKEN, auth_section, bearer, hashes

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def after_file_meta(data: bytes) -> bytes:
    """The data set bytes of a Part 10 file: what follows the File Meta group (its group length says where)."""
    assert data[128:132] == b"DICM"
    assert data[132:136] == b"\x02\x00\x00\x00", "file meta without group length"
    length = int.from_bytes(data[140:144], "little")
    return data[144 + length:]


def test_dcmtk_c_store_then_byte_identical_wado(gateway_factory, dcmtk, ct_series):
    gw = gateway_factory(http={"auth": auth_section(hashes())})
    paths = ct_series(3, rows=64, columns=64)
    result = dcmtk.storescu(gw.port, gw.ae_title, *paths)
    assert result.returncode == 0, result.stderr
    client = DICOMwebClient(f"{gw.http_url}/dicom-web", headers=bearer(READER_TOKEN))
    ds0 = pydicom.dcmread(paths[0])
    # the stored files are the bytes storescu sent; WADO gives exactly those back
    data_dir = gw.config_path.parent / "var"
    stored = {p.stem: p.read_bytes() for p in (data_dir / "store").rglob("*.dcm")}
    assert len(stored) == 3
    import httpx

    r = httpx.get(f"{gw.http_url}/dicom-web/studies/{ds0.StudyInstanceUID}/series/{ds0.SeriesInstanceUID}",
                  headers={**bearer(READER_TOKEN),
                           "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}, timeout=30)
    assert r.status_code == 200
    from tests.integration.web_node import multipart_parts

    bodies = [body for _, body in multipart_parts(r)]
    assert sorted(bodies) == sorted(stored.values())
    for path in paths:
        sent = pydicom.dcmread(path)
        got = client.retrieve_instance(sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID)
        assert got.PixelData == sent.PixelData
        assert after_file_meta(stored[sent.SOPInstanceUID]) == after_file_meta(path.read_bytes())


def test_orthanc_dicomweb_plugin_pushes_queries_and_retrieves(gateway_factory, orthanc_factory, ct_series):
    require_program(PLUGIN)
    gw = gateway_factory(http={"auth": auth_section(hashes())})
    orthanc = orthanc_factory(
        Plugins=[PLUGIN],
        DicomWeb={"Enable": True, "Root": "/dicom-web/", "Servers": {
            "gateway": {"Url": f"{gw.http_url}/dicom-web/",
                        "HttpHeaders": {"Authorization": f"Bearer {WRITER_TOKEN}"}}}},
    )
    # 1. Orthanc pushes a study to us with STOW-RS
    pushed = ct_series(3, rows=32, columns=32)
    for p in pushed:
        orthanc.post("/instances", p.read_bytes())
    study_uid = pydicom.dcmread(pushed[0]).StudyInstanceUID
    [study_id] = [s for s in orthanc.get("/studies")]
    job = orthanc.post("/dicom-web/servers/gateway/stow", {"Resources": [study_id], "Synchronous": True}, timeout=120)
    assert job == {} or isinstance(job, dict), job
    data_dir = gw.config_path.parent / "var"
    stored = {p.stem: p.read_bytes() for p in (data_dir / "store" / study_uid).rglob("*.dcm")}
    assert len(stored) == 3
    for iid in orthanc.get(f"/studies/{study_id}/instances"):
        sop = orthanc.get(f"/instances/{iid['ID']}/tags?simplify")["SOPInstanceUID"]
        assert after_file_meta(stored[sop]) == after_file_meta(orthanc.instance_file(iid["ID"]))

    # 2. Orthanc queries us with QIDO-RS
    answer = orthanc.post("/dicom-web/servers/gateway/qido",
                          {"Uri": "/studies", "Arguments": {"PatientID": "PID0001"}}, timeout=60)
    # (Orthanc's REST API gives each answer back in its own JSON shape: values as strings)
    assert [a["0020000D"]["Value"] for a in answer] == [study_uid]
    assert answer[0]["00100010"]["Value"] == "Test^Patient" and answer[0]["00080061"]["Value"] == "CT"
    answer = orthanc.post("/dicom-web/servers/gateway/qido",
                          {"Uri": f"/studies/{study_uid}/series", "Arguments": {}}, timeout=60)
    series_uid = pydicom.dcmread(pushed[0]).SeriesInstanceUID
    assert [a["0020000E"]["Value"] for a in answer] == [series_uid]
    assert answer[0]["0008103E"]["Value"] == "Synthetic axial series"

    # 3. Orthanc retrieves from us a series it does not have (stored here by dicomweb-client)
    other = ct_series(4, rows=32, columns=32, seed=3)
    sent = [pydicom.dcmread(p) for p in other]
    DICOMwebClient(f"{gw.http_url}/dicom-web", headers=bearer()).store_instances(sent)
    other_series, other_study = sent[0].SeriesInstanceUID, sent[0].StudyInstanceUID
    orthanc.post("/dicom-web/servers/gateway/retrieve",
                 {"Resources": [{"Study": other_study, "Series": other_series}], "Synchronous": True}, timeout=120)
    ours = {p.stem: p.read_bytes() for p in (data_dir / "store" / other_study).rglob("*.dcm")}
    assert len(ours) == 4
    for ds in sent:
        oid = orthanc.find_instance(ds.SOPInstanceUID)
        assert oid is not None, f"Orthanc did not retrieve {ds.SOPInstanceUID}"
        assert after_file_meta(orthanc.instance_file(oid)) == after_file_meta(ours[ds.SOPInstanceUID])


def test_instances_from_c_store_are_found_by_qido_at_once(gateway_factory, dcmtk, ct_series):
    gw = gateway_factory(http={"auth": auth_section(hashes())})
    paths = ct_series(2, rows=32, columns=32)
    assert dcmtk.storescu(gw.port, gw.ae_title, *paths).returncode == 0
    client = DICOMwebClient(f"{gw.http_url}/dicom-web", headers=bearer(READER_TOKEN))
    found = client.search_for_series(search_filters={"PatientID": "PID0001", "Modality": "CT"})
    assert [pydicom.Dataset.from_json(s).SeriesInstanceUID for s in found] == [pydicom.dcmread(paths[0]).SeriesInstanceUID]
