"""A hostile or broken PACS on the forward side: bounded responses, reasons instead of crashes."""

from __future__ import annotations

import socket
import struct
import threading
from types import SimpleNamespace

import pytest

from gateway.dimse.codec import MalformedCommand, pdv_items, store_response_bytes
from gateway.dimse.fastpath import MAX_COMMAND_BYTES, PeerGone, read_response

CT = "1.2.840.10008.5.1.4.1.1.2"


def pdv(control: int, fragment: bytes, context_id: int = 1) -> bytes:
    return struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment


def pdu(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


def respond(data: bytes, max_pdu: int = 16384):
    """read_response against a socket pair whose far end writes ``data`` (from a thread)."""
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    assoc = SimpleNamespace(dul=SimpleNamespace(socket=SimpleNamespace(socket=ours),
                                                _idle_timer=SimpleNamespace(restart=lambda: None)))

    def write():
        try:
            theirs.sendall(data)
        except OSError:
            pass

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        return read_response(assoc, 7, max_pdu)
    finally:
        ours.close()
        theirs.close()
        writer.join(5)


@pytest.mark.parametrize("body", [
    struct.pack(">I", 1) + b"\x01",          # a PDV shorter than its own header
    struct.pack(">I", 0),                     # cut inside the PDV header
    struct.pack(">IBB", 100, 1, 3) + b"x",   # declares more than the PDU holds
])
def test_short_or_overlong_pdvs_are_malformed_not_index_errors(body):
    with pytest.raises(MalformedCommand):
        list(pdv_items(body))


def test_a_short_pdv_in_a_response_is_a_reason():
    with pytest.raises(PeerGone, match="malformed P-DATA-TF PDU: a PDV declares 1 bytes"):
        respond(struct.pack(">BBI", 0x04, 0, 6) + struct.pack(">I", 1) + b"\x01\x03")


def test_endless_command_fragments_are_cut_off():
    fragment = b"\0" * 8000
    endless = pdu(pdv(0x01, fragment)) * (MAX_COMMAND_BYTES // len(fragment) + 50)
    with pytest.raises(PeerGone, match=f"more than {MAX_COMMAND_BYTES} bytes"):
        respond(endless)


def test_a_proper_response_still_reads():
    command = store_response_bytes(CT, 7, 0x0000, "1.2.3")
    assert respond(pdu(pdv(0x01, command[:10]), pdv(0x03, command[10:]))) == (0, "")
