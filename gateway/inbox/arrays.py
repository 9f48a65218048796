"""What an inbox file is, decided before any array data is read.

AI tools write whatever they write into a shared folder. Before the gateway reads an array it
knows, from the file system and the ``.npy`` header alone (for ``.npz``: the zip directory and
the member's own ``.npy`` header), that the file is a regular file of the inbox, what dtype
and shape it holds and how many bytes that is; ``check_against_source`` then compares those
with the source series. A FIFO never blocks the poll, a header declaring (100000, 4096, 4096)
or a 500 KB ``.npz`` inflating to 500 MB costs no memory.
"""

from __future__ import annotations

import math
import os
import stat
import struct
import tokenize
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.lib.format as npformat

from gateway.errors import JobError

#: Largest array a job may hold (the most pixel data one DICOM object can carry).
MAX_ARRAY_BYTES = 4 * 1024**3 - 2
#: Largest ``.npy`` header read (numpy's own default limit).
MAX_HEADER_BYTES = 10_000
#: Highest inflated/compressed ratio accepted for an ``.npz`` member. Deflate itself cannot
#: exceed ~1032:1, so only an archive whose directory lies about the sizes goes beyond.
MAX_NPZ_RATIO = 1100

#: What numpy's and zipfile's readers raise on bytes that are not what they expect (found
#: by tests/unit/test_fuzz_parsers.py: its header parser uses ast.literal_eval).
_UNREADABLE = (ValueError, EOFError, OSError, zipfile.BadZipFile, SyntaxError, tokenize.TokenError,
               zlib.error, NotImplementedError, IndexError, KeyError, TypeError, OverflowError,
               struct.error)

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a folder", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a symlink"}


@dataclass(frozen=True)
class ArrayInfo:
    """An array's description from its header: nothing of its data has been read."""

    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int

    @property
    def ndim(self) -> int:
        return len(self.shape)


