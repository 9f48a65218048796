"""``dicom-gateway run``: wires the SCP, the inbox poll and one sender per destination.

Everything runs in this process: pynetdicom's server threads for receive, an APScheduler
background scheduler for the inbox poll and the senders (each job never overlaps itself),
and the main thread waiting for SIGTERM/SIGINT to shut all of it down in order.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from gateway import metrics as gateway_metrics
from gateway import sdnotify
from gateway.storage import datadir, db, queue
from gateway import status
from gateway.config import Config
from gateway.errors import FastPathUnavailable

log = logging.getLogger("gateway.service")


def _sender(config: Config, name: str, audit, metrics):
    """The destination's sender; its transport follows the type (C-STORE or STOW-RS)."""
    from gateway.forward import sender as forward

    return forward.Sender(config, name, audit=audit, metrics=metrics)


def run(config: Config, stop: threading.Event | None = None,
        crash_hook: Callable[[str], None] | None = None) -> int:
    """Run until ``stop`` is set (SIGTERM/SIGINT set it); return the exit code.

    ``crash_hook`` is a test seam: called with a point's name at the trigger export's crash
    points (``routing.export.CRASH_POINTS``) and the inbox's (``inbox.CHECKPOINTS``);
    production passes None.
    """
    import pydicom

    # pydicom checks every value it reads against its VR (a regex per UID, ~8% of receive
    # CPU) only to warn; we check the UIDs that matter ourselves (uids.check_uid).
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

    from gateway.dimse import fence  # never fall back silently: refuse, exit 2

    fast = config.performance.pynetdicom_fast_path
    problems = fence.missing(fast)
    if problems:
        raise FastPathUnavailable([fence.refusal(problems, fast)])

    # One process per data folder, before anything in it is touched (DataDirInUse: exit 2).
    data_lock = datadir.lock(config.node.data_dir)
    try:
        return _run_locked(config, stop, crash_hook)
    finally:
        data_lock.release()


