"""The sidecar parser: typed jobs from YAML, one clear sentence for every mistake."""

from __future__ import annotations

import pytest
import yaml

from gateway.inbox import sidecar
from gateway.errors import JobError
from gateway.inbox.sidecar import Kind

SERIES = "1.2.826.0.1.3680043.8.498.1"


def parse(data) -> sidecar.Job:
    if isinstance(data, dict):
        data = yaml.safe_dump(data)
    if isinstance(data, str):
        data = data.encode()
    return sidecar.parse(data)


def error(data) -> str:
    with pytest.raises(JobError) as info:
        parse(data)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_minimal_sidecar_has_defaults():
    job = parse({"source": {"series_instance_uid": SERIES}})
    assert job.source.series_instance_uid == SERIES
    assert job.kind is None and job.segments is None and job.bits_stored is None


def test_full_sidecar():
    job = parse({
        "source": {"series_instance_uid": SERIES},
        "kind": "segmentation",
        "series_description": "AI liver",
        "series_number": 901,
        "segments": [
            {"label": "liver", "category": {"scheme": "SCT", "value": "123037004",
                                            "meaning": "Anatomical Structure"},
             "type": {"scheme": "SCT", "value": "10200004", "meaning": "Liver"},
             "algorithm_name": "liver-net", "algorithm_type": "SEMIAUTOMATIC"},
            {"label": "tumor"},
        ],
    })
    assert job.kind is Kind.SEGMENTATION and job.series_number == 901
    assert job.segments[0].type.meaning == "Liver"
    assert job.segments[1].category == sidecar.DEFAULT_CATEGORY
    assert job.segments[1].algorithm_type == "AUTOMATIC"


def test_study_only_source_is_allowed():
    job = parse({"source": {"study_instance_uid": SERIES}, "kind": "secondary_capture"})
    assert job.source.study_instance_uid == SERIES


@pytest.mark.parametrize(
    "data, words",
    [
        ({"source": {"series_instance_uid": SERIES}, "colour": "red"}, ["'colour'", "not known", "allowed"]),
        ({"source": {"series_instance_uid": SERIES}, "segments": [{"label": "a", "colour": 1}]},
         ["segments[0].colour", "not known"]),
        ({"kind": "segmentation"}, ["'source'", "required"]),
        ({"source": {}}, ["source", "series_instance_uid"]),
        ({"source": {"series_instance_uid": "1.2.abc"}}, ["series_instance_uid", "DICOM UID"]),
        ({"source": {"series_instance_uid": "1." + "2" * 70}}, ["DICOM UID"]),
        ({"source": {"series_instance_uid": SERIES}, "kind": "mask"}, ["'kind'", "segmentation"]),
        ({"source": {"series_instance_uid": SERIES}, "bits_stored": 17}, ["bits_stored", "16"]),
        ({"source": {"series_instance_uid": SERIES}, "bits_stored": "8"}, ["bits_stored", "whole number"]),
        ({"source": {"series_instance_uid": SERIES}, "photometric_interpretation": "YBR"},
         ["photometric_interpretation", "RGB"]),
        ({"source": {"series_instance_uid": SERIES}, "segments": []}, ["segments"]),
        ({"source": {"series_instance_uid": SERIES}, "segments": [{"label": "a", "category": {"scheme": "SCT"}}]},
         ["segments[0].category.value", "required"]),
        ({"source": {"series_instance_uid": SERIES}, "series_description": "x" * 65},
         ["series_description", "64"]),
        ({"source": {"series_instance_uid": SERIES}, "series_description": "a\\b"},
         ["series_description", "backslash"]),
    ],
)
def test_mistakes_name_the_key(data, words):
    message = error(data)
    for word in words:
        assert word in message, message


def test_a_float_looking_uid_asks_for_quotes():
    assert "quote" in error("source: {series_instance_uid: 1.2}\n")


@pytest.mark.parametrize("text, words", [
    ("- a\n- b\n", ["mapping", "list"]),
    ("just text\n", ["mapping", "str"]),
    ("", ["mapping", "empty"]),
    ("source: [unclosed\n", ["not valid YAML", "line"]),
])
def test_not_a_mapping(text, words):
    message = error(text)
    for word in words:
        assert word in message, message


def test_over_64_kib_is_refused_before_parsing():
    text = f"source: {{series_instance_uid: '{SERIES}'}}\n#" + "x" * (64 * 1024)
    assert "64 KiB" in error(text)


def test_yaml_aliases_are_refused():
    assert "aliases" in error("a: &x [1, 2]\nb: *x\n")


def test_not_utf8():
    assert "UTF-8" in error(b"source: \xff\xfe\n")


def test_python_tags_are_refused():
    message = error("source: !!python/object/apply:os.system ['true']\n")
    assert "YAML" in message


@pytest.mark.parametrize("dtype_kind, segments, expected", [
    ("b", None, Kind.SEGMENTATION),
    ("u", [{"label": "a"}], Kind.SEGMENTATION),
    ("i", [{"label": "a"}], Kind.SEGMENTATION),
    ("u", None, Kind.SECONDARY_CAPTURE),
    ("f", None, Kind.SECONDARY_CAPTURE),
])
def test_default_kind(dtype_kind, segments, expected):
    data = {"source": {"series_instance_uid": SERIES}}
    if segments:
        data["segments"] = segments
    assert sidecar.default_kind(parse(data), dtype_kind) is expected


def test_explicit_kind_wins():
    job = parse({"source": {"series_instance_uid": SERIES}, "kind": "secondary_capture"})
    assert sidecar.default_kind(job, "b") is Kind.SECONDARY_CAPTURE
