"""DICOMweb destinations in the config: `type` picks the model, secrets only from readable files."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway import config
from gateway.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    return path


def problems_of(tmp_path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text))
    return info.value.problems


def secret(tmp_path, name, text="s3cret-value\n", mode=0o600):
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


def test_both_types_side_by_side_with_defaults_and_sizes(tmp_path):
    secret(tmp_path, "token")
    cfg = config.load(write(tmp_path, """
destinations:
  pacs: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}
  cloud:
    type: dicomweb
    url: https://archive.example.org/dicom-web/
    auth: {type: bearer, token_file: token}
    max_request_bytes: 16 MiB
  web: {type: dicomweb, url: http://127.0.0.1:8042/dicom-web}
routes: {received: [pacs, cloud], results: [web]}
"""))
    pacs, cloud, web = (cfg.destinations[n] for n in ("pacs", "cloud", "web"))
    assert isinstance(pacs, config.DestinationConfig) and pacs.type == "dimse" and pacs.port == 4242
    assert isinstance(cloud, config.DicomwebDestinationConfig)
    assert cloud.url == "https://archive.example.org/dicom-web"  # trailing slash dropped
    assert cloud.auth.token_file == tmp_path.resolve() / "token"  # relative to the config file
    assert cloud.max_request_bytes == 16 * 1024 * 1024
    assert cloud.timeout_seconds == 120 and cloud.tls.verify is True
    assert web.auth is None and web.max_request_bytes == 64 * 1024 * 1024
    assert cfg.routes.received == ("pacs", "cloud")


def test_every_mistake_names_its_key_and_value(tmp_path):
    secret(tmp_path, "open", mode=0o644)
    secret(tmp_path, "empty", text="\n")
    problems = problems_of(tmp_path, """
destinations:
  a: {type: dicomwob, url: https://x.org}
  b: {type: dicomweb, url: ftp://x.org, max_request_bytes: 12 parsecs}
  c: {type: dicomweb, url: https://x.org, auth: {type: basic, username: u, password_file: missing}}
  d: {type: dicomweb, url: https://x.org, auth: {type: bearer, token_file: open}}
  e: {type: dicomweb, url: https://x.org, auth: {type: oauth, token_url: https://t.org}}
  f: {type: dicomweb, url: https://x.org, auth: {token_file: open}}
  g: {type: dicomweb, url: https://x.org, auth: {type: bearer, token_file: empty}}
  h: {type: dicomweb, url: https://x.org, tls: {client_cert_file: open}}
  i: {type: dicomweb, url: https://x.org, ae_title: X}
""")
    expected = [
        "destinations.a.type: must be dimse (the default) or dicomweb, got 'dicomwob'",
        "destinations.b.url: must be an http:// or https:// URL with a host, got 'ftp://x.org'",
        "destinations.b.max_request_bytes: must be a size such as 67108864, 64 MiB or 500 kB, got '12 parsecs'",
        "destinations.c.auth.password_file: cannot read the secret file (No such file or directory), "
        "got 'missing'",
        "destinations.d.auth.token_file: the secret file is open to other users (mode 644); chmod 600 it, "
        "got 'open'",
        "destinations.e.auth.type: must be one of: bearer, basic, oauth2, got 'oauth'",
        "destinations.f.auth: needs a type: bearer, basic or oauth2, got {token_file: open}",
        "destinations.g.auth.token_file: the secret file is empty, got 'empty'",
        "destinations.h.tls: client_cert_file and client_key_file go together: set both or neither, "
        "got {client_cert_file: open}",
        "destinations.i.ae_title: unknown key (check the spelling against config/gateway.yaml), got 'X'",
    ]
    assert sorted(problems) == sorted(expected)


def test_a_secret_written_into_the_yaml_is_refused_and_never_echoed(tmp_path):
    problems = problems_of(tmp_path, """
destinations:
  a: {type: dicomweb, url: https://x.org, auth: {type: basic, username: u, password: hunter2}}
  b: {type: dicomweb, url: https://x.org, auth: {type: oauth2, token_url: https://t.org, client_id: c,
      client_secret: hunter3}}
""")
    assert len(problems) == 2
    assert "name that file with password_file" in problems[0]
    assert "name that file with client_secret_file" in problems[1]
    assert not any("hunter" in p for p in problems)


def test_credentials_never_go_over_plain_http_except_to_loopback(tmp_path):
    secret(tmp_path, "pw")
    problems = problems_of(tmp_path, """
destinations:
  a: {type: dicomweb, url: http://pacs.example.org/dicom-web, auth: {type: basic, username: u, password_file: pw}}
  b: {type: dicomweb, url: https://x.org, auth: {type: oauth2, token_url: http://login.example.org/t,
      client_id: c, client_secret_file: pw}}
""")
    assert problems[0].startswith("destinations.a: credentials would cross the network in clear text")
    assert problems[1].startswith("destinations.b.auth.token_url: the client secret would cross the network")
    ok = config.load(write(tmp_path, """
destinations:
  a: {type: dicomweb, url: http://127.0.0.1:8042/dicom-web, auth: {type: basic, username: u, password_file: pw}}
  b: {type: dicomweb, url: http://localhost:8042/dicom-web, auth: {type: oauth2, token_url: "http://[::1]:9/t",
      client_id: c, client_secret_file: pw}}
"""))
    assert set(ok.destinations) == {"a", "b"}


def test_tls_files_must_load(tmp_path):
    secret(tmp_path, "notacert", text="hello")
    secret(tmp_path, "key", text="nokey")
    problems = problems_of(tmp_path, """
destinations:
  a: {type: dicomweb, url: https://x.org, tls: {ca_file: notacert}}
  b: {type: dicomweb, url: https://x.org, tls: {ca_file: nowhere.pem}}
  c: {type: dicomweb, url: https://x.org, tls: {client_cert_file: notacert, client_key_file: key}}
""")
    assert problems[0].startswith("destinations.a.tls: ca_file holds no usable PEM CA certificate")
    assert problems[1] == ("destinations.b.tls.ca_file: cannot read the file (No such file or directory), "
                           "got 'nowhere.pem'")
    assert problems[2].startswith("destinations.c.tls: client_cert_file and client_key_file do not load")


def test_check_config_exits_2_naming_the_missing_secret_file(tmp_path):
    path = write(tmp_path, """
destinations:
  cloud: {type: dicomweb, url: https://x.org, auth: {type: bearer, token_file: /nonexistent/token}}
""")
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == ("destinations.cloud.auth.token_file: cannot read the secret file "
                                     "(No such file or directory), got '/nonexistent/token'")
