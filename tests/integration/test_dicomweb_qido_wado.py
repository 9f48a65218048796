"""QIDO-RS and WADO-RS on the gateway's store, through dicomweb-client and plain HTTP."""

from __future__ import annotations

from io import BytesIO

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from tests.integration.web_node import READER_TOKEN, WRITER_TOKEN, basic, bearer, multipart_parts, web_node  # noqa: F401


def _client(node, token=WRITER_TOKEN) -> DICOMwebClient:
    return DICOMwebClient(node.dicomweb, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def loaded(web_node, ct_series):
    """A node holding two studies: 3 CT slices (PID0001) and 2 of another patient/date."""
    node = web_node()
    first = ct_series(3, rows=32, columns=32)
    second = ct_series(2, rows=32, columns=32, seed=1)
    others = []
    for p in second:
        ds = pydicom.dcmread(p)
        ds.PatientID, ds.PatientName, ds.StudyDate, ds.Modality = "OTHER7", "Doe^Jane", "20250315", "MR"
        ds.AccessionNumber = "ACC0002"
        ds.save_as(p)
        others.append(ds)
    client = _client(node)
    client.store_instances([pydicom.dcmread(p) for p in first] + others)
    return node, [pydicom.dcmread(p) for p in first], others, first


def _uids(results, keyword):
    return sorted(pydicom.Dataset.from_json(r).get(keyword) for r in results)


def test_qido_matching(loaded):
    node, first, others, _ = loaded
    c = _client(node, READER_TOKEN)
    study1, study2 = first[0].StudyInstanceUID, others[0].StudyInstanceUID
    assert _uids(c.search_for_studies(), "StudyInstanceUID") == sorted([study1, study2])
    assert _uids(c.search_for_studies(search_filters={"PatientID": "PID0001"}), "StudyInstanceUID") == [study1]
    assert _uids(c.search_for_studies(search_filters={"PatientName": "Doe*"}), "StudyInstanceUID") == [study2]
    assert _uids(c.search_for_studies(search_filters={"PatientName": "doe*"}), "StudyInstanceUID") == []
    assert _uids(c.search_for_studies(search_filters={"PatientName": "doe"}, fuzzymatching=True),
                 "StudyInstanceUID") == [study2]
    assert _uids(c.search_for_studies(search_filters={"StudyDate": "20250101-20251231"}), "StudyInstanceUID") == [study2]
    assert _uids(c.search_for_studies(search_filters={"StudyDate": "-20251231"}), "StudyInstanceUID") == [study2]
    assert _uids(c.search_for_studies(search_filters={"ModalitiesInStudy": "CT"}), "StudyInstanceUID") == [study1]
    assert _uids(c.search_for_studies(search_filters={"AccessionNumber": "ACC0002"}), "StudyInstanceUID") == [study2]
    r = httpx.get(f"{node.dicomweb}/studies", params={"StudyInstanceUID": f"{study1},{study2}", "limit": 1},
                  headers=bearer(READER_TOKEN))
    assert r.status_code == 200 and len(r.json()) == 1 and "offset=1" in r.headers["warning"]
    r2 = httpx.get(f"{node.dicomweb}/studies", params={"StudyInstanceUID": f"{study1},{study2}", "limit": 1,
                                                       "offset": 1}, headers=bearer(READER_TOKEN))
    assert {_uids(r.json(), "StudyInstanceUID")[0], _uids(r2.json(), "StudyInstanceUID")[0]} == {study1, study2}
    study = pydicom.Dataset.from_json([s for s in c.search_for_studies(search_filters={"PatientID": "PID0001"})][0])
    assert study.NumberOfStudyRelatedInstances == 3 and study.NumberOfStudyRelatedSeries == 1
    assert study.ModalitiesInStudy == "CT" and study.PatientName == "Test^Patient"
    assert study.RetrieveURL == f"{node.dicomweb}/studies/{study1}"
    series = c.search_for_series(study1)
    assert _uids(series, "SeriesInstanceUID") == [first[0].SeriesInstanceUID]
    assert pydicom.Dataset.from_json(series[0]).NumberOfSeriesRelatedInstances == 3
    assert _uids(c.search_for_series(search_filters={"Modality": "MR"}), "SeriesInstanceUID") == [others[0].SeriesInstanceUID]
    inst = c.search_for_instances(study1, first[0].SeriesInstanceUID)
    assert _uids(inst, "SOPInstanceUID") == sorted(d.SOPInstanceUID for d in first)
    assert len(c.search_for_instances(study1)) == 3 and len(c.search_for_instances()) == 5
    assert _uids(c.search_for_instances(search_filters={"SOPInstanceUID": first[1].SOPInstanceUID}),
                 "SOPInstanceUID") == [first[1].SOPInstanceUID]
    one = c.search_for_instances(search_filters={"SOPInstanceUID": first[1].SOPInstanceUID},
                                 fields=["SliceLocation", "00180050"])
    ds = pydicom.Dataset.from_json(one[0])
    assert ds.SliceLocation == first[1].SliceLocation and ds.SliceThickness == first[1].SliceThickness
    everything = pydicom.Dataset.from_json(c.search_for_instances(
        search_filters={"SOPInstanceUID": first[1].SOPInstanceUID}, fields=["all"])[0])
    assert everything.ImagePositionPatient == first[1].ImagePositionPatient


@pytest.mark.parametrize("params, words", [
    ({"NoSuchKeyword": "x"}, "unknown query parameter 'NoSuchKeyword'"),
    ({"StudyDate": "2025-13"}, "StudyDate: '2025' is not a valid date"),
    ({"StudyInstanceUID": "1.2.x"}, "not a valid UID"),
    ({"limit": "-1"}, "limit must be a whole number"),
    ({"ImagePositionPatient": "1"}, "matching on ImagePositionPatient is not supported"),
])
def test_qido_bad_queries(loaded, params, words):
    node = loaded[0]
    r = httpx.get(f"{node.dicomweb}/studies", params=params, headers=bearer(READER_TOKEN))
    assert r.status_code == 400 and words in r.json()["detail"], r.text


def test_wado_round_trip_bytes_and_metadata(loaded):
    node, first, others, paths = loaded
    c = _client(node, READER_TOKEN)
    study, series = first[0].StudyInstanceUID, first[0].SeriesInstanceUID
    sop = first[0].SOPInstanceUID
    got = c.retrieve_instance(study, series, sop)
    assert got.SOPInstanceUID == sop and np.array_equal(got.pixel_array, first[0].pixel_array)
    got = c.retrieve_series(study, series)
    assert sorted(d.SOPInstanceUID for d in got) == sorted(d.SOPInstanceUID for d in first)
    # the stored bytes, exactly, for transfer-syntax=*
    r = httpx.get(f"{node.dicomweb}/studies/{study}/series/{series}/instances/{sop}",
                  headers={**bearer(READER_TOKEN), "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert r.status_code == 200
    assert paths[0].read_bytes() in r.content
    assert int(r.headers["content-length"]) == len(r.content)
    meta = c.retrieve_series_metadata(study, series)
    assert len(meta) == 3
    m = [x for x in meta if x["00080018"]["Value"][0] == sop][0]
    assert m["00100020"]["Value"] == ["PID0001"]
    uri = m["7FE00010"]["BulkDataURI"]
    assert uri.endswith(f"/instances/{sop}/bulk/7FE00010")
    pixels = c.retrieve_bulkdata(uri)[0]
    assert pixels == first[0].PixelData
    frames = c.retrieve_instance_frames(study, series, sop, frame_numbers=[1])
    assert frames[0] == first[0].PixelData
    assert httpx.get(f"{node.dicomweb}/studies/{study}/series/{series}/instances/{sop}/frames/2",
                     headers=bearer(READER_TOKEN)).status_code == 404


def test_wado_transcodes_between_uncompressed_and_refuses_else(web_node, ct_series):
    node = web_node()
    path = ct_series(1, rows=32, columns=32)[0]
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(path, implicit_vr=True, little_endian=True)
    _client(node).store_instances([pydicom.dcmread(path)])
    url = f"{node.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    # no transfer-syntax parameter means Explicit VR Little Endian (PS3.18 8.7.3.5.2)
    r = httpx.get(url, headers={**bearer(READER_TOKEN), "Accept": 'multipart/related; type="application/dicom"'})
    assert r.status_code == 200
    [(headers, body)] = multipart_parts(r)
    assert headers["content-type"].replace('"', "") == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
    got = pydicom.dcmread(BytesIO(body))
    assert got.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert got.PixelData == ds.PixelData and got.PatientName == ds.PatientName
    assert got.ImagePositionPatient == ds.ImagePositionPatient
    for elem in ds:
        assert got[elem.tag].value == elem.value, elem.keyword
    got = _client(node).retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert got.PixelData == ds.PixelData
    r = httpx.get(url, headers={**bearer(READER_TOKEN),
                                "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'})
    assert r.status_code == 406 and "stored as 1.2.840.10008.1.2" in r.json()["detail"]
    r = httpx.get(url, headers={**bearer(READER_TOKEN), "Accept": "image/png"})
    assert r.status_code == 406


def test_compressed_frames_as_stored_and_other_bulk_data(web_node, ct_series):
    from pydicom.encaps import generate_frames
    from pydicom.uid import RLELossless

    node = web_node()
    path = ct_series(1, rows=32, columns=32)[0]
    ds = pydicom.dcmread(path)
    frames = np.stack([ds.pixel_array, ds.pixel_array[::-1], ds.pixel_array[:, ::-1]])
    ds.NumberOfFrames = 3
    ds.compress(RLELossless, frames)
    ds.add_new(0x00091010, "LO", "BIGBULK")  # a private creator and a large private binary value
    ds.add_new(0x00091011, "OB", bytes(range(256)) * 20)
    ds.save_as(path, enforce_file_format=True)
    stored = pydicom.dcmread(path)
    expected = list(generate_frames(stored.PixelData, number_of_frames=3))
    _client(node).store_instances([stored])
    base = (f"{node.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")
    r = httpx.get(f"{base}/frames/3,1", headers={**bearer(READER_TOKEN),
                                               "Accept": 'multipart/related; type="image/dicom-rle"'})
    assert r.status_code == 200, r.text
    parts = multipart_parts(r)
    assert [body for _, body in parts] == [expected[2], expected[0]]
    assert parts[0][0]["content-type"].startswith("image/dicom-rle")
    r = httpx.get(f"{base}/frames/1", headers={**bearer(READER_TOKEN),
                                             "Accept": 'multipart/related; type="application/octet-stream"'})
    assert r.status_code == 406 and "image/dicom-rle" in r.json()["detail"]
    meta = httpx.get(f"{base}/metadata", headers=bearer(READER_TOKEN)).json()[0]
    uri = meta["00091011"]["BulkDataURI"]
    assert uri.endswith("/bulk/00091011") and meta["00091010"]["Value"] == ["BIGBULK"]
    [(_, body)] = multipart_parts(httpx.get(uri, headers=bearer(READER_TOKEN)))
    assert body == bytes(range(256)) * 20
    got = _client(node).retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert got.file_meta.TransferSyntaxUID == RLELossless and got.PixelData == stored.PixelData
