"""Routing rules: pure matching over a header, explanations, and config mistakes with key paths."""

import pytest
import yaml
from pydicom.dataset import Dataset

from gateway import config
from gateway.errors import ConfigError
from gateway.routing import rules
from gateway.routing.rules import Facts

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"

BASE = {
    "destinations": {
        "ai": {"ae_title": "AI", "host": "127.0.0.1", "port": 104},
        "archive": {"ae_title": "ARCH", "host": "127.0.0.1", "port": 105},
        "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 106},
    },
}


def cfg(routes: dict, **extra) -> config.Config:
    return config.parse({**BASE, "routes": routes, **extra})


def problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.parse({**BASE, **raw})
    return info.value.problems


def header(**values) -> Dataset:
    ds = Dataset()
    ds.Modality = values.pop("Modality", "CT")
    ds.SOPClassUID = values.pop("SOPClassUID", CT)
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


CHEST = {
    "name": "chest-ct-to-ai",
    "match": {
        "calling_ae_title": ["CT01", "CT02"],
        "called_ae_title": ["DICOM-GATEWAY"],
        "modality": ["CT"],
        "sop_class_uid": [CT],
        "tags": {"BodyPartExamined": "CHEST*", "SeriesDescription": "*lung*"},
    },
    "destinations": ["ai"],
}
MR_RULE = {"name": "mr-to-pacs", "match": {"modality": "MR"}, "destinations": ["pacs", "archive"]}
GOOD = Facts(calling_ae_title="CT02", called_ae_title="DICOM-GATEWAY")


def test_the_issue_example_routes_to_the_union_with_one_log_line():
    c = cfg({"received": ["archive"], "rules": [CHEST, MR_RULE]})
    ds = header(BodyPartExamined="CHEST", SeriesDescription="Thin LUNG 1mm")
    decision = rules.decide(c.routes.rules, c.routes.received, ds, GOOD)
    assert decision.destinations == ("ai", "archive")
    assert decision.rules == ("chest-ct-to-ai",)
    assert decision.describe("1.2.3") == "routed SOP 1.2.3 to ai, archive by rules chest-ct-to-ai, received"
    assert decision.verdicts[1] == rules.Verdict("mr-to-pacs", False, "modality is 'CT', not one of MR")


def test_each_destination_is_queued_once_whatever_the_overlap():
    both = {"name": "all-mr", "match": {"modality": ["MR"]}, "destinations": ["archive", "pacs"]}
    c = cfg({"received": ["archive"], "rules": [MR_RULE, both]})
    decision = rules.decide(c.routes.rules, c.routes.received, header(Modality="MR", SOPClassUID=MR), Facts())
    assert decision.destinations == ("pacs", "archive")
    assert decision.rules == ("mr-to-pacs", "all-mr")
    assert decision.describe("9") == "routed SOP 9 to pacs, archive by rules mr-to-pacs, all-mr, received"


def test_no_match_and_no_received_means_nowhere():
    c = cfg({"rules": [MR_RULE]})
    decision = rules.decide(c.routes.rules, c.routes.received, header(), Facts())
    assert decision.destinations == ()
    assert decision.describe("7") == "routed SOP 7 to no destination (no rule matched)"


@pytest.mark.parametrize(
    ("facts", "values", "reason"),
    [
        (Facts("CT03", "DICOM-GATEWAY"), {}, "calling_ae_title is 'CT03', not one of CT01, CT02"),
        (Facts(None, None), {}, "calling_ae_title is absent (not received over DIMSE), not one of CT01, CT02"),
        (Facts("CT01", "OTHER"), {}, "called_ae_title is 'OTHER', not one of DICOM-GATEWAY"),
        (GOOD, {"Modality": "MR"}, "modality is 'MR', not one of CT"),
        (GOOD, {"SOPClassUID": MR}, f"sop_class_uid is '{MR}', not one of {CT}"),
        (GOOD, {"BodyPartExamined": "ABDOMEN"},
         "tags.BodyPartExamined is 'ABDOMEN', which does not match 'CHEST*'"),
        (GOOD, {"BodyPartExamined": "chest", "SeriesDescription": "Brain"},
         "tags.SeriesDescription is 'Brain', which does not match '*lung*'"),
        (GOOD, {"BodyPartExamined": None}, "tags.BodyPartExamined is absent, which does not match 'CHEST*'"),
    ],
)
def test_the_first_failed_condition_is_explained_with_the_value_found(facts, values, reason):
    c = cfg({"rules": [CHEST]})
    values = {"BodyPartExamined": "CHEST", "SeriesDescription": "lung", **values}
    values = {k: v for k, v in values.items() if v is not None}
    [verdict] = rules.evaluate(c.routes.rules, header(**values), facts)
    assert (verdict.matched, verdict.reason) == (False, reason)


def test_globs_are_case_insensitive_and_multi_values_join_with_backslash():
    rule = {"name": "r", "match": {"tags": {"ImageType": "original\\primary*", "PatientName": "DOE^*"}},
            "destinations": ["ai"]}
    c = cfg({"rules": [rule]})
    ds = header(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], PatientName="Doe^John")
    assert rules.evaluate(c.routes.rules, ds, Facts())[0].matched
    ds.ImageType = ["DERIVED", "SECONDARY"]
    [verdict] = rules.evaluate(c.routes.rules, ds, Facts())
    assert verdict.reason == "tags.ImageType is 'DERIVED\\\\SECONDARY', which does not match 'original\\\\primary*'"


