"""A job rewritten under the same name while it is being derived is never swallowed.

The inbox's checkpoint hook (a callable) rewrites the sidecar or the array at the exact moment:
after the load, after the store, after the commit just before the move, and between the claim
and the load. The first version ends done; the new files stay in the inbox and the next poll
decides them (failed with the reason, or derived when nothing of the first was committed).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml

from gateway.inbox.inbox import Inbox
from gateway.storage import db, jobs
from tests.integration.test_inbox import C, N, R, derived_rows, drop_job, error_text, index_sources, load_config
from tests.integration.test_inbox import series  # noqa: F401  (fixture)

FIRST = np.zeros((N, R, C), bool)
FIRST[1:3, 5:20, 5:20] = True
SECOND = np.zeros((N, R, C), bool)
SECOND[4:7, 30:50, 30:50] = True


@pytest.fixture
def gw(tmp_path, series):  # noqa: F811
    paths, sources = series
    config = load_config(tmp_path / "gw")
    index_sources(config, paths)
    return config, {"series_instance_uid": str(sources[0].SeriesInstanceUID)}


def rewrite(folder, name: str, part: str, src: dict) -> None:
    """What a careless tool does: write the job again under the same name."""
    if part == "array":
        np.save(folder / f"{name}.npy", SECOND)  # in place: same inode, same size, new content
    else:
        drop_job(folder, name, SECOND, {"source": src})  # array again, sidecar by rename


def job_row(config, name: str):
    conn = db.connect(config.db_path)
    try:
        return jobs.get(conn, name)
    finally:
        conn.close()


def rewriting_hook(folder, name, part, src, at):
    fired = []

    def checkpoint(point: str) -> None:
        if point == at and not fired:
            fired.append(point)
            rewrite(folder, name, part, src)
    return checkpoint, fired


@pytest.mark.parametrize("part", ["sidecar", "array"])
@pytest.mark.parametrize("at", ["before_encode", "after_store", "before_move"])
def test_a_job_rewritten_mid_derive_is_done_and_the_new_files_fail_with_the_reason(gw, part, at):
    config, src = gw
    folder = config.inbox.path
    drop_job(folder, "seg", FIRST, {"source": src})
    checkpoint, fired = rewriting_hook(folder, "seg", part, src, at)
    inbox = Inbox(config, checkpoint=checkpoint)
    try:
        assert inbox.run_once() == 1
        assert fired == [at]
        # The first version is done: derived, indexed, its result written.
        rows = derived_rows(config, "seg")
        assert len(rows) == 1
        assert job_row(config, "seg")["state"] == "done"
        result = yaml.safe_load((folder / "done" / "seg.result.yaml").read_text())
        assert result["sop_instance_uid"] == rows[0]["sop_instance_uid"]
        # The new files were not taken with it: they wait in the inbox, whole.
        assert (folder / "seg.yaml").exists()
        assert np.array_equal(np.load(folder / "seg.npy"), SECOND)
        assert not (folder / "done" / "seg.npy").exists()

        assert inbox.run_once() == 1  # the next poll decides them, with the reason
        text = error_text(folder, "seg")
        if at == "before_move":  # written after the commit: the job was done by then
            assert "a job named seg was already done" in text
        else:
            assert "seg was replaced while it was being derived" in text
        assert rows[0]["sop_instance_uid"] in text
        assert np.array_equal(np.load(folder / "failed" / "seg.npy"), SECOND)
        assert not list(folder.glob("seg.*"))
        assert len(derived_rows(config, "seg")) == 1
        assert job_row(config, "seg")["state"] == "done"  # the done record stays
        assert inbox.run_once() == 0
    finally:
        inbox.close()


def test_an_array_rewritten_between_claim_and_load_is_derived_at_the_next_poll(gw):
    config, src = gw
    folder = config.inbox.path
    drop_job(folder, "seg", FIRST, {"source": src})
    checkpoint, fired = rewriting_hook(folder, "seg", "array", src, "before_load")
    inbox = Inbox(config, checkpoint=checkpoint)
    try:
        assert inbox.run_once() == 0  # nothing of the first version was derived: no ending
        assert fired == ["before_load"]
        assert derived_rows(config, "seg") == []
        assert not (folder / "failed" / "seg.error.txt").exists()
        assert np.array_equal(np.load(folder / "seg.npy"), SECOND)

        assert inbox.run_once() == 1
        assert len(derived_rows(config, "seg")) == 1
        assert np.array_equal(np.load(folder / "done" / "seg.npy"), SECOND)
        assert not (folder / "failed" / "seg.error.txt").exists()
        row = job_row(config, "seg")
        assert row["state"] == "done" and row["derive_attempts"] == 1  # a fresh job, not a retry
    finally:
        inbox.close()


class Killed(BaseException):
    """Stands in for the process dying between the commit and the move."""


def test_files_rewritten_before_a_crash_are_not_taken_for_leftovers_after_it(gw):
    config, src = gw
    folder = config.inbox.path
    drop_job(folder, "seg", FIRST, {"source": src})
    rewrite_hook, _ = rewriting_hook(folder, "seg", "sidecar", src, "after_store")

    def checkpoint(point: str) -> None:
        rewrite_hook(point)  # rewritten before the commit, so older than the done row
        if point == "before_move":
            raise Killed

    inbox = Inbox(config, checkpoint=checkpoint)
    with pytest.raises(Killed):
        inbox.run_once()
    inbox.close()
    row = job_row(config, "seg")
    assert row["state"] == "done"
    assert max(os.stat(p).st_mtime for p in folder.glob("seg.*")) <= row["finished_at"]

    inbox = Inbox(config)  # the restart: by their identity these are not the done job's files
    try:
        assert inbox.run_once() == 1
        assert "seg was replaced while it was being derived" in error_text(folder, "seg")
        assert np.array_equal(np.load(folder / "failed" / "seg.npy"), SECOND)
        assert (folder / "done" / "seg.result.yaml").exists()
        assert len(derived_rows(config, "seg")) == 1
    finally:
        inbox.close()
