"""One Part 10 file from a web client into the store: header read, UID checks, then ``Store``.

What STOW-RS needs around the store's ingest: the identifying UIDs read from the file
(bounded: nothing past the header is read), the study UID of the URL enforced, and the
QIDO attributes recorded for the stored instance.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from gateway.storage import db, qido
from gateway.storage.store import Incoming, Outcome, Result, Store

#: Elements longer than this are not loaded when reading a header (bounded memory).
DEFER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Ingested:
    result: Result
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    series_uid: str | None = None
    study_uid: str | None = None


def read_header(path: Path):
    """The data set up to Pixel Data, large values deferred; raises ``ValueError`` when not Part 10."""
    try:
        return dcmread(path, stop_before_pixels=True, defer_size=DEFER_BYTES)
    except InvalidDicomError:
        raise ValueError("not a DICOM Part 10 file (no 128-byte preamble and 'DICM')") from None
    except Exception as exc:  # pydicom raises many kinds for damaged files
        raise ValueError(f"not a readable DICOM file ({type(exc).__name__}: {str(exc)[:120]})") from None


def _uid(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value).rstrip("\x00 ") if value else None


def ingest_file(store: Store, path: Path, expected_study: str | None, peer: str, identity: str) -> Ingested:
    """Check and store the file at ``path`` (moved into the store on success; left as is otherwise)."""
    try:
        ds = read_header(path)
        ts = str(ds.file_meta.get("TransferSyntaxUID") or "")
    except ValueError as exc:
        return Ingested(Result(Outcome.UNREADABLE, str(exc)))
    uids = {k: _uid(ds, k) for k in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")}
    got = dict(sop_class_uid=uids["SOPClassUID"], sop_instance_uid=uids["SOPInstanceUID"],
               series_uid=uids["SeriesInstanceUID"], study_uid=uids["StudyInstanceUID"])
    if not ts:
        return Ingested(Result(Outcome.UNREADABLE, "its file meta has no Transfer Syntax UID"), **got)
    if expected_study is not None and uids["StudyInstanceUID"] != expected_study:
        return Ingested(Result(Outcome.INVALID,
                               f"its Study Instance UID {uids['StudyInstanceUID']!s:.64} differs from "
                               f"{expected_study} in the URL"), **got)
    item = Incoming(
        spool_path=Path(path),
        request_sop_instance_uid=uids["SOPInstanceUID"] or "",
        request_sop_class_uid=uids["SOPClassUID"] or "",
        transfer_syntax=ts,
        calling_ae=f"http {identity}@{peer}"[:64],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
    )
    result = store.add_spooled(item)
    if result.outcome is Outcome.STORED:
        try:
            with store._db_lock, db.transaction(store.conn):
                qido.record(store.conn, uids["SOPInstanceUID"], ds)
        except sqlite3.Error:
            pass  # searchable by UID now; the attributes are backfilled at the next start
    return Ingested(result, **got)
