"""``dicom-gateway run``: wires the SCP, the inbox poll and one sender per destination.

Everything runs in this process: pynetdicom's server threads for receive, an APScheduler
background scheduler for the inbox poll and the senders (each job never overlaps itself),
and the main thread waiting for SIGTERM/SIGINT to shut all of it down in order.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import datetime

from apscheduler.schedulers.background import BackgroundScheduler

from gateway import sdnotify
from gateway.storage import db, queue
from gateway.config import Config

log = logging.getLogger("gateway.service")


def run(config: Config, stop: threading.Event | None = None) -> int:
    """Run until ``stop`` is set (SIGTERM/SIGINT set it); return the exit code."""
    import pydicom

    from gateway.forward import sender as forward
    from gateway.inbox import inbox
    from gateway.dimse import receive

    # pydicom checks every value it reads against its VR (a regex per UID, ~8% of receive
    # CPU) only to warn; we check the UIDs that matter ourselves (uids.check_uid).
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: stop.set())

    config.node.data_dir.mkdir(parents=True, exist_ok=True)
    conn = db.connect(config.db_path)
    try:
        with db.transaction(conn):
            stale = queue.requeue_stale(conn, time.time())
    finally:
        conn.close()
    if stale:
        log.info("requeued %d item(s) left 'sending' by an earlier run", stale)

    scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
    senders = {name: forward.Sender(config, name) for name in config.destinations}

    def wake_senders(names) -> None:
        """Send new work now instead of at the next poll (derived objects: low latency)."""
        for name in names:
            job = scheduler.get_job(f"forward:{name}")
            if job is not None:
                job.modify(next_run_time=datetime.now(job.trigger.timezone))

    poller = inbox.Inbox(config, on_queued=wake_senders)
    server = receive.start_server(config, on_queued=wake_senders)
    web = None
    if config.http.enabled:
        from gateway.web import server as http

        try:
            web = http.start(config, http.deps_for(config, on_queued=wake_senders))
        except BaseException:
            server.shutdown()
            raise
    log.info(
        "listening as %s on %s:%d; inbox %s every %gs; destinations: %s",
        config.node.ae_title, config.node.host, config.node.port, config.inbox.path,
        config.inbox.poll_interval_seconds, ", ".join(config.destinations) or "none",
    )
    now = datetime.now().astimezone()
    scheduler.add_job(poller.run_once, "interval", seconds=config.inbox.poll_interval_seconds,
                      id="inbox", next_run_time=now)
    for name, sender in senders.items():
        scheduler.add_job(sender.run_once, "interval", seconds=config.forward.poll_interval_seconds,
                          id=f"forward:{name}", next_run_time=now)
    scheduler.start()
    sdnotify.notify(f"READY=1\nSTATUS=listening on {config.node.host}:{config.node.port}")
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sdnotify.notify("STOPPING=1")
        log.info("shutting down")
        steps = [*(s.stop for s in senders.values()), poller.stop,
                 *([web.shutdown] if web is not None else []), server.shutdown,
                 lambda: scheduler.shutdown(wait=True), *(s.close for s in senders.values()),
                 poller.close]
        failed = 0
        for step in steps:  # every step runs even if one fails: no thread may keep us alive
            try:
                step()
            except Exception as exc:
                failed += 1
                log.error("shutdown step failed: %r", exc)
        log.info("stopped")
    return 1 if failed else 0
