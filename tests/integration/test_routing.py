"""Routing rules against real peers: DCMTK storescu from two AE titles, two Orthancs as destinations."""

from __future__ import annotations

import json
import subprocess
import sys

import pydicom
import yaml

from tests.conftest import wait_until
from tests.helpers_series import make_series


def uids(paths) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def orthanc_uids(orthanc) -> set[str]:
    found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
    return {item["MainDicomTags"]["SOPInstanceUID"] for item in found}


RULES = [
    {"name": "ct01-ct-to-ai", "match": {"calling_ae_title": ["CT01"], "modality": ["CT"]},
     "destinations": ["ai"]},
    {"name": "mr-to-archive", "match": {"modality": ["MR"]}, "destinations": ["archive"]},
    {"name": "chest-from-ct02", "match": {"calling_ae_title": "CT02",
                                         "tags": {"BodyPartExamined": "chest*", "SeriesDescription": "*LUNG*"}},
     "destinations": ["ai", "archive"]},
]


def test_each_instance_lands_exactly_where_the_rules_say(tmp_path, dcmtk, orthanc_factory, gateway_factory):
    ai = orthanc_factory("ai", aet="AI")
    archive = orthanc_factory("archive", aet="ARCHIVE")
    gw = gateway_factory(
        destinations={"ai": {"ae_title": ai.aet, "host": "127.0.0.1", "port": ai.dicom_port},
                      "archive": {"ae_title": archive.aet, "host": "127.0.0.1", "port": archive.dicom_port}},
        routes={"rules": RULES},
    )
    study = pydicom.uid.generate_uid()
    a = make_series(tmp_path / "a", 3, "CT", body_part="CHEST", series_description="lung", study_uid=study)
    b = make_series(tmp_path / "b", 3, "CT", body_part="CHEST", series_description="Thin Lung 1mm",
                    study_uid=study)
    c = make_series(tmp_path / "c", 2, "MR", body_part="HEAD", study_uid=study)
    d = make_series(tmp_path / "d", 2, "MR", body_part="CHEST", series_description="lung", study_uid=study)
    e = make_series(tmp_path / "e", 2, "CT", body_part="ABDOMEN", study_uid=study)
    # Two calling AE titles, mixed CT/MR in one association each.
    dcmtk.storescu(gw.port, gw.ae_title, *a, *c, calling="CT01").check_returncode()
    dcmtk.storescu(gw.port, gw.ae_title, *b, *d, *e, calling="CT02").check_returncode()

    expected_ai = uids(a) | uids(b) | uids(d)  # CT01's CT; CT02's chest lung (CT and MR)
    expected_archive = uids(b) | uids(c) | uids(d)  # CT02's chest lung; every MR

    def settled():
        report = json.loads(gw.cli("status", "--json").stdout)
        totals = report["queue_totals"]
        return report if totals["pending"] == totals["sending"] == 0 and totals["sent"] else None

    report = wait_until(settled, 60, 0.2, "the queue to drain")
    assert report["queue_totals"]["sent"] == len(expected_ai) + len(expected_archive)
    assert report["queue_totals"]["failed"] == 0
    assert orthanc_uids(ai) == expected_ai
    assert orthanc_uids(archive) == expected_archive
    assert report["store"]["instances"] == 12  # e is stored, routed nowhere
    assert report["rules"] == {
        "ct01-ct-to-ai": {"matches": 3, "last_match_at": report["rules"]["ct01-ct-to-ai"]["last_match_at"]},
        "mr-to-archive": {"matches": 4, "last_match_at": report["rules"]["mr-to-archive"]["last_match_at"]},
        "chest-from-ct02": {"matches": 5, "last_match_at": report["rules"]["chest-from-ct02"]["last_match_at"]},
    }
    log = gw.log()
    d_uid = sorted(uids(d))[0]
    assert f"routed SOP {d_uid} to archive, ai by rules mr-to-archive, chest-from-ct02" in log
    e_uid = sorted(uids(e))[0]
    assert f"routed SOP {e_uid} to no destination (no rule matched)" in log
    text = gw.cli("status").stdout
    assert "rule chest-from-ct02: 5 matches" in text


