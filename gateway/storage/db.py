"""The SQLite database under ``data_dir``: one schema and one ``transaction()`` for index, jobs and queue.

WAL mode lets the CLI's ``status`` read while ``run`` writes; ``synchronous=FULL`` makes a
committed transaction survive power loss, because Success to a peer promises exactly that.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

#: The schema the first release created (user_version 1); later changes are MIGRATIONS.
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid    TEXT NOT NULL,
    study_uid        TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    transfer_syntax  TEXT NOT NULL,
    path             TEXT NOT NULL,       -- relative to data_dir
    size             INTEGER NOT NULL,
    calling_ae       TEXT,                -- NULL for derived objects
    origin           TEXT NOT NULL,       -- 'received' | 'derived' | 'manual'
    job              TEXT,                -- inbox job name for derived objects
    received_at      REAL NOT NULL        -- unix time
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);

CREATE TABLE IF NOT EXISTS queue (
    id               INTEGER PRIMARY KEY,
    destination      TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    state            TEXT NOT NULL,       -- queue.State: pending | sending | sent | failed
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL NOT NULL,
    last_error       TEXT,
    enqueued_at      REAL NOT NULL,
    updated_at       REAL NOT NULL,
    UNIQUE (destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS queue_due ON queue(destination, state, next_attempt_at);

CREATE TABLE IF NOT EXISTS jobs (
    name             TEXT PRIMARY KEY,    -- inbox job name (file stem)
    state            TEXT NOT NULL,       -- inbox.JobState: waiting | done | failed
    first_seen_at    REAL NOT NULL,
    finished_at      REAL,
    sop_instance_uid TEXT,                -- the derived object, once done
    series_uid       TEXT,
    error            TEXT
);

CREATE TABLE IF NOT EXISTS schema_migrations (
    name             TEXT PRIMARY KEY,    -- a MIGRATIONS entry, applied once
    applied_at       REAL NOT NULL
);
"""

