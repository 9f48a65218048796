"""Job files in the inbox: finding ready jobs, reading arrays and sidecars safely, moving them out.

Shared by the inbox loop and ``dicom-gateway encode`` (offline), so both read a job the same
way and refuse the same things with the same sentences.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.lib.format as npformat

from gateway.errors import JobError
from gateway.inbox import arrays, sidecar
from gateway.storage.datadir import restrict
from gateway.storage.files import fsync_dir, write_atomic

ARRAY_SUFFIXES = (".npy", ".npz")
SIDECAR_SUFFIX = ".yaml"
IGNORED_SUFFIXES = (".tmp", ".part")
#: Bytes read from the start of a file to tell what it is (npy magic / zip header).
_MAX_SIDECAR_READ = sidecar.MAX_SIDECAR_BYTES + 1


@dataclass(frozen=True)
class JobFiles:
    name: str
    sidecar: Path
    array: Path | None  # None: the sidecar came without its array
    problem: str | None = None  # set when the files themselves make the job bad


def ignored(name: str) -> bool:
    """Hidden and partial files are never jobs (writers use them while writing)."""
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES)


def safe_path(folder: Path, path: Path) -> Path:
    """``path`` itself, or its target if it is a symlink that stays inside ``folder``."""
    if not path.is_symlink():
        return path
    target = path.resolve()
    root = folder.resolve()
    if target != root and root not in target.parents:
        raise JobError(
            f"{path.name} is a symlink leading outside the inbox (to {target}); copy the file "
            "into the inbox instead"
        )
    return target


def _read_error(path: Path, exc: OSError) -> JobError:
    reason = exc.strerror or str(exc)
    return JobError(f"cannot read {path.name}: {reason}; make it a readable file in the inbox")


def read_sidecar(path: Path, seen: dict[str, str] | None = None, name: str | None = None) -> sidecar.Job:
    """Read and parse a sidecar file (at most 64 KiB are read); ``seen[name]`` gets its identity."""
    try:
        with os.fdopen(arrays.open_regular(path), "rb") as f:  # never blocks on a FIFO
            if seen is not None:
                seen[name or path.name] = arrays.identity(os.fstat(f.fileno()))
            data = f.read(_MAX_SIDECAR_READ)
    except OSError as exc:
        raise _read_error(path, exc) from None
    if len(data) > sidecar.MAX_SIDECAR_BYTES:
        raise JobError(
            f"the sidecar {path.name} is larger than the 64 KiB limit; it should hold only the "
            "job's keys"
        )
    return sidecar.parse(data)


def _check_header(fp, size: int, name: str) -> None:
    """Refuse before allocating: object arrays, and data shorter than the header promises."""
    major, _minor = npformat.read_magic(fp)
    read = npformat.read_array_header_1_0 if major == 1 else npformat.read_array_header_2_0
    shape, _fortran, dtype = read(fp, max_header_size=10_000)
    if dtype.hasobject:
        raise ValueError("object arrays need pickle")
    promised = math.prod(shape) * dtype.itemsize
    held = size - fp.tell()
    if held < promised:
        raise JobError(
            f"{name} is truncated: its header promises {promised} bytes of {dtype} {shape} but it "
            f"holds {max(held, 0)}; write the whole array, then the sidecar"
        )


def load_array(path: Path) -> np.ndarray:
    """Load a ``.npy``, or a ``.npz`` holding exactly one array; pickles are never allowed.

    The header is checked against the data actually present before anything is allocated,
    so a corrupt or truncated file cannot make the gateway reserve absurd amounts of memory.
    """
    what = f"{path.name} is not a readable NumPy {path.suffix} file"
    try:
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as zf:
                members = [m for m in zf.infolist() if not m.is_dir()]
                if len(members) != 1:
                    names = ", ".join(m.filename.removesuffix(".npy") for m in members[:5])
                    raise JobError(
                        f"{path.name} holds {len(members)} arrays ({names or 'none'}); a job's "
                        ".npz must hold exactly one"
                    )
                with zf.open(members[0]) as member:
                    _check_header(member, members[0].file_size, path.name)
            with np.load(path, allow_pickle=False) as npz:
                arr = npz[npz.files[0]]
        else:
            with open(path, "rb") as fp:
                _check_header(fp, os.fstat(fp.fileno()).st_size, path.name)
            arr = np.load(path, allow_pickle=False)
    except JobError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise JobError(
                f"{path.name} holds Python objects (it needs pickle, which the gateway never "
                "loads); save a plain numeric array"
            ) from None
        raise JobError(f"{what} ({exc})") from None
    except (zipfile.BadZipFile, EOFError) as exc:
        raise JobError(f"{what} ({exc or 'truncated'})") from None
    except (IsADirectoryError, PermissionError, FileNotFoundError) as exc:
        raise _read_error(path, exc) from None
    except OSError as exc:
        raise JobError(f"{what} ({exc.strerror or exc})") from None
    if not isinstance(arr, np.ndarray):
        raise JobError(f"{what}")
    return arr


def find_ready(folder: Path) -> list[JobFiles]:
    """Jobs whose sidecar is present, in name order; arrays without sidecars wait."""
    entries = {p.name: p for p in folder.iterdir() if not ignored(p.name)}
    jobs = []
    for filename in sorted(entries):
        if not filename.endswith(SIDECAR_SUFFIX) or filename.endswith(".result.yaml"):
            continue
        path = entries[filename]
        if path.is_dir() and not path.is_symlink():
            continue
        name = filename[: -len(SIDECAR_SUFFIX)]
        arrays = [entries[name + s] for s in ARRAY_SUFFIXES if name + s in entries]
        if len(arrays) > 1:
            jobs.append(JobFiles(name, path, arrays[0], problem=(
                f"both {name}.npy and {name}.npz are present; keep only one array per job"
            )))
        elif not arrays:
            jobs.append(JobFiles(name, path, None, problem=(
                f"the sidecar {filename} has no {name}.npy or {name}.npz beside it; write the "
                "array first and the sidecar last"
            )))
        else:
            jobs.append(JobFiles(name, path, arrays[0]))
    return jobs


def identity(job: JobFiles, seen: dict[str, str]) -> str | None:
    """The identity of the job's files as read (``seen``), as ``jobs.files`` records it."""
    if job.array is None or job.sidecar.name not in seen or job.array.name not in seen:
        return None
    return f"{seen[job.sidecar.name]}/{seen[job.array.name]}"


