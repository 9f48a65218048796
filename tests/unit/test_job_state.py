"""The HTTP job API's answer for a job committed done whose files are not moved yet."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

from gateway import config as config_mod
from gateway.derive.derive import SOP_CLASS_NAMES
from gateway.storage import db, index, jobs
from gateway.web.jobs import state_of


def test_a_done_job_before_its_move_answers_the_result_summary(tmp_path):
    config = config_mod.parse({"node": {"ae_title": "GW", "port": 11112, "data_dir": str(tmp_path / "var")},
                               "routes": {"results": []}}, base_dir=tmp_path)
    conn = db.connect(config.db_path)
    with db.transaction(conn):
        jobs.add_waiting(conn, "liver", 1.0)
        index.record_instance(conn, index.InstanceRecord(
            sop_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4", study_uid="1.2.3",
            series_uid="1.2.3.5", transfer_syntax="1.2.840.10008.1.2.1", path="store/x.dcm", size=10,
            calling_ae=None, origin="derived", received_at=2.0, job="liver"))
        jobs.mark_done(conn, "liver", "1.2.3.4", "1.2.3.5", 2.0)

    @contextmanager
    def reader():
        yield conn

    answer = state_of(SimpleNamespace(config=config, reader=reader), "liver")
    assert answer.state == "done"
    assert not (config.inbox.path / "done" / "liver.result.yaml").exists()
    assert answer.result["study_instance_uid"] == "1.2.3"
    assert answer.result["sop_class"] == SOP_CLASS_NAMES["1.2.840.10008.5.1.4.1.1.66.4"]
    assert answer.result["sop_instance_uid"] == "1.2.3.4" and answer.result["job"] == "liver"
