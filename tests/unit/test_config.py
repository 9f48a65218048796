"""Config loading: typed values, relative paths, and every mistake reported with its key path."""

from pathlib import Path

import pytest
import yaml

from gateway import config
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    return path


def problems_of(tmp_path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text))
    return info.value.problems


def test_default_config_is_valid_and_keeps_data_beside_it():
    cfg = config.load(REPO / "config" / "gateway.yaml")
    assert cfg.node.port == 11112
    assert cfg.node.data_dir == (REPO / "config" / "var").resolve()
    assert cfg.inbox.path == (REPO / "config" / "var" / "inbox").resolve()
    assert cfg.routes.results == ("orthanc",)
    assert cfg.routes.received == ()
    assert cfg.destinations["orthanc"].port == 4242


def test_default_file_lists_every_key_with_its_default():
    """The default YAML documents the defaults: its values equal the models' own defaults."""
    raw = yaml.safe_load((REPO / "config" / "gateway.yaml").read_text())
    defaults = config.Config().model_dump(mode="json", exclude={"source_path"})
    for section, values in raw.items():
        if section in ("destinations", "routes"):
            continue
        for key, value in values.items():
            if key in ("data_dir", "path"):
                continue
            assert defaults[section][key] == value, f"{section}.{key}"
        assert set(values) == set(defaults[section]), f"{section} keys differ from the model"


def test_empty_file_gives_defaults_with_paths_relative_to_the_file(tmp_path):
    cfg = config.load(write(tmp_path, ""))
    assert cfg.node.ae_title == "DICOM-GATEWAY"
    assert cfg.node.data_dir == tmp_path.resolve() / "var"
    assert cfg.db_path == tmp_path.resolve() / "var" / "gateway.sqlite3"
    assert cfg.security.allowed_calling_aets == ()


def test_absolute_paths_stay(tmp_path):
    cfg = config.load(write(tmp_path, "node: {data_dir: /srv/dicom}\ninbox: {path: /srv/inbox}\n"))
    assert cfg.node.data_dir == Path("/srv/dicom")
    assert cfg.inbox.path == Path("/srv/inbox")


def test_full_config_types(tmp_path):
    cfg = config.load(write(tmp_path, """
node: {ae_title: GW, host: 0.0.0.0, port: 104}
security: {allowed_calling_aets: [CT1, ' MR2 ']}
destinations:
  pacs: {ae_title: PACS, host: pacs.local, port: 11112}
  ai: {ae_title: AI, host: 10.0.0.2, port: 4242}
routes: {results: [pacs], received: [ai, pacs]}
retry: {max_attempts: 3, initial_backoff_seconds: 1, max_backoff_seconds: 30}
"""))
    assert cfg.security.allowed_calling_aets == ("CT1", "MR2")
    assert cfg.routes.received == ("ai", "pacs")
    assert cfg.retry.initial_backoff_seconds == 1.0
    assert cfg.destinations["ai"].port == 4242
    with pytest.raises(Exception):
        cfg.node.port = 5  # frozen


@pytest.mark.parametrize(
    "text, expected",
    [
        ("node: {port: 70000}", "node.port: must be between 1 and 65535, got 70000"),
        ("node: {port: '104'}", "node.port: must be an integer, got '104'"),
        ("node: {prot: 104}", "node.prot: unknown key (check the spelling against config/gateway.yaml), got 104"),
        ("node: {ae_title: THIS-TITLE-IS-TOO-LONG}", "node.ae_title: must be 1 to 16 printable ASCII characters"),
        ("node: {ae_title: 'A\\\\B'}", "node.ae_title: must be 1 to 16 printable ASCII characters"),
        ("inbox: {poll_interval_seconds: 0}", "inbox.poll_interval_seconds: must be between 0.001 and 604800, got 0"),
        ("retry: {max_attempts: yes}", "retry.max_attempts: must be an integer, got True"),
        ("security: {allowed_calling_aets: CT1}", "security.allowed_calling_aets: must be a list, got 'CT1'"),
        ("destinations: {pacs: {host: h, port: 1}}", "destinations.pacs.ae_title: is required"),
        ("routes: {results: [pacs]}", "routes.results[0]: must name a destination under 'destinations' (none configured), got 'pacs'"),
        ("logging: {level: LOUD}", "logging.level: must be one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'"),
        ("- a\n- b", "(top level): must be a mapping of sections"),
        ("node: [1, 2]", "node: must be a mapping of keys to values, got [1, 2]"),
        ("bogus: 1", "bogus: unknown key"),
    ],
)
def test_each_mistake_names_key_path_and_value(tmp_path, text, expected):
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


def test_all_mistakes_at_once(tmp_path):
    problems = problems_of(tmp_path, """
node: {port: 70000, ae_tilte: X}
retry: {max_attempts: 0}
routes: {received: [nowhere]}
""")
    assert len(problems) == 4
    assert any(p.startswith("node.port:") for p in problems)
    assert any(p.startswith("node.ae_tilte: unknown key") for p in problems)
    assert any(p.startswith("retry.max_attempts: must be between 1 and") for p in problems)
    assert any(p.startswith("routes.received[0]:") for p in problems)


def test_yaml_syntax_error_names_line(tmp_path):
    problems = problems_of(tmp_path, "node:\n  port: [1, 2\n")
    assert len(problems) == 1
    assert "not valid YAML at line" in problems[0]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "nope.yaml")
    assert "config file not found" in info.value.problems[0]
