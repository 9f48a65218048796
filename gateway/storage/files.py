"""Files in the store: checked paths, atomic durable writes and moves, the free-space floor.

Layout: ``<store_dir>/<study uid>/<series uid>/<sop instance uid>.dcm``. Every file is first
written (or spooled) under a temporary name on the same filesystem, fsynced, renamed over
its final name and then the folder is fsynced: after a crash a path holds either the old
complete file or the new complete one, never a partial one, and a rename that was reported
done survives power loss (the folder fsync is what makes the rename itself durable).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

from gateway.errors import StorageFull
from gateway.storage.datadir import DIR_MODE, FILE_MODE
from gateway.storage.uids import check_uid

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: Copy buffer for files moved across filesystems or copied in by ``send``.
COPY_BUFFER = 1024 * 1024


def instance_path(store_dir: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """``store_dir/<study>/<series>/<sop>.dcm``; raises ``InvalidUID`` unless all three are UIDs.

    Only strings that pass ``uids.check_uid`` (digits and dots) become path parts, so no
    dataset content can place a file outside ``store_dir``.
    """
    study = check_uid(study_uid, "Study Instance UID")
    series = check_uid(series_uid, "Series Instance UID")
    sop = check_uid(sop_uid, "SOP Instance UID")
    return Path(store_dir) / study / series / f"{sop}.dcm"


def fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` (a rename, a new file) durable: fsync the folder itself."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(folder: Path) -> None:
    """mkdir -p, fsyncing the parent of every folder created so the new entries survive a crash."""
    folder = Path(folder)
    if folder.is_dir():
        return
    missing = []
    probe = folder
    while not probe.is_dir():
        missing.append(probe)
        probe = probe.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=DIR_MODE)  # readable by the gateway's user only, whatever the umask
        except FileExistsError:
            pass  # another thread made it; its creator fsyncs the parent
        fsync_dir(path.parent)


def _storage_error(exc: OSError, path: Path) -> Exception:
    if exc.errno in FULL_ERRNOS:
        return StorageFull(f"the disk holding {path.parent} is full; free space and the peer may resend")
    return exc


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> int:
    """Create or replace ``path`` with what ``write(file)`` writes; return the size in bytes.

    The data goes to a temporary file in the same folder, is fsynced, renamed over ``path``
    and the folder is fsynced. ``ENOSPC``/``EDQUOT`` raise ``errors.StorageFull``; on any
    failure the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    try:
        ensure_dir(path.parent)
    except OSError as exc:
        raise _storage_error(exc, path) from exc
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise _storage_error(exc, path) from exc
        raise
    fsync_dir(path.parent)
    return size


def place_atomic(src: Path, path: Path) -> int:
    """Move an already written file ``src`` onto ``path`` durably (fsync, rename, fsync folder).

    ``src`` should be on the same filesystem (then this is a rename); otherwise it is copied
    with ``write_atomic``. Returns the size; ``src`` is gone afterwards on success.
    """
    src, path = Path(src), Path(path)
    try:
        ensure_dir(path.parent)
        fd = os.open(src, os.O_RDONLY)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        os.replace(src, path)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise _storage_error(exc, path) from exc
        with open(src, "rb") as f:
            size = write_atomic(path, lambda out: shutil.copyfileobj(f, out, COPY_BUFFER))
        src.unlink()
        return size
    fsync_dir(path.parent)
    return size


def free_bytes(folder: Path) -> int:
    """Bytes available to us on the filesystem holding ``folder`` (the nearest existing parent)."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize


def check_free_space(folder: Path, min_free_bytes: int) -> None:
    """Raise ``StorageFull`` when the disk holding ``folder`` is below its free-space floor."""
    if min_free_bytes <= 0:
        return
    free = free_bytes(folder)
    if free < min_free_bytes:
        raise StorageFull(
            f"only {free / 1e6:.0f} MB free under {folder}, below storage.min_free_bytes "
            f"({min_free_bytes / 1e6:.0f} MB); free space or lower the floor"
        )
