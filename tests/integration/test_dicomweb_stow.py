"""STOW-RS into the gateway: dicomweb-client, bad bodies, auth; every stored instance indexed and on disk."""

from __future__ import annotations

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from tests.integration.web_node import WRITER_TOKEN, bearer, web_node  # noqa: F401


def _client(node, token=WRITER_TOKEN) -> DICOMwebClient:
    return DICOMwebClient(node.dicomweb, headers={"Authorization": f"Bearer {token}"})


def test_dicomweb_client_store_round_trip(web_node, ct_series):
    node = web_node()
    paths = ct_series(3, rows=64, columns=64)
    datasets = [pydicom.dcmread(p) for p in paths]
    answer = _client(node).store_instances(datasets)
    refs = answer.ReferencedSOPSequence
    assert [r.ReferencedSOPInstanceUID for r in refs] == [d.SOPInstanceUID for d in datasets]
    study = datasets[0].StudyInstanceUID
    assert answer.RetrieveURL == f"{node.dicomweb}/studies/{study}"
    assert refs[0].RetrieveURL.startswith(f"{node.dicomweb}/studies/{study}/series/")
    assert "FailedSOPSequence" not in answer
    rows = node.instance_rows()
    assert sorted(r["sop_instance_uid"] for r in rows) == sorted(d.SOPInstanceUID for d in datasets)
    for row in rows:
        stored = node.config.node.data_dir / row["path"]
        assert stored.exists() and row["size"] == stored.stat().st_size
    assert not list((node.config.node.data_dir / "tmp").glob("stow-*"))


def _related(parts: list[bytes], boundary: str = "b0undary") -> bytes:
    out = b""
    for part in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


CT = 'multipart/related; type="application/dicom"; boundary=b0undary'


def test_partial_failures_and_study_mismatch(web_node, ct_series):
    node = web_node()
    good = ct_series(2, rows=32, columns=32)
    other = ct_series(1, rows=32, columns=32)
    study = pydicom.dcmread(good[0]).StudyInstanceUID
    body = _related([good[0].read_bytes(), b"not dicom at all", other[0].read_bytes(), good[1].read_bytes()])
    r = httpx.post(f"{node.dicomweb}/studies/{study}", content=body,
                   headers={"Content-Type": CT, **bearer()}, timeout=30)
    assert r.status_code == 202, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    ds = pydicom.Dataset.from_json(r.json())
    assert len(ds.ReferencedSOPSequence) == 2
    failed = ds.FailedSOPSequence
    assert [f.FailureReason for f in failed] == [0xC000, 0xA900]
    other_sop = pydicom.dcmread(other[0]).SOPInstanceUID
    assert failed[1].ReferencedSOPInstanceUID == other_sop
    reasons = r.json()["00081198"]["Value"]
    assert "part 2: not a DICOM Part 10 file" in reasons[0]["00091001"]["Value"][0]
    assert f"differs from {study} in the request" in reasons[1]["00091001"]["Value"][0]
    assert {row["sop_instance_uid"] for row in node.instance_rows()} == {
        pydicom.dcmread(p).SOPInstanceUID for p in good}
    # none stored: 409
    r = httpx.post(f"{node.dicomweb}/studies", content=_related([b"junk"]),
                   headers={"Content-Type": CT, **bearer()}, timeout=30)
    assert r.status_code == 409 and r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]


@pytest.mark.parametrize("mutate, status, words", [
    (lambda body: body.replace(b"b0undary", b"other"), 400, "does not follow its boundary"),
    (lambda body: body[: len(body) // 2], 400, "truncated"),
    (lambda body: b"", 400, "no part"),
])
def test_malformed_bodies_store_nothing(web_node, ct_series, mutate, status, words):
    node = web_node()
    path = ct_series(1, rows=32, columns=32)[0]
    r = httpx.post(f"{node.dicomweb}/studies", content=mutate(_related([path.read_bytes()])),
                   headers={"Content-Type": CT, **bearer()}, timeout=30)
    assert r.status_code == status and words in r.json()["detail"], r.text
    assert node.instance_rows() == []
    assert not list((node.config.node.data_dir / "tmp").glob("stow-*"))
    # still serving
    r = httpx.post(f"{node.dicomweb}/studies", content=_related([path.read_bytes()]),
                   headers={"Content-Type": CT, **bearer()}, timeout=30)
    assert r.status_code == 200


def test_media_types_and_size(web_node, ct_series):
    node = web_node(http={"max_request_bytes": 20000})
    path = ct_series(1, rows=32, columns=32)[0]
    body = _related([path.read_bytes()])
    for ctype, words in [("application/dicom", "send multipart/related"),
                         ('multipart/related; type="application/dicom+json"; boundary=b0undary', "not accepted")]:
        r = httpx.post(f"{node.dicomweb}/studies", content=body, headers={"Content-Type": ctype, **bearer()})
        assert r.status_code == 415 and words in r.json()["detail"]
    r = httpx.post(f"{node.dicomweb}/studies", content=b"x" * 20001 + body,
                   headers={"Content-Type": CT, **bearer()})
    assert r.status_code == 413 and "http.max_request_bytes" in r.json()["detail"]
    assert node.instance_rows() == []


def test_stalled_and_oversized_streams(web_node, ct_series):
    import socket

    node = web_node(http={"max_request_bytes": 50000, "read_timeout_seconds": 1})
    path = ct_series(1, rows=32, columns=32)[0]
    # a chunked body (no Content-Length) that grows past the limit: 413 while streaming, nothing stored
    def chunks():
        yield _related([path.read_bytes()])[:-20]
        for _ in range(10):
            yield b"x" * 10000

    r = httpx.post(f"{node.dicomweb}/studies", content=chunks(), headers={"Content-Type": CT, **bearer()}, timeout=30)
    assert r.status_code == 413 and "http.max_request_bytes (50000)" in r.json()["detail"]
    # a body that stops arriving: 408 after http.read_timeout_seconds
    with socket.create_connection(("127.0.0.1", node.server.port), timeout=10) as s:
        s.sendall((f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {WRITER_TOKEN}\r\n"
                   f"Content-Type: {CT}\r\nContent-Length: 40000\r\n\r\n").encode() + b"--b0undary\r\n")
        answer = b""
        while chunk := s.recv(65536):  # the server answers and closes the connection
            answer += chunk
        answer = answer.decode(errors="replace")
    assert answer.startswith("HTTP/1.1 408") and "http.read_timeout_seconds" in answer
    assert node.instance_rows() == [] and not list((node.config.node.data_dir / "tmp").glob("stow-*"))
    r = httpx.post(f"{node.dicomweb}/studies", content=_related([path.read_bytes()]),
                   headers={"Content-Type": CT, **bearer()}, timeout=30)
    assert r.status_code == 200
