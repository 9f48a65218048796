"""The sender's pure parts: presentation-context planning, the C-STORE command set, file offsets."""

from __future__ import annotations

from io import BytesIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
)
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode, split_dataset

from gateway import forward
from gateway.queue import Item


def item(n: int, sop_class=CTImageStorage, ts=ExplicitVRLittleEndian) -> Item:
    return Item(id=n, destination="pacs", sop_instance_uid=f"1.2.{n}", attempts=0,
                path=f"s/{n}.dcm", sop_class_uid=sop_class, transfer_syntax=ts)


def test_uncompressed_items_get_their_own_syntax_and_an_explicit_or_implicit_fallback():
    plan = forward.plan_contexts([item(1), item(2), item(3, ts=ImplicitVRLittleEndian)])
    assert sorted(plan.contexts.values()) == [
        [CTImageStorage, ImplicitVRLittleEndian],
        [CTImageStorage, ExplicitVRLittleEndian],
        [CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian],
    ]
    assert len(plan.items) == 3 and not plan.overflow


def test_a_compressed_item_gets_a_context_with_only_its_own_syntax():
    plan = forward.plan_contexts([item(1, ts=JPEG2000Lossless), item(2, sop_class=MRImageStorage)])
    assert sorted(plan.contexts.values()) == [
        [CTImageStorage, JPEG2000Lossless],
        [MRImageStorage, ExplicitVRLittleEndian],
        [MRImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian],
    ]


def test_items_beyond_the_context_limit_wait_for_the_next_association():
    items = [item(n, sop_class=f"1.2.840.10008.5.1.4.1.1.{n}") for n in range(1, 6)]
    plan = forward.plan_contexts(items, limit=7)  # two contexts per class
    assert [i.id for i in plan.items] == [1, 2, 3]
    assert [i.id for i in plan.overflow] == [4, 5]
    assert len(plan.contexts) == 6


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
        assert forward.c_store_command(msg_id, CTImageStorage, sop) == encode(msg.command_set, True, True)


def test_dataset_offset_matches_pynetdicoms_meta_parser(tmp_path):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.3.4"
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    with open(path, "rb") as f:
        assert forward.dataset_offset(f, path) == split_dataset(path)[1]


def test_command_fields_reads_a_c_store_response_encoded_by_pynetdicom():
    from pynetdicom.dimse_messages import C_STORE_RSP

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 42
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = "1.2.3"
    rsp.Status = 0xA700
    rsp.ErrorComment = "disk full"
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    fields = forward._command_fields(encode(msg.command_set, True, True))
    assert fields[0x0100] == b"\x01\x80"
    assert fields[0x0120] == (42).to_bytes(2, "little")
    assert fields[0x0900] == (0xA700).to_bytes(2, "little")
    assert fields[0x0902].rstrip(b" ") == b"disk full"
