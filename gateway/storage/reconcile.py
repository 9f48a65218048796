"""Start-up reconcile: every store file has its index row, and nothing half-written stays.

Runs once in ``service.run`` after the data folder's lock is taken and before any listener
opens, so nothing else writes meanwhile. A store file without a row (the process died between
the rename and the commit) is indexed as ``send`` records a file, queued for no one; one that
cannot be read goes to ``data_dir/quarantine``. A row whose file is gone (a resend that replaced
an indexed file and then failed to commit, or a file deleted by hand) is forgotten with a log
line, and its unsent queue items fail with the reason; unless no indexed file is found at
all (an unmounted store folder), which is logged and left alone. Temporary files
(``.*.tmp`` beside store files, everything in ``data_dir/tmp``) are removed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from gateway.storage import db, index
from gateway.storage.store import Outcome, Store, discard, quarantine

log = logging.getLogger("gateway.reconcile")


@dataclass(frozen=True)
class Reconciled:
    indexed: int = 0
    quarantined: int = 0
    removed: int = 0
    forgotten: int = 0  # rows whose file was gone


def reconcile(store: Store) -> Reconciled:
    """Index or quarantine store files without a row and remove leftover temporary files."""
    removed = 0
    if store.tmp_dir.is_dir():
        for leftover in store.tmp_dir.iterdir():
            if leftover.is_file() or leftover.is_symlink():
                discard(leftover)
                removed += 1
    indexed = quarantined = 0
    with store._db_lock:
        known = index.indexed_paths(store.conn)
    present: set[str] = set()
    if store.store_dir.is_dir():
        for path in sorted(store.store_dir.rglob("*")):
            if path.is_dir():
                continue
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                discard(path)
                removed += 1
                continue
            relative = str(path.relative_to(store.data_dir))
            if relative in known:
                present.add(relative)
                continue
            result = store.adopt(path) if path.is_file() and not path.is_symlink() else None
            if result is not None and result.outcome is Outcome.STORED:
                indexed += 1
                log.info("indexed %s, found in the store without an index row", path)
            else:
                quarantined += quarantine(store.data_dir, path, (result.reason if result else "not a regular file")
                                          + "; found in the store without an index row") is not None
    forgotten = _forget_missing(store, known - present, found_any=bool(present))
    if indexed or quarantined or removed or forgotten:
        log.info("reconcile: %d file(s) indexed, %d quarantined, %d temporary file(s) removed, "
                 "%d row(s) without a file forgotten", indexed, quarantined, removed, forgotten)
    return Reconciled(indexed, quarantined, removed, forgotten)


def _forget_missing(store: Store, candidates: set[str], found_any: bool) -> int:
    """Forget the rows whose file is gone (unless none of the store's files is there at all)."""
    gone = sorted(p for p in candidates if not os.path.lexists(store.data_dir / p))
    if not gone:
        return 0
    if not found_any:
        log.error("reconcile: none of the %d indexed files is in %s; is the store folder mounted? "
                  "The index is left as it is", len(gone), store.store_dir)
        return 0
    reason = ("the stored file was gone when the gateway started (replaced by a resend that did not "
              "commit, or deleted); send the instance to the gateway again")
    with store._db_lock, db.transaction(store.conn):
        dropped = index.drop_missing(store.conn, gone, reason, store.clock())
    for path in gone[:20]:
        log.warning("reconcile: %s is indexed but gone from the store; its row is forgotten and its "
                    "unsent queue items failed", path)
    if len(gone) > 20:
        log.warning("reconcile: %d more indexed files were gone from the store", len(gone) - 20)
    return len(dropped)
