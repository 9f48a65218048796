"""The data folder as a whole: one process at a time, readable by the gateway's user only.

``lock`` is what makes ``run`` the only writer of a data folder: a second ``run`` would
requeue the first one's in-flight items and race it on every file. ``secure`` gives the
folders the gateway owns mode 0700 and the database files 0600 whatever the umask (files
are created 0600 where they are written: ``files.write_atomic``, the spool, ``db.connect``).
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from gateway.errors import DataDirInUse

FILE_MODE = 0o600
DIR_MODE = 0o700
LOCK_NAME = "gateway.lock"


def make_dir(folder: Path) -> Path:
    """mkdir -p with mode 0700 for every folder created, and 0700 for ``folder`` itself."""
    folder = Path(folder)
    missing = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=DIR_MODE)
        except FileExistsError:
            pass
    restrict(folder)
    return folder


def restrict(path: Path) -> None:
    """0700 for a folder, 0600 for a regular file; symlinks and anything else are left alone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        mode = DIR_MODE
    elif stat.S_ISREG(st.st_mode):
        mode = FILE_MODE
    else:
        return
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


class DataDirLock:
    """An exclusive ``flock`` on ``data_dir/gateway.lock``, held until ``release`` (or exit)."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def lock(data_dir: Path) -> DataDirLock:
    """Take the data folder for this process, or raise ``DataDirInUse`` naming the holder.

    Only the folder and the lock file are created before the lock is held: nothing else
    in the folder is touched when another process has it.
    """
    data_dir = make_dir(data_dir)
    path = data_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        by = f"PID {holder}" if holder.isdigit() else "another process"
        raise DataDirInUse(
            f"node.data_dir {data_dir} is in use by another 'dicom-gateway run' ({by}); stop it "
            "first or give this gateway its own data_dir"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    os.fchmod(fd, FILE_MODE)
    return DataDirLock(fd, path)


def secure(data_dir: Path, extra_dirs: tuple[Path, ...] = ()) -> None:
    """Folders the gateway owns 0700 and the database files 0600 (an earlier release's too).

    The data folder's own mode is what keeps other users out of everything below it; the
    store's files keep whatever mode an earlier release gave them, unreachable behind it.
    """
    data_dir = Path(data_dir)
    for folder in (data_dir, data_dir / "store", data_dir / "tmp", *extra_dirs):
        make_dir(folder)
    for name in ("gateway.sqlite3", "gateway.sqlite3-wal", "gateway.sqlite3-shm"):
        restrict(data_dir / name)
