"""No scheduled job runs twice at once: passes of one sender called from several threads (the
scheduler's timer, a wake after a C-STORE, the inbox's on_queued) never overlap, and each
item reaches the real peer (DCMTK storescp) once."""

from __future__ import annotations

import threading
import time

from gateway.forward import sender as forward
from gateway.storage import sendfiles
from tests.integration.test_forward import SMALL, sender_config


def test_passes_of_one_sender_never_overlap_and_send_each_item_once(tmp_path, ct_series, storescp):
    port, out, _proc = storescp()
    paths = ct_series(6, **SMALL)
    config = sender_config(tmp_path, port)
    assert sendfiles.queue_files(config, "scp", paths).queued == 6
    sender = forward.Sender(config, "scp")
    real = sender.transport
    lock = threading.Lock()
    active, peak = [0], [0]

    class Watched:
        """The real transport, counting how many passes are inside it at once."""

        def send(self, items, stopping):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            try:
                time.sleep(0.3)  # hold the pass open: a second caller would overlap it now
                yield from real.send(items, stopping)
            finally:
                with lock:
                    active[0] -= 1

        def close(self):
            real.close()

    sender.transport = Watched()
    results: list[int] = []
    callers = [threading.Thread(target=lambda: results.append(sender.run_once())) for _ in range(3)]
    try:
        for t in callers:
            t.start()
        for t in callers:
            t.join(120)
        assert not any(t.is_alive() for t in callers)
    finally:
        sender.close()
    assert peak[0] == 1
    assert sorted(results)[-1] == 6 and sum(results) == 6  # one pass sent all, the others nothing
    assert len(list(out.iterdir())) == 6
