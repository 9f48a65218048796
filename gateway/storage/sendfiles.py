"""``dicom-gateway send DEST PATH...``: put DICOM files into the store and queue them by hand.

Each file goes through the one ingest path (``store.Store.ingest``) as a copy, bytes
unchanged: indexed (origin 'manual') and queued for DEST; a running gateway sends them on
its next pass. Files that are not DICOM Part 10 files, or whose UIDs are unusable, are
skipped with one line each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config import Config
from gateway.dimse import scu
from gateway.errors import StorageFull, UnreadableHeader
from gateway.storage.header import read_header
from gateway.storage.store import Arrival, Outcome, Source, Store

log = logging.getLogger("gateway.sendfiles")


@dataclass
class SendReport:
    queued: int = 0
    problems: list[str] = field(default_factory=list)
    nbytes: int = 0  # bytes of the files queued


def count_files(paths: Iterable[Path]) -> tuple[int, int]:
    """How many files ``queue_files`` will look at, and their total size (a stat each, for a progress bar)."""
    n = size = 0
    for path in files_under(paths, []):
        n += 1
        try:
            size += path.stat().st_size
        except OSError:
            pass
    return n, size


def files_under(paths: Iterable[Path], problems: list[str]) -> Iterator[Path]:
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
    queued: dict[str, int] = {}  # SOP Instance UID -> bytes
    clock = time.time if now is None else (lambda: now)
    store = Store.open(config, clock=clock)
    arrival = Arrival(Source.SEND, destinations=(dest,))
    try:
        for path in _tracked(files_under(paths, report.problems), progress):
            try:
                read_header(path)  # not DICOM: skip it before copying it
            except UnreadableHeader as exc:
                report.problems.append(f"{path}: skipped, {exc}")
                continue
            except OSError as exc:
                report.problems.append(f"{path}: skipped, cannot read it: {exc.strerror or exc}")
                continue
            try:
                result = store.ingest_copy(path, arrival)
            except OSError as exc:
                report.problems.append(f"{path}: skipped, cannot read it: {exc.strerror or exc}")
                continue
            if result.outcome is Outcome.STORED:
                queued[result.sop_instance_uid] = result.size
                log.info("queued SOP %s for %s (from a file)", result.sop_instance_uid, dest)
            elif result.outcome is Outcome.NO_SPACE:
                raise StorageFull(f"{result.reason} ({len(queued)} file(s) were queued before that)")
            elif result.outcome is Outcome.FAILED:
                report.problems.append(f"{path}: skipped, cannot copy it into the store: {result.reason}")
            else:
                report.problems.append(f"{path}: skipped, {result.reason}")
    finally:
        store.close()
    report.queued = len(queued)
    report.nbytes = sum(queued.values())
    return report
