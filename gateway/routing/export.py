"""Series-complete triggers at the edge: find complete series, export them atomically, commit once.

``SeriesTriggers.run_once`` is one pass (the scheduler calls it; tests call it directly). For
each (trigger, series) that has been quiet for ``series_complete.stable_seconds`` it builds
``export_dir/.<series>.r<revision>.<random>.tmp/`` (hard links to the stored files, copies
where the filesystem refuses links, and ``series.yaml``), fsyncs it, renames it over
``export_dir/<series>/`` (an atomic exchange when a previous revision is there) and only then,
in one transaction, marks the revision fired and queues its webhook.

Exactly once per revision: if the process dies before the rename, no folder appeared and the
next pass builds it again (leftover temporary folders are removed); if it dies after the
rename but before the commit, the next pass finds ``series.yaml`` of that very revision in
place, does not rebuild it, and commits.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import yaml

from gateway.config import Config
from gateway.errors import UnreadableHeader
from gateway.storage import db, index, series
from gateway.storage.files import fsync_dir
from gateway.storage.header import read_header
from gateway.storage.queue import backoff_seconds
from gateway.storage.uids import check_uid
from gateway.routing.triggers import SeriesState, manifest

log = logging.getLogger("gateway.triggers")

MANIFEST = "series.yaml"
#: Crash seams for tests (a callable gets the point's name): after the files are linked into
#: the temporary folder, and after the rename but before the commit.
CRASH_POINTS = ("export_linked", "export_renamed")

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class ExportError(Exception):
    """The export folder could not be built; the series stays open and is tried again later."""


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (the store's files never change in place), else a durable copy."""
    try:
        os.link(src, dst)
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        shutil.copyfileobj(fin, fout, 1024 * 1024)
        fout.flush()
        os.fsync(fout.fileno())


def _leftovers(export_dir: Path, series_uid: str | None = None) -> list[Path]:
    """Temporary folders of interrupted exports (of one series, or all)."""
    if not export_dir.is_dir():
        return []
    prefix = f".{series_uid}.r" if series_uid else "."
    return [p for p in export_dir.iterdir()
            if p.name.startswith(prefix) and p.name.endswith(".tmp") and p.is_dir() and not p.is_symlink()]