def _run_locked(config: Config, stop: threading.Event | None,
                crash_hook: Callable[[str], None] | None) -> int:
    from gateway import audit as audit_trail
    from gateway.inbox import inbox
    from gateway.dimse import receive
    from gateway.inbox.watch import InboxWatcher
    from gateway.routing.export import SeriesTriggers
    from gateway.routing.webhook import Webhooks

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: stop.set())

    inbox_dir = config.inbox.path
    datadir.secure(config.node.data_dir, (inbox_dir / "done", inbox_dir / "failed"))
    audit = _start_audit(config)
    for warning in status.security_warnings(config):
        log.warning("%s", warning)
    conn = db.connect(config.db_path)
    try:
        with db.transaction(conn):
            stale = queue.requeue_stale(conn, time.time())
    finally:
        conn.close()
    if stale:
        log.info("requeued %d item(s) left 'sending' by an earlier run", stale)
    from gateway.storage.reconcile import reconcile
    from gateway.storage.store import Store

    store = Store.open(config)  # before any listener: files and rows agree, no temp leftovers
    try:
        reconcile(store)
    finally:
        store.close()

    metrics = gateway_metrics.build(config)
    # The inbox has an executor of its own: senders stuck in association attempts (one
    # thread each) must never starve it; the default pool has a thread per sender besides.
    scheduler = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(len(config.destinations) + 4),
                   "inbox": ThreadPoolExecutor(1)},
        job_defaults={"coalesce": True, "max_instances": 1},
    )
    senders = {name: _sender(config, name, audit, metrics) for name in config.destinations}

    def wake_senders(names) -> None:
        """Send new work now instead of at the next poll (derived objects: low latency)."""
        for name in names:
            job = scheduler.get_job(f"forward:{name}")
            if job is not None:
                job.modify(next_run_time=datetime.now(job.trigger.timezone))

    def wake(job_id: str) -> None:
        job = scheduler.get_job(job_id)
        if job is not None:
            job.modify(next_run_time=datetime.now(job.trigger.timezone))

    poller = inbox.Inbox(config, on_queued=wake_senders, metrics=metrics,
                         checkpoint=crash_hook or (lambda point: None))
    watcher = InboxWatcher(config.inbox.path, poller.run_once) if config.inbox.watch_events else None
    series_triggers = (SeriesTriggers(config, on_fired=lambda: wake("webhooks"), crash_hook=crash_hook)
                       if config.triggers else None)
    webhooks = Webhooks(config) if any(t.webhook for t in config.triggers) else None
    audit.record(audit_trail.APPLICATION_ACTIVITY, audit_trail.Outcome.SUCCESS,
                 type_codes=(audit_trail.APPLICATION_START,), participants=_app(config))
    try:
        server = receive.start_server(config, on_queued=wake_senders, audit=audit, metrics=metrics)
    except Exception:
        audit.record(audit_trail.APPLICATION_ACTIVITY, audit_trail.Outcome.SERIOUS_FAILURE,
                     type_codes=(audit_trail.APPLICATION_STOP,), participants=_app(config),
                     description="the DICOM listener could not start")
        audit.close()
        raise
    web = None
    if config.http.enabled:
        from gateway.web import server as http

        try:
            deps = http.deps_for(config, on_queued=wake_senders)
            deps.extras["metrics"] = metrics
            deps.extras["audit"] = audit
            web = http.start(config, deps)
        except BaseException:
            server.shutdown()
            audit.close()
            raise
    ports = [f"{config.node.host}:{config.node.port}"] if config.node.port is not None else []
    if config.node.tls is not None:
        ports.append(f"{config.node.host}:{config.node.tls.port} (TLS)")
    log.info(
        "listening as %s on %s; inbox %s every %gs; destinations: %s",
        config.node.ae_title, ", ".join(ports), config.inbox.path,
        config.inbox.poll_interval_seconds, ", ".join(config.destinations) or "none",
    )
    now = datetime.now().astimezone()
    scheduler.add_job(poller.run_once, "interval", seconds=config.inbox.poll_interval_seconds,
                      id="inbox", next_run_time=now, executor="inbox")
    for name, sender in senders.items():
        scheduler.add_job(sender.run_once, "interval", seconds=config.forward.poll_interval_seconds,
                          id=f"forward:{name}", next_run_time=now)
    if series_triggers is not None:
        # A series is due stable_seconds after its last instance: look often enough to fire
        # within a quarter of that (at most every second, at least every 50 ms).
        every = min(1.0, max(0.05, config.series_complete.stable_seconds / 4))
        scheduler.add_job(series_triggers.run_once, "interval", seconds=every, id="triggers",
                          next_run_time=now)
    if webhooks is not None:
        scheduler.add_job(webhooks.run_once, "interval", seconds=1.0, id="webhooks", next_run_time=now)
    scheduler.start()
    if watcher is not None and watcher.start():
        log.info("inbox %s: reacting to file events, polling every %gs as the safety net",
                 config.inbox.path, config.inbox.poll_interval_seconds)
    sdnotify.notify(f"READY=1\nSTATUS=listening on {', '.join(ports)}")
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sdnotify.notify("STOPPING=1")
        log.info("shutting down")
        extras = [x for x in (series_triggers, webhooks) if x is not None]
        steps = [*(s.stop for s in senders.values()), poller.stop, *(x.stop for x in extras),
                 *([watcher.stop] if watcher is not None else []),
                 *([web.shutdown] if web is not None else []), server.shutdown,
                 lambda: scheduler.shutdown(wait=True), *(s.close for s in senders.values()),
                 poller.close, *(x.close for x in extras)]
        steps.append(lambda: audit.record(
            audit_trail.APPLICATION_ACTIVITY, audit_trail.Outcome.SUCCESS,
            type_codes=(audit_trail.APPLICATION_STOP,), participants=_app(config)))
        steps.append(audit.close)  # last: everything recorded above is fsynced before exit
        failed = 0
        for step in steps:  # every step runs even if one fails: no thread may keep us alive
            try:
                step()
            except Exception as exc:
                failed += 1
                log.error("shutdown step failed: %r", exc)
        log.info("stopped")
    return 1 if failed else 0


def _app(config: Config) -> list[dict]:
    from gateway import audit as audit_trail

    return [audit_trail.participant(config.node.ae_title, requestor=False,
                                    role=audit_trail.APPLICATION_ROLE,
                                    alternative=f"dicom-gateway pid {os.getpid()}")]


def _start_audit(config: Config):
    """Open the trail and record the config this run uses (its path and digest, never its values)."""
    from gateway import audit as audit_trail

    audit = audit_trail.AuditLog(config.audit_path, f"{config.node.ae_title}@{socket.gethostname()}",
                                 config.audit.rotate_bytes, config.audit.keep_files).start()
    obj = {"ParticipantObjectID": str(config.source_path or "(defaults)"),
           "ParticipantObjectTypeCode": 2, "ParticipantObjectTypeCodeRole": 13,  # Security Resource
           "ParticipantObjectIDTypeCode": {"csd-code": "12", "codeSystemName": "RFC-3881",
                                           "originalText": "URI"}}
    if config.source_path is not None:
        try:
            obj["ParticipantObjectDetail"] = [{"type": "SHA-256", "value": hashlib.sha256(
                config.source_path.read_bytes()).hexdigest()}]
        except OSError:
            pass
    audit.record(audit_trail.SECURITY_ALERT, audit_trail.Outcome.SUCCESS,
                 type_codes=(audit_trail.SOFTWARE_CONFIGURATION,), participants=_app(config),
                 objects=[obj], description="configuration loaded")
    return audit
