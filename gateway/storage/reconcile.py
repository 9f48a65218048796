"""Start-up reconcile: every store file has its index row, and nothing half-written stays.

Runs once in ``service.run`` after the data folder's lock is taken and before any listener
opens, so nothing else writes meanwhile. A store file without a row (the process died between
the rename and the commit) is indexed as ``send`` records a file, queued for no one; one that
cannot be read goes to ``data_dir/quarantine``. Temporary files (``.*.tmp`` beside store files,
everything in ``data_dir/tmp``) are removed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from gateway.storage import index
from gateway.storage.store import Outcome, Store, discard, quarantine

log = logging.getLogger("gateway.reconcile")


@dataclass(frozen=True)
class Reconciled:
    indexed: int = 0
    quarantined: int = 0
    removed: int = 0


def reconcile(store: Store) -> Reconciled:
    """Index or quarantine store files without a row and remove leftover temporary files."""
    removed = 0
    if store.tmp_dir.is_dir():
        for leftover in store.tmp_dir.iterdir():
            if leftover.is_file() or leftover.is_symlink():
                discard(leftover)
                removed += 1
    indexed = quarantined = 0
    if store.store_dir.is_dir():
        with store._db_lock:
            known = index.indexed_paths(store.conn)
        for path in sorted(store.store_dir.rglob("*")):
            if path.is_dir():
                continue
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                discard(path)
                removed += 1
                continue
            if str(path.relative_to(store.data_dir)) in known:
                continue
            result = store.adopt(path) if path.is_file() and not path.is_symlink() else None
            if result is not None and result.outcome is Outcome.STORED:
                indexed += 1
                log.info("indexed %s, found in the store without an index row", path)
            else:
                quarantined += quarantine(store.data_dir, path, (result.reason if result else "not a regular file")
                                          + "; found in the store without an index row") is not None
    if indexed or quarantined or removed:
        log.info("reconcile: %d file(s) indexed, %d quarantined, %d temporary file(s) removed",
                 indexed, quarantined, removed)
    return Reconciled(indexed, quarantined, removed)
