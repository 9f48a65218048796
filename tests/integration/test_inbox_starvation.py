"""The inbox poll cannot be starved by busy senders: it runs on its own executor."""

from __future__ import annotations

import socket
import threading

import pydicom

from tests.conftest import wait_until
from tests.integration.test_inbox_events import N, C, R, drop

HUNG = 12  # more stuck senders than APScheduler's default pool has threads (10)


class HungPacs:
    """Accepts TCP connections and never answers: each association attempt waits for its ACSE timeout."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)

    def close(self):
        """Closing every held connection lets the stuck senders fail at once (clean shutdown)."""
        self.stopping.set()
        self.thread.join(5)
        for conn in self.conns:
            conn.close()
        self.sock.close()


def test_the_inbox_poll_runs_while_every_sender_thread_is_stuck(dcmtk, ct_series, gateway_factory):
    pacs = HungPacs()
    try:
        dests = {f"dead{k}": {"ae_title": f"DEAD{k}", "host": "127.0.0.1", "port": pacs.port}
                 for k in range(HUNG)}
        gw = gateway_factory(
            destinations=dests,
            inbox={"path": "inbox", "poll_interval_seconds": 0.5, "watch_events": False},
            forward={"poll_interval_seconds": 0.2, "acse_timeout_seconds": 120},
            retry={"max_attempts": 100, "initial_backoff_seconds": 0.5, "max_backoff_seconds": 2},
        )
        paths = ct_series(N, R, C)
        dcmtk.storescu(gw.port, gw.ae_title, *paths, calling="MODALITY").check_returncode()
        for name in dests:
            result = gw.cli("send", name, str(paths[0]))
            assert result.returncode == 0, result.stderr
        # Every sender now waits in its association attempt, each holding a scheduler thread.
        wait_until(lambda: len(pacs.conns) >= HUNG, 30, what="every sender to be stuck")
        inbox = gw.config_path.parent / "inbox"
        series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
        drop(inbox, "starved", series_uid)
        # Far below the senders' 120 s ACSE timeout: only a poll of its own can have taken it.
        wait_until(lambda: (inbox / "done" / "starved.result.yaml").exists(), 20,
                   what="the job to be derived while the senders are stuck")
        assert len(pacs.conns) >= HUNG  # the senders were still stuck meanwhile
    finally:
        pacs.close()
