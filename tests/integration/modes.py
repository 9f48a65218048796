"""Both ways of running pynetdicom: ``fast_path`` is a fixture parametrized over
``performance.pynetdicom_fast_path`` (true: dimse.fastpath, false: the public API only), so
the receive and forward tests that use it prove each promise in both modes."""

from __future__ import annotations

import pytest


@pytest.fixture(params=[True, False], ids=["fast-path", "public-api"])
def fast_path(request) -> bool:
    return request.param


def performance(fast: bool) -> dict:
    """The config section for one mode."""
    return {"pynetdicom_fast_path": fast}
