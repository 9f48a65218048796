"""The audit trail: one JSON line per security-relevant event in ``data_dir/audit.jsonl``.

Field names follow the DICOM audit message schema (PS3.15 A.5: EventIdentification,
ActiveParticipant, ParticipantObjectIdentification) so a SIEM mapping is direct; the codes
are DICOM's (DCM) event IDs and role codes. Events are queued by ``record`` and appended by
one writer thread that fsyncs at most a second after an event (and at ``close``, which the
SIGTERM path calls): nothing acknowledged by ``close`` is lost. No pixel data, no secrets:
UIDs, AE titles, addresses, certificate subjects and counts only.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("gateway.audit")

# --------------------------------------------------------------------------- vocabulary (PS3.16 DCM codes)


def _code(value: str, meaning: str) -> dict:
    return {"csd-code": value, "codeSystemName": "DCM", "originalText": meaning}


APPLICATION_ACTIVITY = _code("110100", "Application Activity")
INSTANCES_TRANSFERRED = _code("110104", "DICOM Instances Transferred")
QUERY = _code("110112", "Query")
SECURITY_ALERT = _code("110113", "Security Alert")
USER_AUTHENTICATION = _code("110114", "User Authentication")

APPLICATION_START = _code("110120", "Application Start")
APPLICATION_STOP = _code("110121", "Application Stop")
LOGIN = _code("110122", "Login")
NODE_AUTHENTICATION = _code("110126", "Node Authentication")
SOFTWARE_CONFIGURATION = _code("110131", "Software Configuration")

SOURCE_ROLE = _code("110153", "Source Role ID")
DESTINATION_ROLE = _code("110152", "Destination Role ID")
APPLICATION_ROLE = _code("110150", "Application")
APPLICATION_LAUNCHER = _code("110151", "Application Launcher")

STUDY_UID = _code("110180", "Study Instance UID")
#: ParticipantObjectIDTypeCode of a patient (RFC 3881 code 2, as PS3.15 A.5.3 uses it).
PATIENT_NUMBER = {"csd-code": "2", "codeSystemName": "RFC-3881", "originalText": "Patient Number"}

#: EventActionCode (PS3.15 A.5.1): Create, Read, Update, Delete, Execute.
CREATE, READ, EXECUTE = "C", "R", "E"


class Outcome:
    """EventOutcomeIndicator values (PS3.15 A.5.1)."""

    SUCCESS = 0
    MINOR_FAILURE = 4  # the request was refused, the system carries on
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


def participant(user_id: str, *, requestor: bool, address: str | None = None,
                role: dict | None = None, alternative: str | None = None) -> dict:
    """An ActiveParticipant: an AE title (or user) and where it came from."""
    p: dict[str, Any] = {"UserID": user_id, "UserIsRequestor": requestor}
    if alternative:
        p["AlternativeUserID"] = alternative
    if address:
        p["NetworkAccessPointID"] = address
        p["NetworkAccessPointTypeCode"] = "2"  # IP address
    if role is not None:
        p["RoleIDCode"] = role
    return p


def study_object(study_uid: str, series: dict[str, int] | None = None, *,
                 instances: int | None = None, size: int | None = None) -> dict:
    """A ParticipantObjectIdentification for a study: its series and instance counts, never pixel data."""
    obj: dict[str, Any] = {
        "ParticipantObjectID": study_uid,
        "ParticipantObjectTypeCode": 2,  # System Object
        "ParticipantObjectTypeCodeRole": 3,  # Report
        "ParticipantObjectIDTypeCode": STUDY_UID,
    }
    description: dict[str, Any] = {}
    if series:
        description["Series"] = [{"SeriesInstanceUID": uid, "NumberOfInstances": n}
                                 for uid, n in sorted(series.items())]
    if instances is not None:
        description["NumberOfInstances"] = instances
    if size is not None:
        description["Bytes"] = size
    if description:
        obj["ParticipantObjectDescription"] = description
    return obj


def patient_object(patient_id: str) -> dict:
    """The Patient ParticipantObjectIdentification ATNA lists for instances transferred: the ID only."""
    return {
        "ParticipantObjectID": patient_id,
        "ParticipantObjectTypeCode": 1,  # Person
        "ParticipantObjectTypeCodeRole": 1,  # Patient
        "ParticipantObjectIDTypeCode": PATIENT_NUMBER,
    }


def build(event_id: dict, outcome: int, *, action: str = EXECUTE, when: datetime,
          source_id: str, type_codes: tuple[dict, ...] = (), description: str | None = None,
          participants: tuple | list = (), objects: tuple | list = ()) -> dict:
    """One audit message as a dict (pure: the time and source come in)."""
    event: dict[str, Any] = {
        "EventID": event_id,
        "EventActionCode": action,
        "EventDateTime": when.isoformat(timespec="milliseconds"),
        "EventOutcomeIndicator": outcome,
    }
    if type_codes:
        event["EventTypeCode"] = list(type_codes)
    if description:
        event["EventOutcomeDescription"] = description
    message: dict[str, Any] = {
        "EventIdentification": event,
        "ActiveParticipant": list(participants),
        "AuditSourceIdentification": {"AuditSourceID": source_id},
    }
    if objects:
        message["ParticipantObjectIdentification"] = list(objects)
    return message


# --------------------------------------------------------------------------- per-association tally


@dataclass
class Tally:
    """What one association stored: per study, per series instance counts and bytes, and
    the patient of each study where it is known."""

    studies: dict[str, dict[str, int]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    patients: dict[str, str] = field(default_factory=dict)  # study UID -> Patient ID
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, study_uid: str, series_uid: str, size: int, patient_id: str | None = None) -> None:
        with self.lock:
            series = self.studies.setdefault(study_uid, {})
            series[series_uid] = series.get(series_uid, 0) + 1
            self.sizes[study_uid] = self.sizes.get(study_uid, 0) + size
            if patient_id:
                self.patients.setdefault(study_uid, patient_id)

    def has_patient(self, study_uid: str) -> bool:
        """Whether the study's Patient ID is known (the first one found is the one recorded)."""
        with self.lock:
            return study_uid in self.patients

    def set_patient(self, study_uid: str, patient_id: str | None) -> None:
        if patient_id:
            with self.lock:
                self.patients.setdefault(study_uid, patient_id)

    def objects(self) -> list[dict]:
        """The study objects, then one Patient object per distinct Patient ID."""
        with self.lock:
            studies = [study_object(study, dict(series), instances=sum(series.values()),
                                    size=self.sizes.get(study) or None)
                       for study, series in sorted(self.studies.items())]
            return studies + [patient_object(pid) for pid in sorted(set(self.patients.values()))]


