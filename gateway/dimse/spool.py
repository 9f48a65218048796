"""Spool files: where an incoming C-STORE data set is streamed while it arrives.

Each data set goes into a file under ``data_dir/tmp`` (the store's filesystem), which the
C-STORE handler then hands to the store to be renamed into place. Memory per association
is therefore bounded by one PDU plus the write buffer, whatever the instance's size.
pynetdicom writes into these files through the replacement for its temp file that
``dimse.fastpath`` installs; nothing here knows about pynetdicom.
"""

from __future__ import annotations

import errno
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from gateway.storage.files import free_bytes
from gateway.storage.header import HEAD_BYTES

FREE_SPACE_CHECK_EVERY = 64 * 1024 * 1024
_SPOOL_BUFFER = 1024 * 1024
_PREFIX = "rx-"  # every spool file's name starts so; what clean_spool removes
_PYNETDICOM_FILES = "tmp*.dcm"  # public-API mode: pynetdicom's NamedTemporaryFile(suffix=".dcm")


class _FdSink:
    """Unbuffered writes to one file descriptor (SpoolFile does its own buffering)."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def truncate(self) -> None:
        os.ftruncate(self.fd, 0)

    def close(self) -> None:
        os.close(self.fd)


class SpoolFile:
    """The file pynetdicom streams one C-STORE data set into (in place of its temp file).

    It never raises into pynetdicom's network thread: a full disk, a free-space floor or an
    instance larger than ``storage.max_instance_bytes`` stops the writing, drops what was
    written and records the ``problem``; the C-STORE handler answers it with 0xA700. The
    first ``HEAD_BYTES`` are also kept in memory so the handler reads the UIDs from there.
    """

    def __init__(self, path: Path, max_bytes: int, min_free_bytes: int):
        self.name = str(path)
        self.file = self  # pynetdicom calls ``file.flush()`` after every fragment
        self.problem: str | None = None
        self._sink: _FdSink | None = None
        try:
            self._sink = _FdSink(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except OSError as exc:  # EMFILE, ENOSPC, EACCES...: this C-STORE fails, the thread lives
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            self.problem = "the disk is full" if full else f"cannot create a spool file: {exc.strerror}"
        self._folder = path.parent
        self._max_bytes = max_bytes
        self._min_free = min_free_bytes
        self._next_check = FREE_SPACE_CHECK_EVERY
        self._pending = bytearray()
        self.head = bytearray()
        self.size = 0

    def write(self, data) -> int:
        n = len(data)
        if self.problem is not None:
            return n
        self.size += n
        if len(self.head) < HEAD_BYTES:
            self.head += data[: HEAD_BYTES - len(self.head)]
        if self.size > self._max_bytes:
            return self._give_up(
                f"instance is larger than storage.max_instance_bytes ({self._max_bytes} bytes)", n
            )
        if self._min_free and self.size >= self._next_check:
            self._next_check += FREE_SPACE_CHECK_EVERY
            if free_bytes(self._folder) < self._min_free:
                return self._give_up("free disk space fell below storage.min_free_bytes", n)
        self._pending += data
        if len(self._pending) >= _SPOOL_BUFFER:
            self._drain()
        return n

    def _drain(self) -> None:
        try:
            self._sink.write(self._pending)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            self._give_up("the disk is full" if full else f"cannot spool: {exc.strerror}", 0)
        self._pending.clear()

    def _give_up(self, problem: str, n: int) -> int:
        self.problem = problem
        self._pending = bytearray()
        self.head = bytearray()
        try:
            if self._sink is not None:
                self._sink.truncate()  # give the space back now, not when the data set ends
        except OSError:
            pass
        return n

    def flush(self) -> None:
        """pynetdicom flushes after every fragment; we write in large pieces instead."""

    def finish(self) -> None:
        """Write out what is buffered (the handler calls this once the data set is complete)."""
        if self.problem is None and self._pending:
            self._drain()

    def placed(self) -> None:
        """The file was renamed into the store: make pynetdicom's later unlink a no-op."""
        self.name = self.name + ".placed"

    def close(self) -> None:
        if self._sink is not None:
            try:
                self._sink.close()
            except OSError:
                pass
            self._sink = None


@dataclass
class Spooler:
    """Per-association spool settings, attached to the association at connection time."""

    folder: Path
    max_bytes: int
    min_free_bytes: int
    files: dict[str, SpoolFile] = field(default_factory=dict)

    prefix: str = field(default_factory=lambda: f"{_PREFIX}{secrets.token_hex(6)}-")
    count: int = 0

    def open(self) -> SpoolFile:
        """A new spool file; an unfinished one of this association is discarded first.

        pynetdicom opens a file for every final command-set fragment of a C-STORE-RQ, also
        when the previous data set never ended: one association could otherwise hold any
        number of open files. We do not negotiate asynchronous operations, so a peer that
        starts a new request before the last one was answered has given that one up.
        """
        self.discard_all()
        self.count += 1
        spool = SpoolFile(self.folder / f"{self.prefix}{self.count}.dcm", self.max_bytes,
                          self.min_free_bytes)
        self.files[spool.name] = spool
        return spool

    def take(self, path) -> SpoolFile | None:
        return self.files.pop(str(path), None)

    def discard_all(self) -> None:
        """Close and remove spool files no handler took (a request pynetdicom refused itself)."""
        while self.files:
            _, spool = self.files.popitem()
            spool.close()
            try:
                os.unlink(spool.name)
            except OSError:
                pass


def remove_pynetdicom_files(folder: Path, before: float | None) -> None:
    """Public-API mode: remove pynetdicom's ``tmp*.dcm`` files last written before ``before``
    (wall clock; None: all), those of data sets that will never end."""
    for leftover in folder.glob(_PYNETDICOM_FILES):
        try:
            if before is None or leftover.stat().st_mtime < before:
                leftover.unlink()
        except OSError:
            pass  # gone already (placed by its ingest or removed by another sweep)


def clean_spool(folder: Path) -> None:
    """Files in transit left by a crash are incomplete and were never acknowledged: remove them.

    Ours (spool files, ingest's temporary files) and pynetdicom's own ``tmp*.dcm`` (public-API mode).
    """
    from gateway.storage.store import TEMP_PREFIX

    for pattern in (f"{_PREFIX}*.dcm*", f"{TEMP_PREFIX}*.dcm", _PYNETDICOM_FILES):
        for leftover in folder.glob(pattern):
            try:
                leftover.unlink()
            except OSError:
                pass
