"""Instance rows: what is stored, series lookups for the inbox, counts for ``status``."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    path: str  # relative to data_dir
    size: int
    calling_ae: str | None
    origin: str  # 'received' | 'derived' | 'manual'
    received_at: float
    job: str | None = None
    dataset_offset: int | None = None  # where the data set starts in the file (forward streams from here)
    source: str | None = None  # store.Source: dimse | stow | send | derived


def record_instance(conn: sqlite3.Connection, rec: InstanceRecord) -> None:
    """Insert or replace the row for this SOP Instance UID (a resend replaces, one row stays)."""
    conn.execute(
        """INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid,
               transfer_syntax, path, size, calling_ae, origin, job, received_at,
               dataset_offset, source)
           VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)
           ON CONFLICT(sop_instance_uid) DO UPDATE SET
               sop_class_uid=excluded.sop_class_uid, study_uid=excluded.study_uid,
               series_uid=excluded.series_uid, transfer_syntax=excluded.transfer_syntax,
               path=excluded.path, size=excluded.size, calling_ae=excluded.calling_ae,
               origin=excluded.origin, job=excluded.job, received_at=excluded.received_at,
               dataset_offset=excluded.dataset_offset, source=excluded.source""",
        (rec.sop_instance_uid, rec.sop_class_uid, rec.study_uid, rec.series_uid,
         rec.transfer_syntax, rec.path, rec.size, rec.calling_ae, rec.origin, rec.job,
         rec.received_at, rec.dataset_offset, rec.source),
    )


def get_instance(conn: sqlite3.Connection, sop_instance_uid: str) -> sqlite3.Row | None:
    return conn.execute(
        "SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
    ).fetchone()


def series_instances(conn: sqlite3.Connection, series_uid: str) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT * FROM instances WHERE series_uid = ? ORDER BY sop_instance_uid", (series_uid,)
    ).fetchall()


def study_instances(conn: sqlite3.Connection, study_uid: str) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT * FROM instances WHERE study_uid = ? ORDER BY series_uid, sop_instance_uid",
        (study_uid,),
    ).fetchall()


def absolute_path(data_dir: Path, row: sqlite3.Row) -> Path:
    return data_dir / row["path"]


def store_counts(conn: sqlite3.Connection) -> dict:
    row = conn.execute(
        """SELECT COUNT(DISTINCT study_uid) AS studies, COUNT(DISTINCT series_uid) AS series,
                  COUNT(*) AS instances, COALESCE(SUM(size), 0) AS bytes,
                  COALESCE(SUM(origin = 'derived'), 0) AS derived
           FROM instances"""
    ).fetchone()
    return dict(row)


def indexed_paths(conn: sqlite3.Connection) -> set[str]:
    """Every indexed file's path (relative to data_dir): what reconcile compares the store with."""
    return {row[0] for row in conn.execute("SELECT path FROM instances")}


def drop_missing(conn: sqlite3.Connection, paths: Iterable[str], reason: str, now: float) -> list[str]:
    """Forget the instances whose files (``paths``) are gone; their unsent queue items fail with
    ``reason``. Returns the SOP Instance UIDs forgotten (call inside a transaction)."""
    dropped = []
    for path in paths:
        for row in conn.execute("SELECT sop_instance_uid FROM instances WHERE path = ?", (path,)).fetchall():
            sop = row["sop_instance_uid"]
            conn.execute("UPDATE queue SET state = 'failed', last_error = ?, updated_at = ? "
                         "WHERE sop_instance_uid = ? AND state IN ('pending', 'sending')", (reason, now, sop))
            conn.execute("DELETE FROM instance_attributes WHERE sop_instance_uid = ?", (sop,))
            conn.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (sop,))
            dropped.append(sop)
    return dropped
