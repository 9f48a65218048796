"""dimse.fence: every private pynetdicom name the fast path relies on is checked at start, and
``run`` refuses (exit 2, one sentence naming it and the installed version) when one is gone."""

from __future__ import annotations

import pynetdicom.dul
import pynetdicom.dimse_messages
import pytest
import yaml

from gateway import cli
from gateway.dimse import fence


def config_file(tmp_path, fast: bool):
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "node": {"port": 1, "data_dir": str(tmp_path / "var")},
        "performance": {"pynetdicom_fast_path": fast},
    }))
    return path


def test_the_installed_pynetdicom_has_everything_the_fast_path_needs():
    assert fence.missing() == []
    assert fence.missing(fast_path=False) == []


def refused(tmp_path, capsys, fast: bool) -> str:
    """What ``run`` says when it refuses (exit 2, before touching the data folder)."""
    code = cli.main(["run", "-c", str(config_file(tmp_path, fast))])
    assert code == 2
    assert not (tmp_path / "var").exists()
    return capsys.readouterr().err.strip()


def test_run_refuses_to_start_naming_a_missing_private_name(tmp_path, monkeypatch, capsys):
    monkeypatch.delattr(pynetdicom.dul.DULServiceProvider, "_is_transport_event")
    assert refused(tmp_path, capsys, True) == (
        f"performance.pynetdicom_fast_path: pynetdicom {fence.pynetdicom_version()} lacks "
        "pynetdicom.dul.DULServiceProvider._is_transport_event (method), which the fast path "
        "replaces; set it to false to run on pynetdicom's public API, or install the pynetdicom "
        "version pyproject.toml names, got true")


@pytest.mark.parametrize("fast", [True, False])
def test_run_refuses_in_both_modes_when_a_name_used_outside_the_fast_path_is_gone(tmp_path, monkeypatch,
                                                                                  capsys, fast):
    """The DUL's kill switch (shutdown) is read in both modes: no setting can do without it."""
    monkeypatch.delattr(pynetdicom.dul.DULServiceProvider, "kill_dul")
    assert refused(tmp_path, capsys, fast) == (
        f"performance.pynetdicom_fast_path: pynetdicom {fence.pynetdicom_version()} lacks "
        "pynetdicom.dul.DULServiceProvider.kill_dul (method), which the gateway uses in both "
        f"modes; install the pynetdicom version pyproject.toml names, got {str(fast).lower()}")


def test_public_api_mode_does_without_the_fast_path_names(monkeypatch):
    monkeypatch.delattr(pynetdicom.dul.DULServiceProvider, "_is_transport_event")
    assert fence.missing(fast_path=False) == []


def test_a_name_of_the_wrong_kind_is_missing_too(monkeypatch):
    monkeypatch.setattr(pynetdicom.dimse_messages, "create_file_meta", "not a function")
    assert fence.missing() == ["pynetdicom.dimse_messages.create_file_meta (function)"]
