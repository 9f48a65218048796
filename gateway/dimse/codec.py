"""Hand-encoded DICOM for the hot paths of receive and forward (pure: bytes in, bytes out).

pynetdicom builds every command set and file meta group through pydicom Datasets, which
costs about a millisecond per message: as much as sending a 512 KiB image (forward), and
~15-20% of a small C-STORE's CPU on the receiving side. The messages these paths send have
a fixed shape, so they are written here directly; the callers hand anything unusual to
pynetdicom's own path. tests/unit/test_dimse.py compares each encoder byte for byte with
pynetdicom/pydicom.

Here: element encoding and UID padding, the C-STORE-RQ and C-STORE-RSP command sets, the
Part 10 file meta group pynetdicom writes, command-set and P-DATA-TF parsing. (Reading a
Part 10 file's header is ``storage.header``.)
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

# --------------------------------------------------------------------------- encoding


def element(group: int, elem: int, value: bytes, vr: bytes | None = None) -> bytes:
    """One little endian element; ``vr=None`` for implicit VR, explicit short/long otherwise."""
    head = struct.pack("<HH", group, elem)
    if vr is None:
        return head + struct.pack("<L", len(value)) + value
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return head + vr + b"\0\0" + struct.pack("<L", len(value)) + value
    return head + vr + struct.pack("<H", len(value)) + value


def uid_value(value: str) -> bytes:
    """A UI value: ASCII, padded to even length with a NUL."""
    raw = str(value).encode("ascii", "replace")
    return raw + b"\0" if len(raw) % 2 else raw


def sh_value(value: str) -> bytes:
    """A text value (SH and the like): ASCII, padded to even length with a space."""
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _command_set(*elements: tuple[int, bytes]) -> bytes:
    """Implicit VR little endian group 0000 elements, led by their Command Group Length."""
    body = b"".join(element(0x0000, elem, value) for elem, value in elements)
    return element(0x0000, 0x0000, struct.pack("<L", len(body))) + body


def store_request_bytes(message_id: int, sop_class_uid: str, sop_instance_uid: str, priority: int = 2) -> bytes:
    """The C-STORE-RQ command set, Implicit VR Little Endian (PS3.7 9.3.1.1), ready to send."""
    return _command_set(
        (0x0002, uid_value(sop_class_uid)),  # Affected SOP Class UID
        (0x0100, _us(0x0001)),  # Command Field: C-STORE-RQ
        (0x0110, _us(message_id)),
        (0x0700, _us(priority)),
        (0x0800, _us(0x0001)),  # Command Data Set Type: present
        (0x1000, uid_value(sop_instance_uid)),  # Affected SOP Instance UID
    )


def store_response_bytes(sop_class_uid: str, message_id: int, status: int, sop_instance_uid: str) -> bytes:
    """A C-STORE-RSP command set (implicit VR little endian) without comment or offending element."""
    return _command_set(
        (0x0002, uid_value(sop_class_uid)),  # Affected SOP Class UID
        (0x0100, _us(0x8001)),  # Command Field: C-STORE-RSP
        (0x0120, _us(message_id)),  # Message ID Being Responded To
        (0x0800, _us(0x0101)),  # Command Data Set Type: none
        (0x0900, _us(status)),
        (0x1000, uid_value(sop_instance_uid)),  # Affected SOP Instance UID
    )


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """The File Meta group pynetdicom writes for a received data set (without the preamble)."""
    body = b"".join((
        element(0x0002, 0x0001, b"\x00\x01", b"OB"),
        element(0x0002, 0x0002, uid_value(sop_class_uid), b"UI"),
        element(0x0002, 0x0003, uid_value(sop_instance_uid), b"UI"),
        element(0x0002, 0x0010, uid_value(transfer_syntax), b"UI"),
        element(0x0002, 0x0012, uid_value(PYNETDICOM_IMPLEMENTATION_UID), b"UI"),
        element(0x0002, 0x0013, sh_value(PYNETDICOM_IMPLEMENTATION_VERSION), b"SH"),
    ))
    return element(0x0002, 0x0000, struct.pack("<L", len(body)), b"UL") + body


# --------------------------------------------------------------------------- PDUs and command sets

#: A P-DATA-TF PDU with one PDV: PDU type, reserved, PDU length, PDV length, context ID,
#: message control header (bit 0: command, bit 1: last fragment).
PDATA_HEAD = struct.Struct(">BBIIBB")
#: Type and length at the start of every PDU.
PDU_HEAD = struct.Struct(">BxI")
PDATA_TF, RELEASE_RQ, ABORT = 0x04, 0x05, 0x07


class MalformedCommand(ValueError):
    """A command set or P-DATA-TF body that does not parse."""


def pdv_items(body: bytes) -> Iterator[tuple[int, bytes]]:
    """(message control header, fragment) of each PDV in a P-DATA-TF PDU's body.

    Raises ``MalformedCommand`` for a PDV shorter than its context ID and control header,
    one running past the PDU, or bytes left over that are no PDV (PS3.8 9.3.5.1).
    """
    pos = 0
    while pos < len(body):
        if pos + 6 > len(body):
            raise MalformedCommand(f"a PDV header is cut short ({len(body) - pos} bytes at the end of the PDU)")
        item_len = struct.unpack_from(">I", body, pos)[0]
        if item_len < 2:
            raise MalformedCommand(f"a PDV declares {item_len} bytes, less than its own header")
        if pos + 4 + item_len > len(body):
            raise MalformedCommand(
                f"a PDV declares {item_len} bytes but the PDU holds {len(body) - pos - 4} more")
        yield body[pos + 5], body[pos + 6:pos + 4 + item_len]
        pos += 4 + item_len


def command_fields(command: bytes) -> dict[int, bytes]:
    """Element number -> value of an Implicit VR Little Endian command set (group 0000)."""
    fields, pos = {}, 0
    while pos + 8 <= len(command):
        group, elem, length = struct.unpack_from("<HHI", command, pos)
        pos += 8
        if group != 0x0000 or pos + length > len(command):
            raise MalformedCommand("malformed command set")
        fields[elem] = command[pos:pos + length]
        pos += length
    return fields
