"""Hostile inbox files: decided from headers and file types before any array data is read."""

from __future__ import annotations

import os
import threading
import tracemalloc
import zipfile

import numpy as np
import pytest

from gateway.inbox.inbox import Inbox
from tests.integration.test_inbox import C, N, R, drop_job, error_text, index_sources, load_config
from tests.integration.test_inbox import series  # noqa: F401  (fixture)

MB = 1024 * 1024


def run_bounded(inbox: Inbox, timeout: float = 60) -> int:
    """run_once in a thread: a poll that blocks (on a FIFO) fails the test instead of hanging it."""
    result = []
    worker = threading.Thread(target=lambda: result.append(inbox.run_once()), daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), "the inbox poll blocked"
    return result[0]


@pytest.fixture
def gw(tmp_path, series):  # noqa: F811
    paths, sources = series
    config = load_config(tmp_path / "gw", inbox={"source_wait_seconds": 60})
    index_sources(config, paths)
    inbox = Inbox(config)
    yield config, inbox, {"series_instance_uid": str(sources[0].SeriesInstanceUID)}
    inbox.close()


def test_an_npz_bomb_and_an_absurd_header_cost_no_memory(gw):
    config, inbox, src = gw
    folder = config.inbox.path
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("mask.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(
                member, {"descr": "|b1", "fortran_order": False, "shape": (N, 8192, 8192)})
            zero = bytes(MB)
            for _ in range(N * 64):  # 8 x 8192 x 8192 bool: 512 MB
                member.write(zero)
    assert (folder / "bomb.npz").stat().st_size < 1 * MB  # 512 MB inside
    drop_job(folder, "bomb", None, {"source": src})
    with open(folder / "absurd.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "|u1", "fortran_order": False, "shape": (100000, 4096, 4096)})
        f.write(bytes(100))
    drop_job(folder, "absurd", None, {"source": src})

    tracemalloc.start()
    try:
        assert run_bounded(inbox) == 2
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"\npeak traced memory for the 512 MB npz bomb and the 1.6 TB header: {peak / MB:.1f} MB")
    assert peak < 20 * MB
    assert "does not match the source series" in error_text(folder, "bomb")
    assert "1677721600000 bytes" in error_text(folder, "absurd")


def test_fifos_folders_and_hard_links_are_refused_without_blocking(gw, tmp_path):
    config, inbox, src = gw
    folder = config.inbox.path
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "fifo_array.npy")
    drop_job(folder, "fifo_array", None, {"source": src})
    os.mkfifo(folder / "fifo_sidecar.yaml")
    np.save(folder / "fifo_sidecar.npy", np.ones((N, R, C), bool))
    os.mkdir(folder / "dir_array.npy")
    drop_job(folder, "dir_array", None, {"source": src})
    outside = tmp_path / "outside.npy"
    np.save(outside, np.ones((N, R, C), bool))
    os.link(outside, folder / "linked.npy")
    drop_job(folder, "linked", None, {"source": src})

    assert run_bounded(inbox) == 4
    assert "cannot read fifo_array.npy: it is a FIFO, not a regular file" in error_text(folder, "fifo_array")
    assert "cannot read fifo_sidecar.yaml: it is a FIFO, not a regular file" in error_text(folder, "fifo_sidecar")
    assert "cannot read dir_array.npy: it is a folder" in error_text(folder, "dir_array")
    assert "linked.npy has 2 hard links" in error_text(folder, "linked")
    assert outside.exists()


def test_a_job_name_that_is_not_utf8_fails_with_a_reason(gw):
    config, inbox, src = gw
    folder = config.inbox.path
    folder.mkdir(parents=True, exist_ok=True)
    raw = os.fsencode(folder) + b"/caf\xe9"
    with open(raw + b".npy", "wb") as f:
        np.save(f, np.ones((N, R, C), bool))
    with open(raw + b".yaml", "w") as f:
        f.write(f"source: {{series_instance_uid: '{src['series_instance_uid']}'}}\n")
    drop_job(folder, "good", np.ones((N, R, C), bool), {"source": src})

    assert run_bounded(inbox) == 2
    failed = os.listdir(os.fsencode(folder / "failed"))
    assert b"caf\xe9.error.txt" in failed and b"caf\xe9.npy" in failed
    text = open(os.fsencode(folder / "failed") + b"/caf\xe9.error.txt").read()
    assert "not valid UTF-8" in text
    assert (folder / "done" / "good.result.yaml").exists()
    assert run_bounded(inbox) == 0  # nothing left to retry for ever


class Killed(BaseException):
    """Stands in for an OOM kill or a segfault in the middle of a derivation."""


def test_a_job_that_kills_the_process_three_times_fails_instead_of_crash_looping(tmp_path, series):  # noqa: F811
    paths, sources = series
    config = load_config(tmp_path / "gw")
    index_sources(config, paths)
    src = {"series_instance_uid": str(sources[0].SeriesInstanceUID)}
    drop_job(config.inbox.path, "poison", np.ones((N, R, C), bool), {"source": src})

    def kill(point: str) -> None:
        if point == "before_encode":
            raise Killed

    for start in range(3):  # three gateway starts, each killed while deriving the job
        inbox = Inbox(config, checkpoint=kill)
        with pytest.raises(Killed):
            inbox.run_once()
        inbox.close()
    inbox = Inbox(config, checkpoint=kill)  # the fourth start: the job fails, the node lives
    try:
        assert run_bounded(inbox) == 1
    finally:
        inbox.close()
    assert "stopped 3 times while deriving this job" in error_text(config.inbox.path, "poison")
