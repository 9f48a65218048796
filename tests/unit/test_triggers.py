"""Series-complete triggers: the pure state machine, the export order, and exactly-once exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
import yaml

from gateway import config as config_mod
from gateway.routing import export, triggers
from gateway.routing.rules import Facts
from gateway.routing.triggers import SeriesState
from gateway.storage import db, files, index, series
from tests.helpers_series import make_series


# --------------------------------------------------------------------------- pure


def test_state_machine_opens_reopens_and_fires_once_per_revision():
    assert triggers.on_arrival(None, None) == (SeriesState.OPEN, 1)
    assert triggers.on_arrival(SeriesState.OPEN, 1) == (SeriesState.OPEN, 1)
    assert triggers.on_arrival(SeriesState.FIRED, 1) == (SeriesState.OPEN, 2)
    assert not triggers.is_due(SeriesState.OPEN, 100.0, 104.9, 5.0)
    assert triggers.is_due(SeriesState.OPEN, 100.0, 105.0, 5.0)
    assert not triggers.is_due(SeriesState.FIRED, 100.0, 500.0, 5.0)
    assert not triggers.is_due(SeriesState.OPEN, 100.0, 110.0, 5.0, not_before=111.0)
    assert triggers.after_export(1, 100.0, 100.0) == (SeriesState.FIRED, 1)
    assert triggers.after_export(1, 100.0, 101.0) == (SeriesState.OPEN, 2)


def test_export_order_follows_the_slice_normal_of_an_oblique_shuffled_series(tmp_path):
    paths = make_series(tmp_path / "s", 12, oblique_degrees=35, shuffle_numbers=True, seed=3)
    expected = [str(pydicom.dcmread(p).SOPInstanceUID) for p in paths]
    shuffled = list(paths)
    import random
    random.Random(5).shuffle(shuffled)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in shuffled]
    ordered = triggers.order_instances(headers)
    assert ordered.order == "slice_normal"
    assert [str(headers[i].SOPInstanceUID) for i in ordered.indices] == expected
    # neither Instance Number nor the file name gives this order
    by_number = sorted(headers, key=lambda h: int(h.InstanceNumber))
    assert [str(h.SOPInstanceUID) for h in by_number] != expected


def test_export_order_falls_back_to_instance_number_with_a_reason(tmp_path):
    paths = make_series(tmp_path / "s", 4, shuffle_numbers=True, seed=1)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    for h in headers:
        del h.ImagePositionPatient
    ordered = triggers.order_instances(headers)
    assert ordered.order == "instance_number"
    assert [int(headers[i].InstanceNumber) for i in ordered.indices] == [1, 2, 3, 4]
    assert "Image Position" in ordered.note


def test_matching_triggers_uses_the_rule_matcher():
    cfg = config_mod.parse({"triggers": [
        {"name": "lung", "match": {"modality": "CT", "tags": {"SeriesDescription": "*lung*"}}, "export_dir": "/x"},
        {"name": "mr", "match": {"modality": "MR"}, "export_dir": "/y"},
    ]})
    ds = pydicom.Dataset()
    ds.Modality = "CT"
    ds.SeriesDescription = "LUNG 1mm"
    assert triggers.matching_triggers(cfg.triggers, ds, Facts()) == ("lung",)


# --------------------------------------------------------------------------- with a database


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Node:
    """A data folder with a database; ``receive`` stores files and records arrivals as ingest does."""

    def __init__(self, tmp_path: Path, stable: float = 5.0, webhook: bool = True):
        raw = {
            "node": {"data_dir": str(tmp_path / "var")},
            "series_complete": {"stable_seconds": stable},
            "retry": {"initial_backoff_seconds": 1, "max_backoff_seconds": 2},
            "triggers": [{"name": "lung-ai", "match": {"modality": "CT"},
                          "export_dir": str(tmp_path / "export"),
                          **({"webhook": {"url": "http://127.0.0.1:9/jobs"}} if webhook else {})}],
        }
        self.config = config_mod.parse(raw)
        self.config.node.data_dir.mkdir(parents=True)
        self.conn = db.connect(self.config.db_path)
        self.clock = Clock()
        self.export_dir = tmp_path / "export"

    def receive(self, paths, calling_ae="CT01"):
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            target = files.instance_path(self.config.store_dir, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                         ds.SOPInstanceUID)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            matching = triggers.matching_triggers(self.config.triggers, ds, Facts(calling_ae))
            with db.transaction(self.conn):
                index.record_instance(self.conn, index.InstanceRecord(
                    str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.StudyInstanceUID),
                    str(ds.SeriesInstanceUID), "1.2.840.10008.1.2.1",
                    str(target.relative_to(self.config.node.data_dir)), target.stat().st_size,
                    calling_ae, "received", self.clock()))
                series.record_arrival(self.conn, str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID),
                                      matching, self.clock())

    def triggers(self, crash_hook=None) -> export.SeriesTriggers:
        return export.SeriesTriggers(self.config, clock=self.clock, crash_hook=crash_hook)

    def webhooks(self) -> list[dict]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM webhooks ORDER BY id")]


def test_two_bursts_within_stable_seconds_fire_once(tmp_path):
    node = Node(tmp_path)
    paths = make_series(tmp_path / "ct", 6, oblique_degrees=20, shuffle_numbers=True)
    runner = node.triggers()
    node.receive(paths[:3])
    node.clock.t += 4  # pause shorter than stable_seconds
    assert runner.run_once() == 0
    node.receive(paths[3:])
    node.clock.t += 4
    assert runner.run_once() == 0  # quiet for 4 s only
    node.clock.t += 1
    assert runner.run_once() == 1
    assert runner.run_once() == 0
    node.clock.t += 100
    assert runner.run_once() == 0
    [hook] = node.webhooks()
    body = json.loads(hook["body"])
    folder = node.export_dir / body["series_instance_uid"]
    manifest = yaml.safe_load((folder / "series.yaml").read_text())
    assert manifest["revision"] == body["revision"] == 1
    assert manifest["instance_count"] == 6
    assert manifest["calling_ae_title"] == "CT01"
    assert manifest["order"] == "slice_normal"
    expected = [str(pydicom.dcmread(p).SOPInstanceUID) for p in paths]
    assert manifest["sop_instance_uids"] == expected
    assert manifest["files"] == [f"{uid}.dcm" for uid in expected]
    assert body["export_path"] == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(manifest["files"] + ["series.yaml"])
    for name, uid in zip(manifest["files"], expected):
        assert str(pydicom.dcmread(folder / name).SOPInstanceUID) == uid
    assert [p.name for p in node.export_dir.iterdir()] == [folder.name]  # no temporary leftovers
    status = series.trigger_status(node.conn, ["lung-ai"], node.clock())
    assert status["lung-ai"]["series_fired"] == 1
    assert status["lung-ai"]["webhooks"]["pending"] == 1


def test_a_late_instance_fires_revision_2_replacing_the_folder(tmp_path):
    node = Node(tmp_path, webhook=True)
    paths = make_series(tmp_path / "ct", 5)
    node.receive(paths[:4])
    node.clock.t += 10
    runner = node.triggers()
    assert runner.run_once() == 1
    uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    folder = node.export_dir / uid
    first = yaml.safe_load((folder / "series.yaml").read_text())
    assert (first["revision"], first["instance_count"]) == (1, 4)
    node.receive(paths[4:])
    assert series.trigger_status(node.conn, ["lung-ai"], node.clock())["lung-ai"]["series_open"] == 1
    node.clock.t += 10
    assert runner.run_once() == 1
    second = yaml.safe_load((folder / "series.yaml").read_text())
    assert (second["revision"], second["instance_count"]) == (2, 5)
    assert len(list(folder.glob("*.dcm"))) == 5
    assert [json.loads(h["body"])["revision"] for h in node.webhooks()] == [1, 2]
    assert [p.name for p in node.export_dir.iterdir()] == [uid]


def test_an_instance_arriving_during_the_export_reopens_as_the_next_revision(tmp_path):
    node = Node(tmp_path)
    paths = make_series(tmp_path / "ct", 4)
    node.receive(paths[:3])
    node.clock.t += 10

    def arrive(point):
        if point == "export_linked":
            node.receive(paths[3:])

    assert node.triggers(crash_hook=arrive).run_once() == 1
    status = series.trigger_status(node.conn, ["lung-ai"], node.clock())["lung-ai"]
    assert (status["series_open"], status["series_fired"]) == (1, 0)
    node.clock.t += 10
    assert node.triggers().run_once() == 1
    assert [json.loads(h["body"])["instance_count"] for h in node.webhooks()] == [3, 4]


class Killed(BaseException):
    """Stands in for SIGKILL inside one process: nothing after the raise runs."""


def test_crash_before_the_rename_leaves_no_folder_and_the_restart_exports_once(tmp_path):
    node = Node(tmp_path)
    node.receive(make_series(tmp_path / "ct", 3))
    node.clock.t += 10

    def die(point):
        if point == "export_linked":
            raise Killed()

    with pytest.raises(Killed):
        node.triggers(crash_hook=die).run_once()
    assert list(node.export_dir.iterdir()) == []
    assert node.webhooks() == []
    # a SIGKILLed process would leave its temporary folder behind: the restart sweeps it
    (node.export_dir / ".1.2.3.r1.deadbeef.tmp").mkdir()
    assert node.triggers().run_once() == 1
    assert len(list(node.export_dir.iterdir())) == 1
    assert len(node.webhooks()) == 1


def test_crash_after_the_rename_commits_without_rebuilding_or_duplicating(tmp_path):
    node = Node(tmp_path)
    node.receive(make_series(tmp_path / "ct", 3))
    node.clock.t += 10

    def die(point):
        if point == "export_renamed":
            raise Killed()

    with pytest.raises(Killed):
        node.triggers(crash_hook=die).run_once()
    [folder] = list(node.export_dir.iterdir())
    inode = (folder / "series.yaml").stat().st_ino
    assert node.webhooks() == []
    assert node.triggers().run_once() == 1
    assert (folder / "series.yaml").stat().st_ino == inode  # the same folder, not a second build
    assert len(node.webhooks()) == 1
    assert node.triggers().run_once() == 0


def test_a_series_matching_no_trigger_stores_nothing(tmp_path):
    node = Node(tmp_path)
    node.receive(make_series(tmp_path / "mr", 3, modality="MR"))
    assert node.conn.execute("SELECT COUNT(*) FROM series_triggers").fetchone()[0] == 0


def test_an_unwritable_export_dir_keeps_the_series_open_with_the_reason(tmp_path):
    node = Node(tmp_path)
    node.receive(make_series(tmp_path / "ct", 2))
    node.export_dir.write_text("not a folder")
    node.clock.t += 10
    assert node.triggers().run_once() == 0
    status = series.trigger_status(node.conn, ["lung-ai"], node.clock())["lung-ai"]
    assert status["series_open"] == 1
    assert "cannot write the export" in status["last_export_error"]
    node.export_dir.unlink()
    node.clock.t += 0.5
    assert node.triggers().run_once() == 0  # waits for its backoff
    node.clock.t += 5
    assert node.triggers().run_once() == 1
