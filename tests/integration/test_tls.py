"""DICOM TLS with real peers: DCMTK storescu/echoscu +tls in, Orthanc and DCMTK storescp +tls out;
peers bound to networks and certificate names; the audit trail of the same run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from gateway import audit as audit_trail
from tests.conftest import free_port, port_open, stop_process, wait_until
from tests.tlsutil import TestCA


@pytest.fixture
def pki(tmp_path):
    """A test CA with the gateway's, the modalities' and the peers' certificates, and a foreign CA."""
    ca = TestCA(tmp_path / "pki")
    other = TestCA(tmp_path / "pki-other", "Other Test CA")
    return {
        "ca": ca,
        "gateway": ca.issue("gateway.test"),
        "modality": ca.issue("modality.test"),
        "site_b": ca.issue("site-b.test"),
        "foreign": other.issue("modality.test", file_stem="foreign"),
        "wrong_name": ca.issue("elsewhere.test", names=("elsewhere.test",)),
        "other": other,
    }


@pytest.fixture(params=[True, False], ids=["fast-path", "public-api"])
def fast_path(request) -> bool:
    """Both receive/forward modes (issue 10): the fast path reads and writes the SSLSocket itself."""
    return request.param


def _tls_args(leaf=None, ca=None):
    args = []
    if leaf is not None:
        args += ["+tls", leaf.key, leaf.cert]
    else:
        args += ["+tla"]
    if ca is not None:
        args += ["+cf", ca]
    return args


def _audit_events(gw) -> list[dict]:
    path = gw.config_path.parent / "var" / "audit.jsonl"
    return audit_trail.read(path)


def _code(event: dict) -> str:
    return event["EventIdentification"]["EventID"]["csd-code"]


def _type(event: dict) -> str | None:
    types = event["EventIdentification"].get("EventTypeCode")
    return types[0]["csd-code"] if types else None


#: The Patient ID of every series ``ct_series`` writes (scripts/make_ct_series.py).
PATIENT = {"ParticipantObjectID": "PID0001", "ParticipantObjectTypeCode": 1, "ParticipantObjectTypeCodeRole": 1,
           "ParticipantObjectIDTypeCode": {"csd-code": "2", "codeSystemName": "RFC-3881",
                                           "originalText": "Patient Number"}}


def _studies(event: dict) -> list[dict]:
    return [o for o in event.get("ParticipantObjectIdentification", []) if o["ParticipantObjectTypeCode"] == 2]


def _patients(event: dict) -> list[dict]:
    return [o for o in event.get("ParticipantObjectIdentification", []) if o["ParticipantObjectTypeCode"] == 1]


