"""Store.ingest_many (STOW-RS): parallel placing, ONE index transaction, per-file outcomes in order."""

from __future__ import annotations

import sqlite3

from gateway.storage import index, qido
from gateway.storage.store import Arrival, Expected, Outcome, Source
from tests.unit.test_store import CT, SERIES, STUDY, conn, count, dataset, spooled, store  # noqa: F401

STOW = Arrival(Source.STOW, peer="127.0.0.1:5000", identity="token:ai")


def test_many_files_one_transaction_in_order(tmp_path, store, conn):
    sops = [f"1.2.3.4.{i}" for i in range(1, 7)]
    paths = [spooled(tmp_path, dataset(sop=s)) for s in sops]
    bad = spooled(tmp_path, raw=b"not dicom")
    wrong = spooled(tmp_path, dataset(sop="1.2.3.4.99", study="1.2.3.999"))
    commits = []
    conn.set_trace_callback(lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)
    items = [(p, STOW, Expected(study_uid=STUDY)) for p in paths[:3]] + [(bad, STOW, None)] + \
        [(wrong, STOW, Expected(study_uid=STUDY))] + [(p, STOW, Expected(study_uid=STUDY)) for p in paths[3:]]
    results = store.ingest_many(items, workers=4)
    conn.set_trace_callback(None)
    assert [r.outcome for r in results] == [Outcome.STORED] * 3 + [Outcome.UNREADABLE, Outcome.WRONG_STUDY] + \
        [Outcome.STORED] * 3
    assert [r.sop_instance_uid for r in results if r.outcome is Outcome.STORED] == sops
    assert len(commits) == 1, commits
    assert count(conn, "instances") == 6 and count(conn, "queue") == 12
    assert all(index.get_instance(conn, s)["source"] == "stow" for s in sops)
    assert conn.execute("SELECT COUNT(*) FROM instance_attributes WHERE patient_id = 'P1'").fetchone()[0] == 6
    assert not bad.exists() and not wrong.exists() and not any(p.exists() for p in paths)
    assert all(r.path.exists() for r in results if r.outcome is Outcome.STORED)


def test_a_failed_transaction_acknowledges_none(tmp_path, store, conn, monkeypatch):
    paths = [spooled(tmp_path, dataset(sop=f"1.2.3.5.{i}")) for i in range(1, 4)]

    def broken(conn, header):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "indexers", (qido.indexer, broken))
    results = store.ingest_many([(p, STOW, None) for p in paths])
    assert [r.outcome for r in results] == [Outcome.FAILED] * 3
    assert all("cannot index the instance" in r.reason for r in results)
    assert count(conn, "instances") == 0 and count(conn, "queue") == 0 and count(conn, "instance_attributes") == 0
    assert CT and SERIES
