"""The DIMSE transport: a batch of queue items as C-STORE requests over as few associations as possible.

The stored Part 10 files are streamed as they are, from the data set offset the index
recorded at ingest (never decoded and re-encoded), unless the destination accepted the SOP
class only in another uncompressed transfer syntax. pynetdicom negotiates, releases and
aborts the association; between A-ASSOCIATE-AC and the release the requests and responses
go over its socket from this thread (``dimse.fastpath.direct_socket``): faster than its DUL
thread, and free of its lost-response race. With ``performance.pynetdicom_fast_path: false``
it is pynetdicom's public ``send_c_store`` with chunked sending instead.

A request that gets no response (abort, timeout) costs the association: the item is tried
once more on a new one; after ``MAX_LOST_ASSOCIATIONS`` lost in a row, the rest of the batch
waits for its backoff. What each answer means is ``forward.outcome``'s to say.
"""

from __future__ import annotations

import logging
import ssl
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from contextlib import nullcontext
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import _config, build_context
from pynetdicom.dsutils import encode

from gateway.config import Config
from gateway.dimse import scu
from gateway.dimse.codec import store_request_bytes
from gateway.errors import PeerGone
from gateway.forward import outcome
from gateway.forward.outcome import Outcome, Verdict
from gateway.storage import queue
from gateway.storage.header import UNCOMPRESSED, read_header

log = logging.getLogger("gateway.forward")

#: What we offer for uncompressed data besides its own transfer syntax.
UNCOMPRESSED_OFFER = UNCOMPRESSED[:2]  # Explicit, Implicit VR Little Endian
#: A-ASSOCIATE-RQ carries at most 128 presentation contexts (odd IDs 1..255).
MAX_CONTEXTS = 128
#: Associations lost in a row (aborted, no response) before the rest of the batch backs off.
MAX_LOST_ASSOCIATIONS = 3
#: What makes a request lost (the association is gone or in an unknown state).
LOST = (ConnectionError, TimeoutError, PeerGone, ssl.SSLError)


@dataclass
class Plan:
    """The presentation contexts one association proposes, and the items that fit in them."""

    contexts: dict[str, list[str]] = field(default_factory=dict)  # key -> [abstract, ts...]
    items: list[queue.Item] = field(default_factory=list)
    overflow: list[queue.Item] = field(default_factory=list)


def _context_keys(item: queue.Item) -> list[tuple[str, tuple[str, ...]]]:
    """Contexts an item needs: one with exactly its stored syntax (so it can be streamed as it
    is), and for uncompressed data one offering Explicit and Implicit VR Little Endian as a
    fallback the file can be converted to when the destination refuses the stored syntax.

    Compressed data gets no fallback: we never decompress on the way out.
    """
    keys = [(item.sop_class_uid, (item.transfer_syntax,))]
    if item.transfer_syntax in UNCOMPRESSED or item.transfer_syntax == DeflatedExplicitVRLittleEndian:
        keys.append((item.sop_class_uid, UNCOMPRESSED_OFFER))
    return keys


def plan_contexts(items: list[queue.Item], limit: int = MAX_CONTEXTS) -> Plan:
    """Group items into at most ``limit`` presentation contexts; the rest wait for the next association."""
    plan = Plan()
    for item in items:
        keys = _context_keys(item)
        new = [k for k in keys if "|".join([k[0], *k[1]]) not in plan.contexts]
        if len(plan.contexts) + len(new) > limit:
            plan.overflow.append(item)
            continue
        for abstract, syntaxes in new:
            plan.contexts["|".join([abstract, *syntaxes])] = [abstract, *syntaxes]
        plan.items.append(item)
    return plan


def choose_context(accepted, item: queue.Item):
    """(context, convert) for the item among the ``accepted`` contexts, or (None, Outcome) when refused."""
    same_class = [cx for cx in accepted if cx.abstract_syntax == item.sop_class_uid]
    for cx in same_class:
        if cx.transfer_syntax[0] == item.transfer_syntax:
            return cx, False
    if item.transfer_syntax in (*UNCOMPRESSED, DeflatedExplicitVRLittleEndian):
        for cx in same_class:
            if cx.transfer_syntax[0] in UNCOMPRESSED_OFFER:
                return cx, True
    return None, outcome.refused_context(item.sop_class_uid, item.transfer_syntax, bool(same_class))


