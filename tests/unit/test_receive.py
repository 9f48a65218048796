"""receive's pieces that need no network: the outcome -> status map (the spool file is
tests/unit/test_spool.py, the header reader test_header.py)."""

from __future__ import annotations

from gateway.dimse.receive import STATUS, _status
from gateway.storage.store import Outcome, Result


def test_every_outcome_has_a_status():
    assert set(STATUS) == set(Outcome)
    assert STATUS[Outcome.STORED] == 0x0000
    assert STATUS[Outcome.NO_SPACE] == 0xA700
    rsp = _status(Result(Outcome.INVALID, "x" * 100))
    assert rsp.Status == 0xC000 and len(rsp.ErrorComment) == 64