def test_tls_listener_peers_and_audit(gateway_factory, dcmtk, ct_series, pki, fast_path):
    """One mixed run: stored over TLS with a client certificate and over the plain port; refused
    without a certificate, with a foreign CA's, with the wrong CN, over plain TCP when TLS is
    required, from a disallowed address and under an unknown AE title; the audit trail holds
    exactly these events, every line JSON, the last ones written across SIGTERM."""
    tls_port = free_port()
    gw = gateway_factory(
        node={"tls": {"port": tls_port, "cert_file": str(pki["gateway"].cert),
                      "key_file": str(pki["gateway"].key), "ca_file": str(pki["ca"].ca_file),
                      "require_client_cert": True}},
        security={"peers": {"MODALITY": {"hosts": ["127.0.0.1"]},
                            "SITEB": {"hosts": ["127.0.0.0/8"], "tls_subject_cn": "site-b.test"}}},
        performance={"pynetdicom_fast_path": fast_path},
    )
    wait_until(lambda: port_open(tls_port), 10, what="the TLS listener")
    ca = pki["ca"].ca_file
    series = ct_series(3, rows=64, columns=64)
    series_b = ct_series(2, rows=64, columns=64)
    plain = ct_series(1, rows=64, columns=64)

    # stored over TLS with a client certificate from the trusted CA
    r = dcmtk.storescu(tls_port, gw.ae_title, *series, calling="MODALITY",
                       extra=_tls_args(pki["modality"], ca))
    assert r.returncode == 0, r.stderr
    # a tls_subject_cn peer with the right certificate
    r = dcmtk.storescu(tls_port, gw.ae_title, *series_b, calling="SITEB", extra=_tls_args(pki["site_b"], ca))
    assert r.returncode == 0, r.stderr
    # the plain port is unaffected
    r = dcmtk.storescu(gw.port, gw.ae_title, *plain, calling="MODALITY")
    assert r.returncode == 0, r.stderr

    # refused: no client certificate, a foreign CA's, the wrong CN, plain TCP for a TLS-only peer
    r = dcmtk.run("echoscu", "-aet", "MODALITY", "-aec", gw.ae_title, *_tls_args(None, ca),
                  "127.0.0.1", tls_port, timeout=30)
    assert r.returncode != 0
    r = dcmtk.run("echoscu", "-aet", "MODALITY", "-aec", gw.ae_title, *_tls_args(pki["foreign"], ca),
                  "127.0.0.1", tls_port, timeout=30)
    assert r.returncode != 0
    r = dcmtk.run("echoscu", "-aet", "SITEB", "-aec", gw.ae_title, *_tls_args(pki["modality"], ca),
                  "127.0.0.1", tls_port, timeout=30)
    assert r.returncode != 0
    r = dcmtk.echoscu(gw.port, gw.ae_title, calling="SITEB")
    assert r.returncode != 0
    r = dcmtk.echoscu(gw.port, gw.ae_title, calling="NOBODY")
    assert r.returncode != 0
    # an allowed AE title from a disallowed address (a second loopback address)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", gw.port, ae_title=gw.ae_title, bind_address=("127.0.0.2", 0))
    assert assoc.is_rejected
    # an accepted C-ECHO over TLS, for the audit count
    r = dcmtk.run("echoscu", "-aet", "MODALITY", "-aec", gw.ae_title, *_tls_args(pki["modality"], ca),
                  "127.0.0.1", tls_port, timeout=30)
    assert r.returncode == 0, r.stderr

    status = json.loads(gw.cli("status", "--json").stdout)
    assert status["store"]["instances"] == 6
    assert status["node"]["tls_port"] == tls_port

    log = gw.log()
    assert "rejected TLS connection from 127.0.0.1" in log
    assert "no client certificate" in log
    assert "unknown CA" in log
    assert "certificate name mismatch: the client certificate's CN is 'modality.test'" in log
    assert "TLS required: security.peers.SITEB.tls_subject_cn is set" in log
    assert "AE unknown: calling AE title 'NOBODY' is not in security.peers" in log
    assert "host not allowed: 127.0.0.2 is not in security.peers.MODALITY.hosts" in log
    rejections = [line for line in log.splitlines() if "rejected" in line]
    assert len(rejections) == 6, rejections  # one line each

    assert gw.stop() == 0
    events = _audit_events(gw)
    kinds = [(_code(e), _type(e), e["EventIdentification"]["EventOutcomeIndicator"]) for e in events]
    assert kinds[0] == ("110113", "110131", 0)  # configuration loaded
    assert kinds[1] == ("110100", "110120", 0)  # application start
    assert kinds[-1] == ("110100", "110121", 0)  # application stop, written across SIGTERM
    middle = sorted(kinds[2:-1])
    assert middle == sorted(
        [("110114", "110122", 0)] * 4  # accepted: TLS store, SITEB store, plain store, TLS echo
        + [("110104", None, 0)] * 3  # instances received, one per storing association
        + [("110113", "110126", 4)] * 2  # TLS handshakes refused: no certificate, foreign CA
        + [("110114", "110122", 4)] * 4  # associations refused: CN, TLS required, unknown AE, host
    ), kinds
    received = [e for e in events if _code(e) == "110104"]
    counts = sorted(o["ParticipantObjectDescription"]["NumberOfInstances"]
                    for e in received for o in _studies(e))
    assert counts == [1, 2, 3]
    for e in received:  # ATNA's Patient object: the Patient ID of what was received, once
        assert _patients(e) == [PATIENT], e
    siteb = [e for e in received if e["ActiveParticipant"][0]["UserID"] == "SITEB"][0]
    assert "CN=site-b.test" in siteb["ActiveParticipant"][0]["AlternativeUserID"]
    assert siteb["ActiveParticipant"][0]["NetworkAccessPointID"] == "127.0.0.1"
    refused = [e for e in events if e["EventIdentification"]["EventOutcomeIndicator"] == 4]
    assert all(e["EventIdentification"]["EventOutcomeDescription"] for e in refused)
    path = gw.config_path.parent / "var" / "audit.jsonl"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert b"PixelData" not in path.read_bytes() and b"7FE00010" not in path.read_bytes().upper()