class DimseTransport:
    """C-STORE SCU to one destination; ``send`` never raises for what the peer or network does."""

    def __init__(self, config: Config, name: str):
        self.config = config
        self.name = name
        self.dest = scu.destination(config, name)
        self.data_dir = config.node.data_dir
        self._ae = None
        self._tls_args = None  # built at the first association (loads the CA and key files)
        self._msg_id = 0
        self.fast = config.performance.pynetdicom_fast_path
        if not self.fast:  # pynetdicom's public API: send_c_store streams a file it is given
            _config.STORE_SEND_CHUNKED_DATASET = True

    def close(self) -> None:
        """Nothing is held between batches: each ``send`` releases its associations."""

    @property
    def where(self) -> str:
        return f"{self.dest.ae_title}@{self.dest.host}:{self.dest.port}"

    def _associate(self, plan: Plan):
        if self._ae is None:
            self._ae = scu.make_ae(self.config)
        if self.dest.tls is not None and self._tls_args is None:
            self._tls_args = scu.tls_args(self.dest)
        contexts = [build_context(c[0], c[1:]) for c in plan.contexts.values()]
        return self._ae.associate(
            self.dest.host, self.dest.port, contexts=contexts, ae_title=self.dest.ae_title,
            max_pdu=self.config.node.max_pdu_size, evt_handlers=scu.NODELAY_HANDLERS,
            tls_args=self._tls_args,
        )

    def _next_msg_id(self) -> int:
        self._msg_id = self._msg_id % 65535 + 1
        return self._msg_id

    def _link(self, assoc, timeout: float):
        """Fast path: the association's socket taken for our requests; else pynetdicom's own."""
        if self.fast:
            from gateway.dimse.fastpath import direct_socket

            return direct_socket(assoc, timeout)
        return nullcontext(None)

    def _c_store_public(self, assoc, item: queue.Item, cx, convert: bool) -> tuple[int, str]:
        """pynetdicom's ``send_c_store``: the file streamed in chunks, or the converted data set."""
        path = self.data_dir / item.path
        if convert:
            ds = dcmread(path)
            ts = cx.transfer_syntax[0]  # pynetdicom encodes the data set as its file meta says
            ds.file_meta.TransferSyntaxUID = ts
            ds.set_original_encoding(ts.is_implicit_VR, ts.is_little_endian, ds.original_character_set)
            status = assoc.send_c_store(ds)
        else:
            status = assoc.send_c_store(path)
        if status is None or "Status" not in status:
            if assoc.is_aborted:
                raise PeerGone("aborted the association")
            raise TimeoutError("no response")
        return int(status.Status), str(status.get("ErrorComment", "") or "")

    def _c_store(self, link, item: queue.Item, cx, convert: bool, assoc=None) -> tuple[int, str]:
        """Send one C-STORE and read its own response: (status, error comment).

        The data set is streamed from the stored file after its meta header, as it is; only a
        conversion between uncompressed syntaxes decodes and re-encodes it.
        """
        if link is None:
            return self._c_store_public(assoc, item, cx, convert)
        path = self.data_dir / item.path
        msg_id = self._next_msg_id()
        command = store_request_bytes(msg_id, item.sop_class_uid, item.sop_instance_uid)
        if convert:
            ts = cx.transfer_syntax[0]
            data = encode(dcmread(path), ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
            if data is None:
                raise ValueError(f"pydicom cannot encode it as {ts.name}")
            with BytesIO(data) as source:
                link.write_message(cx.context_id, command, source, len(data))
        else:
            with open(path, "rb") as source:
                offset = item.dataset_offset
                if offset is None:  # stored by the first release: no offset in the index
                    offset = read_header(Path(path)).dataset_offset
                length = source.seek(0, 2) - offset
                source.seek(offset)
                link.write_message(cx.context_id, command, source, length)
        return link.read_response(msg_id, self.config.node.max_pdu_size)

    def send(self, items: list[queue.Item], stopping: Callable[[], bool] = lambda: False
             ) -> Iterator[list[tuple[queue.Item, Outcome]]]:
        """Yield (item, outcome) lists as the items are done; items never yielded were not tried."""
        plan = plan_contexts(items)
        todo = deque(plan.items)
        lost_in_row = 0
        retried: set[int] = set()
        timeout = self.config.forward.dimse_timeout_seconds
        while todo and not stopping():
            assoc = self._associate(plan)
            if not assoc.is_established:
                reason = scu.describe_failure(assoc, self.dest, self.config.forward.connect_timeout_seconds)
                yield [(item, Outcome(Verdict.RETRY, reason)) for item in todo]
                return
            clean = False
            try:
                with self._link(assoc, timeout) as link:
                    while todo and not stopping():
                        item = todo[0]
                        cx, convert = choose_context(assoc.accepted_contexts, item)
                        if cx is None:
                            todo.popleft()
                            yield [(item, convert)]
                            continue
                        try:
                            status, comment = self._c_store(link, item, cx, convert, assoc)
                        except LOST:
                            raise
                        except Exception as exc:  # noqa: BLE001 - unreadable file, or one pydicom cannot convert
                            todo.popleft()
                            yield [(item, outcome.unsendable(item.path, exc))]
                            break  # the association's state is unknown: a new one
                        todo.popleft()
                        result = outcome.of_c_store(status, comment, self.dest.ae_title)
                        if result.verdict is Verdict.SENT:
                            lost_in_row = 0
                        yield [(item, result)]
                    else:
                        clean = True
            except LOST as exc:
                lost = outcome.lost(exc, self.where, timeout)
                lost_in_row += 1
                item = todo[0]
                log.warning("%s (SOP %s); reconnecting", lost.reason, item.sop_instance_uid)
                if item.id not in retried:
                    retried.add(item.id)  # once more on a fresh association
                else:
                    todo.popleft()
                    yield [(item, lost)]
                if lost_in_row >= MAX_LOST_ASSOCIATIONS and todo:
                    yield [(i, lost) for i in todo]
                    todo.clear()
            finally:
                if clean and assoc.is_established:
                    assoc.release()
                elif assoc.is_established:
                    assoc.abort()
