"""Per-UID exclusion between processes: ``dicom-gateway send`` next to a running ``run``.

``store.UidLocks`` serializes rename and commit per SOP Instance UID between the threads of
one process; another process writing the same store (``send`` while ``run`` receives) needs
the same between processes. ``ProcessLocks`` takes an ``fcntl`` record lock on one byte of
``data_dir/uid.lock`` per UID (the byte at a hash of the UID), in offset order so two
processes never deadlock. POSIX record locks belong to the process, not the thread, so each
byte also has a thread lock: one thread of the process holds it at a time. The file is
opened while a lock is held and closed when none is (closing drops every record lock of the
process on it), so a process with many stores holds no descriptor for idle ones. A process
that dies loses its locks with it.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("gateway.store")

#: Bytes of the lock file UIDs are hashed onto (a collision only makes two UIDs wait for each other).
SLOTS = 2**31 - 1
LOCK_NAME = "uid.lock"


def slot(uid: str) -> int:
    return int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=8).digest(), "big") % SLOTS


class ProcessLocks:
    """Exclusive record locks on ``path``, one byte per UID (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._mutex = threading.Lock()
        self._slots: dict[int, list] = {}  # slot -> [thread Lock, holders and waiters]
        self._fd: int | None = None
        self._users = 0  # threads holding or taking slots: the file is open while > 0
        self._warned = False

    @contextmanager
    def hold(self, uids: Iterable[str]):
        """Hold the record locks of ``uids`` (between processes and between threads)."""
        slots = sorted({slot(uid) for uid in uids})
        taken: list[int] = []
        fd = self._open()
        try:
            for s in slots:
                with self._mutex:
                    entry = self._slots.setdefault(s, [threading.Lock(), 0])
                    entry[1] += 1
                entry[0].acquire()
                taken.append(s)
                if fd is not None:
                    fcntl.lockf(fd, fcntl.LOCK_EX, 1, s)
            yield
        finally:
            for s in reversed(taken):
                if fd is not None:
                    try:
                        fcntl.lockf(fd, fcntl.LOCK_UN, 1, s)
                    except OSError:
                        pass
                with self._mutex:
                    entry = self._slots[s]
                    entry[0].release()
                    entry[1] -= 1
                    if entry[1] == 0:
                        del self._slots[s]
            self._close()

    def _open(self) -> int | None:
        with self._mutex:
            self._users += 1
            if self._fd is None:
                try:
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                except OSError as exc:
                    if not self._warned:
                        self._warned = True
                        log.warning("cannot open %s (%s): stores by other processes (dicom-gateway "
                                    "send) are not serialized with this one", self.path,
                                    exc.strerror or exc)
                    return None
            return self._fd

    def _close(self) -> None:
        with self._mutex:
            self._users -= 1
            if self._users == 0 and self._fd is not None:
                os.close(self._fd)  # nothing held: dropping the process's record locks is right
                self._fd = None


_SHARED: dict[Path, ProcessLocks] = {}
_SHARED_MUTEX = threading.Lock()


def process_locks_for(data_dir: Path) -> ProcessLocks:
    """The one ``ProcessLocks`` of a data folder in this process (two would drop each other's locks)."""
    path = Path(os.path.abspath(data_dir)) / LOCK_NAME
    with _SHARED_MUTEX:
        return _SHARED.setdefault(path, ProcessLocks(path))
