"""``dicom-gateway encode``: the inbox's derivation without a daemon, for AI teams' checks.

Reads the array and sidecar exactly as the inbox does, takes the source series from a
folder of DICOM files instead of the index, and writes the derived object to one file.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom.uid import generate_uid

from gateway.derive import derive
from gateway.inbox import jobfiles
from gateway.errors import JobError, UnreadableHeader
from gateway.storage.files import write_atomic
from gateway.storage.header import read_header


@dataclass(frozen=True)
class OfflineResult:
    path: Path
    summary: str
    derived: derive.Derived


def _find_sources(source_dir: Path, series_uid: str | None, study_uid: str | None) -> list:
    """Headers of the DICOM files under ``source_dir`` in the wanted series (or study)."""
    if not source_dir.is_dir():
        raise JobError(f"the source folder {source_dir} does not exist or is not a folder")
    found, series_seen = [], set()
    for path in sorted(p for p in source_dir.rglob("*") if p.is_file()):
        try:
            ds = read_header(path).dataset
        except (UnreadableHeader, OSError, ValueError, EOFError):
            continue  # not DICOM: folders often hold other files
        if "SOPInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
            continue
        series_seen.add(str(ds.SeriesInstanceUID))
        if series_uid is not None and ds.SeriesInstanceUID == series_uid:
            found.append(ds)
        elif series_uid is None and ds.get("StudyInstanceUID") == study_uid:
            found.append(ds)
            break
    if not found:
        what = f"series {series_uid}" if series_uid else f"study {study_uid}"
        extra = f" (it holds {len(series_seen)} other series)" if series_seen else " (no DICOM files)"
        raise JobError(f"the source {what} is not in {source_dir}{extra}")
    return found


def encode_offline(array: Path, sidecar_path: Path, source_dir: Path, out: Path,
                   keep_empty_frames: bool = False) -> OfflineResult:
    """Derive the SEG/SC for ``array`` + ``sidecar_path`` against ``source_dir``; write ``out``.

    Raises ``JobError`` with the same one-sentence messages the inbox writes to
    ``failed/NAME.error.txt``.
    """
    array, sidecar_path, source_dir, out = map(Path, (array, sidecar_path, source_dir, out))
    spec = jobfiles.read_sidecar(sidecar_path)
    if array.suffix not in jobfiles.ARRAY_SUFFIXES:
        raise JobError(f"{array.name} must be a .npy or .npz file")
    arr = jobfiles.load_array(array)
    sources = _find_sources(source_dir, spec.source.series_instance_uid, spec.source.study_instance_uid)
    opts = derive.Options(
        job_name=array.stem,
        now=datetime.now().astimezone(),
        new_uid=generate_uid,
        keep_empty_frames=keep_empty_frames,
    )
    result = derive.derive(sources, arr, spec, opts)
    ds = result.dataset
    try:
        write_atomic(out, lambda f: ds.save_as(f, enforce_file_format=True))
    except OSError as exc:
        raise JobError(f"cannot write {out}: {exc.strerror or exc}") from None
    return OfflineResult(out, f"{result.summary}; SOP Instance UID {result.sop_instance_uid}", result)
