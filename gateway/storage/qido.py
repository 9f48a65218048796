"""QIDO-RS in SQL: the searchable attributes of each instance, and study/series/instance searches.

The attributes live in their own table (``instance_attributes``, one row per instance,
written in ingest's transaction by ``record``) so the ``instances`` rows stay what they
were; instances stored by a release without this table get theirs from their files at
start (``backfill``). Matching follows PS3.4 C.2.2.2: single value, list of UIDs,
wildcards (``*``/``?``), date/time ranges, universal (empty) matching.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from pydicom.datadict import dictionary_VR, tag_for_keyword

from gateway.storage.header import TEXT_CODECS

log = logging.getLogger("gateway.qido")

# The table is made by the migration "instance_attributes" in db.MIGRATIONS.


@dataclass(frozen=True)
class Attr:
    keyword: str
    column: str  # SQL expression over i (instances) and a (instance_attributes)
    vr: str
    level: str  # study | series | instance


ATTRS: dict[str, Attr] = {a.keyword: a for a in (
    Attr("StudyInstanceUID", "i.study_uid", "UI", "study"),
    Attr("PatientName", "a.patient_name", "PN", "study"),
    Attr("PatientID", "a.patient_id", "LO", "study"),
    Attr("PatientBirthDate", "a.patient_birth_date", "DA", "study"),
    Attr("PatientSex", "a.patient_sex", "CS", "study"),
    Attr("StudyDate", "a.study_date", "DA", "study"),
    Attr("StudyTime", "a.study_time", "TM", "study"),
    Attr("AccessionNumber", "a.accession_number", "SH", "study"),
    Attr("StudyID", "a.study_id", "SH", "study"),
    Attr("StudyDescription", "a.study_description", "LO", "study"),
    Attr("ReferringPhysicianName", "a.referring_physician_name", "PN", "study"),
    Attr("SeriesInstanceUID", "i.series_uid", "UI", "series"),
    Attr("Modality", "a.modality", "CS", "series"),
    Attr("SeriesNumber", "a.series_number", "IS", "series"),
    Attr("SeriesDescription", "a.series_description", "LO", "series"),
    Attr("SeriesDate", "a.series_date", "DA", "series"),
    Attr("SeriesTime", "a.series_time", "TM", "series"),
    Attr("BodyPartExamined", "a.body_part_examined", "CS", "series"),
    Attr("SOPInstanceUID", "i.sop_instance_uid", "UI", "instance"),
    Attr("SOPClassUID", "i.sop_class_uid", "UI", "instance"),
    Attr("InstanceNumber", "a.instance_number", "IS", "instance"),
    Attr("Rows", "a.rows", "US", "instance"),
    Attr("Columns", "a.columns", "US", "instance"),
    Attr("NumberOfFrames", "a.number_of_frames", "IS", "instance"),
    Attr("BitsAllocated", "a.bits_allocated", "US", "instance"),
)}
#: Matched over the study's series, returned at study level.
MODALITIES_IN_STUDY = "ModalitiesInStudy"
_LEVELS = ("study", "series", "instance")
_GROUP = {"study": "i.study_uid", "series": "i.series_uid", "instance": "i.sop_instance_uid"}
_STORED = [a for a in ATTRS.values() if a.column.startswith("a.")]
_CHARSET_COLUMN = "specific_character_set"


# --------------------------------------------------------------------------- writing


def _text(ds, keyword: str):
    """A value as text for the index ('' and absent become NULL; PN as its DICOM string)."""
    try:
        value = ds.get(keyword)
    except Exception:  # an unparsable value is not searchable, never a failed ingest
        return None
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return None
    return str(value).strip() or None


def values_of(ds) -> dict[str, object]:
    """The column values of one instance's header (a pydicom Dataset); never raises."""
    row: dict[str, object] = {}
    for attr in _STORED:
        value = _text(ds, attr.keyword)
        if attr.vr == "US" and value is not None:
            try:
                value = int(str(value).split("\\")[0])
            except ValueError:
                value = None
        row[attr.column[2:]] = value
    row[_CHARSET_COLUMN] = _text(ds, "SpecificCharacterSet")
    return row


def _tag_and_vr(keyword: str) -> tuple[int, str]:
    return tag_for_keyword(keyword), dictionary_VR(keyword)


_RAW = {attr.column[2:]: _tag_and_vr(attr.keyword) for attr in _STORED}
_CHARSET_TAG = tag_for_keyword("SpecificCharacterSet")
_RAW_TAGS = frozenset([_CHARSET_TAG, *(tag for tag, _ in _RAW.values())])
#: VRs whose values pydicom strips on both sides (the others keep leading spaces).
_STRIPPED_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"}


def values_of_header(header) -> dict[str, object]:
    """``values_of`` the header, read by the header walker where it can (no pydicom Dataset:
    that costs a millisecond per received instance), by pydicom otherwise; never raises."""
    try:
        raw = header.raw_values(_RAW_TAGS)
        row = None if raw is None else _decode(raw, header.transfer_syntax)
    except Exception:  # odd bytes: pydicom's reading decides
        row = None
    return values_of(header.dataset) if row is None else row


