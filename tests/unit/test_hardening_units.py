"""Pure hardening helpers: log escaping, the data folder's lock and modes."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from gateway.errors import DataDirInUse
from gateway.logsafe import OneLineFormatter, wire
from gateway.storage import datadir, db
from gateway.storage.files import write_atomic


@pytest.mark.parametrize("value,shown", [
    ("1.2.840.10008.1.1", "1.2.840.10008.1.1"),
    ("MODALITY", "MODALITY"),
    ("1.2\nforged", "1.2\\x0aforged"),
    ("\x1b[2J", "\\x1b[2J"),
    ("a\\x0a", "a\\\\x0a"),  # a literal backslash cannot pose as an escape
    ("caf\u00e9\u2028", "caf\\xe9\\u2028"),
    ("bad\udcff", "bad\\udcff"),  # a non-UTF-8 file name, as os.fsdecode gives it
])
def test_wire_escapes_everything_but_printable_ascii(value, shown):
    assert wire(value) == shown


def test_wire_cuts_long_values():
    assert wire("1" * 200, 10) == "1" * 10 + "..."


def test_formatter_keeps_every_message_on_one_line():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "job %s seen", ("a\nb\rc\x85",), None)
    assert OneLineFormatter("%(message)s").format(record) == "job a\\x0ab\\x0dc\\x85 seen"


def test_lock_is_exclusive_and_names_the_holder(tmp_path):
    first = datadir.lock(tmp_path / "var")
    try:
        with pytest.raises(DataDirInUse, match=f"PID {os.getpid()}"):
            datadir.lock(tmp_path / "var")
    finally:
        first.release()
    datadir.lock(tmp_path / "var").release()  # free again once released
    assert stat.S_IMODE(os.stat(tmp_path / "var").st_mode) == 0o700


def test_files_and_folders_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0o000)
    try:
        write_atomic(tmp_path / "a" / "b" / "x.dcm", lambda f: f.write(b"x"))
        conn = db.connect(tmp_path / "var" / "gateway.sqlite3")
        conn.execute("CREATE TABLE t (x)")
        conn.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "b" / "x.dcm").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "b").st_mode) == 0o700
    for name in ("gateway.sqlite3", "gateway.sqlite3-wal"):
        path = tmp_path / "var" / name
        if path.exists():
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, name


def test_secure_tightens_an_earlier_release_folder(tmp_path):
    var = tmp_path / "var"
    (var / "store").mkdir(parents=True, mode=0o755)
    (var / "gateway.sqlite3").write_bytes(b"")
    os.chmod(var, 0o755)
    os.chmod(var / "gateway.sqlite3", 0o644)
    link = var / "elsewhere"
    target = tmp_path / "public.txt"
    target.write_text("x")
    os.chmod(target, 0o644)
    link.symlink_to(target)
    datadir.secure(var, (tmp_path / "inbox" / "done",))
    for folder in (var, var / "store", var / "tmp", tmp_path / "inbox" / "done"):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(var / "gateway.sqlite3").st_mode) == 0o600
    datadir.restrict(link)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644  # never through a symlink


def test_a_resend_while_sending_is_sent_again_even_after_a_clock_step_back(tmp_path):
    from gateway.storage import index, queue

    conn = db.connect(tmp_path / "gateway.sqlite3")
    with db.transaction(conn):
        index.record_instance(conn, index.InstanceRecord(
            sop_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_uid="1.2",
            series_uid="1.2.3", transfer_syntax="1.2.840.10008.1.2.1", path="store/x.dcm", size=1,
            calling_ae="X", origin="received", received_at=1000.0))
        queue.enqueue(conn, ["pacs"], "1.2.3.4", now=1000.0)
    with db.transaction(conn):
        [item] = queue.claim_due(conn, "pacs", now=1000.0, limit=10)
    with db.transaction(conn):  # the file is replaced while it is sent; the clock stepped back
        queue.enqueue(conn, ["pacs"], "1.2.3.4", now=400.0)
    with db.transaction(conn):
        state = queue.mark_sent(conn, item.id, 1001.0, item.claimed_at, item.generation)
    assert state is queue.State.PENDING  # the new file still has to go
    with db.transaction(conn):
        [again] = queue.claim_due(conn, "pacs", now=1002.0, limit=10)
        assert queue.mark_sent(conn, again.id, 1003.0, again.claimed_at, again.generation) \
            is queue.State.SENT
    conn.close()
