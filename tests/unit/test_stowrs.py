"""STOW-RS's pure core: request planning, the streamed multipart body, and the server's answer -> verdicts."""

from __future__ import annotations

import email.parser
import email.policy
import json
from pathlib import Path

import pytest

from gateway.forward import stowrs
from gateway.forward.outcome import Outcome, Verdict
from gateway.forward.stowrs import Part


def make_parts(tmp_path: Path, sizes: list[int]) -> list[Part]:
    parts = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"f{i}.dcm"
        path.write_bytes(bytes([i % 251]) * size)
        parts.append(Part(i, f"1.2.3.{i}", path, size))
    return parts


def uids_of(requests):
    return [[p.sop_instance_uid for p in r] for r in requests]


# --------------------------------------------------------------------------- planning


def test_requests_fill_up_to_the_limit_and_a_large_instance_goes_alone(tmp_path):
    parts = make_parts(tmp_path, [40, 40, 30, 200, 10, 90, 11])
    requests = stowrs.plan_requests(parts, 100)
    assert [[p.item_id for p in r] for r in requests] == [[0, 1], [2], [3], [4, 5], [6]]
    assert all(sum(p.size for p in r) <= 100 or len(r) == 1 for r in requests)
    assert stowrs.plan_requests([], 100) == []


def test_split_halves_keep_every_part_once(tmp_path):
    parts = make_parts(tmp_path, [1] * 5)
    halves = stowrs.split(parts)
    assert [len(h) for h in halves] == [2, 3]
    assert [p for h in halves for p in h] == parts


# --------------------------------------------------------------------------- the body


def test_body_is_valid_multipart_related_with_each_file_byte_for_byte(tmp_path):
    parts = make_parts(tmp_path, [0, 1, 5000, 3 * 1024 + 7])
    body = stowrs.MultipartBody(parts, "b0undary-xyz", chunk_bytes=1024)
    data = b"".join(body)
    assert len(data) == len(body)  # Content-Length announced before sending is exact
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {body.content_type}\r\n\r\n".encode() + data
    )
    assert message.get_content_type() == "multipart/related"
    assert message.get_param("type") == "application/dicom"
    got = [part.get_payload(decode=True) for part in message.iter_parts()]
    assert [part.get_content_type() for part in message.iter_parts()] == ["application/dicom"] * 4
    assert got == [p.path.read_bytes() for p in parts]
    # each part says its length (a streaming parser takes it whole, no boundary search)
    assert [part["Content-Length"] for part in message.iter_parts()] == [str(p.size) for p in parts]


def test_body_is_read_in_bounded_chunks_and_each_pass_rereads_the_files(tmp_path):
    parts = make_parts(tmp_path, [10_000, 2_500])
    body = stowrs.MultipartBody(parts, "b", chunk_bytes=1000)
    chunks = list(body)
    assert max(len(c) for c in chunks) <= 1000 + 100  # part headers are small
    assert b"".join(body) == b"".join(chunks)


def test_a_file_that_changed_size_stops_the_body(tmp_path):
    parts = make_parts(tmp_path, [100, 100])
    parts[1].path.write_bytes(b"x" * 150)
    with pytest.raises(stowrs.FileChanged, match="changed size"):
        b"".join(stowrs.MultipartBody(parts, "b"))
    parts[1].path.write_bytes(b"x" * 50)
    with pytest.raises(stowrs.FileChanged):
        b"".join(stowrs.MultipartBody(parts, "b"))


def test_a_boundary_that_could_break_the_header_is_refused(tmp_path):
    with pytest.raises(ValueError):
        stowrs.MultipartBody([], 'a"b\r\nX: y')


# --------------------------------------------------------------------------- the answer


def ref_item(uid, warning=None):
    item = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
            "00081155": {"vr": "UI", "Value": [uid]}}
    if warning is not None:
        item["00081196"] = {"vr": "US", "Value": [warning]}
    return item


def failed_item(uid, reason):
    return {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [reason]}}


def store_json(referenced=(), failed=()) -> bytes:
    data = {"00081190": {"vr": "UR", "Value": ["http://x/studies/1"]}}
    if referenced:
        data["00081199"] = {"vr": "SQ", "Value": list(referenced)}
    if failed:
        data["00081198"] = {"vr": "SQ", "Value": list(failed)}
    return json.dumps(data).encode()


UIDS = ["1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.4", "1.2.3.5"]


def test_200_and_202_mark_each_instance_by_its_own_entry():
    body = store_json(
        referenced=[ref_item("1.2.3.1"), ref_item("1.2.3.2", warning=0xB000)],
        failed=[failed_item("1.2.3.3", 0xA700), failed_item("1.2.3.4", 0xC000)],
    )
    out = stowrs.decide(UIDS, 202, "Accepted", "application/dicom+json", body, server="cloud")
    assert out["1.2.3.1"] == Outcome(Verdict.SENT)
    assert out["1.2.3.2"] == Outcome(Verdict.SENT, "Warning Reason 0xB000")
    assert out["1.2.3.3"].verdict is Verdict.RETRY and "0xA700" in out["1.2.3.3"].reason
    assert out["1.2.3.3"].reason.startswith("cloud refused it (HTTP 202)")
    assert out["1.2.3.4"].verdict is Verdict.FAILED and "0xC000 (cannot understand)" in out["1.2.3.4"].reason
    assert out["1.2.3.5"].verdict is Verdict.RETRY and "without mentioning" in out["1.2.3.5"].reason


