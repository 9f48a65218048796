"""metrics: bounded labels, the last-hour history, and the scrape-time state collector on a real DB."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics as m
from gateway.config import parse
from gateway.storage import db, index, queue, series


def _config(tmp_path: Path, **raw):
    base = {"node": {"data_dir": str(tmp_path / "var")}, "storage": {"min_free_bytes": 12345},
            "security": {"allowed_calling_aets": ["CT01"]},
            "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}}
    base.update(raw)
    return parse(base, base_dir=tmp_path)


def _self_signed(path: Path, days: float) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days)).sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _samples(registry) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


RULES = {"routes": {"rules": [{"name": "chest", "match": {"modality": ["CT"]}, "destinations": ["pacs"]}]},
         "triggers": [{"name": "lung", "match": {"modality": ["CT"]}, "export_dir": "export"}]}


def _populated(tmp_path: Path):
    """A config, a DB with queue rows in every state, and a Metrics that saw every kind of event."""
    config = _config(tmp_path, **RULES)
    conn = db.connect(config.db_path)
    now = time.time()
    with db.transaction(conn):
        for i, state in enumerate(["pending", "pending", "failed", "sent"]):
            uid = f"1.2.3.{i + 1}"
            index.record_instance(conn, index.InstanceRecord(uid, "1.2.840.10008.5.1.4.1.1.2", "1.2", "1.2.3",
                                                             "1.2.840.10008.1.2.1", f"store/{uid}.dcm", 10,
                                                             "CT01", "received", now))
            queue.enqueue(conn, ["pacs"], uid, now - 100 + i)
            conn.execute("UPDATE queue SET state = ?, last_error = ? WHERE sop_instance_uid = ?",
                         (state, "refused" if state == "failed" else None, uid))
        series.count_rule_matches(conn, ["chest"], now)
        series.count_rule_matches(conn, ["chest"], now)
        conn.execute("INSERT INTO series_triggers (trigger, series_uid, study_uid, state, revision, last_arrival_at) "
                     "VALUES ('lung', '1.2.3', '1.2', 'fired', 2, 0), ('lung', '1.2.4', '1.2', 'open', 1, 0), "
                     "('lung', '1.2.5', '1.2', 'open', 3, 0)")
    conn.close()
    cert = tmp_path / "node.pem"
    _self_signed(cert, days=10)
    metrics = m.Metrics.for_config(config)
    metrics.registry.register(m.StateCollector(config, certificates=lambda: {"dicom": cert}))
    metrics.association(True)
    metrics.association(False, "calling_ae_not_allowed")
    metrics.received("CT01", 1000, 0.01)
    metrics.received("EVIL\x1b[2J", 500, 0.02)
    metrics.cstore_status(0)
    metrics.inbox_job("done", 1.5)
    metrics.inbox_job("failed")
    metrics.sent("pacs", 0.05)
    metrics.send_failed("pacs", for_good=False)
    metrics.send_failed("pacs", for_good=True)
    metrics.http_request("/dicom-web/studies", 200)
    return config, metrics


def exercised_sample_names(tmp_path: Path) -> set[str]:
    """Every sample name a gateway exposes once each kind of event happened (used by contrib tests)."""
    _, metrics = _populated(tmp_path)
    return {name for name, _ in _samples(metrics.registry)}


def test_every_declared_name_is_exposed_and_only_those(tmp_path):
    names = exercised_sample_names(tmp_path)
    suffixes = ("_total", "_created", "_bucket", "_count", "_sum", "_info")
    families = set()
    for n in names:
        for suffix in suffixes:
            if n.endswith(suffix) and n[: -len(suffix)] in {x.removesuffix("_total") for x in m.NAMES} | set(m.NAMES):
                n = n[: -len(suffix)]
                break
        families.add(n)
    declared = {x.removesuffix("_total") for x in m.NAMES}
    assert {f.removesuffix("_total") for f in families} == declared


def test_labels_are_bounded_to_configured_values(tmp_path):
    _, metrics = _populated(tmp_path)
    s = _samples(metrics.registry)
    assert s[("dicom_gateway_instances_received_total", (("calling_ae", "CT01"),))] == 1
    assert s[("dicom_gateway_instances_received_total", (("calling_ae", "other"),))] == 1
    assert s[("dicom_gateway_received_bytes_total", (("calling_ae", "other"),))] == 500
    assert not any("EVIL" in str(labels) for _, labels in s)
    assert s[("dicom_gateway_cstore_responses_total", (("status", "0x0000"),))] == 1
    assert s[("dicom_gateway_send_failures_total", (("destination", "pacs"),))] == 1
    assert s[("dicom_gateway_send_retries_total", (("destination", "pacs"),))] == 1


def test_state_collector_reads_the_database_at_scrape_time(tmp_path):
    config, metrics = _populated(tmp_path)
    s = _samples(metrics.registry)
    q = "dicom_gateway_queue_items"
    assert s[(q, (("destination", "pacs"), ("state", "pending")))] == 2
    assert s[(q, (("destination", "pacs"), ("state", "failed")))] == 1
    assert s[(q, (("destination", "pacs"), ("state", "sent")))] == 1
    assert s[(q, (("destination", "pacs"), ("state", "sending")))] == 0
    age = s[("dicom_gateway_queue_oldest_pending_age_seconds", (("destination", "pacs"),))]
    assert 99 <= age < 200
    assert s[("dicom_gateway_min_free_bytes", ())] == 12345
    assert s[("dicom_gateway_free_disk_bytes", ())] > 0
    assert s[("dicom_gateway_database_up", ())] == 1
    assert s[("dicom_gateway_rule_matches_total", (("rule", "chest"),))] == 2
    assert s[("dicom_gateway_trigger_fires_total", (("trigger", "lung"),))] == 2 + 0 + 2
    days = s[("dicom_gateway_certificate_expiry_seconds", (("certificate", "dicom"),))] / 86400
    assert 9.9 < days <= 10
    # the next scrape sees the DB as it is now
    conn = db.connect(config.db_path)
    with db.transaction(conn):
        queue.retry_failed(conn, "pacs", time.time())
    conn.close()
    s = _samples(metrics.registry)
    assert s[(q, (("destination", "pacs"), ("state", "failed")))] == 0
    assert s[(q, (("destination", "pacs"), ("state", "pending")))] == 3


def test_state_collector_without_a_database_yet(tmp_path):
    config = _config(tmp_path)
    registry = m.Metrics.for_config(config).registry
    registry.register(m.StateCollector(config))
    s = _samples(registry)
    assert s[("dicom_gateway_queue_items", (("destination", "pacs"), ("state", "pending")))] == 0
    assert s[("dicom_gateway_database_up", ())] == 1


def test_history_keeps_the_last_hour_per_minute():
    now = [1_000_000 * 60.0]
    h = m.History(clock=lambda: now[0])
    h.received(0.01)
    h.received(0.03)
    h.sent(0.2)
    now[0] += 60
    h.sent(None)
    snap = h.snapshot()
    assert len(snap) == 60
    assert snap[-2]["received"] == 2 and snap[-2]["store_seconds_avg"] == 0.02
    assert snap[-2]["store_seconds_max"] == 0.03 and snap[-2]["send_seconds_avg"] == 0.2
    assert snap[-1]["sent"] == 1 and snap[-1]["send_seconds_avg"] is None
    now[0] += 3600  # an hour later everything has aged out
    h.received(0.5)
    snap = h.snapshot()
    assert sum(x["received"] for x in snap) == 1 and sum(x["sent"] for x in snap) == 0
    assert len(h._buckets) <= 60