def exported_revision(folder: Path, trigger: str) -> int | None:
    """The revision of this trigger's export already in ``folder`` (None when absent or another's)."""
    try:
        data = yaml.safe_load((folder / MANIFEST).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("trigger") != trigger:
        return None
    revision = data.get("revision")
    return revision if isinstance(revision, int) else None


def build_export(
    export_dir: Path,
    series_uid: str,
    files: list[tuple[Path, str]],
    manifest_text: str,
    revision: int,
    crash_hook: Callable[[str], None] | None = None,
) -> Path:
    """Build the folder under a temporary name and rename it into ``export_dir/<series_uid>``.

    ``files`` are (stored file, name in the export) pairs. An existing folder (an earlier
    revision) is replaced in one atomic exchange, so a reader sees the old or the new one.
    """
    check_uid(series_uid, "Series Instance UID")
    export_dir.mkdir(parents=True, exist_ok=True)
    for old in _leftovers(export_dir, series_uid):
        shutil.rmtree(old, ignore_errors=True)
    final = export_dir / series_uid
    tmp = export_dir / f".{series_uid}.r{revision}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        for src, name in files:
            _link_or_copy(src, tmp / name)
        if crash_hook:
            crash_hook("export_linked")
        with open(tmp / MANIFEST, "x", encoding="utf-8") as f:
            f.write(manifest_text)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():
            if not _exchange(tmp, final):
                aside = export_dir / f".{series_uid}.r{revision}.{secrets.token_hex(4)}.old.tmp"
                os.rename(final, aside)
                os.rename(tmp, final)
                tmp = aside
            shutil.rmtree(tmp, ignore_errors=True)  # the previous revision, now under tmp
        else:
            os.rename(tmp, final)
        fsync_dir(export_dir)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if crash_hook:
        crash_hook("export_renamed")
    return final


class SeriesTriggers:
    """One pass over series that became complete: export, commit, queue the webhook."""

    def __init__(
        self,
        config: Config,
        on_fired: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
        crash_hook: Callable[[str], None] | None = None,
    ):
        self.config = config
        self.triggers = {t.name: t for t in config.triggers}
        self.stable = config.series_complete.stable_seconds
        self.on_fired = on_fired
        self.clock = clock
        self.crash_hook = crash_hook
        self._lock = threading.Lock()
        self._db = db.LazyConnection(config.db_path)
        self._stop = threading.Event()
        self._swept = False

    @property
    def conn(self) -> sqlite3.Connection:
        return self._db.get()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def run_once(self) -> int:
        """Fire every complete series; return how many revisions were exported in this pass."""
        with self._lock:
            if not self._swept:
                self._sweep()
            fired = 0
            try:
                due = series.due_series(self.conn, self.clock(), self.stable)
            except sqlite3.Error as exc:
                log.warning("cannot look for complete series now: %s", exc)
                return 0
            for item in due:
                if self._stop.is_set():
                    break
                try:
                    fired += self._fire(item)
                except sqlite3.Error as exc:
                    log.warning("series %s (trigger %s): database busy, tried again at the next pass: %s",
                                item.series_uid, item.trigger, exc)
                except Exception:  # one series' trouble must never stop the others
                    log.exception("series %s (trigger %s): unexpected error; tried again later",
                                  item.series_uid, item.trigger)
                    self._failed(item, "unexpected error (see the log)")
            if fired and self.on_fired:
                self.on_fired()
            return fired

    def _sweep(self) -> None:
        """Remove temporary folders left by an export the process did not finish."""
        self._swept = True
        for trigger in self.triggers.values():
            for old in _leftovers(trigger.export_dir):
                shutil.rmtree(old, ignore_errors=True)
                log.info("removed %s, left by an interrupted export", old)

    def _failed(self, item: series.DueSeries, reason: str) -> None:
        delay = backoff_seconds(1, self.config.retry.initial_backoff_seconds,
                                self.config.retry.max_backoff_seconds)
        with db.transaction(self.conn):
            series.export_failed(self.conn, item, reason, self.clock() + delay)

    def _fire(self, item: series.DueSeries) -> int:
        trigger = self.triggers.get(item.trigger)
        if trigger is None:
            with db.transaction(self.conn):
                series.finish_export(self.conn, item, "", None, self.clock())
            log.info("series %s: trigger %s is no longer configured; not exported", item.series_uid,
                     item.trigger)
            return 0
        with db.transaction(self.conn):  # one snapshot: the row is still due, and its instances
            if not series.still_due(self.conn, item):
                return 0
            rows = index.series_instances(self.conn, item.series_uid)
        if not rows:
            with db.transaction(self.conn):
                series.finish_export(self.conn, item, "", None, self.clock())
            return 0
        final = trigger.export_dir / item.series_uid
        if exported_revision(final, trigger.name) == item.revision:
            body = yaml.safe_load((final / MANIFEST).read_text())
        else:
            try:
                body = self._export(trigger, item, rows)
            except (ExportError, OSError) as exc:
                reason = str(exc) if isinstance(exc, ExportError) else (
                    f"cannot write the export under {trigger.export_dir}: {exc.strerror or exc}")
                self._failed(item, reason)
                log.warning("series %s (trigger %s) not exported, tried again later: %s",
                            item.series_uid, trigger.name, reason)
                return 0
        webhook = {**body, "export_path": str(final)} if trigger.webhook else None
        with db.transaction(self.conn):
            state, revision = series.finish_export(self.conn, item, str(final), webhook, self.clock())
        log.info(
            "series %s complete for trigger %s: revision %d, %d instance(s) exported to %s%s",
            item.series_uid, trigger.name, item.revision, body["instance_count"], final,
            "; webhook queued" if webhook else "",
        )
        if state is SeriesState.OPEN:
            log.info("series %s reopened as revision %d for trigger %s (an instance arrived during the export)",
                     item.series_uid, revision, trigger.name)
        return 1

    def _export(self, trigger, item: series.DueSeries, rows) -> dict:
        data_dir = self.config.node.data_dir
        headers, files = [], []
        for row in rows:
            path = index.absolute_path(data_dir, row)
            try:
                headers.append(read_header(path).dataset)
            except (OSError, UnreadableHeader) as exc:
                raise ExportError(f"stored instance {row['sop_instance_uid']} cannot be read ({exc})") from None
            files.append((path, f"{check_uid(row['sop_instance_uid'], 'SOP Instance UID')}.dcm"))
        callers = [r["calling_ae"] for r in rows if r["calling_ae"]]
        calling = max(set(callers), key=callers.count) if callers else None
        exported_at = datetime.fromtimestamp(self.clock()).astimezone().isoformat()
        body = manifest(trigger.name, item.revision, headers, [name for _, name in files], calling,
                        exported_at)
        text = yaml.safe_dump(body, sort_keys=False)
        build_export(trigger.export_dir, item.series_uid, files, text, item.revision, self.crash_hook)
        return body
