"""dimse.refusals: refused connections become bounded audit messages whose counts add up."""

from __future__ import annotations

from gateway.dimse.refusals import RefusalTrail


class Recorder:
    def __init__(self):
        self.messages = []

    def record(self, event_id, outcome, **kwargs):
        self.messages.append((kwargs["participants"][0]["NetworkAccessPointID"], kwargs["description"]))


class Clock:
    now = 100.0

    def __call__(self):
        return self.now


def counts(rec: Recorder, host: str) -> list[int]:
    return [int(d.split()[1]) for h, d in rec.messages if h == host]


def test_a_flood_is_one_message_per_address_per_window_and_the_counts_add_up():
    rec, clock = Recorder(), Clock()
    trail = RefusalTrail(rec, "GW", clock=clock)
    for i in range(5000):  # 5000 refusals from one address over 2.5 s, 500 from another
        clock.now = 100.0 + i * 0.0005
        trail.refused("10.0.0.1", "busy")
        if i % 10 == 0:
            trail.refused("10.0.0.2", "busy")
        trail.flush()  # what the flusher thread does, as often as it likes
    trail.close()
    assert sum(counts(rec, "10.0.0.1")) == 5000 and sum(counts(rec, "10.0.0.2")) == 500
    assert len(counts(rec, "10.0.0.1")) <= 4 and len(counts(rec, "10.0.0.2")) <= 4
    assert counts(rec, "10.0.0.1")[0] == 1  # the first refusal is written at once
    assert trail.pending() == 0


def test_reasons_are_kept_apart_and_addresses_beyond_the_bound_are_counted_together():
    rec, clock = Recorder(), Clock()
    trail = RefusalTrail(rec, "GW", clock=clock, max_addresses=3)
    for n in range(10):
        trail.refused(f"10.0.1.{n}", "busy")
    trail.refused("10.0.1.0", "evicted")
    trail.close()
    hosts = [h for h, _ in rec.messages]
    assert hosts.count("*") >= 1 and len(set(hosts)) == 4  # three addresses, then "*"
    assert sum(int(d.split()[1]) for _, d in rec.messages) == 11
    assert any(d.endswith("evicted") for _, d in rec.messages)


def test_the_audit_writer_writes_what_waits_without_more_refusals(tmp_path):
    import threading
    import time

    from gateway import audit as audit_trail

    log = audit_trail.AuditLog(tmp_path / "audit.jsonl", "GW").start()
    trail = RefusalTrail(log, "GW", window=0.1)
    threads = threading.active_count()
    for _ in range(50):
        trail.refused("10.0.0.1", "busy")
    assert threading.active_count() == threads  # no thread of its own
    deadline = time.monotonic() + 10
    while trail.pending() and time.monotonic() < deadline:  # the writer's tick flushes it
        time.sleep(0.05)
    assert trail.pending() == 0
    log.close()
    texts = [e["EventIdentification"]["EventOutcomeDescription"] for e in audit_trail.read(tmp_path / "audit.jsonl")]
    assert sum(int(t.split()[1]) for t in texts) == 50 and len(texts) == 2
