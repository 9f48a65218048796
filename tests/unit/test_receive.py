"""receive's pieces that need no network: the outcome -> status map and the pydicom fallback
for reading the UIDs (the spool file is tests/unit/test_spool.py, the head reader test_dimse.py)."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.data import get_testdata_file

from gateway.dimse.receive import STATUS, _read_uids, _status
from gateway.storage.store import Outcome, Result


def test_every_outcome_has_a_status():
    assert set(STATUS) == set(Outcome)
    assert STATUS[Outcome.STORED] == 0x0000
    assert STATUS[Outcome.NO_SPACE] == 0xA700
    rsp = _status(Result(Outcome.INVALID, "x" * 100))
    assert rsp.Status == 0xC000 and len(rsp.ErrorComment) == 64


@pytest.mark.parametrize("name", ["image_dfl.dcm", "MR_small_bigendian.dcm", "CT_small.dcm"])
def test_the_pydicom_fallback_reads_the_same_uids(name):
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    head = _read_uids(path)
    for key in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        assert head.get(key) == ds.get(key)
    assert "PixelData" not in head