def current_identity(job: JobFiles) -> str | None:
    """The identity of the files now under the job's names (None when one is missing)."""
    if job.array is None:
        return None
    try:
        return "/".join(arrays.identity(os.stat(p)) for p in (job.sidecar, job.array))
    except OSError:
        return None


def replaced(job: JobFiles, recorded: str | None) -> bool:
    """True when the files under the job's names are not the ones ``recorded``: a new job."""
    now = current_identity(job)
    return recorded is not None and now is not None and now != recorded


def dropped_after(job: JobFiles, when: float | None) -> bool:
    """True when the job's files were (re)written after ``when``: a new job, not leftovers."""
    try:
        mtime = max(os.lstat(p).st_mtime for p in (job.sidecar, job.array) if p is not None)
    except OSError:
        return False
    return when is not None and mtime > when


def move(job: JobFiles, folder: Path, inbox: Path, error: str | None = None,
         result_text: str | None = None, before_move: Callable[[], None] = lambda: None,
         expect: str | None = None) -> bool:
    """Write NAME.error.txt / NAME.result.yaml into ``folder``, then move the job's files there.

    With ``expect`` (the identity the job was read with), files that are no longer those
    stay in the inbox as a new job: checked before the move, and again on each moved file
    (a rewrite racing the rename is put back). Returns False when the files were left.
    """
    if error is not None:
        write_atomic(folder / f"{job.name}.error.txt", lambda f: f.write((error + "\n").encode()))
    if result_text is not None:
        write_atomic(folder / f"{job.name}.result.yaml", lambda f: f.write(result_text.encode()))
    before_move()
    if replaced(job, expect):
        return False
    wanted = dict(zip((job.sidecar.name, job.array.name), expect.split("/"))) if (
        expect is not None and job.array is not None) else {}
    left = False
    # The array first, the sidecar last: a job is never left with only its array moved
    # while its sidecar still says "ready".
    for path in (job.array, job.sidecar):
        if path is None:
            continue
        target = folder / path.name
        try:
            os.replace(path, target)
        except FileNotFoundError:
            pass  # already moved by an earlier, interrupted pass
        else:
            if path.name in wanted and _put_back_if_new(target, path, wanted[path.name]):
                left = True
                break
        restrict(target)  # 0600 (a symlink is left as it is, not its target)
    for moved in (folder, inbox):
        try:
            fsync_dir(moved)  # the renames survive a crash; if one is lost the move is redone
        except OSError:
            pass
    return not left


def _put_back_if_new(moved: Path, original: Path, expected: str) -> bool:
    """A file rewritten between the identity check and its rename goes back (if its name is free)."""
    try:
        if arrays.identity(os.stat(moved)) == expected:
            return False
        os.link(moved, original, follow_symlinks=False)  # never over a newer file of that name
    except OSError:
        return False
    os.unlink(moved)
    return True
