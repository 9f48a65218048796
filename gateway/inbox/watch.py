"""React to the inbox at once: file events (inotify through ``watchdog``) start the inbox pass.

The scheduler's poll stays as the safety net (events can be lost: a full inotify queue, a
network filesystem, a watch that failed to start). Events only *kick* one worker thread,
which calls the same ``run_once`` as the poll; ``run_once`` holds its own lock, so two
passes never run at once, and a kick that arrives during a pass makes one more pass after
it, so a job dropped meanwhile never waits for the next poll.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger("gateway.inbox.watch")


def wanted(event: FileSystemEvent) -> bool:
    """A sidecar is ready: renamed into the inbox, or closed after writing.

    A plain "created" event is also what a rename from another folder looks like; it counts
    only once the file has content, so a sidecar being written in place (against the
    advice) is taken at its "closed" event rather than half-written at its creation.
    """
    if event.is_directory or event.event_type not in ("created", "moved", "closed"):
        return False
    path = getattr(event, "dest_path", "") or event.src_path
    path = path if isinstance(path, str) else os.fsdecode(path)
    name = os.path.basename(path)
    if name.startswith(".") or not name.endswith(".yaml"):
        return False
    if event.event_type == "created":
        try:
            return os.stat(path).st_size > 0
        except OSError:
            return False
    return True


class Kicker:
    """A worker thread that runs ``work`` once per burst of kicks (never concurrently)."""

    def __init__(self, work: Callable[[], object], name: str = "inbox-events"):
        self.work = work
        self._kicked = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def kick(self) -> None:
        self._kicked.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._kicked.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._kicked.wait(timeout=1.0)
            if self._stop.is_set():
                return
            if not self._kicked.is_set():
                continue
            self._kicked.clear()  # a kick during the pass sets it again: one more pass follows
            try:
                self.work()
            except Exception:  # the poll is the safety net; never let the thread die
                log.exception("inbox pass started by a file event failed")


class _Handler(FileSystemEventHandler):
    def __init__(self, kick: Callable[[], None]):
        self.kick = kick

    def on_any_event(self, event: FileSystemEvent) -> None:
        if wanted(event):
            self.kick()


class InboxWatcher:
    """inotify on the inbox folder (not its subfolders) kicking the inbox pass."""

    def __init__(self, folder: Path, run_once: Callable[[], object]):
        self.folder = Path(folder)
        self.kicker = Kicker(run_once)
        self._observer = None

    def start(self) -> bool:
        """Start watching; False (and the poll alone) when the folder cannot be watched."""
        self.kicker.start()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            observer = Observer()
            observer.schedule(_Handler(self.kicker.kick), str(self.folder), recursive=False)
            observer.daemon = True
            observer.start()
        except (OSError, RuntimeError) as exc:
            log.warning("cannot watch the inbox %s for file events (%s); relying on the poll alone",
                        self.folder, exc)
            return False
        self._observer = observer
        return True

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None
        self.kicker.stop()
