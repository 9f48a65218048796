"""The inbox reacts to file events: with an hour-long poll, a renamed sidecar is still taken at once."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pydicom
import yaml

from gateway.inbox.watch import InboxWatcher, Kicker
from tests.conftest import wait_until

N, R, C = 6, 32, 32


def drop(inbox, name, series_uid):
    mask = np.zeros((N, R, C), bool)
    mask[1:4, 4:20, 4:20] = True
    np.save(inbox / f"{name}.npy", mask)
    tmp = inbox / f".{name}.yaml.tmp"
    tmp.write_text(yaml.safe_dump({"source": {"series_instance_uid": series_uid}}))
    os.rename(tmp, inbox / f"{name}.yaml")


def test_a_job_is_picked_up_by_its_file_event_with_an_hour_long_poll(tmp_path, dcmtk, ct_series, gateway_factory):
    gw = gateway_factory(inbox={"path": "inbox", "poll_interval_seconds": 3600})
    wait_until(lambda: "reacting to file events" in gw.log(), 30, what="the inbox watch to start")
    paths = ct_series(N, R, C)
    dcmtk.storescu(gw.port, gw.ae_title, *paths, calling="MODALITY").check_returncode()
    inbox = gw.config_path.parent / "inbox"
    series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    # The start-up poll has run (the folder exists); the next poll is an hour away.
    wait_until(lambda: (inbox / "done").is_dir(), 30, what="the start-up poll")
    for k in range(3):
        drop(inbox, f"evt-{k}", series_uid)
        # Bounded far below the poll interval: only the file event can have taken it.
        wait_until(lambda: (inbox / "done" / f"evt-{k}.result.yaml").exists(), 30,
                   what=f"job evt-{k} to be done")
    # The log line follows the result file by a moment: wait for it rather than race it.
    wait_until(lambda: "job evt-2 moved to done/" in gw.log(), 30, what="the job's log line")


def test_kicks_during_a_pass_make_exactly_one_more_pass():
    passes, started, release = [], threading.Event(), threading.Event()

    def work():
        passes.append(time.monotonic())
        started.set()
        release.wait(10)

    kicker = Kicker(work)
    kicker.start()
    try:
        kicker.kick()
        assert started.wait(10)
        for _ in range(5):  # a burst while the pass runs
            kicker.kick()
        release.set()
        wait_until(lambda: len(passes) == 2, 10, what="the second pass")
        time.sleep(0.3)
        assert len(passes) == 2
    finally:
        kicker.stop()


def test_the_watcher_kicks_on_a_rename_into_the_folder_not_on_hidden_files(tmp_path):
    calls = []
    watcher = InboxWatcher(tmp_path, lambda: calls.append(1))
    assert watcher.start()
    try:
        (tmp_path / ".job.yaml.tmp").write_text("x")
        (tmp_path / "sub").mkdir()
        time.sleep(0.3)
        assert calls == []
        os.rename(tmp_path / ".job.yaml.tmp", tmp_path / "job.yaml")
        wait_until(lambda: calls, 10, what="a pass after the rename")
        outside = tmp_path.parent / f"{tmp_path.name}-other.yaml"
        outside.write_text("y")
        n = len(calls)
        os.rename(outside, tmp_path / "moved-in.yaml")  # from another folder: a "created" event
        wait_until(lambda: len(calls) > n, 10, what="a pass after the move from another folder")
    finally:
        watcher.stop()
