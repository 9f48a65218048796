"""Hostile and broken peers against the running gateway: raw sockets for what no real program
does (partial PDUs, stalls, floods, endless command sets), DCMTK for the real modality that
must still get through. Figures for the notes are printed (run with -s to see them)."""

from __future__ import annotations

import resource
import socket
import struct
import time
from pathlib import Path

import psutil
import pytest
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

from gateway.dimse.codec import store_request_bytes
from tests.conftest import wait_until
from tests.integration.modes import fast_path, performance  # noqa: F401 (fixture)

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"


def var(gw) -> Path:
    return gw.config_path.parent / "var"


def associate_rq(called: str) -> bytes:
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = "HOSTILE"
    prim.called_ae_title = called
    contexts = []
    for i, (abstract, syntax) in enumerate([(VERIFICATION, "1.2.840.10008.1.2"),
                                            (CT, "1.2.840.10008.1.2.1")]):
        cx = build_context(abstract, [syntax])
        cx.context_id = 2 * i + 1
        contexts.append(cx)
    prim.presentation_context_definition_list = contexts
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.9.7433.1"
    prim.user_information = [max_length, impl]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return pdu.encode()


def connect(gw, timeout: float = 30) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=timeout)


def associated(gw) -> socket.socket:
    """A raw socket with an established association (CT Image Storage is context 3)."""
    s = connect(gw)
    s.sendall(associate_rq(gw.ae_title))
    head = recv_exact(s, 6)
    assert head[0] == 0x02, f"expected A-ASSOCIATE-AC, got PDU type {head[0]:#x}"
    recv_exact(s, struct.unpack(">I", head[2:])[0])
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def pdata(context_id: int, control: int, fragment: bytes) -> bytes:
    return struct.pack(">BBIIBB", 0x04, 0, len(fragment) + 6, len(fragment) + 2, context_id, control) + fragment


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """True once the gateway has closed ``s`` (reads drain whatever it sent before)."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def stalled_mid_pdu(gw) -> socket.socket:
    """An association that started a C-STORE and stopped inside a P-DATA-TF PDU."""
    s = associated(gw)
    s.sendall(pdata(3, 0x03, store_request_bytes(1, CT, "1.2.3.4")))
    s.sendall(struct.pack(">BBI", 0x04, 0, 1000) + b"\0" * 10)  # 16 of 1006 bytes, then silence
    return s


def gateway_threads(gw) -> int:
    return psutil.Process(gw.proc.pid).num_threads()


def gateway_fds(gw) -> int:
    return psutil.Process(gw.proc.pid).num_fds()


def steady_threads(gw) -> int:
    """The thread count once the threads of closed connections have ended: the same over 1 s."""
    samples = [gateway_threads(gw)]
    deadline = time.monotonic() + 15
    while len(samples) < 5 or len(set(samples[-5:])) > 1:
        assert time.monotonic() < deadline, f"threads never settled: {samples}"
        time.sleep(0.25)
        samples.append(gateway_threads(gw))
    return samples[-1]


def steady_fds(gw) -> int:
    """The descriptor count once start-up is over (the HTTP loop and the file watcher open
    theirs in their own threads): the same over 2 s."""
    samples = [gateway_fds(gw)]
    deadline = time.monotonic() + 30
    while len(samples) < 5 or len(set(samples[-5:])) > 1:
        assert time.monotonic() < deadline, f"descriptors never settled: {samples}"
        time.sleep(0.5)
        samples.append(gateway_fds(gw))
    return samples[-1]


# --------------------------------------------------------------------------- stalls


def test_partial_pdu_then_silence_is_closed_within_the_network_timeout(gateway_factory, fast_path):
    gw = gateway_factory(node={"network_timeout_seconds": 1, "acse_timeout_seconds": 600},
                         performance=performance(fast_path))
    during_association = connect(gw)
    during_association.sendall(associate_rq(gw.ae_title)[:3])
    mid_data = stalled_mid_pdu(gw)
    start = time.monotonic()
    try:
        # Bounded wait (the timeout is 1 s): today a blocked read waits for ever.
        assert closed_by_peer(during_association, 20)
        assert closed_by_peer(mid_data, 20)
        print(f"\nstalled peers closed {time.monotonic() - start:.1f} s after the stall (timeout 1 s)")
    finally:
        during_association.close()
        mid_data.close()
    wait_until(lambda: "stopped in the middle of a PDU" in gw.log(), 10, what="the log line")
    wait_until(lambda: not list((var(gw) / "tmp").iterdir()), 10, what="the spool file to go")


def test_stalled_and_flooding_peers_do_not_lock_out_a_real_modality(dcmtk, gateway_factory, fast_path):
    gw = gateway_factory(node={"max_associations": 3, "network_timeout_seconds": 4,
                               "acse_timeout_seconds": 600}, performance=performance(fast_path))
    idle = steady_threads(gw)
    # Three connects that never associate take every slot...
    silent = [connect(gw) for _ in range(3)]
    time.sleep(1.5)  # older than the eviction grace
    # ...yet a real modality gets in (the oldest silent one makes room).
    assert dcmtk.echoscu(gw.port, gw.ae_title).returncode == 0
    full = steady_threads(gw)
    # A flood of connects costs no threads beyond the cap: two per slot at most.
    flood = [connect(gw) for _ in range(60)]
    threads = steady_threads(gw)
    print(f"\nthreads: {idle} idle, {full} after the silent connects and the echo, {threads} with 60 "
          "more connects (cap 3)")
    assert threads <= idle + 2 * 3
    for s in silent + flood:
        s.close()

    # Established associations stalled mid-PDU hold their slots until the network timeout;
    # meanwhile a new connection is closed at once, and then a slot frees.
    stalled = [stalled_mid_pdu(gw) for _ in range(3)]
    extra = connect(gw)
    assert closed_by_peer(extra, 10)
    extra.close()
    start = time.monotonic()
    wait_until(lambda: dcmtk.echoscu(gw.port, gw.ae_title, timeout=10).returncode == 0, 30, 0.2,
               "a slot to free")
    print(f"a slot freed {time.monotonic() - start:.1f} s after the cap was hit (timeout 4 s)")
    for s in stalled:
        s.close()


def test_sigterm_stops_the_gateway_with_stalled_peers_connected(gateway_factory, fast_path):
    gw = gateway_factory(node={"network_timeout_seconds": 300, "acse_timeout_seconds": 600},
                         performance=performance(fast_path))
    peers = [stalled_mid_pdu(gw), connect(gw)]
    peers[1].sendall(b"\x01\x00\x00")
    time.sleep(0.5)
    proc = gw.proc
    start = time.monotonic()
    try:
        code = gw.stop(timeout=30)  # SIGTERM; SIGKILL only after 30 s
    finally:
        for s in peers:
            s.close()
    print(f"\nstopped {time.monotonic() - start:.1f} s after SIGTERM with 2 stalled peers")
    assert code == 0, f"exit {code} (negative: it had to be killed)"
    assert proc.returncode == 0


# --------------------------------------------------------------------------- descriptors and spool files


def test_descriptors_and_spool_files_stay_bounded_with_a_low_fd_limit(dcmtk, gateway_factory, ct_series, fast_path):
    gw = gateway_factory(node={"max_associations": 8, "network_timeout_seconds": 30},
                         performance=performance(fast_path))
    _soft, hard = resource.prlimit(gw.proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(gw.proc.pid, resource.RLIMIT_NOFILE, (256, hard))
    files = ct_series(3, 64, 64)
    assert dcmtk.storescu(gw.port, gw.ae_title, *files).returncode == 0  # warm: DB open, threads up
    baseline = steady_fds(gw)

    # Each peer starts C-STOREs over and over without finishing one: every final command-set
    # fragment makes pynetdicom open a new spool file. (The fast path replaces the unfinished
    # one; the public-API mode aborts the association at the second command.)
    hostile = [associated(gw) for _ in range(6)]
    for s in hostile:
        command = store_request_bytes(1, CT, "1.2.3.4")
        try:
            for _ in range(150):
                s.sendall(pdata(3, 0x03, command) + pdata(3, 0x00, b"\0" * 64))
        except OSError:
            assert not fast_path, "the fast path does not abort these peers"
    time.sleep(1.0)
    during = gateway_fds(gw)
    spooled = len(list((var(gw) / "tmp").iterdir()))
    print(f"\ndescriptors: baseline {baseline}, {during} with 6 hostile peers "
          f"(900 unfinished data sets sent); spool files {spooled}")
    assert spooled <= 6
    assert during <= baseline + 6 * 2 + 4
    # A real modality still stores while they are connected.
    result = dcmtk.storescu(gw.port, gw.ae_title, *files)
    assert result.returncode == 0 and "Error" not in result.stdout + result.stderr
    for s in hostile:
        s.close()
    wait_until(lambda: gateway_fds(gw) <= baseline, 30, 0.2, "descriptors back to the baseline")
    wait_until(lambda: not list((var(gw) / "tmp").iterdir()), 10, 0.2, "spool files removed")


def test_a_spool_file_that_cannot_be_created_is_a_failure_status(dcmtk, gateway_factory, ct_series, fast_path):
    gw = gateway_factory(performance=performance(fast_path))
    files = ct_series(2, 64, 64)
    spool = var(gw) / "tmp"
    spool.rmdir()
    spool.write_bytes(b"")  # creating rx-... under it now fails with ENOTDIR
    try:
        result = dcmtk.storescu(gw.port, gw.ae_title, files[0], extra=("-v",))
        out = result.stdout + result.stderr
        assert "Refused: OutOfResources" in out, out
    finally:
        spool.unlink()
        spool.mkdir(mode=0o700)
    wait_until(lambda: "cannot create a spool file" in gw.log(), 10, what="the refusal line")
    assert "Traceback" not in gw.log()
    assert dcmtk.storescu(gw.port, gw.ae_title, files[1]).returncode == 0