def test_a_list_of_patterns_is_any_of_them_and_star_accepts_absent():
    rule = {"name": "r", "match": {"tags": {"SeriesDescription": ["*lung*", "*thorax*"],
                                            "StudyDescription": "*"}},
            "destinations": ["ai"]}
    c = cfg({"rules": [rule]})
    assert rules.evaluate(c.routes.rules, header(SeriesDescription="THORAX"), Facts())[0].matched
    assert not rules.evaluate(c.routes.rules, header(SeriesDescription="head"), Facts())[0].matched


def test_single_values_are_one_item_lists():
    c = cfg({"rules": [{"name": "r", "match": {"modality": "CT", "calling_ae_title": "CT01"},
                        "destinations": ["ai"]}]})
    assert c.routes.rules[0].match.modality == ("CT",)
    assert c.routes.rules[0].match.calling_ae_title == ("CT01",)


def test_bad_rules_are_config_errors_with_key_paths():
    found = problems({"routes": {"received": ["archive"], "rules": [
        {"name": "a", "match": {"modality": ["CT"]}, "destinations": ["nowhere"]},
        {"name": "b", "match": {"tags": {"SeriesDescriptoin": "*lung*"}}, "destinations": ["ai"]},
        {"name": "c", "match": {"sop_class_uid": ["1.2.840.10008.5.1.4.1.1.02"]}, "destinations": ["ai"]},
        {"name": "d", "match": {}, "destinations": ["ai"]},
        {"name": "a", "match": {"modality": ["ct"]}, "destinations": []},
        {"name": "f", "match": {"tags": {"PixelData": "*"}}, "destinations": ["ai"]},
        {"name": "g", "match": {"modality": "CT", "colour": "red"}, "destinations": ["ai"]},
    ]}})
    text = "\n".join(problems_sorted := sorted(found))
    assert ("routes.rules[0].destinations[0]: must name a destination under 'destinations' "
            "(ai, archive, pacs), got 'nowhere'") in found, text
    assert any(p.startswith("routes.rules[1].match.tags.SeriesDescriptoin: is not a DICOM keyword")
               and p.endswith("got 'SeriesDescriptoin'") for p in found), text
    assert any(p.startswith("routes.rules[2].match.sop_class_uid[0]: must be a UID")
               and p.endswith("got '1.2.840.10008.5.1.4.1.1.02'") for p in found), text
    assert any(p.startswith("routes.rules[3].match: must hold at least one condition") for p in found), text
    assert "routes.rules[4].name: another rule has this name, got 'a'" in found, text
    assert any(p.startswith("routes.rules[4].match.modality[0]: must be a DICOM modality code in upper case")
               for p in found), text
    assert any(p.startswith("routes.rules[4].destinations: must list at least one value") for p in found), text
    assert any(p.startswith("routes.rules[5].match.tags.PixelData: is at or after Pixel Data") for p in found), text
    assert any(p.startswith("routes.rules[6].match.colour: unknown key") for p in found), text
    assert len(problems_sorted) == 9, text


def test_bad_triggers_are_config_errors_with_key_paths(tmp_path):
    (tmp_path / "tok").write_text("s3cret\n")
    found = problems({
        "series_complete": {"stable_seconds": 0},
        "triggers": [
            {"name": "t", "match": {"modality": "CT"}, "export_dir": str(tmp_path),
             "webhook": {"url": "ftp://x", "headers": {"Authorization": "Bearer abc"}}},
            {"name": "t", "match": {}, "export_dir": str(tmp_path)},
            {"name": "u", "match": {"modality": "CT"}, "export_dir": str(tmp_path / "u"),
             "webhook": {"url": "http://ai.example.org/jobs", "token_file": str(tmp_path / "tok")}},
            {"name": "v", "match": {"modality": "CT"}, "export_dir": str(tmp_path / "v"),
             "webhook": {"url": "https://ai.example.org/jobs", "token_file": str(tmp_path / "missing")}},
        ],
    })
    text = "\n".join(found)
    assert any(p.startswith("series_complete.stable_seconds:") and p.endswith("got 0") for p in found), text
    assert any(p.startswith("triggers[0].webhook.url: must be an http:// or https:// URL") for p in found), text
    assert any(p.startswith("triggers[0].webhook.headers.Authorization: must not be set here") for p in found), text
    assert any(p.startswith("triggers[1].match: must hold at least one condition") for p in found), text
    assert "triggers[1].name: another trigger has this name, got 't'" in found, text
    assert any(p.startswith("triggers[2].webhook: a token_file needs an https:// url") for p in found), text
    assert (f"triggers[3].webhook.token_file: cannot read the token file (No such file or directory), "
            f"got '{tmp_path / 'missing'}'") in found, text
    assert "s3cret" not in text
    assert f"triggers[1].export_dir: trigger t exports there too; give each trigger its own folder, got '{tmp_path}'" in found
    assert "Bearer abc" not in text  # a secret put in the wrong place is never echoed back


def test_triggers_load_with_relative_export_dirs(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({
        "series_complete": {"stable_seconds": 0.5},
        "triggers": [{"name": "lung-ai", "match": {"modality": ["CT"], "tags": {"SeriesDescription": "*lung*"}},
                      "export_dir": "ai/incoming", "webhook": {"url": "http://127.0.0.1:9000/jobs"}}],
    }))
    c = config.load(path)
    assert c.series_complete.stable_seconds == 0.5
    assert c.triggers[0].export_dir == tmp_path.resolve() / "ai" / "incoming"
    assert c.triggers[0].webhook.url == "http://127.0.0.1:9000/jobs"