def test_a_json_array_and_charset_parameter_are_read_too():
    body = b"[" + store_json(referenced=[ref_item(u) for u in UIDS]) + b"]"
    out = stowrs.decide(UIDS, 200, "OK", "application/dicom+json; charset=utf-8", body)
    assert {o.verdict for o in out.values()} == {Verdict.SENT}


def test_409_marks_each_by_its_entry_and_without_a_body_fails_all_with_the_words():
    body = store_json(failed=[failed_item(u, 0xA900) for u in UIDS[:2]] + [failed_item(UIDS[2], 0x0110)])
    out = stowrs.decide(UIDS[:3], 409, "Conflict", "application/dicom+json", body)
    assert [out[u].verdict for u in UIDS[:3]] == [Verdict.FAILED, Verdict.FAILED, Verdict.RETRY]
    assert "does not match SOP class" in out[UIDS[0]].reason
    out = stowrs.decide(UIDS[:2], 409, "Conflict", "text/plain", b"study exists with other patient")
    assert {o.verdict for o in out.values()} == {Verdict.FAILED}
    assert out[UIDS[0]].reason.endswith("HTTP 409 Conflict: study exists with other patient")


def test_dicom_xml_answers_are_read_with_or_without_the_namespace():
    for ns in ("", ' xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM"'):
        body = f"""<?xml version="1.0" encoding="UTF-8"?>
<NativeDicomModel{ns}>
  <DicomAttribute tag="00081199" vr="SQ" keyword="ReferencedSOPSequence">
    <Item number="1"><DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.3.1</Value></DicomAttribute></Item>
  </DicomAttribute>
  <DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence">
    <Item number="1"><DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.3.2</Value></DicomAttribute>
      <DicomAttribute tag="00081197" vr="US"><Value number="1">272</Value></DicomAttribute></Item>
  </DicomAttribute>
</NativeDicomModel>""".encode()
        out = stowrs.decide(UIDS[:2], 200, "OK", "application/dicom+xml", body)
        assert out["1.2.3.1"].verdict is Verdict.SENT
        assert out["1.2.3.2"].verdict is Verdict.RETRY and "0x0110 (processing failure)" in out["1.2.3.2"].reason


@pytest.mark.parametrize("ctype,body", [
    ("application/dicom+json", b"{not json"),
    ("application/dicom+json", b""),
    ("text/html", b"<html><body>502 proxy</body></html"),
    ("application/dicom+json", b'{"00081199": {"vr": "SQ", "Value": [{"00081150": {"vr": "UI"}}]}}'),
    ("application/dicom+json", b'"a string"'),
    ("application/dicom+xml", b'<!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>'),
])
def test_an_answer_we_cannot_read_marks_nothing_sent(ctype, body):
    out = stowrs.decide(UIDS, 200, "OK", ctype, body)
    assert {o.verdict for o in out.values()} == {Verdict.RETRY}
    assert "cannot be read" in out[UIDS[0]].reason


@pytest.mark.parametrize("status,verdict", [
    (401, Verdict.REAUTH), (403, Verdict.FAILED), (404, Verdict.FAILED), (415, Verdict.FAILED),
    (400, Verdict.FAILED), (413, Verdict.SPLIT), (408, Verdict.RETRY), (429, Verdict.RETRY),
    (500, Verdict.RETRY), (502, Verdict.RETRY), (503, Verdict.RETRY), (504, Verdict.RETRY),
    (204, Verdict.RETRY), (302, Verdict.FAILED),
])
def test_status_codes_decide_for_the_whole_request(status, verdict):
    out = stowrs.decide(UIDS, status, "Phrase", "text/plain", b"the server's own words\n\x00here",
                        retry_after=7.0, server="cloud")
    assert {o.verdict for o in out.values()} == {verdict}
    reason = out[UIDS[0]].reason
    assert reason.startswith(f"cloud answered HTTP {status} Phrase")
    assert "the server's own words here" in reason  # one printable line
    assert out[UIDS[0]].retry_after == (7.0 if status in (408, 429, 503, 500, 502, 504) else None)


def test_html_error_pages_give_their_text_only_and_are_cut_short():
    page = b"<html><head><title>403 Forbidden</title></head><body><h1>Forbidden</h1>" + b"x" * 5000
    reason = stowrs.decide(UIDS[:1], 403, "Forbidden", "text/html", page)[UIDS[0]].reason
    assert "<" not in reason and "403 Forbidden Forbidden" in reason
    assert len(reason) < 400


def test_retry_after_seconds_and_http_dates():
    assert stowrs.retry_after_seconds("120", now=0) == 120.0
    assert stowrs.retry_after_seconds(None, now=0) is None
    assert stowrs.retry_after_seconds("soon", now=0) is None
    assert stowrs.retry_after_seconds("99999999", now=0) == stowrs.MAX_RETRY_AFTER
    # Wed, 21 Oct 2015 07:28:00 GMT = 1445412480
    assert stowrs.retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 30) == 30.0
    assert stowrs.retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 + 30) == 0.0


@pytest.mark.parametrize("code,retry", [
    (0xA700, True), (0xA7FF, True), (0x0110, True), (None, True),
    (0xA900, False), (0xC000, False), (0xC122, False), (0x0122, False), (0x0111, False), (0x1234, False),
])
def test_failure_reasons_say_whether_a_retry_may_help(code, retry):
    words, may_retry = stowrs.describe_failure_reason(code)
    assert may_retry is retry
    assert (f"0x{code:04X}" in words) if code is not None else "no Failure Reason" in words