def _decode(raw: dict[int, tuple[bytes | None, bytes]], transfer_syntax: str) -> dict[str, object] | None:
    """The column values from raw element bytes; None when pydicom must decide (another
    character set, an unexpected VR)."""
    charset = raw.get(_CHARSET_TAG, (None, b""))[1].decode("latin-1").strip("\x00 ")
    codec = TEXT_CODECS.get(charset)
    if codec is None:
        return None
    little = transfer_syntax != "1.2.840.10008.1.2.2"
    row: dict[str, object] = {}
    for column, (tag, vr) in _RAW.items():
        found = raw.get(tag)
        if found is None:
            row[column] = None
            continue
        element_vr, value = found
        if element_vr is not None and element_vr.decode("latin-1") != vr:
            return None
        if vr == "US":
            row[column] = int.from_bytes(value[:2], "little" if little else "big") if len(value) >= 2 else None
            continue
        parts = value.decode(codec, "replace").split("\\")
        parts = [p.strip("\x00 ") if vr in _STRIPPED_VRS else p.rstrip("\x00 ") for p in parts]
        row[column] = "\\".join(parts).strip() or None
    row[_CHARSET_COLUMN] = charset or None
    return row


def record(conn: sqlite3.Connection, sop_instance_uid: str, ds=None, *, row: dict | None = None) -> None:
    """Insert or replace the searchable attributes of one instance (call inside ingest's transaction)."""
    row = values_of(ds) if row is None else row
    columns = ", ".join(["sop_instance_uid", *row])
    marks = ", ".join("?" * (len(row) + 1))
    conn.execute(f"INSERT OR REPLACE INTO instance_attributes ({columns}) VALUES ({marks})",
                 (sop_instance_uid, *row.values()))


def indexer(conn: sqlite3.Connection, header) -> None:
    """``Store`` indexer (every store has it): a stored instance's attributes, in the ingest transaction."""
    record(conn, header.sop_instance_uid, row=values_of_header(header))


def missing(conn: sqlite3.Connection, limit: int = 1000) -> list[sqlite3.Row]:
    """Instances without an attributes row (stored by an earlier release): their UIDs and paths."""
    return conn.execute(
        """SELECT i.sop_instance_uid, i.path FROM instances i
           LEFT JOIN instance_attributes a ON a.sop_instance_uid = i.sop_instance_uid
           WHERE a.sop_instance_uid IS NULL LIMIT ?""", (limit,)).fetchall()


def backfill(conn: sqlite3.Connection, data_dir: Path, read_header: Callable[[Path], object]) -> int:
    """Give every instance that has none its attributes row, read from its file; return how many.

    Files that cannot be read get an empty row (they stay findable by their UIDs), so a
    broken file is read once, not at every start.
    """
    done = 0
    while True:
        rows = missing(conn, 500)
        if not rows:
            return done
        batch = []
        for row in rows:
            try:
                ds = read_header(Path(data_dir) / row["path"])
            except Exception as exc:
                log.warning("QIDO attributes of %s: cannot read %s (%s); searchable by UID only",
                            row["sop_instance_uid"], row["path"], exc)
                ds = {}
            batch.append((row["sop_instance_uid"], ds))
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sop, ds in batch:
                record(conn, sop, ds)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        done += len(batch)


# --------------------------------------------------------------------------- searching


@dataclass(frozen=True)
class Match:
    """One matching key: ``kind`` is exact | list | wildcard | range | fuzzy."""

    keyword: str
    kind: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Search:
    level: str  # study | series | instance
    matches: tuple[Match, ...] = ()
    study_uid: str | None = None  # from the URL
    series_uid: str | None = None
    limit: int = 1000
    offset: int = 0


def _glob(value: str) -> str:
    """DICOM wildcards to SQLite GLOB (case-sensitive), with GLOB's own ``[`` escaped."""
    return value.replace("[", "[[]")


def _like(value: str) -> str:
    out = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return out.replace("*", "%").replace("?", "_")


def _condition(match: Match) -> tuple[str, list]:
    if match.keyword == MODALITIES_IN_STUDY:
        marks = ",".join("?" * len(match.values))
        return (f"i.study_uid IN (SELECT i2.study_uid FROM instances i2 JOIN instance_attributes a2 "
                f"ON a2.sop_instance_uid = i2.sop_instance_uid WHERE a2.modality IN ({marks}))",
                list(match.values))
    column = ATTRS[match.keyword].column
    if match.kind == "list":
        return f"{column} IN ({','.join('?' * len(match.values))})", list(match.values)
    if match.kind == "range":
        low, high = match.values
        parts, args = [], []
        if low:
            parts.append(f"{column} >= ?")
            args.append(low)
        if high:
            parts.append(f"{column} <= ?")
            args.append(high)
        return " AND ".join(parts) or "1", args
    if match.kind == "wildcard":
        return f"{column} GLOB ?", [_glob(match.values[0])]
    if match.kind == "fuzzy":  # case-insensitive, any name component may start with the value
        value = _like(match.values[0])
        return (f"(LOWER({column}) LIKE LOWER(?) ESCAPE '\\' OR LOWER({column}) LIKE LOWER(?) ESCAPE '\\' "
                f"OR LOWER({column}) LIKE LOWER(?) ESCAPE '\\')",
                [value + "%", "%^" + value + "%", "% " + value + "%"])
    return f"{column} = ?", [match.values[0]]


