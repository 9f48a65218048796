"""WADO-RS content negotiation (pure): stored bytes when accepted, IVR<->EVR relabelling, 406 reasons."""

from __future__ import annotations

import pytest

from gateway.web.negotiate import (
    EXPLICIT_LE,
    IMPLICIT_LE,
    NotAcceptable,
    choose_frames,
    choose_instance,
    parse_accept,
)

JPEG = "1.2.840.10008.1.2.4.50"
MP = 'multipart/related; type="application/dicom"'


@pytest.mark.parametrize("accept, stored, single, ts, as_stored, multipart", [
    (None, JPEG, False, JPEG, True, True),
    ("*/*", IMPLICIT_LE, False, IMPLICIT_LE, True, True),
    (f"{MP}; transfer-syntax=*", JPEG, False, JPEG, True, True),
    (MP, EXPLICIT_LE, False, EXPLICIT_LE, True, True),
    (MP, IMPLICIT_LE, False, EXPLICIT_LE, False, True),
    (f"{MP}; transfer-syntax={IMPLICIT_LE}", EXPLICIT_LE, True, IMPLICIT_LE, False, True),
    ("application/dicom", EXPLICIT_LE, True, EXPLICIT_LE, True, False),
    (f"{MP}; transfer-syntax={JPEG}; q=0.9, {MP}; transfer-syntax=*; q=0.5", JPEG, False, JPEG, True, True),
])
def test_choices(accept, stored, single, ts, as_stored, multipart):
    choice = choose_instance(parse_accept(accept), stored, single)
    assert (choice.transfer_syntax, choice.as_stored, choice.multipart) == (ts, as_stored, multipart)


def test_refusals_say_what_would_work():
    with pytest.raises(NotAcceptable, match=f"stored as {JPEG}.*transfer-syntax=\\*"):
        choose_instance(parse_accept(MP), JPEG, single=True)
    with pytest.raises(NotAcceptable, match="asks for image/png"):
        choose_instance(parse_accept("image/png"), EXPLICIT_LE, single=True)
    with pytest.raises(NotAcceptable, match="one instance"):
        choose_instance(parse_accept("application/dicom"), EXPLICIT_LE, single=False)
    with pytest.raises(NotAcceptable, match="image/jpeg"):
        choose_frames(parse_accept('multipart/related; type="application/octet-stream"'), JPEG)
    assert choose_frames(parse_accept('multipart/related; type="image/jpeg"'), JPEG).media_type == "image/jpeg"
    assert choose_frames(parse_accept(None), IMPLICIT_LE).media_type == "application/octet-stream"