# --------------------------------------------------------------------------- the writer


class AuditLog:
    """Appends audit messages to ``path`` from one writer thread; ``record`` never does I/O.

    ``record`` blocks only when ``max_queued`` messages wait (the disk is that slow): the
    trail is complete rather than the memory unbounded.
    """

    FLUSH_SECONDS = 1.0

    def __init__(self, path: Path, source_id: str, rotate_bytes: int = 50 * 1024**2,
                 keep_files: int = 10, clock: Callable[[], datetime] | None = None,
                 max_queued: int = 10_000):
        self.path = Path(path)
        self.source_id = source_id
        self.rotate_bytes = rotate_bytes
        self.keep_files = keep_files
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._closed = False
        self._tickers: list[Callable[[], None]] = []
        self._from_tickers: list[str] = []  # recorded by a ticker, in the writer thread itself

    def add_ticker(self, tick: Callable[[], None]) -> None:
        """Call ``tick`` from the writer thread about once a second (it may ``record``): how
        aggregated events (dimse.refusals) are written when their window ends, with no thread
        of their own."""
        self._tickers.append(tick)

    def record(self, event_id: dict, outcome: int, **kwargs) -> None:
        """Queue one audit message (``build``'s keyword arguments); written within a second."""
        if self._closed:
            log.error("audit event after close dropped: %s", event_id.get("originalText"))
            return
        message = build(event_id, outcome, when=self._clock(), source_id=self.source_id, **kwargs)
        line = json.dumps(message, separators=(",", ":"), ensure_ascii=True)
        if threading.current_thread() is self._thread:  # a ticker: never wait on our own queue
            self._from_tickers.append(line)
        else:
            self._queue.put(line)

    def start(self) -> "AuditLog":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Write and fsync everything recorded so far, then stop the writer."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(30.0)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # ------------------------------------------------------------------ writer thread

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(self._fd, 0o600)

    def _tick(self) -> list[str]:
        for tick in self._tickers:
            try:
                tick()
            except Exception:  # a ticker's bug must not stop the trail
                log.exception("audit ticker failed")
        lines, self._from_tickers = self._from_tickers, []
        return lines

    def _run(self) -> None:
        done = False
        while not done:
            lines = []
            try:
                item = self._queue.get(timeout=self.FLUSH_SECONDS if self._tickers else None)
            except queue.Empty:
                ticked = self._tick()
                if ticked:
                    self._write(ticked)
                continue
            deadline = time.monotonic() + self.FLUSH_SECONDS
            while True:
                if item is None:
                    done = True
                    break
                lines.append(item)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if self._tickers:
                lines.extend(self._tick())
            if lines:
                self._write(lines)

    def _write(self, lines: list[str]) -> None:
        """Append a batch, rotating first whenever the next lines would pass ``rotate_bytes``."""
        pending = [(line + "\n").encode("ascii") for line in lines]
        for attempt in range(3):
            try:
                while pending:
                    size = os.fstat(self._fd).st_size
                    take, total = 0, 0
                    while take < len(pending) and size + total + len(pending[take]) <= self.rotate_bytes:
                        total += len(pending[take])
                        take += 1
                    if take == 0:
                        if size > 0:
                            self._rotate()
                            continue
                        take = 1  # one line larger than rotate_bytes: it gets a file of its own
                    view = memoryview(b"".join(pending[:take]))
                    while view:
                        view = view[os.write(self._fd, view):]
                    os.fsync(self._fd)
                    del pending[:take]
                return
            except OSError as exc:
                log.error("cannot write the audit trail %s (attempt %d): %s", self.path, attempt + 1, exc)
                if self._fd is None:
                    try:
                        self._open()
                    except OSError:
                        pass
                time.sleep(0.5)
        log.critical("audit trail %s: %d event(s) could not be written", self.path, len(pending))

    def _rotate(self) -> None:
        """audit.jsonl -> audit.jsonl.1 -> ... -> audit.jsonl.KEEP (the oldest is removed)."""
        os.close(self._fd)
        self._fd = None
        oldest = self.path.with_name(f"{self.path.name}.{self.keep_files}")
        if oldest.exists():
            oldest.unlink()
        for n in range(self.keep_files - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                older.rename(self.path.with_name(f"{self.path.name}.{n + 1}"))
        self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the renames survive a crash
        finally:
            os.close(dir_fd)
        self._open()


class NullAudit:
    """Stands in where no trail is kept (library use, unit tests of other rooms)."""

    def record(self, event_id: dict, outcome: int, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


NULL = NullAudit()


def read(path: Path) -> list[dict]:
    """Every message of one audit file, in order (tests and tools)."""
    with open(path, encoding="ascii") as f:
        return [json.loads(line) for line in f if line.strip()]
