"""dimse.meter: the public-API mode's bounds on what one peer can make pynetdicom buffer."""

from __future__ import annotations

import socket
import struct

import pytest

from gateway.dimse import meter
from gateway.dimse.meter import MAX_COMMAND_BYTES, MAX_IN_MEMORY_DATASET_BYTES, PduMeter, command_field


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def pdv(control: int, fragment: bytes, context_id: int = 1) -> bytes:
    return struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment


def element(tag: tuple[int, int], value: bytes) -> bytes:
    return struct.pack("<HHL", *tag, len(value)) + value


def command(field: int) -> bytes:
    data_set = 0x0000 if field == 0x0001 else 0x0101  # C-STORE-RQ: a data set follows
    body = (element((0, 0x0002), b"1.2.840.10008.5.1.4.1.1.2\0") + element((0, 0x0100), struct.pack("<H", field))
            + element((0, 0x0800), struct.pack("<H", data_set)))
    return element((0, 0x0000), struct.pack("<L", len(body))) + body


def fed_in_pieces(stream: bytes, piece: int, limit: int = 70000):
    m = PduMeter(limit)
    for at in range(0, len(stream), piece):
        problem = m.feed(stream[at:at + piece])
        if problem:
            return problem
    return None


def test_command_field_is_read_from_an_encoded_command_set():
    assert command_field(command(0x0001)) == 0x0001
    assert command_field(command(0x0030)) == 0x0030
    assert command_field(b"\0" * 3) is None


@pytest.mark.parametrize("piece", [1, 5, 4096])
def test_a_normal_c_store_passes_however_the_reads_split_it(piece):
    data = b"\x11" * (3 * MAX_IN_MEMORY_DATASET_BYTES)  # a C-STORE data set is streamed to a file
    stream = (pdu(0x01, b"\0" * 200) + pdu(0x04, pdv(0x03, command(0x0001)))
              + b"".join(pdu(0x04, pdv(0x00, data[i:i + 60000])) for i in range(0, len(data) - 60000, 60000))
              + pdu(0x04, pdv(0x02, b"end")) + pdu(0x05, b"\0" * 4))
    assert fed_in_pieces(stream, piece if piece > 1 else 7) is None


def test_a_declared_pdu_over_the_limit_is_refused_at_its_header():
    m = PduMeter(meter.pdu_limit(16384))
    assert m.feed(struct.pack(">BB", 0x04, 0)) is None
    refusal = m.feed(struct.pack(">L", 0xFFFFFFF0))
    assert not refusal.abort
    assert refusal.reason == "it declared a PDU of 4294967280 bytes, more than node.max_pdu_size allows (66560)"


def test_endless_command_fragments_are_refused_before_the_limit_is_buffered():
    fragment = b"\0" * 8192
    stream = pdu(0x04, pdv(0x01, fragment)) * (MAX_COMMAND_BYTES // len(fragment) + 1)
    refusal = fed_in_pieces(stream, 4096)
    assert refusal.abort and "more than a C-ECHO/C-STORE needs" in refusal.reason


def test_a_data_set_kept_in_memory_is_bounded_but_a_c_store_one_is_not():
    fragment = b"\0" * 60000
    endless = pdu(0x04, pdv(0x00, fragment)) * (MAX_IN_MEMORY_DATASET_BYTES // len(fragment) + 1)
    echo = pdu(0x04, pdv(0x03, command(0x0030)))
    store = pdu(0x04, pdv(0x03, command(0x0001)))
    assert fed_in_pieces(echo + endless, 4096).abort
    assert fed_in_pieces(store + endless, 4096) is None
    # the next message starts afresh: a C-ECHO after a finished C-STORE is bounded again
    finished = store + pdu(0x04, pdv(0x02, b"x"))
    assert fed_in_pieces(finished + echo + endless, 4096).abort


def test_a_metered_socket_closes_on_an_absurd_pdu_and_reads_end_of_file_after(caplog):
    ours, theirs = socket.socketpair()
    with theirs:
        sock = meter.metered(ours, 16384)
        with sock:
            assert isinstance(sock, socket.socket) and sock.gettimeout() == ours.gettimeout()
            theirs.sendall(pdu(0x05, b"\0" * 4) + struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0) + b"\0" * 64)
            assert sock.recv(6) and sock.recv(4) == b"\0" * 4  # a normal PDU passes
            assert sock.recv(6) == b""
            assert sock.recv(6) == b""
            theirs.settimeout(5)
            assert theirs.recv(16) == b""  # shut, no A-ABORT outside a message
    assert "closing the connection from ?: it declared a PDU of 4294967280 bytes" in caplog.text


def test_a_metered_socket_sends_a_abort_for_endless_fragments(caplog):
    ours, theirs = socket.socketpair()
    with theirs:
        sock = meter.metered(ours, 16384)
        with sock:
            fragment = b"\0" * 8192
            theirs.sendall(pdu(0x04, pdv(0x01, fragment)) * (MAX_COMMAND_BYTES // len(fragment) + 1))
            while sock.recv(4096):
                pass
            theirs.settimeout(5)
            assert theirs.recv(16) == bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 0])  # A-ABORT
    assert "aborting the association from ?: one message holds" in caplog.text


def test_a_new_message_before_the_data_set_ended_is_refused():
    unfinished = pdu(0x04, pdv(0x03, command(0x0001)) + pdv(0x00, b"\0" * 64))
    refusal = fed_in_pieces(unfinished * 2, 4096)
    assert refusal.abort and "before the data set of the last one ended" in refusal.reason
    finished = pdu(0x04, pdv(0x03, command(0x0001)) + pdv(0x02, b"\0" * 64))
    assert fed_in_pieces(finished * 3, 4096) is None


def test_a_stall_in_the_middle_of_a_pdu_is_logged_and_ends_reading(caplog):
    ended = []
    ours, theirs = socket.socketpair()
    with theirs:
        sock = meter.metered(ours, 16384)
        sock.gateway_on_end = lambda: ended.append(True)
        sock.settimeout(0.2)
        with sock:
            theirs.sendall(struct.pack(">BBL", 0x04, 0, 100) + b"\0" * 30)
            assert len(sock.recv(6)) == 6 and len(sock.recv(100)) == 30
            with pytest.raises(TimeoutError):
                sock.recv(70)
            assert ended == [True] and sock.recv(70) == b""
    assert "it stopped in the middle of a PDU (30 of 100 bytes)" in caplog.text
