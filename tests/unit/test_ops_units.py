"""Pure pieces of the operations work: the progress line, queue paging and single-item retry, job listing."""

from __future__ import annotations

import time

from gateway import progress
from gateway.storage import db, health, index, queue
from gateway.storage import jobs as job_rows


def test_progress_line_fits_and_fills():
    line = progress.render(50, 200, 25_000_000, 100_000_000, 2.0, width=80)
    assert line.startswith("[") and "50/200 files" in line and "25.0/100.0 MB" in line
    assert "12.5 MB/s" in line and "25 files/s" in line
    bar = line[1:line.index("]")]
    assert bar.count("#") == round(len(bar) / 4)  # a quarter of the bytes: a quarter of the bar
    assert len(line) < 80
    done = progress.render(200, 200, 100_000_000, 100_000_000, 4.0, width=60)
    assert "-" not in done[1:done.index("]")]
    assert progress.render(0, 0, 0, 0, 0.0).startswith("[")  # nothing to do: no division by zero
    assert progress.summary(3, 1, "pacs", 2_500_000, 0.5) == \
        "3 instance(s) queued for pacs, 1 skipped (2.5 MB in 0.5 s, 5.0 MB/s)"


def _db(tmp_path):
    conn = db.connect(tmp_path / "g.sqlite3")
    now = time.time()
    with db.transaction(conn):
        for i in range(5):
            uid = f"1.2.3.{i + 1}"
            index.record_instance(conn, index.InstanceRecord(
                uid, "1.2.840.10008.5.1.4.1.1.2", "1.2", "1.2.3", "1.2.840.10008.1.2.1", f"s/{uid}.dcm",
                10, "CT", "received", now))
            queue.enqueue(conn, ["pacs"] if i < 4 else ["ai"], uid, now + i)
        conn.execute("UPDATE queue SET state = 'failed', last_error = 'refused', attempts = 10 "
                     "WHERE sop_instance_uid IN ('1.2.3.1', '1.2.3.2')")
        conn.execute("UPDATE queue SET state = 'sent' WHERE sop_instance_uid = '1.2.3.3'")
        conn.execute("UPDATE queue SET next_attempt_at = ? WHERE sop_instance_uid = '1.2.3.4'", (now + 999,))
    return conn, now


def test_list_items_pages_and_filters(tmp_path):
    conn, _ = _db(tmp_path)
    total, items = queue.list_items(conn, "pacs", "failed", limit=1, offset=0)
    assert total == 2 and len(items) == 1
    assert items[0]["last_error"] == "refused" and items[0]["study_uid"] == "1.2"
    total2, items2 = queue.list_items(conn, "pacs", "failed", limit=1, offset=1)
    assert total2 == 2 and items2[0]["id"] != items[0]["id"]
    assert queue.list_items(conn)[0] == 5
    assert queue.list_items(conn, "ai")[0] == 1
    assert queue.list_items(conn, "pacs", "failed", offset=5)[1] == []


def test_retry_one_item(tmp_path):
    conn, now = _db(tmp_path)
    ids = {r["sop_instance_uid"]: r["id"] for r in queue.list_items(conn, limit=10)[1]}
    with db.transaction(conn):
        assert queue.retry_item(conn, ids["1.2.3.1"], now) is queue.State.PENDING
        assert queue.retry_item(conn, ids["1.2.3.3"], now) is queue.State.SENT  # sent stays sent
        assert queue.retry_item(conn, ids["1.2.3.4"], now) is queue.State.PENDING  # due now
        assert queue.retry_item(conn, 99999, now) is None
    rows = {r["sop_instance_uid"]: r for r in queue.list_items(conn, limit=10)[1]}
    assert rows["1.2.3.1"]["state"] == "pending" and rows["1.2.3.1"]["attempts"] == 0
    assert rows["1.2.3.2"]["state"] == "failed"  # only the one asked for
    assert rows["1.2.3.4"]["next_attempt_at"] == now
    claimed = queue.claim_due(conn, "pacs", now, 10)
    assert {c.sop_instance_uid for c in claimed} == {"1.2.3.1", "1.2.3.4"}


def test_list_jobs_and_health_probe(tmp_path):
    conn, now = _db(tmp_path)
    with db.transaction(conn):
        conn.execute("INSERT INTO jobs (name, state, first_seen_at, finished_at, error) VALUES "
                     "('a', 'failed', 1, 5, 'bad shape'), ('b', 'done', 2, 6, NULL), ('c', 'waiting', 3, NULL, NULL)")
    total, jobs = job_rows.page(conn)
    assert total == 3 and [j["name"] for j in jobs] == ["b", "a", "c"]
    total, jobs = job_rows.page(conn, "failed")
    assert total == 1 and jobs[0]["error"] == "bad shape"
    health.probe_write(conn, now)
    health.probe_write(conn, now + 1)
    assert conn.execute("SELECT checked_at FROM health").fetchall()[0][0] == now + 1
