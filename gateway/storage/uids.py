"""DICOM UID checking (pure): the only gate between a peer's UIDs and a file path."""

from __future__ import annotations

import re

from gateway.errors import InvalidUID

MAX_UID_LENGTH = 64
# Components are "0" or digits without a leading zero, joined by single dots (PS3.5 9.1).
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a str that is a valid DICOM UID (see ``check_uid``)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_UID_LENGTH
        and _UID.fullmatch(value) is not None
    )


def check_uid(value: object, what: str = "UID") -> str:
    """Return ``value`` if it is a valid DICOM UID, else raise ``InvalidUID`` naming ``what``.

    Valid: a non-empty str of at most 64 characters, digits and dots only, no empty
    component and no leading zero in a component ("0" itself is allowed). Such a string
    can never be ".", "..", contain a path separator or be absolute, so it is safe as a
    file or folder name.
    """
    if value is None or value == "":
        raise InvalidUID(f"{what} is missing")
    if not isinstance(value, str):
        raise InvalidUID(f"{what} must be text, got {type(value).__name__}")
    if len(value) > MAX_UID_LENGTH:
        raise InvalidUID(
            f"{what} is {len(value)} characters long, at most {MAX_UID_LENGTH} are allowed"
        )
    if _UID.fullmatch(value) is None:
        raise InvalidUID(
            f"{what} {_show(value)} is not a DICOM UID (digits and dots only, "
            "no empty component, no leading zero in a component)"
        )
    return value


def _show(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
