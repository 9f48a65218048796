"""A data_dir written by the previous release (commit 0a1f2d2) opens: migrated, QIDO finds it, WADO serves it."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pydicom

from gateway.storage import db
from tests.integration.web_node import READER_TOKEN, bearer, multipart_parts, web_node  # noqa: F401

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "release-0a1f2d2-data"


def test_previous_release_data_dir_is_migrated_and_found(web_node, tmp_path):
    folder = tmp_path / "node"
    shutil.copytree(FIXTURE, folder / "var")
    before = {p.relative_to(folder): p.read_bytes() for p in (folder / "var" / "store").rglob("*.dcm")}
    assert len(before) == 3
    node = web_node(folder=folder)
    conn = db.connect(node.config.db_path)
    try:
        applied = {r[0] for r in conn.execute("SELECT name FROM schema_migrations")}
        queued = conn.execute("SELECT COUNT(*) FROM queue WHERE destination = 'pacs'").fetchone()[0]
    finally:
        conn.close()
    assert "instance_attributes" in applied
    assert queued == 3  # the old queue is kept, not wiped
    r = httpx.get(f"{node.dicomweb}/studies", params={"PatientID": "PID0001", "StudyDate": "20260101-"},
                  headers=bearer(READER_TOKEN), timeout=30)
    assert r.status_code == 200 and len(r.json()) == 1, r.text
    study = pydicom.Dataset.from_json(r.json()[0])
    assert study.NumberOfStudyRelatedInstances == 3 and study.ModalitiesInStudy == "CT"
    assert study.PatientName == "Test^Patient"
    r = httpx.get(f"{node.dicomweb}/studies/{study.StudyInstanceUID}",
                  headers={**bearer(READER_TOKEN), "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
                  timeout=30)
    assert r.status_code == 200
    got = sorted(body for _, body in multipart_parts(r))
    assert got == sorted(before.values())
    after = {p.relative_to(folder): p.read_bytes() for p in (folder / "var" / "store").rglob("*.dcm")}
    assert after == before
