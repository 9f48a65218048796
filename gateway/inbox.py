"""The AI result inbox: finds ready jobs and turns them into stored, queued DICOM objects.

(Minimal placeholder so ``dicom-gateway run`` starts; the real poll lands next.)
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable

from gateway.config import Config

log = logging.getLogger("gateway.inbox")


class Inbox:
    def __init__(self, config: Config, on_queued: Callable[[Iterable[str]], None] | None = None):
        self.config = config
        self.on_queued = on_queued
        self._stop = threading.Event()

    def run_once(self) -> int:
        """One poll: run every ready job; returns how many finished (done or failed)."""
        return 0

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        pass
