"""dimse.fence: every private pynetdicom name the fast path relies on is checked at start, and
``run`` refuses (exit 2, one sentence naming it and the installed version) when one is gone."""

from __future__ import annotations

import pynetdicom.dul
import pynetdicom.dimse_messages
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


def test_run_refuses_to_start_naming_a_missing_private_name(tmp_path, monkeypatch, capsys):
    monkeypatch.delattr(pynetdicom.dul.DULServiceProvider, "_is_transport_event")
    code = cli.main(["run", "-c", str(config_file(tmp_path, True))])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (f"performance.pynetdicom_fast_path: pynetdicom {fence.pynetdicom_version()} lacks "
                   "pynetdicom.dul.DULServiceProvider._is_transport_event (method), which the fast path "
                   "replaces; set it to false to run on pynetdicom's public API, or install the pynetdicom "
                   "version pyproject.toml names, got true")
    assert not (tmp_path / "var").exists()  # refused before touching the data folder


def test_a_name_of_the_wrong_kind_is_missing_too(monkeypatch):
    monkeypatch.setattr(pynetdicom.dimse_messages, "create_file_meta", "not a function")
    assert fence.missing() == ["pynetdicom.dimse_messages.create_file_meta (function)"]
