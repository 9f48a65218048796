"""Forwarding over STOW-RS against real servers: Orthanc's DICOMweb plugin (Basic auth, HTTPS with a
test CA), and a small scripted server for what Orthanc cannot be made to answer (202 with
failures, 413, 429 with Retry-After, garbage) plus an OAuth2 token endpoint.

The Orthanc scenarios run `dicom-gateway run`; the scripted ones call the sender's
``run_once`` directly so each answer's effect on the queue is checked step by step.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from gateway import audit as audit_trail
from gateway import config as config_mod
from gateway.forward.sender import Sender
from gateway.storage import db, queue, sendfiles
from tests.conftest import gateway_config, wait_until
from tests.integration.dicomweb_peers import (
    PASSWORD,
    USER,
    StowPeer,
    dataset_bytes,
    make_ca,
    make_orthanc_web,
    store_all,
    stow_response,
)
from tests.integration.web_node import READER_TOKEN, WRITER_TOKEN, web_node  # noqa: F401

SMALL = {"rows": 64, "columns": 64}


def secret_file(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture
def orthanc_web(tmp_path):
    """Factory: Orthanc with the DICOMweb plugin and Basic auth; stopped by PID at teardown."""
    started = []

    def start(name="orthanc-web", **kw):
        orthanc = make_orthanc_web(tmp_path / name, **kw)
        orthanc.start()
        started.append(orthanc)
        return orthanc

    yield start
    for orthanc in started:
        orthanc.stop()


@pytest.fixture
def stow_peer():
    peers = []

    def start(**kw) -> StowPeer:
        peer = StowPeer(**kw).start()
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.stop()


def basic_dest(url: str, folder: Path, password: str = PASSWORD, **extra) -> dict:
    pw = secret_file(folder, "orthanc-password", password)
    return {"type": "dicomweb", "url": url, "auth": {"type": "basic", "username": USER,
                                                     "password_file": str(pw)}, **extra}


def queue_rows(db_path: Path, dest: str) -> dict[str, dict]:
    """SOP Instance UID -> the queue row (state, attempts, last_error, next_attempt_at)."""
    conn = db.connect_readonly(db_path)
    try:
        return {r["sop_instance_uid"]: dict(r) for r in conn.execute(
            "SELECT sop_instance_uid, state, attempts, last_error, next_attempt_at FROM queue "
            "WHERE destination = ?", (dest,))}
    finally:
        conn.close()


def counts(gw, dest: str) -> dict:
    result = gw.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["destinations"][dest]


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# --------------------------------------------------------------------------- Orthanc, Basic auth


def test_received_series_and_inbox_result_reach_orthanc_byte_identical(
        tmp_path, dcmtk, orthanc_web, ct_series, gateway_factory):
    orthanc = orthanc_web()
    folder = tmp_path / "gw"
    gw = gateway_factory(
        folder,
        destinations={"cloud": basic_dest(orthanc.dicomweb_url, folder)},
        routes={"received": ["cloud"], "results": ["cloud"]},
        inbox={"poll_interval_seconds": 0.2},
    )
    paths = ct_series(6, **SMALL)
    result = dcmtk.storescu(gw.port, gw.ae_title, *paths)
    assert result.returncode == 0, result.stderr
    source = pydicom.dcmread(paths[0], stop_before_pixels=True)
    inbox = folder / "inbox"
    mask = np.zeros((6, 64, 64), bool)
    mask[1:4, 10:30, 10:30] = True
    np.save(inbox / "mask.npy", mask)
    (inbox / ".mask.yaml.tmp").write_text(yaml.safe_dump(
        {"source": {"series_instance_uid": str(source.SeriesInstanceUID)}, "series_description": "AI"}))
    (inbox / ".mask.yaml.tmp").rename(inbox / "mask.yaml")
    wait_until(lambda: counts(gw, "cloud")["sent"] == 7, 60, 0.2, "6 received + 1 derived sent")
    d = counts(gw, "cloud")
    assert (d["failed"], d["pending"], d["type"], d["address"]) == (0, 0, "dicomweb", orthanc.dicomweb_url)
    assert orthanc.count() == 7
    for path in paths:  # the received series: Orthanc's file holds exactly our data set bytes
        orthanc_id = orthanc.find_instance(uid_of(path))
        assert dataset_bytes(orthanc.instance_file(orthanc_id)) == dataset_bytes(path)
    conn = db.connect_readonly(folder / "var" / "gateway.sqlite3")
    derived = [dict(r) for r in conn.execute("SELECT sop_instance_uid, path FROM instances "
                                             "WHERE origin != 'received'")]
    conn.close()
    assert len(derived) == 1
    stored = folder / "var" / derived[0]["path"]
    in_orthanc = orthanc.instance_file(orthanc.find_instance(derived[0]["sop_instance_uid"]))
    assert dataset_bytes(in_orthanc) == dataset_bytes(stored)
    assert pydicom.dcmread(io.BytesIO(in_orthanc)).Modality == "SEG"
    assert sorted(orthanc.received()) == sorted([uid_of(p) for p in paths] + [derived[0]["sop_instance_uid"]])
    # our requests put nothing in the PACS's error log (a list in Accept made Orthanc log an
    # "Unsupported return MIME type" error line for every request)
    assert [line for line in orthanc.log.read_text(errors="replace").splitlines() if line.startswith("E")] == []
    log = gw.log()
    assert log.count("sent SOP") == 7
    assert PASSWORD not in log
    assert gw.stop() == 0
    transfers = [e for e in audit_trail.read(folder / "var" / "audit.jsonl")
                 if e["EventIdentification"]["EventID"]["csd-code"] == "110104"
                 and e["ActiveParticipant"][1]["UserID"] == orthanc.dicomweb_url]
    assert transfers and all(e["EventIdentification"]["EventOutcomeIndicator"] == 0 for e in transfers)
    assert transfers[0]["ActiveParticipant"][1]["AlternativeUserID"] == "destination cloud"
    assert sum(o["ParticipantObjectDescription"]["NumberOfInstances"]
               for e in transfers for o in e["ParticipantObjectIdentification"]
               if o["ParticipantObjectTypeCode"] == 2) == 7
    patients = {o["ParticipantObjectID"] for e in transfers for o in e["ParticipantObjectIdentification"]
                if o["ParticipantObjectTypeCode"] == 1}
    assert patients == {"PID0001"}  # sources and the SEG derived from them: one patient


def test_a_routing_rule_sends_received_instances_to_a_dicomweb_destination(
        tmp_path, dcmtk, orthanc_web, gateway_factory):
    """routes.rules name a DICOMweb destination like any other: only the matching instances go."""
    from tests.helpers_series import make_series

    orthanc = orthanc_web()
    folder = tmp_path / "gw"
    gw = gateway_factory(
        folder,
        destinations={"cloud": basic_dest(orthanc.dicomweb_url, folder)},
        routes={"rules": [{"name": "ct-to-cloud", "match": {"modality": ["CT"]}, "destinations": ["cloud"]}]},
    )
    study = pydicom.uid.generate_uid()
    ct = make_series(tmp_path / "ct", 3, "CT", study_uid=study)
    mr = make_series(tmp_path / "mr", 2, "MR", study_uid=study)
    result = dcmtk.storescu(gw.port, gw.ae_title, *ct, *mr)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: counts(gw, "cloud")["sent"] == 3, 60, 0.2, "the CT series sent to cloud")
    report = json.loads(gw.cli("status", "--json").stdout)
    assert report["rules"]["ct-to-cloud"]["matches"] == 3
    assert report["queue_totals"]["pending"] == 0 and report["queue_totals"]["failed"] == 0
    assert sorted(orthanc.received()) == sorted(uid_of(p) for p in ct)  # the MR went nowhere
    for path in ct:
        assert dataset_bytes(orthanc.instance_file(orthanc.find_instance(uid_of(path)))) == dataset_bytes(path)


def test_wrong_password_fails_for_good_with_the_servers_reason(tmp_path, orthanc_web, ct_series,
                                                               gateway_factory):
    orthanc = orthanc_web()
    folder = tmp_path / "gw"
    gw = gateway_factory(folder, destinations={"cloud": basic_dest(orthanc.dicomweb_url, folder, "Wr0ng-Passw0rd")},
                         retry={"max_attempts": 5})
    paths = ct_series(3, **SMALL)
    assert gw.cli("send", "cloud", paths[0].parent).returncode == 0
    wait_until(lambda: counts(gw, "cloud")["failed"] == 3, 30, 0.2, "3 failed")
    rows = queue_rows(folder / "var" / "gateway.sqlite3", "cloud")
    assert {r["attempts"] for r in rows.values()} == {1}  # at once, not after five tries
    reason = next(iter(rows.values()))["last_error"]
    assert reason.startswith("cloud answered HTTP 401 Unauthorized")
    assert "the credentials were refused: check auth" in reason
    assert orthanc.count() == 0
    echo = gw.cli("echo", "cloud")
    assert echo.returncode == 1
    assert echo.stderr.startswith("dicom-gateway: auth: cloud refused our credentials (HTTP 401")
    assert "Wr0ng-Passw0rd" not in gw.log()


def test_orthanc_down_then_up_all_delivered_none_twice(tmp_path, orthanc_web, ct_series, gateway_factory):
    orthanc = orthanc_web()
    orthanc.stop()
    folder = tmp_path / "gw"
    gw = gateway_factory(
        folder,
        destinations={"cloud": basic_dest(orthanc.dicomweb_url, folder, max_request_bytes="40 kB")},
        retry={"max_attempts": 100, "initial_backoff_seconds": 0.3, "max_backoff_seconds": 1},
    )
    paths = ct_series(12, **SMALL)
    assert gw.cli("send", "cloud", paths[0].parent).returncode == 0

    db_path = folder / "var" / "gateway.sqlite3"

    def backing_off():
        rows = queue_rows(db_path, "cloud").values()
        return len(rows) == 12 and all(r["attempts"] >= 1 and r["state"] in ("pending", "sending")
                                       for r in rows)

    wait_until(backing_off, 30, 0.1, "the queue to back off")
    shown = counts(gw, "cloud")
    assert "connect: connection refused" in shown["last_error"]
    assert shown["failed"] == 0 and shown["sent"] == 0 and shown["pending"] + shown["sending"] == 12
    echo = gw.cli("echo", "cloud")
    assert echo.returncode == 1 and "connect: connection refused" in echo.stderr
    orthanc.start()
    wait_until(lambda: {r["state"] for r in queue_rows(db_path, "cloud").values()} == {"sent"}, 60, 0.1,
               "all 12 sent after Orthanc is back")
    assert counts(gw, "cloud")["failed"] == 0
    received = orthanc.received()
    assert sorted(received) == sorted(uid_of(p) for p in paths)  # each exactly once
    assert orthanc.count() == 12
    echo = gw.cli("echo", "cloud")
    assert echo.returncode == 0, echo.stderr
    assert echo.stdout.startswith(f"QIDO-RS cloud: HTTP 200 from {orthanc.dicomweb_url}/studies?limit=1")


def test_https_with_a_test_ca_verified_by_default_refused_on_a_wrong_ca(tmp_path, stow_peer, ct_series,
                                                                       gateway_factory):
    ca = make_ca(tmp_path / "ca")
    other = make_ca(tmp_path / "other-ca", name="Someone Else's CA")
    peer = stow_peer(tls=(ca["cert"], ca["key"]))
    assert peer.url.startswith("https://")
    folder = tmp_path / "gw"
    good = {"type": "dicomweb", "url": peer.url, "tls": {"ca_file": str(ca["ca"])}}
    wrong = {"type": "dicomweb", "url": peer.url, "tls": {"ca_file": str(other["ca"])}}
    system = {"type": "dicomweb", "url": peer.url}  # no ca_file: the system CAs do not know ours
    gw = gateway_factory(folder, destinations={"good": good, "wrong": wrong, "system": system},
                         retry={"max_attempts": 2, "initial_backoff_seconds": 0.2})
    paths = ct_series(2, **SMALL)
    for dest in ("good", "wrong", "system"):
        assert gw.cli("send", dest, paths[0].parent).returncode == 0
    db_path = folder / "var" / "gateway.sqlite3"

    def states(dest):
        return [r["state"] for r in queue_rows(db_path, dest).values()]

    wait_until(lambda: states("good") == ["sent"] * 2, 30, 0.1, "sent over verified HTTPS")
    for dest in ("wrong", "system"):
        wait_until(lambda dest=dest: states(dest) == ["failed"] * 2, 30, 0.1, f"{dest}: failed")
        for row in queue_rows(db_path, dest).values():
            assert "TLS: the server's certificate was not accepted (unable to get local issuer " \
                   "certificate)" in row["last_error"], row["last_error"]
    echo = gw.cli("echo", "wrong")
    assert echo.returncode == 1
    assert echo.stderr.startswith("dicom-gateway: TLS: the server's certificate was not accepted")
    assert gw.cli("echo", "good").returncode == 0
    assert sorted(peer.stored) == sorted(uid_of(p) for p in paths)  # only the verified destination's


def test_https_server_requiring_a_client_certificate(tmp_path, stow_peer, ct_series, gateway_factory):
    """ssl.CERT_REQUIRED with the test CA: our certificate from it delivers; none, or one from
    another CA, fails with a reason that says which; echo says the same."""
    ca = make_ca(tmp_path / "ca")
    other = make_ca(tmp_path / "other-ca", name="Someone Else's CA")
    peer = stow_peer(tls=(ca["cert"], ca["key"]), client_ca=ca["ca"])
    tls = {"ca_file": str(ca["ca"])}
    dests = {
        "withcert": {"type": "dicomweb", "url": peer.url, "tls": {
            **tls, "client_cert_file": str(ca["client_cert"]), "client_key_file": str(ca["client_key"])}},
        "nocert": {"type": "dicomweb", "url": peer.url, "tls": tls},
        "othercert": {"type": "dicomweb", "url": peer.url, "tls": {
            **tls, "client_cert_file": str(other["client_cert"]),
            "client_key_file": str(other["client_key"])}},
    }
    folder = tmp_path / "gw"
    gw = gateway_factory(folder, destinations=dests, retry={"max_attempts": 2, "initial_backoff_seconds": 0.2})
    paths = ct_series(2, **SMALL)
    for dest in dests:
        assert gw.cli("send", dest, paths[0].parent).returncode == 0
    db_path = folder / "var" / "gateway.sqlite3"

    def states(dest):
        return [r["state"] for r in queue_rows(db_path, dest).values()]

    wait_until(lambda: states("withcert") == ["sent"] * 2, 30, 0.1, "sent with the client certificate")
    reasons = {
        "nocert": "TLS: the server requires a client certificate and we sent none (tlsv13 alert "
                  "certificate required): set tls.client_cert_file and tls.client_key_file",
        "othercert": "TLS: the server refused our client certificate (tlsv1 alert unknown ca): "
                     "tls.client_cert_file must be valid and signed by a CA the server trusts",
    }
    for dest, reason in reasons.items():
        wait_until(lambda dest=dest: states(dest) == ["failed"] * 2, 30, 0.1, f"{dest}: failed")
        for row in queue_rows(db_path, dest).values():
            assert reason in row["last_error"], row["last_error"]
        echo = gw.cli("echo", dest)
        assert echo.returncode == 1, echo.stdout
        assert echo.stderr.startswith(f"dicom-gateway: {reason} ({peer.url}/studies)"), echo.stderr
    echo = gw.cli("echo", "withcert")
    assert echo.returncode == 0, echo.stderr
    assert echo.stdout.startswith(f"QIDO-RS withcert: HTTP 200 from {peer.url}/studies?limit=1")
    # only the request with our certificate got through the handshake to the server
    assert sorted(peer.stored) == sorted(uid_of(p) for p in paths)
    assert len(peer.requests) == 1


# --------------------------------------------------------------------------- a scripted server


def sender_for(tmp_path: Path, dest: dict, clock=time.time, **sections) -> tuple[Sender, Path]:
    folder = tmp_path / "gw"
    folder.mkdir(parents=True, exist_ok=True)
    sections.setdefault("retry", {"max_attempts": 5, "initial_backoff_seconds": 1, "max_backoff_seconds": 2})
    cfg = config_mod.load(gateway_config(folder, destinations={"web": dest}, **sections))
    return Sender(cfg, "web", clock=clock, rand=lambda: 1.0), cfg.db_path


def queue_all(sender: Sender, paths) -> list[str]:
    report = sendfiles.queue_files(sender.config, "web", [paths[0].parent])
    assert report.queued == len(paths) and not report.problems
    return [uid_of(p) for p in paths]


def make_due(db_path: Path) -> None:
    conn = db.connect(db_path)
    with db.transaction(conn):
        conn.execute("UPDATE queue SET next_attempt_at = 0 WHERE state = 'pending'")
    conn.close()


def test_202_with_failures_marks_each_instance_by_its_own_entry(tmp_path, stow_peer, ct_series):
    paths = ct_series(5, **SMALL)
    uids = [uid_of(p) for p in paths]

    def script(peer, request):
        ok = [u for u in request.uids if u in (uids[0], uids[1])]
        return 202, {"Content-Type": "application/dicom+json"}, stow_response(
            referenced=ok, failed={uids[2]: 0xA700, uids[3]: 0xC000})  # uids[4]: not mentioned

    peer = stow_peer(script=script)
    sender, db_path = sender_for(tmp_path, {"type": "dicomweb", "url": peer.url})
    queue_all(sender, paths)
    assert sender.run_once() == 2
    sender.close()
    rows = queue_rows(db_path, "web")
    assert [rows[u]["state"] for u in uids] == ["sent", "sent", "pending", "failed", "pending"]
    assert "Failure Reason 0xA700 (refused: out of resources)" in rows[uids[2]]["last_error"]
    assert rows[uids[3]]["last_error"] == "web refused it (HTTP 202): Failure Reason 0xC000 (cannot understand)"
    assert rows[uids[4]]["last_error"] == "web answered HTTP 202 without mentioning this instance"
    assert len(peer.requests) == 1 and sorted(peer.requests[0].uids) == sorted(uids)
    request = peer.requests[0]
    assert request.transfer_encoding == "chunked" and request.content_length > 5 * 8192  # streamed
    assert request.content_type.startswith('multipart/related; type="application/dicom"; boundary=')


def test_413_splits_the_request_and_one_instance_too_large_fails(tmp_path, stow_peer, ct_series):
    paths = ct_series(5, **SMALL)
    big = ct_series(1, rows=128, columns=128)

    def script(peer, request):
        if len(request.uids) > 2 or request.content_length > 30_000:
            return 413, {"Content-Type": "text/plain"}, b"Request Entity Too Large: limit 30000 bytes"
        return store_all(peer, request)

    peer = stow_peer(script=script)
    sender, db_path = sender_for(tmp_path, {"type": "dicomweb", "url": peer.url})
    uids = queue_all(sender, paths)
    big_uid = queue_all(sender, big)[0]
    assert sender.run_once() == 5
    sender.close()
    rows = queue_rows(db_path, "web")
    assert all(rows[u]["state"] == "sent" for u in uids)
    assert rows[big_uid]["state"] == "failed" and rows[big_uid]["attempts"] == 1
    assert rows[big_uid]["last_error"].startswith("web answered HTTP 413 Request Entity Too Large: "
                                                  "Request Entity Too Large: limit 30000 bytes")
    assert "is too large for the server" in rows[big_uid]["last_error"]
    assert sorted(peer.stored) == sorted(uids)  # each stored once
    sizes = [len(r.uids) for r in peer.requests]
    assert sizes[0] == 6 and max(sizes[1:]) <= 3 and sizes.count(1) >= 1


def test_429_with_retry_after_waits_that_long_and_stops_the_pass(tmp_path, stow_peer, ct_series):
    paths = ct_series(6, **SMALL)
    answers = iter([(429, {"Retry-After": "120", "Content-Type": "text/plain"}, b"slow down")])

    def script(peer, request):
        return next(answers, None) or store_all(peer, request)

    peer = stow_peer(script=script)
    now = [time.time()]
    sender, db_path = sender_for(tmp_path, {"type": "dicomweb", "url": peer.url, "max_request_bytes": 20_000},
                                 clock=lambda: now[0])
    uids = queue_all(sender, paths)
    now[0] = time.time()
    assert sender.run_once() == 0
    assert len(peer.requests) == 1  # the rest of the pass waited instead of hammering
    rows = queue_rows(db_path, "web")
    assert {r["state"] for r in rows.values()} == {"pending"}
    assert all(r["next_attempt_at"] >= now[0] + 120 for r in rows.values())  # not the 1 s backoff
    assert rows[uids[0]]["last_error"] == "web answered HTTP 429 Too Many Requests: slow down"
    now[0] += 60
    assert sender.run_once() == 0 and len(peer.requests) == 1  # not due yet
    now[0] += 61
    assert sender.run_once() == 6
    sender.close()
    assert sorted(peer.stored) == sorted(uids)


def test_garbage_and_5xx_mark_nothing_sent_and_a_later_answer_delivers(tmp_path, stow_peer, ct_series):
    paths = ct_series(4, **SMALL)
    answers = iter([
        (200, {"Content-Type": "application/dicom+json"}, b"\x00\xffnot json at all"),
        (503, {"Content-Type": "text/html"}, b"<html><body><h1>Service Unavailable</h1></body></html>"),
        (200, {"Content-Type": "text/plain"}, b""),
    ])

    def script(peer, request):
        return next(answers, None) or store_all(peer, request)

    peer = stow_peer(script=script)
    sender, db_path = sender_for(tmp_path, {"type": "dicomweb", "url": peer.url})
    uids = queue_all(sender, paths)
    errors = []
    for _ in range(3):
        assert sender.run_once() == 0
        rows = queue_rows(db_path, "web")
        assert {r["state"] for r in rows.values()} == {"pending"}
        errors.append(rows[uids[0]]["last_error"])
        make_due(db_path)
    assert errors[0].startswith("web answered HTTP 200 but its response cannot be read: invalid DICOM JSON")
    assert errors[1] == "web answered HTTP 503 Service Unavailable: Service Unavailable"
    assert errors[2] == "web answered HTTP 200 but its response cannot be read: the response has no body"
    assert sender.run_once() == 4
    sender.close()
    rows = queue_rows(db_path, "web")
    assert {r["state"] for r in rows.values()} == {"sent"} and {r["attempts"] for r in rows.values()} == {4}


def test_oauth2_token_refreshed_before_expiry_and_once_on_401(tmp_path, stow_peer, ct_series):
    peer = stow_peer(token_lifetime=2.0, require_token=True)
    folder = tmp_path / "gw"
    cs = secret_file(folder, "client-secret", peer.client_secret)
    dest = {"type": "dicomweb", "url": peer.url, "auth": {
        "type": "oauth2", "token_url": f"{peer.base}/token", "client_id": "gateway",
        "client_secret_file": str(cs), "scope": "stow"}}
    sender, db_path = sender_for(tmp_path, dest)
    first = ct_series(2, **SMALL)
    queue_all(sender, first)
    assert sender.run_once() == 2
    assert [r.authorization for r in peer.requests] == ["Bearer token-1"]
    assert peer.token_requests[0] == {"grant_type": "client_credentials", "client_id": "gateway",
                                      "client_secret": peer.client_secret, "scope": "stow"}
    time.sleep(1.7)  # inside token-1's 2 s life, past its renewal point (a fifth before expiry)
    second = ct_series(2, **SMALL)
    queue_all(sender, second)
    assert sender.run_once() == 2
    assert peer.requests[-1].authorization == "Bearer token-2" and peer.rejected_401 == 0
    peer.revoke_tokens()  # the server forgets token-2 early: a 401, one new token, one resend
    third = ct_series(2, **SMALL)
    queue_all(sender, third)
    assert sender.run_once() == 2
    assert peer.rejected_401 == 1
    assert [r.authorization for r in peer.requests[-2:]] == ["Bearer token-2", "Bearer token-3"]
    assert len(peer.token_requests) == 3
    peer.client_secret = "rotated"  # the endpoint now refuses us: failed for good with its words
    peer.revoke_tokens()
    fourth = ct_series(1, **SMALL)
    uid = queue_all(sender, fourth)[0]
    assert sender.run_once() == 0
    sender.close()
    row = queue_rows(db_path, "web")[uid]
    assert row["state"] == "failed"
    assert "refused the client credentials (HTTP 401): invalid_client" in row["last_error"]
    assert sorted(peer.stored) == sorted(uid_of(p) for p in first + second + third)


def test_bearer_token_file_change_is_picked_up_without_restart(tmp_path, stow_peer, ct_series):
    peer = stow_peer(require_token=True, token_lifetime=3600)
    folder = tmp_path / "gw"
    peer.tokens["static-one"] = time.monotonic() + 3600
    token = secret_file(folder, "token", "static-one\n")
    sender, db_path = sender_for(tmp_path, {"type": "dicomweb", "url": peer.url,
                                            "auth": {"type": "bearer", "token_file": str(token)}})
    queue_all(sender, ct_series(1, **SMALL))
    assert sender.run_once() == 1
    peer.revoke_tokens()
    peer.tokens["static-two"] = time.monotonic() + 3600
    token.write_text("static-two-rotated\n")
    peer.tokens["static-two-rotated"] = time.monotonic() + 3600
    queue_all(sender, ct_series(1, **SMALL))
    assert sender.run_once() == 1
    assert peer.requests[-1].authorization == "Bearer static-two-rotated"
    peer.revoke_tokens()  # refused, and the file did not change: failed for good
    uid = queue_all(sender, ct_series(1, **SMALL))[0]
    assert sender.run_once() == 0
    sender.close()
    row = queue_rows(db_path, "web")[uid]
    assert row["state"] == "failed" and "HTTP 401" in row["last_error"] and row["attempts"] == 1
    assert "token expired or unknown" in row["last_error"]


def test_requests_share_one_kept_alive_connection(tmp_path, stow_peer, ct_series):
    """Several requests in a pass and across passes go over the same TCP connection."""
    peer = stow_peer()
    sender, _ = sender_for(tmp_path, {"type": "dicomweb", "url": peer.url, "max_request_bytes": 10_000})
    queue_all(sender, ct_series(4, **SMALL))
    assert sender.run_once() == 4
    queue_all(sender, ct_series(2, **SMALL))
    assert sender.run_once() == 2
    sender.close()
    assert len(peer.requests) == 6
    assert len({r.client_port for r in peer.requests}) == 1


def test_a_server_wanting_content_length_gets_it_after_its_411_and_chunked_false_sends_it_at_once(
        tmp_path, stow_peer, ct_series):
    """Chunked by default; 411 Length Required: the same request again with Content-Length, and
    every later one; ``chunked: false`` never tries chunked."""
    paths = ct_series(4, **SMALL)
    peer = stow_peer(length_required=True)
    sender, db_path = sender_for(tmp_path, {"type": "dicomweb", "url": peer.url, "max_request_bytes": 10_000})
    uids = queue_all(sender, paths)
    assert sender.run_once() == 4
    sender.close()
    assert peer.refused_411 == 1  # only the first request was chunked
    assert [r.transfer_encoding for r in peer.requests] == [None] * 4  # 4 requests stored, all with a length
    assert sorted(peer.stored) == sorted(uids)
    assert {r["state"] for r in queue_rows(db_path, "web").values()} == {"sent"}

    peer2 = stow_peer(length_required=True)
    sender2, _ = sender_for(tmp_path / "two", {"type": "dicomweb", "url": peer2.url, "chunked": False})
    queue_all(sender2, paths)
    assert sender2.run_once() == 4
    sender2.close()
    assert peer2.refused_411 == 0 and len(peer2.requests) == 1
    assert peer2.requests[0].transfer_encoding is None


# --------------------------------------------------------------------------- the gateway's own STOW-RS server


def test_forward_to_another_gateways_stow_rs_with_a_bearer_token(tmp_path, dcmtk, web_node, ct_series,
                                                                 gateway_factory):
    """The second real server: a gateway's own DICOMweb node (auth on); a write token stores, a read token is
    refused for good (403) with the server's words."""
    node = web_node()
    folder = tmp_path / "gw"
    writer = secret_file(folder, "writer-token", WRITER_TOKEN + "\n")
    reader = secret_file(folder, "reader-token", READER_TOKEN + "\n")
    gw = gateway_factory(folder, destinations={
        "node": {"type": "dicomweb", "url": node.dicomweb, "auth": {"type": "bearer", "token_file": str(writer)}},
        "readonly": {"type": "dicomweb", "url": node.dicomweb,
                     "auth": {"type": "bearer", "token_file": str(reader)}},
    }, routes={"received": ["node", "readonly"]})
    paths = ct_series(4, **SMALL)
    result = dcmtk.storescu(gw.port, gw.ae_title, *paths)
    assert result.returncode == 0, result.stderr
    db_path = folder / "var" / "gateway.sqlite3"
    wait_until(lambda: [r["state"] for r in queue_rows(db_path, "node").values()] == ["sent"] * 4, 60, 0.1,
               "4 sent to the other gateway")
    wait_until(lambda: [r["state"] for r in queue_rows(db_path, "readonly").values()] == ["failed"] * 4, 60,
               0.1, "4 failed for the read-only token")
    rows = {r["sop_instance_uid"]: r for r in node.instance_rows()}
    assert sorted(rows) == sorted(uid_of(p) for p in paths)
    for path in paths:
        stored = node.config.node.data_dir / rows[uid_of(path)]["path"]
        assert dataset_bytes(stored) == dataset_bytes(path)
    reason = next(iter(queue_rows(db_path, "readonly").values()))["last_error"]
    assert reason.startswith("readonly answered HTTP 403 Forbidden"), reason
    assert gw.cli("echo", "node").returncode == 0
    assert WRITER_TOKEN not in gw.log() and READER_TOKEN not in gw.log()
