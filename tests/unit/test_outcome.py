"""forward.outcome (pure: what an answer or an exception means for a queue item), and the
sender recording what a transport yields (queue states, retry policy, untried items given back)."""

from __future__ import annotations

import socket
import ssl

import pytest

from gateway import config as config_mod
from gateway.errors import PeerGone
from gateway.forward import outcome
from gateway.forward.outcome import Outcome, Verdict
from gateway.forward.sender import Sender
from gateway.storage import db, index, queue

CT = "1.2.840.10008.5.1.4.1.1.2"
J2K = "1.2.840.10008.1.2.4.90"


@pytest.mark.parametrize("status,verdict,note", [
    (0x0000, Verdict.SENT, None),
    (0xB000, Verdict.SENT, "warning 0xB000"),  # coercion of data elements: stored
    (0x0107, Verdict.SENT, "warning 0x0107"),  # attribute list error: a warning category
])
def test_success_and_warning_statuses_are_sent(status, verdict, note):
    assert outcome.of_c_store(status, "", "PACS") == Outcome(verdict, note)


@pytest.mark.parametrize("status,category", [(0xA700, "Failure"), (0xC000, "Failure"), (0xA900, "Failure")])
def test_failure_statuses_are_retried_with_the_status_and_comment(status, category):
    result = outcome.of_c_store(status, "disk\nfull", "PACS")
    assert result.verdict is Verdict.RETRY
    assert result.reason.startswith(f"PACS answered C-STORE with status 0x{status:04X} ({category}): disk")
    assert "\n" not in result.reason  # the peer's words are escaped onto one line


def test_a_refused_context_fails_for_good_naming_what_was_refused():
    by_class = outcome.refused_context(CT, J2K, class_accepted=False)
    assert by_class == Outcome(Verdict.FAILED, f"CT Image Storage ({CT}) is not accepted by the destination")
    by_syntax = outcome.refused_context(CT, J2K, class_accepted=True)
    assert by_syntax.verdict is Verdict.FAILED
    assert by_syntax.reason == (f"the destination refused transfer syntax JPEG 2000 Image Compression (Lossless Only) ({J2K}) "
                                f"for CT Image Storage ({CT})")


@pytest.mark.parametrize("exc,reason", [
    (TimeoutError(), "no C-STORE response from PACS@h:104 within 30 s"),
    (socket.timeout(), "no C-STORE response from PACS@h:104 within 30 s"),
    (PeerGone("aborted the association"), "PACS@h:104 aborted the association"),
    (ConnectionResetError(104, "Connection reset by peer"),
     "connection to PACS@h:104 lost while sending (Connection reset by peer)"),
    (ssl.SSLError(1, "bad record mac"), "TLS connection to PACS@h:104 failed while sending"),
])
def test_a_lost_request_is_retried_saying_how_it_was_lost(exc, reason):
    result = outcome.lost(exc, "PACS@h:104", 30)
    assert result.verdict is Verdict.RETRY and result.reason.startswith(reason)


def test_a_missing_file_fails_at_once_an_unreadable_one_is_retried():
    assert outcome.missing("store/1/2/3.dcm") == Outcome(Verdict.FAILED, "the stored file store/1/2/3.dcm is missing")
    assert outcome.unsendable("store/1/2/3.dcm", ValueError("bad")).verdict is Verdict.RETRY


# --------------------------------------------------------------------------- the sender records


class ScriptedTransport:
    """Stands in for the network: yields the given outcomes, leaves the rest untried."""

    def __init__(self, script: dict[str, Outcome]):
        self.script, self.seen, self.closed = script, [], False

    def send(self, items, stopping):
        self.seen.append([i.sop_instance_uid for i in items])
        yield [(item, self.script[item.sop_instance_uid]) for item in items
               if item.sop_instance_uid in self.script]

    def close(self):
        self.closed = True


def test_the_sender_records_each_outcome_and_gives_untried_items_back(tmp_path):
    config = config_mod.parse({
        "node": {"data_dir": str(tmp_path / "var")},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
        "retry": {"max_attempts": 2, "initial_backoff_seconds": 10, "max_backoff_seconds": 60},
    })
    conn = db.connect(config.db_path)
    with db.transaction(conn):
        for n in range(1, 6):
            path = config.store_dir / f"{n}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            if n != 5:
                path.write_bytes(b"x")  # 5: its file is missing
            index.record_instance(conn, index.InstanceRecord(
                f"1.{n}", CT, "1", "2", "1.2.840.10008.1.2.1", f"store/{n}.dcm", 1, None, "received", 0.0))
            queue.enqueue(conn, ["pacs"], f"1.{n}", 0.0)
    transport = ScriptedTransport({
        "1.1": Outcome(Verdict.SENT),
        "1.2": Outcome(Verdict.RETRY, "busy", retry_after=120),
        "1.3": Outcome(Verdict.FAILED, "refused"),
    })  # 1.4: never tried
    sender = Sender(config, "pacs", transport=transport, clock=lambda: 1000.0, rand=lambda: 1.0)
    assert sender.run_once() == 1
    sender.close()
    # progress (an item sent or failed for good) claims again: 1.4 is offered once more, then the pass ends
    assert transport.closed and transport.seen == [["1.1", "1.2", "1.3", "1.4"], ["1.4"]]
    rows = {r["sop_instance_uid"]: r for r in conn.execute("SELECT * FROM queue")}
    conn.close()
    assert rows["1.1"]["state"] == "sent"
    assert (rows["1.2"]["state"], rows["1.2"]["next_attempt_at"], rows["1.2"]["last_error"]) == (
        "pending", 1120.0, "busy")  # the destination's Retry-After beats the 10 s backoff
    assert (rows["1.3"]["state"], rows["1.3"]["last_error"]) == ("failed", "refused")
    assert (rows["1.4"]["state"], rows["1.4"]["attempts"]) == ("pending", 0)  # given back untouched
    assert (rows["1.5"]["state"], rows["1.5"]["last_error"]) == ("failed", "the stored file store/5.dcm is missing")