def test_route_explains_each_file_without_a_daemon(tmp_path, gateway_factory):
    gw = gateway_factory(
        start=False,
        destinations={"ai": {"ae_title": "AI", "host": "127.0.0.1", "port": 104},
                      "archive": {"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 105}},
        routes={"received": ["archive"], "rules": RULES},
    )
    ct = make_series(tmp_path / "ct", 1, "CT", body_part="ABDOMEN")
    mr = make_series(tmp_path / "mr", 1, "MR", body_part="CHEST", series_description="lung")
    result = gw.cli("route", "--calling-ae", "CT02", ct[0], mr[0])
    assert result.returncode == 0, result.stderr
    ct_uid, mr_uid = sorted(uids(ct))[0], sorted(uids(mr))[0]
    assert result.stdout.splitlines() == [
        f"{ct[0]}: SOP {ct_uid} (CT)",
        "  rule ct01-ct-to-ai: no match, calling_ae_title is 'CT02', not one of CT01",
        "  rule mr-to-archive: no match, modality is 'CT', not one of MR",
        "  rule chest-from-ct02: no match, tags.BodyPartExamined is 'ABDOMEN', which does not match 'chest*'",
        "  destinations: archive (by routes.received)",
        f"{mr[0]}: SOP {mr_uid} (MR)",
        "  rule ct01-ct-to-ai: no match, calling_ae_title is 'CT02', not one of CT01",
        "  rule mr-to-archive: matches -> archive",
        "  rule chest-from-ct02: matches -> ai, archive",
        "  destinations: archive, ai (by rules mr-to-archive, chest-from-ct02, routes.received)",
    ]
    # without --calling-ae, a file has no calling AE title: the rule says so
    result = gw.cli("route", ct[0])
    assert "  rule ct01-ct-to-ai: no match, calling_ae_title is absent (not received over DIMSE), not one of CT01" \
        in result.stdout.splitlines()
    # unreadable input: one line on stderr, exit 1
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    result = gw.cli("route", tmp_path / "junk.dcm")
    assert result.returncode == 1
    assert result.stderr.startswith(f"{tmp_path / 'junk.dcm'}: skipped, not a readable DICOM file")


def test_bad_rules_fail_check_config_with_their_key_paths(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({
        "destinations": {"ai": {"ae_title": "AI", "host": "127.0.0.1", "port": 104}},
        "routes": {"rules": [
            {"name": "a", "match": {"modality": "CT"}, "destinations": ["pacs"]},
            {"name": "b", "match": {"tags": {"BodyPart": "CHEST"}}, "destinations": ["ai"]},
            {"name": "c", "match": {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.2.x"}, "destinations": ["ai"]},
            {"name": "d", "match": {}, "destinations": ["ai"]},
        ]},
    }))
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert [line.split(":", 1)[0] for line in lines] == [
        "routes.rules[1].match.tags.BodyPart",
        "routes.rules[2].match.sop_class_uid[0]",
        "routes.rules[3].match",
        "routes.rules[0].destinations[0]",
    ], lines
    assert lines[3].endswith("must name a destination under 'destinations' (ai), got 'pacs'")
    assert lines[0].endswith("got 'BodyPart'")


def test_stow_rs_instances_are_routed_by_the_same_rules(tmp_path, orthanc, gateway_factory):
    from dicomweb_client.api import DICOMwebClient

    gw = gateway_factory(
        destinations={"ai": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}},
        routes={"rules": [
            {"name": "mr-to-ai", "match": {"modality": "MR"}, "destinations": ["ai"]},
            {"name": "from-ct01", "match": {"calling_ae_title": "CT01"}, "destinations": ["ai"]},
        ]},
    )
    study = pydicom.uid.generate_uid()
    mr = make_series(tmp_path / "mr", 2, "MR", study_uid=study)
    ct = make_series(tmp_path / "ct", 2, "CT", study_uid=study)
    client = DICOMwebClient(f"{gw.http_url}/dicom-web")
    client.store_instances([pydicom.dcmread(p) for p in mr + ct])

    def settled():
        report = json.loads(gw.cli("status", "--json").stdout)
        totals = report["queue_totals"]
        return report if totals["pending"] == totals["sending"] == 0 and totals["sent"] else None

    report = wait_until(settled, 60, 0.2, "the queue to drain")
    assert orthanc_uids(orthanc) == uids(mr)  # STOW-RS has no calling AE title: from-ct01 never matches
    assert report["rules"]["mr-to-ai"]["matches"] == 2 and report["rules"]["from-ct01"]["matches"] == 0
    assert f"routed SOP {sorted(uids(ct))[0]} to no destination (no rule matched)" in gw.log()
