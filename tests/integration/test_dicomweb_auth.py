"""Authentication on every DICOMweb endpoint: no token, wrong token, token without the scope, a Basic user."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.web_node import READER_TOKEN, WRITER_TOKEN, basic, bearer, web_node  # noqa: F401

STUDY = "1.2.3"
READS = ["/dicom-web/studies", "/dicom-web/series", "/dicom-web/instances", f"/dicom-web/studies/{STUDY}/series",
         f"/dicom-web/studies/{STUDY}/instances", f"/dicom-web/studies/{STUDY}/series/1.2.4/instances",
         f"/dicom-web/studies/{STUDY}", f"/dicom-web/studies/{STUDY}/metadata",
         f"/dicom-web/studies/{STUDY}/series/1.2.4/instances/1.2.5/frames/1", "/api/inbox/jobs/x"]
WRITES = ["/dicom-web/studies", f"/dicom-web/studies/{STUDY}", "/api/inbox/jobs"]


@pytest.fixture
def node(web_node):
    return web_node()


def test_every_endpoint_needs_the_right_credentials(node):
    wrong = bearer("not-the-token")
    for path in READS:
        r = httpx.get(node.url + path, timeout=10)
        assert r.status_code == 401 and "Bearer" in r.headers["www-authenticate"], path
        assert "Basic" in r.headers["www-authenticate"]
        assert httpx.get(node.url + path, headers=wrong, timeout=10).status_code == 401, path
        for good in (bearer(READER_TOKEN), basic()):
            assert httpx.get(node.url + path, headers=good, timeout=10).status_code not in (401, 403), path
    for path in WRITES:
        assert httpx.post(node.url + path, content=b"", timeout=10).status_code == 401, path
        r = httpx.post(node.url + path, content=b"", headers=bearer(READER_TOKEN), timeout=10)
        assert r.status_code == 403 and "token:reader lacks the 'write' scope" in r.json()["detail"], path
        r = httpx.post(node.url + path, content=b"", headers=basic(), timeout=10)
        assert r.status_code == 403 and "user:viewer lacks the 'write' scope" in r.json()["detail"], path
        assert httpx.post(node.url + path, content=b"", headers=bearer(WRITER_TOKEN),
                          timeout=10).status_code not in (401, 403), path
    assert httpx.get(node.url + "/dicom-web/studies", headers=basic(password="nope"), timeout=10).status_code == 401