def open_regular(path, name: str | None = None) -> int:
    """A read-only descriptor of ``path`` if it is a regular file with one link; else ``JobError``.

    Opened non-blocking (a FIFO would otherwise block the poll until someone writes to it)
    and checked with ``fstat`` on what was opened, not on the name; a file with other hard
    links may be one outside the inbox, so it is refused like a symlink leading out.
    """
    name = name or os.fsdecode(os.path.basename(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise JobError(f"cannot read {name}: {exc.strerror or exc}; make it a readable file in "
                       "the inbox") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise JobError(f"cannot read {name}: it is {kind}, not a regular file; write the "
                           "job's files as plain files into the inbox")
        if st.st_nlink > 1:
            raise JobError(f"{name} has {st.st_nlink} hard links (it may be a file outside the "
                           "inbox); copy the file into the inbox instead of linking it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def identity(st: os.stat_result) -> str:
    """``inode:size:mtime_ns``: a file rewritten in place or replaced by a rename gets another."""
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _header(fp, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) from a ``.npy`` stream positioned at its start."""
    try:
        major, _minor = npformat.read_magic(fp)
        read = npformat.read_array_header_1_0 if major == 1 else npformat.read_array_header_2_0
        shape, _fortran, dtype = read(fp, max_header_size=MAX_HEADER_BYTES)
    except _UNREADABLE as exc:
        raise JobError(f"{name} is not a readable NumPy array file ({exc})") from None
    if dtype.hasobject:
        raise JobError(f"{name} holds Python objects (it needs pickle, which the gateway never "
                       "loads); save a plain numeric array")
    return tuple(shape), dtype, fp.tell()


def _describe(shape, dtype: np.dtype, name: str) -> ArrayInfo:
    """The size check every array gets (its dtype and shape are derive's to judge)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_ARRAY_BYTES:
        raise JobError(f"{name}'s header promises {nbytes} bytes of {dtype} {tuple(shape)}: more "
                       f"than the {MAX_ARRAY_BYTES} bytes one DICOM object can hold")
    return ArrayInfo(tuple(shape), dtype, nbytes)


def inspect_npy(fp, size: int, name: str) -> ArrayInfo:
    """Describe a ``.npy`` stream of ``size`` bytes from its header alone."""
    shape, dtype, header = _header(fp, name)
    info = _describe(shape, dtype, name)
    if size - header < info.nbytes:
        raise JobError(f"{name} is truncated: its header promises {info.nbytes} bytes of {dtype} "
                       f"{shape} but it holds {max(size - header, 0)}; write the whole array, "
                       "then the sidecar")
    return info


def inspect_npz(zf: zipfile.ZipFile, name: str) -> ArrayInfo:
    """Describe the one array of an ``.npz`` from its directory and its member's header.

    Only the member's first bytes are inflated. Its declared size must be exactly what its
    header promises (numpy's reader stops at the declared size, so this bounds what
    loading it inflates), within ``MAX_NPZ_RATIO`` of its compressed size.
    """
    members = [m for m in zf.infolist() if not m.is_dir()]
    if len(members) != 1:
        names = ", ".join(m.filename.removesuffix(".npy") for m in members[:5])
        raise JobError(f"{name} holds {len(members)} arrays ({names or 'none'}); a job's .npz "
                       "must hold exactly one")
    member = members[0]
    if member.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise JobError(f"{name} uses a zip compression other than deflate; save it with "
                       "numpy.savez or numpy.savez_compressed")
    if member.compress_size and member.file_size / member.compress_size > MAX_NPZ_RATIO:
        raise JobError(f"{name} claims to inflate {member.file_size / member.compress_size:.0f}-fold, "
                       f"more than deflate can ({MAX_NPZ_RATIO}); it is not an archive numpy wrote")
    try:
        with zf.open(member) as fp:
            shape, dtype, header = _header(fp, name)
    except _UNREADABLE as exc:
        raise JobError(f"{name} is not a readable NumPy .npz file ({exc})") from None
    info = _describe(shape, dtype, name)
    if member.file_size != header + info.nbytes:
        raise JobError(f"{name} declares {member.file_size} bytes for an array whose header "
                       f"promises {header + info.nbytes}; write it again with numpy.savez")
    return info


def inspect(path, name: str | None = None, seen: dict[str, str] | None = None) -> ArrayInfo:
    """Describe the ``.npy``/``.npz`` at ``path`` without reading its array data.

    ``seen[name]`` gets the identity of the file that was opened."""
    name = name or os.fsdecode(os.path.basename(path))
    fd = open_regular(path, name)
    if seen is not None:
        seen[name] = identity(os.fstat(fd))
    with os.fdopen(fd, "rb") as f:
        if str(path).endswith(".npz"):
            try:
                with zipfile.ZipFile(f) as zf:
                    return inspect_npz(zf, name)
            except _UNREADABLE as exc:
                raise JobError(f"{name} is not a readable NumPy .npz file ({exc})") from None
        return inspect_npy(f, os.fstat(f.fileno()).st_size, name)


def check_against_source(info: ArrayInfo, name: str, frames: int, rows: int, columns: int) -> None:
    """A segmentation's array must be (frames, rows, columns) of its source series: checked
    from the header, so a wrong one is refused before its data is read."""
    expected = (frames, rows, columns) if info.ndim == 3 or frames > 1 else (rows, columns)
    if info.shape != expected:
        raise JobError(f"{name} has shape {info.shape}, which does not match the source series "
                       f"{expected}; a segmentation needs one frame per source image on its grid")


def load(path, info: ArrayInfo, name: str, seen: dict[str, str] | None = None) -> np.ndarray:
    """The array ``inspect`` described, read from one descriptor (never a pickle).

    The file is opened and checked again, and its header must still say what ``info`` says
    (and, given ``seen`` from ``inspect``, it must be the same file): a file replaced since
    ``inspect`` is refused instead of read unchecked.
    """
    fd = open_regular(path, name)
    if seen is not None and name in seen and seen[name] != identity(os.fstat(fd)):
        os.close(fd)
        raise JobError(f"{name} changed while the job ran (it was rewritten after its header was "
                       "checked); drop the job again once it is written")
    with os.fdopen(fd, "rb") as f:
        try:
            if str(path).endswith(".npz"):
                with zipfile.ZipFile(f) as zf:
                    again = inspect_npz(zf, name)
                    _same(info, again, name)
                    only = next(m for m in zf.infolist() if not m.is_dir())
                    with zf.open(only) as member:
                        return npformat.read_array(member, allow_pickle=False)
            again = inspect_npy(f, os.fstat(f.fileno()).st_size, name)
            _same(info, again, name)
            f.seek(0)
            return npformat.read_array(f, allow_pickle=False)
        except _UNREADABLE as exc:
            raise JobError(f"{name} is not a readable NumPy array file ({exc})") from None


def _same(before: ArrayInfo, now: ArrayInfo, name: str) -> None:
    if before != now:
        raise JobError(f"{name} changed while the job ran (it was {before.dtype} {before.shape}, "
                       f"now {now.dtype} {now.shape}); drop the job again once it is written")
