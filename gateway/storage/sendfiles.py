"""``dicom-gateway send DEST PATH...``: put DICOM files into the store and queue them by hand.

Each file is copied into the store as it is (bytes unchanged), then all of them are indexed
(origin 'manual') and queued for DEST in one transaction; a running gateway sends them on
its next pass. Files that are not DICOM Part 10 files, or whose UIDs are unusable, are
skipped with one line each.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from gateway.storage import db, index, queue, store
from gateway.dimse import scu
from gateway.config import Config
from gateway.errors import InvalidUID, StorageFull
from gateway.storage.uids import check_uid

log = logging.getLogger("gateway.sendfiles")

_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]


class GiveUpFile(Exception):
    """This one file cannot be queued; the message says why."""


@dataclass
class SendReport:
    queued: int = 0
    problems: list[str] = field(default_factory=list)
    nbytes: int = 0  # bytes of the files queued


def count_files(paths: Iterable[Path]) -> tuple[int, int]:
    """How many files ``queue_files`` will look at, and their total size (a stat each, for a progress bar)."""
    n = size = 0
    for path in _files(paths, []):
        n += 1
        try:
            size += path.stat().st_size
        except OSError:
            pass
    return n, size


def _files(paths: Iterable[Path], problems: list[str]) -> Iterator[Path]:
    """Files as given, folders searched recursively in name order; hidden files are skipped."""
    for path in paths:
        path = Path(path)
        if path.is_dir():
            for found in sorted(path.rglob("*")):
                if found.is_file() and not found.name.startswith("."):
                    yield found
        elif path.is_file():
            yield path
        else:
            problems.append(f"{path}: no such file or folder")


def _describe(path: Path) -> tuple[dict, str]:
    """The UIDs and transfer syntax of a Part 10 file, read without its pixel data."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
    except InvalidDicomError:
        raise GiveUpFile("not a DICOM Part 10 file (no 'DICM' header)") from None
    except (OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise GiveUpFile(f"cannot read it: {exc}") from None
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if not ts:
        raise GiveUpFile("its file meta has no Transfer Syntax UID")
    uids = {tag: str(getattr(ds, tag, "") or "") for tag in _TAGS}
    media = str(getattr(meta, "MediaStorageSOPInstanceUID", "") or "")
    if media != uids["SOPInstanceUID"]:
        raise GiveUpFile(
            f"its file meta names SOP Instance UID {media or '(none)'!s:.64}, the data set "
            f"{uids['SOPInstanceUID'] or '(none)'!s:.64}"
        )
    media_class = str(getattr(meta, "MediaStorageSOPClassUID", "") or "")
    if media_class != uids["SOPClassUID"]:
        raise GiveUpFile(
            f"its file meta names SOP Class UID {media_class or '(none)'!s:.64}, the data set "
            f"{uids['SOPClassUID'] or '(none)'!s:.64}"
        )
    return uids, str(ts)


def _tracked(files: Iterable[Path], progress: Callable[[Path], None] | None) -> Iterator[Path]:
    """Yield each file, then tell ``progress`` once the caller has handled it (queued or skipped)."""
    for path in files:
        yield path
        if progress is not None:
            progress(path)


def queue_files(config: Config, dest: str, paths: Iterable[Path], now: float | None = None,
                progress: Callable[[Path], None] | None = None) -> SendReport:
    """Store the DICOM files under ``paths`` and queue them for ``dest``; report counts and problems.

    Raises ``UnknownDestination`` for an unconfigured ``dest`` and ``StorageFull`` (after
    queueing what was already stored) when the store's disk fills up.
    """
    scu.destination(config, dest)  # refuse an unknown name before touching anything
    report = SendReport()
    records: list[index.InstanceRecord] = []
    full: StorageFull | None = None
    now = time.time() if now is None else now
    for path in _tracked(_files(paths, report.problems), progress):
        try:
            uids, ts = _describe(path)
            target = store.instance_path(
                config.store_dir, uids["StudyInstanceUID"], uids["SeriesInstanceUID"],
                uids["SOPInstanceUID"],
            )
            check_uid(uids["SOPClassUID"], "SOP Class UID")
            store.check_free_space(config.store_dir, config.storage.min_free_bytes)
            with open(path, "rb") as src:
                size = store.write_atomic(target, lambda out: shutil.copyfileobj(src, out, 1024 * 1024))
        except (GiveUpFile, InvalidUID) as exc:
            report.problems.append(f"{path}: skipped, {exc}")
            continue
        except StorageFull as exc:
            full = exc
            break
        except OSError as exc:
            report.problems.append(f"{path}: skipped, cannot copy it into the store: {exc.strerror or exc}")
            continue
        records.append(
            index.InstanceRecord(
                sop_instance_uid=uids["SOPInstanceUID"],
                sop_class_uid=uids["SOPClassUID"],
                study_uid=uids["StudyInstanceUID"],
                series_uid=uids["SeriesInstanceUID"],
                transfer_syntax=ts,
                path=str(target.relative_to(config.node.data_dir)),
                size=size,
                calling_ae=None,
                origin="manual",
                received_at=now,
            )
        )
    if records:
        conn = db.connect(config.db_path)
        try:
            with db.transaction(conn):
                for rec in records:
                    index.record_instance(conn, rec)
                    queue.enqueue(conn, [dest], rec.sop_instance_uid, now)
        finally:
            conn.close()
        for rec in records:
            log.info("queued SOP %s for %s (from a file)", rec.sop_instance_uid, dest)
    report.queued = len({r.sop_instance_uid for r in records})
    report.nbytes = sum({r.sop_instance_uid: r.size for r in records}.values())
    if full is not None:
        raise StorageFull(f"{full} ({report.queued} file(s) were queued before that)")
    return report

