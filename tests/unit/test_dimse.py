"""gateway.dimse.codec against pynetdicom and pydicom: every hand-encoded message byte for byte,
and the command-set and P-DATA-TF parsers on pynetdicom's encodings (the header reader is
tests/unit/test_header.py)."""

from __future__ import annotations

import io
from io import BytesIO

import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from gateway.dimse.codec import (
    PDATA_HEAD,
    command_fields,
    file_meta_bytes,
    pdv_items,
    store_request_bytes,
    store_response_bytes,
)


# --------------------------------------------------------------------------- hand-encoded messages

CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
ODD_AND_EVEN = ["1.2.3", "1.2.34", "1.2.840.113619.2.55.3.604688119.868.1249343483.504", "1." + "2" * 62]


@pytest.mark.parametrize("sop", ODD_AND_EVEN)
@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"])
def test_file_meta_matches_what_pynetdicom_writes(sop, ts):
    expected = io.BytesIO()
    write_file_meta_info(expected, create_file_meta(sop_class_uid=CT_CLASS, sop_instance_uid=sop,
                                                    transfer_syntax=ts))
    assert file_meta_bytes(CT_CLASS, sop, ts) == expected.getvalue()


@pytest.mark.parametrize("sop", ODD_AND_EVEN)
@pytest.mark.parametrize("status,message_id", [(0x0000, 1), (0xA700, 65535), (0xC000, 300)])
def test_store_response_matches_what_pynetdicom_sends(sop, status, message_id):
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = CT_CLASS
    primitive.AffectedSOPInstanceUID = sop
    primitive.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    (pdata,) = list(message.encode_msg(1, 16384))
    ((context_id, pdv),) = pdata.presentation_data_value_list
    assert pdv[:1] == b"\x03"
    assert pdv[1:] == store_response_bytes(CT_CLASS, message_id, status, sop)


def test_the_hand_built_command_set_equals_pynetdicoms_encoding():
    for msg_id, sop in [(1, "1.2.3"), (65535, "1.2.840.113619.2.55.3.604688119.969.1268071029.3200000000001")]:
        req = C_STORE()
        req.MessageID = msg_id
        req.AffectedSOPClassUID = CTImageStorage
        req.AffectedSOPInstanceUID = sop
        req.Priority = 2
        req.DataSet = BytesIO(b"\x00\x00")
        msg = C_STORE_RQ()
        msg.primitive_to_message(req)
        assert store_request_bytes(msg_id, CTImageStorage, sop) == encode(msg.command_set, True, True)


def test_command_fields_reads_a_c_store_response_encoded_by_pynetdicom():
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 42
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = "1.2.3"
    rsp.Status = 0xA700
    rsp.ErrorComment = "disk full"
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    fields = command_fields(encode(msg.command_set, True, True))
    assert fields[0x0100] == b"\x01\x80"
    assert fields[0x0120] == (42).to_bytes(2, "little")
    assert fields[0x0900] == (0xA700).to_bytes(2, "little")
    assert fields[0x0902].rstrip(b" ") == b"disk full"


def p_data_tf(*pdvs: tuple[int, bytes]) -> bytes:
    """A P-DATA-TF PDU as pynetdicom encodes it; each PDV is (context ID, control + fragment)."""
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[cx, data] for cx, data in pdvs]
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return pdu.encode()


def test_pdata_head_and_pdv_items_agree_with_pynetdicoms_p_data_tf():
    command = store_request_bytes(7, CTImageStorage, "1.2.3")
    assert PDATA_HEAD.pack(0x04, 0, len(command) + 6, len(command) + 2, 5, 0x03) + command == p_data_tf(
        (5, b"\x03" + command))
    encoded = p_data_tf((1, b"\x01" + command[:20]), (1, b"\x03" + command[20:]), (3, b"\x02data"))
    assert list(pdv_items(encoded[6:])) == [(0x01, command[:20]), (0x03, command[20:]), (0x02, b"data")]
