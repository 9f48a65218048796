"""The AI result inbox: ready jobs -> stored, indexed, queued DICOM objects, exactly once.

A job is ``NAME.npy`` (or ``NAME.npz`` holding one array) plus its sidecar ``NAME.yaml``;
the sidecar is written last and marks the job ready. One ``run_once`` takes every ready
job: parse the sidecar, find the source series in the index, derive the SEG or SC, write it
atomically into the store, then in ONE transaction index it, mark the job done and queue it
for ``routes.results``; only then are the files moved to ``done/`` beside
``NAME.result.yaml``. A bad job goes to ``failed/`` with ``NAME.error.txt`` (one sentence).

Exactly once: the job row in ``jobs`` is the truth. A crash before the commit leaves no row
marked done, so the job runs again; its UIDs are derived from the job's name and first-seen
time, so the rerun rewrites the same file instead of leaving a second one. A crash after the
commit leaves a done row, and the next poll only finishes the move.

Test hook: ``checkpoint(point)`` is called at each of ``CHECKPOINTS`` of a job; the
integration tests pass one that SIGKILLs the process there, to prove the exactly-once promise.

Files (finding, reading, moving) are ``inbox.jobfiles``; job rows are ``storage.jobs``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

import numpy as np
import yaml
from pydicom.uid import generate_uid

from gateway.metrics import Metrics
from gateway.storage import db, index, jobs
from gateway.storage.datadir import make_dir
from gateway.storage.header import read_header
from gateway.storage.jobs import JobState
from gateway.routing.router import Router
from gateway.storage.store import Arrival, Outcome, Source, Store
from gateway.derive import derive
from gateway.inbox import jobfiles, sidecar
from gateway.inbox import arrays
from gateway.logsafe import wire
from gateway.inbox.jobfiles import JobFiles
from gateway.config import Config
from gateway.errors import GiveUp, JobError, RetryLater, StorageFull, UnreadableHeader

log = logging.getLogger("gateway.inbox")

#: Where ``checkpoint`` is called in a job (tests kill the process there to prove exactly-once).
#: Derivations of one job that may start without finishing before it fails (poison job).
MAX_DERIVE_ATTEMPTS = 3
CHECKPOINTS = ("before_load", "before_encode", "after_store", "after_commit", "before_move")


def result_summary(conn, row, queued_for: list[str], result: derive.Derived | None = None) -> dict:
    """What ``NAME.result.yaml`` says of a done job (its row, the index; ``result``: what the
    derivation just reported). The HTTP job API answers the same before the file is written."""
    inst = index.get_instance(conn, row["sop_instance_uid"])
    summary = {
        "job": row["name"],
        "state": "done",
        "sop_instance_uid": row["sop_instance_uid"],
        "series_instance_uid": row["series_uid"],
        "study_instance_uid": inst["study_uid"] if inst else None,
        "sop_class_uid": inst["sop_class_uid"] if inst else None,
        "sop_class": derive.SOP_CLASS_NAMES.get(inst["sop_class_uid"]) if inst else None,
        "frames": result.frames if result else None,
        "segments": result.segments if result and result.segments else None,
        "summary": result.summary if result else None,
        "stored_as": inst["path"] if inst else None,
        "queued_for": queued_for,
        "finished_at": datetime.fromtimestamp(row["finished_at"]).astimezone().isoformat(),
    }
    return {k: v for k, v in summary.items() if v is not None}


# --------------------------------------------------------------------------- the inbox


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode turned undecodable bytes into lone surrogates
        return False
    return True


class Inbox:
    """The inbox poll: ``run_once`` is one pass; the scheduler calls it every poll interval."""

    def __init__(
        self,
        config: Config,
        on_queued: Callable[[Iterable[str]], None] | None = None,
        clock: Callable[[], float] = time.time,
        checkpoint: Callable[[str], None] = lambda point: None,
        metrics: Metrics | None = None,
    ):
        self.config = config
        self.checkpoint = checkpoint
        self.on_queued = on_queued
        self.metrics = metrics if metrics is not None else Metrics()
        self.clock = clock
        self.path = Path(config.inbox.path)
        self.done_dir = self.path / "done"
        self.failed_dir = self.path / "failed"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._db = db.LazyConnection(config.db_path)
        self._store: Store | None = None
        self._waiting_logged: set[str] = set()

    # ------------------------------------------------------------------ lifecycle

    @property
    def conn(self) -> sqlite3.Connection:
        return self._db.get()

    @property
    def store(self) -> Store:
        """The one ingest path, over this inbox's connection (same thread, same transactions)."""
        if self._store is None or self._store.conn is not self.conn:
            self._store = Store(
                self.config.node.data_dir, self.config.store_dir, self.conn,
                router=Router(self.config, clock=self.clock),
                min_free_bytes=self.config.storage.min_free_bytes, clock=self.clock,
                checkpoint=lambda name: self._checkpoint("after_store") if name == "placed" else None,
            )
        return self._store

    def stop(self) -> None:
        """Finish the job in hand, start no other."""
        self._stop.set()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ one pass

    def run_once(self) -> int:
        """Take every ready job; return how many finished (done or failed) in this pass."""
        if self._stop.is_set():
            return 0
        with self._lock:
            try:
                self.path.mkdir(parents=True, exist_ok=True)  # shared with the AI tools
                for folder in (self.done_dir, self.failed_dir):
                    make_dir(folder)  # the gateway's own: 0700
                jobs = self.ready_jobs()
            except OSError as exc:
                log.error("cannot read the inbox %s: %s", self.path, exc.strerror or exc)
                return 0
            try:
                self._forget_vanished({job.name for job in jobs})
            except sqlite3.OperationalError as exc:
                log.warning("cannot tidy waiting jobs now: %s", exc)
            finished = 0
            for job in jobs:
                if self._stop.is_set():
                    break
                if not _utf8(job.name):  # no row can hold it: straight to failed/
                    finished += self._refuse_name(job)
                    continue
                try:
                    finished += self._run_job(job)
                except (RetryLater, sqlite3.OperationalError) as exc:
                    log.warning("job %s will be retried at the next poll: %s", job.name, exc)
                except Exception:  # one job's trouble must never stop the node
                    log.exception("job %s: unexpected error; it will be retried", job.name)
            return finished

    def ready_jobs(self) -> list[JobFiles]:
        return jobfiles.find_ready(self.path)

    def _forget_vanished(self, present: set[str]) -> None:
        """Waiting jobs whose sidecar was taken away are no longer jobs: drop their rows."""
        gone = [name for name in jobs.waiting_names(self.conn) if name not in present]
        if not gone:
            return
        with db.transaction(self.conn):
            jobs.forget_waiting(self.conn, gone)
        for name in gone:
            self._waiting_logged.discard(name)
            log.info("job %s was removed from the inbox before it ran; forgotten", name)

    # ------------------------------------------------------------------ one job

    def _job_row(self, name: str) -> sqlite3.Row | None:
        return jobs.get(self.conn, name)

    def _is_new(self, job: JobFiles, row) -> bool:
        """Files under a finished job's name: a new job, or the finished one's leftovers?"""
        recorded = row["files"] if "files" in row.keys() else None
        if recorded is not None:  # which files it was derived from: exact
            return jobfiles.replaced(job, recorded)
        return jobfiles.dropped_after(job, row["finished_at"])  # rows of earlier releases

    def _run_job(self, job: JobFiles) -> int:
        row = self._job_row(job.name)
        if row is not None and row["state"] == JobState.DONE.value:
            if self._is_new(job, row):
                # A new job under a used name: keep the done record, refuse the new files.
                if jobfiles.dropped_after(job, row["finished_at"]):
                    error = (f"a job named {job.name} was already done (SOP Instance UID "
                             f"{row['sop_instance_uid']}); give every job a unique name")
                else:
                    error = (f"{job.name} was replaced while it was being derived: the first "
                             f"version is done (SOP Instance UID {row['sop_instance_uid']}, see "
                             f"done/{job.name}.result.yaml) and these files were not derived; "
                             "drop them again under a new name")
                self._move(job, self.failed_dir, error=error)
                log.warning("job %s refused: its name was already used", job.name)
                return 1
            self._finish_done(job, row)  # the process stopped between commit and move
            return 1
        if row is not None and row["state"] == JobState.FAILED.value:
            if not self._is_new(job, row):
                self._move(job, self.failed_dir, error=row["error"])
                return 1
            with db.transaction(self.conn):  # dropped again (fixed?): a fresh attempt
                jobs.delete(self.conn, job.name)
            row = None
        now = self.clock()
        if row is None:
            with db.transaction(self.conn):
                jobs.add_waiting(self.conn, job.name, now)
            row = self._job_row(job.name)
            log.info("job %s seen in the inbox", job.name)
        seen: dict[str, str] = {}  # identity of each file as it was read
        try:
            if job.problem:
                raise JobError(job.problem)
            started = time.monotonic()
            committed = self._derive_and_store(job, row, now, seen)
        except GiveUp as exc:
            return self._fail(job, str(exc), seen)
        except (RetryLater, sqlite3.OperationalError):
            raise
        except MemoryError:
            return self._fail(job, "the gateway ran out of memory deriving this job; send a smaller "
                                   "array or give the node more memory", seen)
        except Exception as exc:  # a bug or odd input: fail this job, keep going
            log.exception("job %s: unexpected error while deriving", job.name)
            return self._fail(job, f"the job could not be turned into DICOM ({type(exc).__name__}: "
                                   f"{exc})", seen)
        if committed is None:
            return 0  # waiting for its source
        # Committed: from here on nothing may mark the job failed; if the move does not
        # happen now, the next poll finishes it from the done row.
        result, destinations = committed
        log.info("derived SOP %s (%s) from job %s: %s", result.sop_instance_uid,
                 derive.SOP_CLASS_NAMES[result.sop_class_uid], job.name, result.summary)
        for dest in destinations:
            log.info("queued SOP %s for %s", result.sop_instance_uid, dest)
        if destinations and self.on_queued is not None:
            try:
                self.on_queued(destinations)
            except Exception:  # the senders' own poll picks the items up anyway
                log.exception("job %s: waking the senders failed", job.name)
        self.metrics.inbox_job("done", time.monotonic() - started)
        self._finish_done(job, self._job_row(job.name), result)
        return 1

    def _sources(self, job: JobFiles, spec: sidecar.Job, arr: np.ndarray, row, now: float):
        """The source headers, or None while the source may still be arriving."""
        waited = now - row["first_seen_at"]
        limit = self.config.inbox.source_wait_seconds
        series = spec.source.series_instance_uid
        if series:
            rows = index.series_instances(self.conn, series)
            what = f"series {series}"
        else:
            rows = index.study_instances(self.conn, spec.source.study_instance_uid)[:1]
            what = f"study {spec.source.study_instance_uid}"
        kind = sidecar.default_kind(spec, arr.dtype.kind)
        frames = arr.shape[0] if arr.ndim == 3 else 1
        short = kind is sidecar.Kind.SEGMENTATION and rows and len(rows) < frames
        if not rows or short:
            if waited < limit:
                if job.name not in self._waiting_logged:
                    self._waiting_logged.add(job.name)
                    have = f"{len(rows)} of {frames} images" if rows else "nothing"
                    log.info("job %s waits for source %s (have %s; gives up after %gs)",
                             job.name, what, have, limit)
                return None
            if not rows:
                raise JobError(
                    f"the source {what} has not been received within {limit:g} seconds; send it "
                    "to the gateway first, then drop the job again"
                )
        self._waiting_logged.discard(job.name)
        datasets = []
        for r in rows:
            path = index.absolute_path(self.config.node.data_dir, r)
            try:
                datasets.append(read_header(path).dataset)
            except (OSError, UnreadableHeader) as exc:
                raise JobError(
                    f"the source instance {r['sop_instance_uid']} cannot be read from the store "
                    f"({exc}); send the source series again"
                ) from None
        return datasets

    def _derive_and_store(
        self, job: JobFiles, row, now: float, seen: dict[str, str]
    ) -> tuple[derive.Derived, tuple[str, ...]] | None:
        """Derive, write, commit; None while the source is not here. Nothing after the commit."""
        spec = jobfiles.read_sidecar(jobfiles.safe_path(self.path, job.sidecar), seen, job.sidecar.name)
        assert job.array is not None
        array_path = jobfiles.safe_path(self.path, job.array)
        info = arrays.inspect(array_path, job.array.name, seen)  # header only: nothing loaded yet
        sources = self._sources(job, spec, info, row, now)
        if sources is None:
            return None
        if (sidecar.default_kind(spec, info.dtype.kind) is sidecar.Kind.SEGMENTATION and sources
                and "Rows" in sources[0] and "Columns" in sources[0]):
            arrays.check_against_source(info, job.array.name, len(sources),
                                        int(sources[0].Rows), int(sources[0].Columns))
        started = row["derive_attempts"] if "derive_attempts" in row.keys() else 0
        if started >= MAX_DERIVE_ATTEMPTS:
            raise JobError(
                f"the gateway stopped {started} times while deriving this job (killed for lack of "
                "memory, or crashed); it is not tried again: check the array and the node's "
                "memory, then drop the job again")
        with db.transaction(self.conn):  # committed first: a crash during the derive counts
            jobs.start_derive(self.conn, job.name, jobfiles.identity(job, seen))
        self._checkpoint("before_load")
        arr = arrays.load(array_path, info, job.array.name, seen)
        self._checkpoint("before_encode")
        # Same job, same first-seen time -> same UIDs: a rerun after a crash rewrites one file.
        counter = iter(range(1000))
        seed = f"{job.name}|{row['first_seen_at']!r}"

        def new_uid() -> str:
            return generate_uid(entropy_srcs=["dicom-gateway", seed, str(next(counter))])

        opts = derive.Options(
            job_name=job.name,
            now=datetime.fromtimestamp(now).astimezone(),
            new_uid=new_uid,
            keep_empty_frames=self.config.inbox.keep_empty_frames,
        )
        result = derive.derive(sources, arr, spec, opts)
        del arr
        stored = self.store.ingest_dataset(result.dataset, Arrival(Source.DERIVED, job=job.name))
        if stored.outcome is Outcome.NO_SPACE:
            raise StorageFull(stored.reason)
        if stored.outcome is Outcome.FAILED:
            raise RetryLater(stored.reason)
        if stored.outcome is not Outcome.STORED:
            raise JobError(f"the store refused the derived object: {stored.reason}")
        destinations = stored.queued_for
        self._checkpoint("after_commit")
        return result, destinations

    # ------------------------------------------------------------------ endings

    def _finish_done(self, job: JobFiles, row, result: derive.Derived | None = None) -> None:
        summary = result_summary(self.conn, row, list(self.config.routes.results), result)
        text = yaml.safe_dump(summary, sort_keys=False)
        if not self._move(job, self.done_dir, result_text=text, expect=row["files"]):
            log.warning("job %s was replaced while it was being derived: the first version is done "
                        "(SOP Instance UID %s); the new files stay in the inbox", job.name,
                        row["sop_instance_uid"])

    def _refuse_name(self, job: JobFiles) -> int:
        """A job name that is not UTF-8 (os.fsdecode's escapes in it): failed, with a reason."""
        message = ("the job name is not valid UTF-8; name the job's files with UTF-8 text (ASCII "
                   "letters, digits, '-' and '_' are safest)")
        log.warning("job %s failed: %s", wire(job.name), message)
        try:
            self._move(job, self.failed_dir, error=message + ".")
        except OSError as exc:
            log.error("cannot move job %s to failed/: %s", wire(job.name), exc.strerror or exc)
        return 1

    def _fail(self, job: JobFiles, message: str, seen: dict[str, str] | None = None) -> int:
        """Mark the job failed and move it to failed/; a job replaced meanwhile is left instead."""
        message = " ".join(message.split())
        if not message.endswith("."):
            message += "."
        read = jobfiles.identity(job, seen or {})
        self._waiting_logged.discard(job.name)
        if jobfiles.replaced(job, read):  # what failed is gone: the new files get a fresh start
            with db.transaction(self.conn):
                jobs.delete(self.conn, job.name)
            log.warning("job %s was replaced while it was being derived (the first version failed: "
                        "%s); the new files are left for the next poll", job.name, message)
            return 0
        with db.transaction(self.conn):
            jobs.mark_failed(self.conn, job.name, message, self.clock(), files=read)
        log.warning("job %s failed: %s", job.name, message)
        self.metrics.inbox_job("failed")
        self._move(job, self.failed_dir, error=message, expect=read)
        return 1

    def _move(self, job: JobFiles, folder: Path, error: str | None = None,
              result_text: str | None = None, expect: str | None = None) -> bool:
        moved = jobfiles.move(job, folder, self.path, error=error, result_text=result_text,
                              before_move=lambda: self._checkpoint("before_move"), expect=expect)
        if moved:
            log.info("job %s moved to %s/", wire(job.name), folder.name)
        return moved

    def _checkpoint(self, point: str) -> None:
        """Test hook: tell ``checkpoint`` (one of CHECKPOINTS) where a job is."""
        self.checkpoint(point)
