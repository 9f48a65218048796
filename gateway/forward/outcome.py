"""What one attempt to send an instance means for its queue item (pure: no sockets, no clock).

Every transport turns what happened (a DIMSE status, a STOW-RS answer, an exception) into one
``Outcome``: ``SENT`` (the destination holds it), ``RETRY`` (may work later: backoff, then
``failed`` after ``retry.max_attempts``) or ``FAILED`` (refused for good, with the reason).
The sender records outcomes; only these functions decide them.
"""

from __future__ import annotations

import enum
import socket
import ssl
from dataclasses import dataclass

from pydicom.uid import UID
from pynetdicom.status import code_to_category

from gateway.errors import PeerGone
from gateway.logsafe import wire


class Verdict(str, enum.Enum):
    SENT = "sent"  # the destination holds the instance
    RETRY = "retry"  # try again after backoff (transient: resources, down, timeout, abort)
    FAILED = "failed"  # refused for good; the reason says why
    # Inside the STOW-RS transport only (never reach the sender):
    SPLIT = "split"  # 413: the request was too large, send its halves
    REAUTH = "reauth"  # 401: refresh the credential once and resend, else failed


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    reason: str | None = None  # for the log and the queue item's last_error; a note when sent
    retry_after: float | None = None  # seconds the destination asked us to wait, or None


def uid_name(uid: str) -> str:
    """'CT Image Storage (1.2.840.10008.5.1.4.1.1.2)' or just the UID when unknown."""
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


def of_c_store(status: int, comment: str, peer: str) -> Outcome:
    """A C-STORE response: Success/Warning -> sent; any failure status -> retry (PS3.4 B.2.3:
    out of resources and processing failures are transient more often than not, and after
    ``retry.max_attempts`` the item is failed with this reason)."""
    category = code_to_category(status)
    if category in ("Success", "Warning"):
        return Outcome(Verdict.SENT, None if status == 0 else f"warning 0x{status:04X}")
    detail = f": {wire(comment, 64)}" if comment else ""
    return Outcome(Verdict.RETRY, f"{peer} answered C-STORE with status 0x{status:04X} ({category}){detail}")


def refused_context(sop_class_uid: str, transfer_syntax: str, class_accepted: bool) -> Outcome:
    """The association has no presentation context for the item: it never will, fail for good."""
    if not class_accepted:
        return Outcome(Verdict.FAILED, f"{uid_name(sop_class_uid)} is not accepted by the destination")
    return Outcome(Verdict.FAILED, f"the destination refused transfer syntax {uid_name(transfer_syntax)} "
                                   f"for {uid_name(sop_class_uid)}")


def lost(exc: BaseException, where: str, timeout: float) -> Outcome:
    """A request that got no response (abort, release request, closed socket, timeout): retry."""
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return Outcome(Verdict.RETRY, f"no C-STORE response from {where} within {timeout:g} s")
    if isinstance(exc, PeerGone):
        return Outcome(Verdict.RETRY, f"{where} {exc}")
    if isinstance(exc, ssl.SSLError):
        return Outcome(Verdict.RETRY, f"TLS connection to {where} failed while sending ({getattr(exc, 'reason', None) or exc})")
    reason = getattr(exc, "strerror", None) or exc
    return Outcome(Verdict.RETRY, f"connection to {where} lost while sending ({reason})")


def unsendable(path: str, exc: BaseException) -> Outcome:
    """The stored file could not be read or converted: retry (the file may come back), then failed."""
    return Outcome(Verdict.RETRY, f"cannot send the stored file {path}: {exc}")


def missing(path: str) -> Outcome:
    return Outcome(Verdict.FAILED, f"the stored file {path} is missing")
