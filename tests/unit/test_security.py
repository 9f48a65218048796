"""TLS config checks, the peer policy, handshake failure wording and the audit writer (no sockets)."""

from __future__ import annotations

import json
import os
import ssl
import threading
from datetime import datetime, timedelta, timezone

import pytest

from gateway import audit as audit_trail
from gateway.config import parse
from gateway.dimse import peers, tls
from gateway.errors import ConfigError
from tests.tlsutil import TestCA


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = TestCA(folder / "ca")
    return {"ca": ca, "node": ca.issue("node.test"), "other": ca.issue("other.test"),
            "soon": ca.issue("soon.test", days=10), "expired": ca.issue("old.test", days=-1, not_before_days=-9)}


def problems(raw, tmp_path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(raw, base_dir=tmp_path)
    return info.value.problems


def node_tls(pki, **over):
    return {"port": 2762, "cert_file": str(pki["node"].cert), "key_file": str(pki["node"].key),
            "ca_file": str(pki["ca"].ca_file), **over}


def test_valid_tls_and_peers_config(pki, tmp_path):
    cfg = parse({"node": {"tls": node_tls(pki)},
                 "security": {"peers": {"CT01": {"hosts": ["10.1.2.0/24"]},
                                        "SITE-B": {"hosts": ["0.0.0.0/0"], "tls_subject_cn": "b.test"}}}},
                base_dir=tmp_path)
    assert cfg.node.tls.port == 2762 and cfg.node.tls.require_client_cert is True
    assert str(cfg.security.peers["CT01"].hosts[0]) == "10.1.2.0/24"


def test_tls_mistakes_name_their_key(pki, tmp_path):
    unreadable = tmp_path / "unreadable.pem"
    found = problems({
        "node": {"port": None, "tls": node_tls(pki, key_file=str(pki["other"].key), ca_file=None)},
        "destinations": {
            "a": {"ae_title": "A", "host": "h", "port": 1, "tls": {"cert_file": str(pki["node"].cert)}},
            "b": {"ae_title": "B", "host": "h", "port": 1,
                  "tls": {"cert_file": str(pki["expired"].cert), "key_file": str(pki["expired"].key),
                          "ca_file": str(unreadable)}},
        }}, tmp_path)
    assert found == [
        f"node.tls.key_file: does not match the certificate in cert_file (different public key), "
        f"got '{pki['other'].key}'",
        "node.tls.require_client_cert: needs node.tls.ca_file (the CA that signs client certificates), "
        "or set it to false, got true",
        "destinations.a.tls.key_file: is required when cert_file is set",
        found[3],
        f"destinations.b.tls.ca_file: cannot read the file (No such file or directory), got '{unreadable}'",
    ]
    assert found[3].startswith("destinations.b.tls.cert_file: the certificate expired on ")


def test_a_world_readable_or_garbage_key_is_refused(pki, tmp_path):
    key = tmp_path / "node.key"
    key.write_bytes(pki["node"].key.read_bytes())
    os.chmod(key, 0o644)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    found = problems({"node": {"tls": node_tls(pki, key_file=str(key), cert_file=str(garbage))}}, tmp_path)
    assert any(p.startswith("node.tls.cert_file: is not a PEM certificate file") for p in found)
    assert any(p.startswith("node.tls.key_file: is readable by every user; chmod 600 it") for p in found)


def test_no_listener_and_same_ports_are_errors(pki, tmp_path):
    assert problems({"node": {"port": None}}, tmp_path) == [
        "node.port: null leaves no listener; set it or configure node.tls, got null"]
    assert problems({"node": {"port": 2762, "tls": node_tls(pki)}}, tmp_path) == [
        "node.tls.port: must differ from node.port, got 2762"]


def test_peer_hosts_must_be_networks(tmp_path):
    found = problems({"security": {"peers": {"CT01": {"hosts": ["10.1.2.5/24"]}, "CT02": {"hosts": []}}}},
                     tmp_path)
    assert found[0].startswith("security.peers.CT01.hosts[0]: must be an IP network such as 10.1.2.0/24")
    assert found[1] == ("security.peers.CT02.hosts: must list at least one network "
                        "(0.0.0.0/0 for any IPv4 address), got []")


def test_expiry_warning_within_30_days(pki, tmp_path):
    cfg = parse({"node": {"tls": node_tls(pki, cert_file=str(pki["soon"].cert),
                                          key_file=str(pki["soon"].key))}}, base_dir=tmp_path)
    now = datetime.now(timezone.utc)
    (warning,) = tls.expiry_warnings(cfg, now)
    assert warning.startswith("node.tls.cert_file: the certificate O=Gateway Tests,CN=soon.test expires on")
    assert tls.expiry_warnings(cfg, now - timedelta(days=40)) == []


def _cfg(tmp_path, **security):
    return parse({"security": security}, base_dir=tmp_path)


def test_peer_policy(tmp_path):
    cfg = _cfg(tmp_path, peers={"CT01": {"hosts": ["10.1.2.0/24"]},
                                "SITE-B": {"hosts": ["0.0.0.0/0"], "tls_subject_cn": "b.test"}})
    assert peers.rejection(cfg, "CT01", "10.1.2.7", False, None) is None
    assert peers.rejection(cfg, "CT01", "::ffff:10.1.2.7", False, None) is None
    assert peers.rejection(cfg, "CT01", "10.1.3.7", False, None).startswith("host not allowed: 10.1.3.7")
    assert peers.rejection(cfg, "XX", "10.1.2.7", False, None).startswith("AE unknown")
    assert peers.rejection(cfg, "SITE-B", "192.0.2.1", False, None).startswith("TLS required")
    assert peers.rejection(cfg, "SITE-B", "192.0.2.1", True, None).startswith(
        "certificate name mismatch: no client certificate")
    assert peers.rejection(cfg, "SITE-B", "192.0.2.1", True, "c.test").startswith(
        "certificate name mismatch: the client certificate's CN is 'c.test'")
    assert peers.rejection(cfg, "SITE-B", "192.0.2.1", True, "b.test") is None


def test_open_listener_warning(tmp_path):
    assert peers.open_listener_warning(parse({"node": {"host": "0.0.0.0"}}, base_dir=tmp_path))
    assert peers.open_listener_warning(
        parse({"node": {"host": "0.0.0.0"}, "security": {"allowed_calling_aets": ["CT"]}}, base_dir=tmp_path)
    ) is None
    assert peers.open_listener_warning(parse({}, base_dir=tmp_path)) is None


def test_handshake_failures_in_words():
    mismatch = ssl.SSLCertVerificationError("x")
    mismatch.verify_code, mismatch.verify_message = 62, "Hostname mismatch, certificate is not valid for 'a'."
    assert tls.describe_ssl_error(mismatch).startswith("name mismatch")
    expired = ssl.SSLCertVerificationError("x")
    expired.verify_code, expired.verify_message = 10, "certificate has expired"
    assert tls.describe_ssl_error(expired).startswith("expired")
    unknown = ssl.SSLCertVerificationError("x")
    unknown.verify_code, unknown.verify_message = 20, "unable to get local issuer certificate"
    assert tls.describe_ssl_error(unknown).startswith("unknown CA")
    proto = ssl.SSLError(1, "[SSL: SSLV3_ALERT_HANDSHAKE_FAILURE] sslv3 alert handshake failure")
    proto.reason = "SSLV3_ALERT_HANDSHAKE_FAILURE"
    assert tls.describe_ssl_error(proto).startswith("no shared protocol")


def test_contexts_are_tls12_plus_with_bcp195_ciphers(pki):
    server = tls.server_context(pki["node"].cert, pki["node"].key, pki["ca"].ca_file, True)
    client = tls.client_context(pki["ca"].ca_file, None, None)
    for ctx in (server, client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
        assert tls12 and tls12 <= set(tls.BCP195_CIPHERS.split(":"))
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED


def test_audit_writer_appends_rotates_and_flushes_at_close(tmp_path):
    path = tmp_path / "audit.jsonl"
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    log = audit_trail.AuditLog(path, "GW@host", rotate_bytes=4096, keep_files=2, clock=lambda: when).start()
    threads = [threading.Thread(target=lambda n=n: [log.record(
        audit_trail.USER_AUTHENTICATION, audit_trail.Outcome.SUCCESS,
        participants=[audit_trail.participant(f"AE{n}", requestor=True, address="10.0.0.1")])
        for _ in range(50)]) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    files = [path, path.with_name("audit.jsonl.1"), path.with_name("audit.jsonl.2")]
    assert not path.with_name("audit.jsonl.3").exists()
    lines = [json.loads(line) for f in files if f.exists() for line in f.read_text().splitlines()]
    # 200 recorded; rotation keeps 3 files of <= 4096 bytes, so older lines may be gone, never torn
    assert 0 < len(lines) <= 200
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files if f.exists())
    assert all(f.stat().st_size <= 4096 for f in files if f.exists())
    first = lines[0]
    assert first["EventIdentification"]["EventID"]["csd-code"] == "110114"
    assert first["EventIdentification"]["EventDateTime"] == "2026-01-02T03:04:05.000+00:00"
    assert first["AuditSourceIdentification"] == {"AuditSourceID": "GW@host"}


def test_audit_nothing_lost_without_rotation(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = audit_trail.AuditLog(path, "GW").start()
    for i in range(1000):
        log.record(audit_trail.INSTANCES_TRANSFERRED, 0, action=audit_trail.CREATE,
                   objects=[audit_trail.study_object(f"1.2.{i}", {"1.2.3": 2}, instances=2, size=10)])
    log.close()
    events = audit_trail.read(path)
    assert [e["ParticipantObjectIdentification"][0]["ParticipantObjectID"] for e in events] == [
        f"1.2.{i}" for i in range(1000)]


def test_dicomweb_request_descriptions():
    from gateway.web.audit_requests import describe

    q = describe("GET", "/dicom-web/studies/1.2/series", "Modality=CT", 200, "token:r", "10.0.0.9", "GW")
    assert q["event_id"] == audit_trail.QUERY and q["outcome"] == 0
    assert q["objects"][0]["ParticipantObjectQuery"] == "/dicom-web/studies/1.2/series?Modality=CT"
    w = describe("GET", "/dicom-web/studies/1.2/series/1.3/instances/1.4/frames/1", "", 404, "u", None, "GW")
    assert w["event_id"] == audit_trail.INSTANCES_TRANSFERRED and w["action"] == "R" and w["outcome"] == 4
    assert w["objects"][0]["ParticipantObjectID"] == "1.2"
    assert w["objects"][0]["ParticipantObjectDescription"] == {
        "Resource": "studies/1.2/series/1.3/instances/1.4/frames/1",
        "SeriesInstanceUID": "1.3", "SOPInstanceUID": "1.4"}
    s = describe("POST", "/dicom-web/studies", "", 500, "token:w", "10.0.0.9", "GW")
    assert s["action"] == "C" and s["outcome"] == 8 and s["objects"] == []
    a = describe("GET", "/dicom-web/studies", "", 401, "-", "10.0.0.9", "GW")
    assert a["event_id"] == audit_trail.USER_AUTHENTICATION and a["outcome"] == 4


def test_patient_objects_in_instances_transferred():
    from gateway.web.audit_requests import describe, retrieved_study

    tally = audit_trail.Tally()
    tally.add("1.2.1", "1.2.1.1", 10, "PAT-1")
    tally.add("1.2.1", "1.2.1.2", 10, None)
    tally.add("1.2.2", "1.2.2.1", 10, "PAT-1")  # a second study of the same patient
    tally.add("1.2.3", "1.2.3.1", 10)  # no Patient ID known: no patient object for it
    # receive reads a study's Patient ID only until one is known
    assert tally.has_patient("1.2.1") and tally.has_patient("1.2.2") and not tally.has_patient("1.2.3")
    objects = tally.objects()
    assert [o["ParticipantObjectID"] for o in objects] == ["1.2.1", "1.2.2", "1.2.3", "PAT-1"]
    assert objects[-1] == {"ParticipantObjectID": "PAT-1", "ParticipantObjectTypeCode": 1,
                           "ParticipantObjectTypeCodeRole": 1,
                           "ParticipantObjectIDTypeCode": {"csd-code": "2", "codeSystemName": "RFC-3881",
                                                           "originalText": "Patient Number"}}
    assert retrieved_study("GET", "/dicom-web/studies/1.2/series/1.3", 200) == "1.2"
    assert retrieved_study("GET", "/dicom-web/studies/1.2/series", 200) is None  # a query
    assert retrieved_study("GET", "/dicom-web/studies/1.2", 404) is None
    w = describe("GET", "/dicom-web/studies/1.2", "", 200, "u", None, "GW", patient_id="PAT-9")
    assert [o["ParticipantObjectTypeCode"] for o in w["objects"]] == [2, 1]
    assert w["objects"][1]["ParticipantObjectID"] == "PAT-9"
    stored = tally.objects()
    p = describe("POST", "/dicom-web/studies/1.2.1", "", 200, "w", None, "GW", stored=stored)
    assert p["action"] == "C" and p["objects"] == stored  # the counted studies replace the URL's


def test_the_patient_id_comes_from_the_head_in_memory_and_from_the_index(tmp_path):
    from gateway.storage import db, qido
    from gateway.storage.header import read_header
    from gateway.storage.store import Outcome, Store, default_router
    from tests.unit.test_store import DIMSE, STUDY, dataset, spooled

    conn = db.connect(tmp_path / "var" / "gateway.sqlite3")
    try:
        store = Store(tmp_path / "var", tmp_path / "var" / "store", conn, router=default_router([], []))
        result = store.ingest(spooled(tmp_path), DIMSE)
        assert result.outcome is Outcome.STORED
        assert result.header.patient_id == "P1"
        assert "dataset" not in result.header.__dict__  # no pydicom Dataset on the receive path
        assert qido.patient_of_study(conn, STUDY) == "P1"  # what the senders and WADO-RS audit use
        assert qido.patient_of_study(conn, "9.9.9") is None
    finally:
        conn.close()
    for charset, pid in [("ISO_IR 192", "Zoë-7"), ("ISO_IR 100", "Zoë-7"), ("ISO 2022 IR 100", "Zoë-7"), (None, "")]:
        ds = dataset()
        if charset:
            ds.SpecificCharacterSet = charset
        ds.PatientID = pid
        path = tmp_path / f"{charset}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert read_header(path).patient_id == (pid or None), charset  # the fast reading or pydicom's