def search(conn: sqlite3.Connection, spec: Search) -> tuple[list[dict], bool]:
    """Rows of (keyword -> value) for the matching studies/series/instances, and whether more exist.

    Each row also carries ``_path`` (a representative file, relative to data_dir), and at
    study/series level ``_series``/``_instances`` counts and ``_modalities``.
    """
    if spec.level not in _LEVELS:
        raise ValueError(f"unknown level {spec.level!r}")
    where, args = [], []
    if spec.study_uid:
        where.append("i.study_uid = ?")
        args.append(spec.study_uid)
    if spec.series_uid:
        where.append("i.series_uid = ?")
        args.append(spec.series_uid)
    for match in spec.matches:
        sql, more = _condition(match)
        where.append(sql)
        args.extend(more)
    depth = _LEVELS.index(spec.level)
    shown = [a for a in ATTRS.values() if _LEVELS.index(a.level) <= depth]
    grouped = spec.level != "instance"
    select = [f"{'MIN(' + a.column + ')' if grouped else a.column} AS \"{a.keyword}\"" for a in shown]
    select.append("MIN(i.path) AS _path" if grouped else "i.path AS _path")
    select.append("MIN(i.transfer_syntax) AS _transfer_syntax" if grouped else "i.transfer_syntax AS _transfer_syntax")
    select.append("MIN(a.specific_character_set) AS _charset" if grouped else "a.specific_character_set AS _charset")
    if grouped:
        select.append("COUNT(*) AS _instances")
    if spec.level == "study":
        select.append("COUNT(DISTINCT i.series_uid) AS _series")
        select.append("GROUP_CONCAT(DISTINCT a.modality) AS _modalities")
    sql = (f"SELECT {', '.join(select)} FROM instances i "
           f"LEFT JOIN instance_attributes a ON a.sop_instance_uid = i.sop_instance_uid")
    if where:
        sql += " WHERE " + " AND ".join(where)
    if grouped:
        sql += f" GROUP BY {_GROUP[spec.level]}"
    order = {"study": "\"StudyDate\", \"StudyTime\", \"StudyInstanceUID\"",
             "series": "\"StudyInstanceUID\", CAST(\"SeriesNumber\" AS INTEGER), \"SeriesInstanceUID\"",
             "instance": "i.series_uid, CAST(a.instance_number AS INTEGER), i.sop_instance_uid"}[spec.level]
    sql += f" ORDER BY {order} LIMIT ? OFFSET ?"
    rows = conn.execute(sql, (*args, spec.limit + 1, spec.offset)).fetchall()
    more = len(rows) > spec.limit
    return [dict(r) for r in rows[: spec.limit]], more


# --------------------------------------------------------------------------- retrieving


def instances_of(conn: sqlite3.Connection, study_uid: str, series_uid: str | None = None,
                 sop_instance_uid: str | None = None) -> list[sqlite3.Row]:
    """The stored instances of a study, series or one instance (path, transfer syntax, UIDs, size)."""
    sql = ("SELECT i.sop_instance_uid, i.sop_class_uid, i.study_uid, i.series_uid, i.transfer_syntax, "
           "i.path, i.size, a.instance_number FROM instances i "
           "LEFT JOIN instance_attributes a ON a.sop_instance_uid = i.sop_instance_uid WHERE i.study_uid = ?")
    args: list = [study_uid]
    if series_uid is not None:
        sql += " AND i.series_uid = ?"
        args.append(series_uid)
    if sop_instance_uid is not None:
        sql += " AND i.sop_instance_uid = ?"
        args.append(sop_instance_uid)
    sql += " ORDER BY i.series_uid, CAST(a.instance_number AS INTEGER), i.sop_instance_uid"
    return conn.execute(sql, args).fetchall()


def known_sops(conn: sqlite3.Connection, sop_instance_uids: Iterable[str]) -> set[str]:
    """Which of these SOP Instance UIDs are stored."""
    uids = list(sop_instance_uids)
    found: set[str] = set()
    for start in range(0, len(uids), 500):
        chunk = uids[start:start + 500]
        rows = conn.execute(f"SELECT sop_instance_uid FROM instances WHERE sop_instance_uid IN "
                            f"({','.join('?' * len(chunk))})", chunk)
        found.update(r[0] for r in rows)
    return found


def patient_of_study(conn: sqlite3.Connection, study_uid: str) -> str | None:
    """The Patient ID indexed for a study (the audit trail's patient object), or None."""
    row = conn.execute(
        """SELECT a.patient_id FROM instances i JOIN instance_attributes a
           ON a.sop_instance_uid = i.sop_instance_uid
           WHERE i.study_uid = ? AND a.patient_id IS NOT NULL AND a.patient_id != '' LIMIT 1""",
        (study_uid,)).fetchone()
    return row[0] if row else None
