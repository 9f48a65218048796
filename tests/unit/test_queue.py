"""The forward queue on a temporary SQLite database: backoff, state transitions, stale rows, retry."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.storage import db, index, queue
from gateway.storage.queue import State


@pytest.fixture
def conn(tmp_path):
    c = db.connect(tmp_path / "gateway.sqlite3")
    yield c
    c.close()


def add(conn, sop: str, dests=("pacs",), now: float = 100.0, ts: str = "1.2.840.10008.1.2.1"):
    with db.transaction(conn):
        index.record_instance(
            conn,
            index.InstanceRecord(
                sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_uid="1.2",
                series_uid="1.2.3", transfer_syntax=ts, path=f"store/{sop}.dcm", size=10,
                calling_ae="MOD", origin="received", received_at=now,
            ),
        )
        queue.enqueue(conn, dests, sop, now)


def row(conn, sop: str, dest: str = "pacs"):
    return conn.execute(
        "SELECT * FROM queue WHERE sop_instance_uid = ? AND destination = ?", (sop, dest)
    ).fetchone()


def claim(conn, dest="pacs", now=100.0, limit=100):
    with db.transaction(conn):
        return queue.claim_due(conn, dest, now, limit)


def fail(conn, item_id, now=100.0, max_attempts=3, permanent=False, at_least=None):
    policy = queue.RetryPolicy(max_attempts, 10.0, 600.0, rand=lambda: 1.0)  # 10 s, then 20 s, ...
    with db.transaction(conn):
        return queue.mark_attempt_failed(conn, item_id, "peer down", now, policy, permanent, at_least)


# --------------------------------------------------------------------------- backoff


def test_backoff_doubles_from_the_initial_delay_up_to_the_cap():
    full = [queue.backoff_seconds(n, 5, 600, rand=lambda: 1.0) for n in range(1, 10)]
    assert full == [5, 10, 20, 40, 80, 160, 320, 600, 600]


def test_backoff_jitter_spans_half_to_all_of_the_delay():
    assert queue.backoff_seconds(3, 5, 600, rand=lambda: 0.0) == 10
    assert queue.backoff_seconds(3, 5, 600, rand=lambda: 1.0) == 20


@given(
    attempts=st.integers(min_value=0, max_value=10_000),
    initial=st.floats(min_value=0.001, max_value=1000),
    maximum=st.floats(min_value=0.001, max_value=86400),
    r=st.floats(min_value=0, max_value=1),
)
def test_backoff_is_bounded_for_any_attempt_count(attempts, initial, maximum, r):
    delay = queue.backoff_seconds(attempts, initial, maximum, rand=lambda: r)
    cap = min(maximum, initial * 2 ** max(0, attempts - 1)) if attempts < 60 else min(maximum, initial * 2**60)
    assert 0 < delay <= cap * (1 + 1e-9)
    assert delay >= cap / 2 * (1 - 1e-9)


# --------------------------------------------------------------------------- transitions


def test_enqueue_makes_one_pending_row_per_destination(conn):
    add(conn, "1.1", dests=("pacs", "archive"))
    assert row(conn, "1.1")["state"] == State.PENDING
    assert row(conn, "1.1", "archive")["state"] == State.PENDING


def test_claim_takes_due_items_of_one_destination_in_order_and_marks_them_sending(conn):
    add(conn, "1.1", now=100)
    add(conn, "1.2", now=101)
    add(conn, "1.3", dests=("other",), now=99)
    add(conn, "1.4", now=500)  # not due yet at 200
    items = claim(conn, now=200)
    assert [i.sop_instance_uid for i in items] == ["1.1", "1.2"]
    assert all(row(conn, i.sop_instance_uid)["state"] == State.SENDING for i in items)
    assert items[0].path == "store/1.1.dcm" and items[0].transfer_syntax == "1.2.840.10008.1.2.1"
    assert items[0].claimed_at == 200
    assert claim(conn, now=200) == []  # nothing claimed twice


def test_claim_respects_the_limit(conn):
    for k in range(5):
        add(conn, f"1.{k + 1}")
    assert len(claim(conn, limit=3)) == 3
    assert len(claim(conn, limit=3)) == 2


def test_mark_sent(conn):
    add(conn, "1.1")
    (item,) = claim(conn)
    with db.transaction(conn):
        assert queue.mark_sent(conn, item.id, 101, item.claimed_at) == State.SENT
    r = row(conn, "1.1")
    assert (r["state"], r["attempts"], r["last_error"]) == ("sent", 1, None)


def test_a_resend_received_while_sending_is_sent_again(conn):
    add(conn, "1.1", now=100)
    (item,) = claim(conn, now=100)
    add(conn, "1.1", now=105)  # the modality sent a new version meanwhile
    assert row(conn, "1.1")["state"] == State.SENDING
    with db.transaction(conn):
        assert queue.mark_sent(conn, item.id, 106, item.claimed_at) == State.PENDING
    assert [i.sop_instance_uid for i in claim(conn, now=107)] == ["1.1"]


def test_a_sent_item_queued_again_is_pending_with_a_fresh_age(conn):
    add(conn, "1.1", now=100)
    (item,) = claim(conn, now=100)
    with db.transaction(conn):
        queue.mark_sent(conn, item.id, 101, item.claimed_at)
    add(conn, "1.1", now=1000)
    r = row(conn, "1.1")
    assert (r["state"], r["attempts"], r["enqueued_at"]) == ("pending", 0, 1000)


def test_failed_attempts_back_off_then_fail_with_the_last_error(conn):
    add(conn, "1.1")
    (item,) = claim(conn, now=100)
    assert fail(conn, item.id, now=100) == State.PENDING
    r = row(conn, "1.1")
    assert (r["state"], r["attempts"], r["next_attempt_at"], r["last_error"]) == ("pending", 1, 110, "peer down")
    assert claim(conn, now=109) == []
    (item,) = claim(conn, now=110)
    assert fail(conn, item.id, now=110) == State.PENDING
    assert row(conn, "1.1")["next_attempt_at"] == 130
    (item,) = claim(conn, now=130)
    assert fail(conn, item.id, now=130) == State.FAILED  # third of max_attempts=3
    r = row(conn, "1.1")
    assert (r["state"], r["attempts"], r["last_error"]) == ("failed", 3, "peer down")
    assert claim(conn, now=10_000) == []


def test_a_destination_asking_for_a_longer_wait_gets_it(conn):
    add(conn, "1.1")
    (item,) = claim(conn, now=100)
    assert fail(conn, item.id, now=100, at_least=300) == State.PENDING
    assert row(conn, "1.1")["next_attempt_at"] == 400


def test_a_permanent_refusal_fails_at_once(conn):
    add(conn, "1.1")
    (item,) = claim(conn)
    assert fail(conn, item.id, max_attempts=10, permanent=True) == State.FAILED
    assert row(conn, "1.1")["attempts"] == 1


def test_release_returns_claimed_items_untouched(conn):
    add(conn, "1.1")
    (item,) = claim(conn)
    with db.transaction(conn):
        queue.release(conn, [item.id], 150)
    r = row(conn, "1.1")
    assert (r["state"], r["attempts"], r["next_attempt_at"]) == ("pending", 0, 100)


def test_requeue_stale_returns_rows_left_sending_by_a_crash(conn):
    add(conn, "1.1")
    add(conn, "1.2")
    add(conn, "1.3")
    items = claim(conn, limit=2)
    with db.transaction(conn):
        queue.mark_sent(conn, items[0].id, 101)
        assert queue.requeue_stale(conn, 200) == 1
    assert row(conn, items[1].sop_instance_uid)["state"] == State.PENDING
    assert row(conn, items[1].sop_instance_uid)["next_attempt_at"] == 200
    assert row(conn, items[0].sop_instance_uid)["state"] == State.SENT
    with db.transaction(conn):
        assert queue.requeue_stale(conn, 300) == 0


def test_retry_failed_brings_back_one_destination_or_all(conn):
    add(conn, "1.1", dests=("pacs", "archive"))
    for dest in ("pacs", "archive"):
        (item,) = claim(conn, dest)
        fail(conn, item.id, permanent=True)
    with db.transaction(conn):
        assert queue.retry_failed(conn, "pacs", 500) == 1
    r = row(conn, "1.1")
    assert (r["state"], r["attempts"], r["next_attempt_at"]) == ("pending", 0, 500)
    assert row(conn, "1.1", "archive")["state"] == State.FAILED
    with db.transaction(conn):
        assert queue.retry_failed(conn, None, 500) == 1
    assert row(conn, "1.1", "archive")["state"] == State.PENDING


def test_destination_status_counts_states_age_and_last_error(conn):
    add(conn, "1.1", now=100)
    add(conn, "1.2", now=150)
    (first, _second) = claim(conn, now=150)
    fail(conn, first.id, now=160)
    report = queue.destination_status(conn, ["pacs", "idle"], now=200)
    pacs = report["pacs"]
    assert (pacs["pending"], pacs["sending"], pacs["sent"], pacs["failed"]) == (1, 1, 0, 0)
    assert pacs["oldest_pending_age_seconds"] == 100
    assert pacs["next_attempt_in_seconds"] == 0  # 160 + 10 = 170, already due at 200
    assert pacs["last_error"] == "peer down"
    assert report["idle"]["pending"] == 0 and report["idle"]["last_error"] is None


def test_requeue_stale_can_be_limited_to_one_destination(conn):
    add(conn, "1.1", dests=("pacs", "archive"))
    claim(conn, "pacs")
    claim(conn, "archive")
    with db.transaction(conn):
        assert queue.requeue_stale(conn, 200, "pacs") == 1
    assert row(conn, "1.1")["state"] == State.PENDING
    assert row(conn, "1.1", "archive")["state"] == State.SENDING


def test_migrations_apply_once_by_name_on_a_first_release_database(tmp_path, monkeypatch):
    """A database made by the first release (no schema_migrations table) gains each migration once."""
    import sqlite3

    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    first_release_schema = db.SCHEMA.split("CREATE TABLE IF NOT EXISTS schema_migrations")[0]
    old.executescript(first_release_schema)
    old.execute("INSERT INTO jobs (name, state, first_seen_at) VALUES ('j', 'done', 1)")
    old.commit()
    old.close()
    monkeypatch.setattr(db, "MIGRATIONS", [("test-add-column", "ALTER TABLE jobs ADD COLUMN extra TEXT;")])
    conn = db.connect(path)
    assert [r[0] for r in conn.execute("SELECT name FROM schema_migrations")] == ["test-add-column"]
    assert conn.execute("SELECT name, extra FROM jobs").fetchone()[:] == ("j", None)
    conn.close()
    conn = db.connect(path)  # a second open applies nothing again (ALTER would fail twice)
    assert db.migrate(conn) == []
    conn.close()