def _start_storescp_tls(dcmtk, out: Path, leaf, ca: Path, port: int, require_cert: bool = True):
    out.mkdir(parents=True, exist_ok=True)
    args = [dcmtk.path("storescp"), "-aet", "STORESCP", "-od", str(out),
            "+tls", str(leaf.key), str(leaf.cert), "+cf", str(ca)]
    if not require_cert:
        args.append("-ic")
    proc = subprocess.Popen([*args, str(port)], env=dcmtk.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: port_open(port) or proc.poll() is not None, 15, what="storescp +tls")
    assert proc.poll() is None
    return proc


def test_forward_over_tls_to_orthanc_and_storescp(gateway_factory, dcmtk, orthanc_factory, ct_series,
                                                  pki, tmp_path, fast_path):
    """Delivered to Orthanc with DICOM TLS (client certificate required) and to storescp +tls;
    a peer whose certificate names another host gets nothing and the item says 'name mismatch'."""
    ca = pki["ca"]
    orthanc_leaf = ca.issue("orthanc.test")
    orthanc = orthanc_factory(
        DicomTlsEnabled=True, DicomTlsCertificate=str(orthanc_leaf.cert),
        DicomTlsPrivateKey=str(orthanc_leaf.key), DicomTlsTrustedCertificates=str(ca.ca_file),
        DicomTlsRemoteCertificateRequired=True,
    )
    scp_port, bad_port = free_port(), free_port()
    scp_out, bad_out = tmp_path / "scp-tls", tmp_path / "scp-bad"
    scp = _start_storescp_tls(dcmtk, scp_out, ca.issue("storescp.test"), ca.ca_file, scp_port)
    bad = _start_storescp_tls(dcmtk, bad_out, pki["wrong_name"], ca.ca_file, bad_port)
    client = {"ca_file": str(ca.ca_file), "cert_file": str(pki["gateway"].cert),
              "key_file": str(pki["gateway"].key)}
    try:
        gw = gateway_factory(
            destinations={
                "orthanc": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port,
                            "tls": client},
                "scp": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": scp_port, "tls": client},
                "bad": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": bad_port, "tls": client},
                "foreign": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port,
                            "tls": {**client, "ca_file": str(pki["other"].ca_file)}},
            },
            routes={"received": ["orthanc", "scp", "bad"]},
            retry={"max_attempts": 2, "initial_backoff_seconds": 0.2, "max_backoff_seconds": 0.5},
            performance={"pynetdicom_fast_path": fast_path},
        )
        echo = gw.cli("echo", "orthanc")
        assert echo.returncode == 0, echo.stderr
        assert "peer certificate O=Gateway Tests,CN=orthanc.test valid until" in echo.stdout, echo.stdout
        echo = gw.cli("echo", "bad")
        assert echo.returncode == 1 and "name mismatch" in echo.stderr, echo.stderr
        echo = gw.cli("echo", "foreign")
        assert echo.returncode == 1 and "unknown CA" in echo.stderr, echo.stderr

        files = ct_series(4, rows=64, columns=64)
        r = dcmtk.storescu(gw.port, gw.ae_title, *files, calling="MODALITY")
        assert r.returncode == 0, r.stderr

        def settled():
            d = json.loads(gw.cli("status", "--json").stdout)["destinations"]
            return d if d["orthanc"]["sent"] == 4 and d["scp"]["sent"] == 4 and d["bad"]["failed"] == 4 else None

        dests = wait_until(settled, 60, 0.5, "deliveries to settle")
        assert len(orthanc.instances()) == 4
        assert len(list(scp_out.glob("*"))) == 4
        assert "name mismatch" in dests["bad"]["last_error"]
        assert list(bad_out.glob("*")) == []  # the handshake failed: no DICOM byte was sent
        assert gw.stop() == 0
        deliveries = [e for e in _audit_events(gw) if _code(e) == "110104"
                      and e["EventIdentification"]["EventActionCode"] == "R"]
        to: dict[str, list] = {}
        for e in deliveries:  # one message per batch: the first item may go alone
            to.setdefault(e["ActiveParticipant"][1]["AlternativeUserID"], []).append(e)
        for name in ("orthanc", "scp"):
            assert {e["EventIdentification"]["EventOutcomeIndicator"] for e in to[f"destination {name}"]} == {0}
            assert sum(o["ParticipantObjectDescription"]["NumberOfInstances"]
                       for e in to[f"destination {name}"] for o in _studies(e)) == 4
            assert all(_patients(e) == [PATIENT] for e in to[f"destination {name}"])
        assert {e["EventIdentification"]["EventOutcomeIndicator"] for e in to["destination bad"]} == {8}
        assert all("name mismatch" in e["EventIdentification"]["EventOutcomeDescription"]
                   for e in to["destination bad"])
        assert "destination foreign" not in to
    finally:
        stop_process(scp)
        stop_process(bad)