#: Changes to the schema since the first release, applied once each, in this order, by name
#: (not by number, so changes made on parallel branches never collide). Never edit or
#: remove an entry that has landed: a data folder of an earlier release must open.
#: Append ``(name, sql_script)``; the script runs in the same transaction as its record.
MIGRATIONS: list[tuple[str, str]] = [
    ("routing_rules_and_series_triggers", """
CREATE TABLE rule_matches (
    rule             TEXT PRIMARY KEY,    -- routes.rules[].name
    matches          INTEGER NOT NULL,    -- instances it routed
    last_match_at    REAL NOT NULL
);
CREATE TABLE series_triggers (
    trigger          TEXT NOT NULL,       -- triggers[].name
    series_uid       TEXT NOT NULL,
    study_uid        TEXT NOT NULL,
    state            TEXT NOT NULL,       -- triggers.SeriesState: open | fired
    revision         INTEGER NOT NULL,    -- 1, then +1 each time a late instance reopens it
    last_arrival_at  REAL NOT NULL,       -- unix time of the series' latest instance
    not_before       REAL,                -- after a failed export: not retried before this
    fired_at         REAL,
    export_path      TEXT,
    last_error       TEXT,
    PRIMARY KEY (trigger, series_uid)
);
CREATE INDEX series_triggers_due ON series_triggers(state, last_arrival_at);
CREATE INDEX series_triggers_series ON series_triggers(series_uid);
CREATE TABLE webhooks (
    id               INTEGER PRIMARY KEY,
    trigger          TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    revision         INTEGER NOT NULL,
    body             TEXT NOT NULL,       -- the JSON object POSTed
    state            TEXT NOT NULL,       -- triggers.WebhookState: pending | sent | failed
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL NOT NULL,
    last_error       TEXT,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    UNIQUE (trigger, series_uid, revision)
);
CREATE INDEX webhooks_due ON webhooks(state, next_attempt_at);
"""),
    # /readyz proves the database takes a committed write by updating this one row
    ("health_probe", "CREATE TABLE IF NOT EXISTS health (id INTEGER PRIMARY KEY CHECK (id = 1), "
                     "checked_at REAL NOT NULL);"),
    # QIDO-RS: the searchable attributes of each instance (storage/qido.py); rows of an
    # earlier release are filled from their files at start (qido.backfill).
    ("instance_attributes", """
CREATE TABLE instance_attributes (
    sop_instance_uid         TEXT PRIMARY KEY,  -- instances.sop_instance_uid
    patient_name             TEXT,
    patient_id               TEXT,
    patient_birth_date       TEXT,              -- YYYYMMDD as stored
    patient_sex              TEXT,
    study_date               TEXT,
    study_time               TEXT,
    accession_number         TEXT,
    study_id                 TEXT,
    study_description        TEXT,
    referring_physician_name TEXT,
    modality                 TEXT,
    series_number            TEXT,
    series_description       TEXT,
    series_date              TEXT,
    series_time              TEXT,
    body_part_examined       TEXT,
    instance_number          TEXT,
    rows                     INTEGER,
    columns                  INTEGER,
    number_of_frames         TEXT,
    bits_allocated           INTEGER,
    specific_character_set   TEXT
);
CREATE INDEX instance_attributes_patient ON instance_attributes(patient_id);
CREATE INDEX instance_attributes_study_date ON instance_attributes(study_date);
CREATE INDEX instance_attributes_accession ON instance_attributes(accession_number);
"""),
    # Where the data set starts in each stored file (forward streams from there without
    # re-reading the header; NULL for files stored by the first release) and which way it
    # came in (store.Source).
    ("instances.dataset_offset+source", """
        ALTER TABLE instances ADD COLUMN dataset_offset INTEGER;
        ALTER TABLE instances ADD COLUMN source TEXT;
    """),
    # Bumped by every enqueue of a row: "was it re-sent while being sent?" compares it with
    # the claim's, never wall-clock times (a clock step back would mark a replaced file sent).
    ("queue.generation", """
        ALTER TABLE queue ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
    """),
    # How often a derivation of this job started without finishing (a crash, an OOM kill):
    # the inbox gives up on a job after three, instead of crash-looping at every start.
    ("jobs.derive_attempts", """
        ALTER TABLE jobs ADD COLUMN derive_attempts INTEGER NOT NULL DEFAULT 0;
    """),
    # Which files a job was derived from (inode:size:mtime_ns of its sidecar and array, read
    # when the derivation started): files found later under the job's name with another
    # identity are a new job that replaced it mid-derive, never leftovers to move away.
    ("jobs.files", """
        ALTER TABLE jobs ADD COLUMN files TEXT;
    """),
]


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply the MIGRATIONS this database lacks (all in one transaction); return their names."""
    import time

    done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
    todo = [(name, script) for name, script in MIGRATIONS if name not in done]
    if not todo:
        return []
    conn.execute("BEGIN IMMEDIATE")
    try:
        done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
        applied = []
        for name, script in todo:
            if name in done:  # another process migrated meanwhile
                continue
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                         (name, time.time()))
            applied.append(name)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return applied


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (executescript would commit on its own)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return statements


def connect(path: Path) -> sqlite3.Connection:
    """Open (and create) the database; autocommit mode, transactions only via ``transaction``."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # SQLite gives its -wal and -shm files the database file's mode: create it 0600 first.
    # Only when it is new: closing any descriptor of a database file drops every POSIX lock
    # this process holds on it, so another process's last close would then reset the WAL
    # under our open connections and their later commits would be lost.
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.executescript(SCHEMA)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    migrate(conn)
    return conn


class LazyConnection:
    """A worker's own connection: opened on first use (``connect`` makes the folder), closed once."""

    def __init__(self, path: Path):
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def get(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = connect(self.path)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def connect_readonly(path: Path) -> sqlite3.Connection | None:
    """Open an existing database for reading (``status``); None when there is none yet."""
    if not path.exists():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception: all or nothing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def counts_by_state(conn: sqlite3.Connection, table: str, key: str, value, states: Iterable[str]) -> dict[str, int]:
    """Rows of ``table`` whose ``key`` is ``value``, per ``state`` (every one of ``states``, 0 when none).

    ``table`` and ``key`` are this package's own names, never input.
    """
    counts = dict.fromkeys(states, 0)
    for row in conn.execute(f"SELECT state, COUNT(*) AS n FROM {table} WHERE {key} = ? GROUP BY state", (value,)):
        counts[row["state"]] = row["n"]
    return counts
