"""uids.check_uid: the gate between a peer's UIDs and file names."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from gateway.errors import InvalidUID
from gateway.storage.uids import MAX_UID_LENGTH, check_uid, is_valid_uid

VALID = ["1.2.840.10008.1.1", "0", "0.0", "1.2.3.0.4", "2.25." + "9" * 30, "1." + "2" * 62]
INVALID = [
    "", "../../evil", "1.2.3/../../x", "1" * 65, "1." + "2" * 63, "1.02", "01.2", "1..2", ".1.2",
    "1.2.", ".", "..", "1.2.3 ", " 1.2", "1.2\n", "1.2\x00", "1,2", "1.2.a", "/1.2", "1.2/3",
    "\\..\\x", "١.٢",  # Arabic-Indic digits are digits to str.isdigit, not to DICOM
]


@pytest.mark.parametrize("uid", VALID)
def test_valid_uids_pass_unchanged(uid):
    assert check_uid(uid) == uid
    assert is_valid_uid(uid)


@pytest.mark.parametrize("uid", INVALID)
def test_invalid_uids_are_refused(uid):
    with pytest.raises(InvalidUID):
        check_uid(uid, "SOP Instance UID")
    assert not is_valid_uid(uid)


@pytest.mark.parametrize("value", [None, 12, b"1.2.3", ["1.2"]])
def test_non_text_is_refused(value):
    with pytest.raises(InvalidUID):
        check_uid(value)


def test_messages_name_the_field_and_the_rule():
    with pytest.raises(InvalidUID, match="Study Instance UID is missing"):
        check_uid("", "Study Instance UID")
    with pytest.raises(InvalidUID, match="65 characters long, at most 64"):
        check_uid("1" * 65, "SOP Instance UID")
    with pytest.raises(InvalidUID, match=r"SOP Instance UID '\.\./\.\./evil' is not a DICOM UID"):
        check_uid("../../evil", "SOP Instance UID")


def test_generated_uids_pass():
    for _ in range(200):
        assert check_uid(generate_uid()) is not None


@given(st.text(max_size=80))
def test_anything_accepted_stays_one_path_component_inside_the_root(text):
    if not is_valid_uid(text):
        with pytest.raises(InvalidUID):
            check_uid(text)
        return
    root = Path("/store")
    path = root / text / text / f"{text}.dcm"
    assert len(text) <= MAX_UID_LENGTH
    assert path.parts[:2] == ("/", "store") and len(path.parts) == 5
    assert ".." not in path.parts and "/" not in text and "\\" not in text


@given(st.lists(st.integers(min_value=0, max_value=10**12), min_size=1, max_size=12))
def test_well_formed_component_lists_pass_when_short_enough(components):
    uid = ".".join(map(str, components))
    assert is_valid_uid(uid) == (len(uid) <= MAX_UID_LENGTH)