def test_echo_explains_expired_and_no_shared_protocol(gateway_factory, dcmtk, pki, tmp_path):
    ca = pki["ca"]
    expired = ca.issue("expired.test", days=-1, not_before_days=-30)
    exp_port, old_port = free_port(), free_port()
    exp = _start_storescp_tls(dcmtk, tmp_path / "exp", expired, ca.ca_file, exp_port, require_cert=False)
    # a peer offering only the retired AES profile (TLS_RSA_WITH_AES_128_CBC_SHA): not BCP 195
    old = subprocess.Popen(
        [dcmtk.path("storescp"), "-aet", "OLD", "-od", str(tmp_path / "old"), "+tls",
         str(pki["gateway"].key), str(pki["gateway"].cert), "+cf", str(ca.ca_file), "-ic", "+pa",
         str(old_port)], env=dcmtk.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (tmp_path / "old").mkdir()
    try:
        wait_until(lambda: port_open(old_port) or old.poll() is not None, 15, what="storescp +pa")
        tls = {"ca_file": str(ca.ca_file)}
        gw = gateway_factory(start=False, destinations={
            "expired": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": exp_port, "tls": tls},
            "old": {"ae_title": "OLD", "host": "127.0.0.1", "port": old_port, "tls": tls},
            "down": {"ae_title": "DOWN", "host": "127.0.0.1", "port": free_port(), "tls": tls},
        })
        r = gw.cli("echo", "down")
        assert r.returncode == 1 and "cannot connect to DOWN@127.0.0.1" in r.stderr, r.stderr
        r = gw.cli("echo", "expired")
        assert r.returncode == 1 and "expired" in r.stderr, r.stderr
        r = gw.cli("echo", "old")
        assert r.returncode == 1 and "no shared protocol" in r.stderr, r.stderr
    finally:
        stop_process(exp)
        stop_process(old)


def test_dicomweb_requests_in_the_audit_trail(gateway_factory, ct_series):
    """STOW-RS, QIDO-RS, WADO-RS and a refused token: one message each, with identity and status."""
    import httpx
    import pydicom

    from tests.integration.web_node import READER_TOKEN, WRITER_TOKEN, auth_section, bearer, hashes

    gw = gateway_factory(http={"auth": auth_section(hashes())})
    files = ct_series(2, rows=64, columns=64)
    ds = pydicom.dcmread(files[0])
    study, series = ds.StudyInstanceUID, ds.SeriesInstanceUID
    boundary = "b0undary"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.read_bytes() + b"\r\n"
                    for f in files) + f"--{boundary}--\r\n".encode()
    base = gw.http_url + "/dicom-web"
    with httpx.Client(timeout=30) as http:
        r = http.post(f"{base}/studies", content=body, headers={
            **bearer(WRITER_TOKEN),
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        assert r.status_code == 200, r.text
        r = http.get(f"{base}/studies", params={"PatientID": "X*"}, headers=bearer(READER_TOKEN))
        assert r.status_code in (200, 204)
        r = http.get(f"{base}/studies/{study}/series/{series}/metadata", headers=bearer(READER_TOKEN))
        assert r.status_code == 200
        r = http.get(f"{base}/studies", headers=bearer("not-a-token-at-all-000"))
        assert r.status_code == 401
    assert gw.stop() == 0
    web = [e for e in _audit_events(gw) if "EventOutcomeDescription" in e["EventIdentification"]
           and " /dicom-web/" in e["EventIdentification"]["EventOutcomeDescription"]]
    summary = [(_code(e), e["EventIdentification"]["EventActionCode"],
                e["EventIdentification"]["EventOutcomeIndicator"], e["ActiveParticipant"][0]["UserID"])
               for e in web]
    assert summary == [("110104", "C", 0, "token:writer"), ("110112", "E", 0, "token:reader"),
                       ("110104", "R", 0, "token:reader"), ("110114", "E", 4, "-")], summary
    query = web[1]["ParticipantObjectIdentification"][0]["ParticipantObjectQuery"]
    assert query == "/dicom-web/studies?PatientID=X%2A"
    retrieved = web[2]["ParticipantObjectIdentification"][0]
    assert retrieved["ParticipantObjectID"] == study
    assert retrieved["ParticipantObjectDescription"]["SeriesInstanceUID"] == series
    assert _patients(web[2]) == [PATIENT]  # the retrieved study's patient, from the index
    stored = _studies(web[0])  # STOW-RS: what it stored, counted, and whose it is
    assert [(o["ParticipantObjectID"], o["ParticipantObjectDescription"]["NumberOfInstances"]) for o in stored] == [
        (study, 2)]
    assert stored[0]["ParticipantObjectDescription"]["Series"] == [{"SeriesInstanceUID": series, "NumberOfInstances": 2}]
    assert _patients(web[0]) == [PATIENT] and _patients(web[1]) == []  # QIDO-RS names no patient
    assert all(p["NetworkAccessPointID"] == "127.0.0.1" for e in web for p in e["ActiveParticipant"][:1])
    text = (gw.config_path.parent / "var" / "audit.jsonl").read_text()
    assert WRITER_TOKEN not in text and READER_TOKEN not in text


def test_warnings_in_check_config_and_status(gateway_factory, pki):
    """An open listener and a certificate expiring within 30 days: in check-config and status."""
    soon = pki["ca"].issue("soon.test", days=12)
    gw = gateway_factory(start=False, node={"host": "0.0.0.0", "tls": {
        "port": free_port(), "cert_file": str(soon.cert), "key_file": str(soon.key),
        "require_client_cert": False}})
    r = gw.cli("check-config")
    assert r.returncode == 0, r.stderr
    assert "warning: node.tls.cert_file: the certificate O=Gateway Tests,CN=soon.test expires on" in r.stderr
    assert "warning: node.host is 0.0.0.0 and neither security.allowed_calling_aets nor security.peers" in r.stderr
    report = json.loads(gw.cli("status", "--json").stdout)
    assert len(report["warnings"]) == 2 and "(in 11 day(s))" in report["warnings"][0]
    assert "WARNING  node.host is 0.0.0.0" in gw.cli("status").stdout
    expired = pki["ca"].issue("gone.test", days=-2, not_before_days=-20)
    bad = gateway_factory(start=False, node={"tls": {
        "port": free_port(), "cert_file": str(expired.cert), "key_file": str(pki["gateway"].key),
        "require_client_cert": True}})
    r = bad.cli("check-config")
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert lines[0].startswith("node.tls.cert_file: the certificate expired on ")
    assert lines[1].startswith("node.tls.key_file: does not match the certificate in cert_file")
    assert lines[2].startswith("node.tls.require_client_cert: needs node.tls.ca_file")


def test_listener_refuses_old_protocols_and_non_bcp195_ciphers(gateway_factory, dcmtk, pki):
    """openssl s_client with TLS 1.1, and with TLS 1.2 but a non-BCP 195 suite: refused, one line each."""
    from tests.conftest import require_program

    openssl = require_program("/usr/bin/openssl")
    tls_port = free_port()
    gw = gateway_factory(node={"tls": {"port": tls_port, "cert_file": str(pki["gateway"].cert),
                                       "key_file": str(pki["gateway"].key), "require_client_cert": False}})
    wait_until(lambda: port_open(tls_port), 10, what="the TLS listener")
    attempts = [["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"], ["-tls1_2", "-cipher", "AES128-SHA"],
                ["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"]]
    results = []
    for extra in attempts:
        r = subprocess.run([openssl, "s_client", "-connect", f"127.0.0.1:{tls_port}", "-CAfile",
                            str(pki["ca"].ca_file), *extra], input="", capture_output=True, text=True,
                           timeout=30)
        results.append(r.stdout + r.stderr)
    assert "Cipher is ECDHE-RSA-AES128-GCM-SHA256" in results[2] and "Verify return code: 0 (ok)" in results[2]
    assert "Cipher is (NONE)" in results[0] or "no protocols available" in results[0] or \
        "alert" in results[0], results[0]
    assert "Cipher is (NONE)" in results[1] or "alert handshake failure" in results[1], results[1]
    # a plain DICOM client on the TLS port is refused too, and the plain port still works
    assert dcmtk.echoscu(tls_port, gw.ae_title).returncode != 0
    assert dcmtk.echoscu(gw.port, gw.ae_title).returncode == 0
    refused = [line for line in gw.log().splitlines() if "rejected TLS connection" in line]
    assert len(refused) == 3, refused
    assert "no shared protocol" in refused[0] and "no shared protocol" in refused[1], refused
    assert "not TLS: the peer does not speak TLS on this port" in refused[2], refused
