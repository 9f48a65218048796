"""The sender's pure parts: presentation-context planning (the C-STORE command set is
tests/unit/test_dimse.py, file offsets tests/unit/test_header.py)."""

from __future__ import annotations


from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
)

from gateway.forward import dimse as forward
from gateway.storage.queue import Item


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
