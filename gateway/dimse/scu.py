"""Calling a destination: association setup shared by ``echo`` and the forward sender."""

from __future__ import annotations

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from gateway.config import Config, DestinationConfig
from gateway.errors import RetryLater, UnknownDestination
from gateway.dimse.netutil import set_nodelay

NODELAY_HANDLERS = [(evt.EVT_CONN_OPEN, set_nodelay)]


def destination(config: Config, name: str) -> DestinationConfig:
    try:
        return config.destinations[name]
    except KeyError:
        known = ", ".join(sorted(config.destinations)) or "none configured"
        raise UnknownDestination(
            f"destination {name!r} is not configured (known: {known})"
        ) from None


def make_ae(config: Config) -> AE:
    ae = AE(ae_title=config.calling_ae_title)
    ae.connection_timeout = config.forward.connect_timeout_seconds
    ae.acse_timeout = config.forward.acse_timeout_seconds
    ae.dimse_timeout = config.forward.dimse_timeout_seconds
    ae.network_timeout = config.forward.dimse_timeout_seconds
    return ae


def describe_failure(assoc, dest: DestinationConfig) -> str:
    """One sentence for an association that did not establish."""
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    if not getattr(assoc, "gateway_connected", False):
        return f"cannot connect to {where} (connection refused or timed out)"
    if assoc.is_rejected:
        return f"association rejected by {where} (check the AE titles on both sides)"
    if assoc.is_aborted:
        return f"association aborted by {where} (is it a DICOM peer that knows our AE title?)"
    return f"no association with {where} (timed out)"


def echo(config: Config, name: str) -> None:
    """C-ECHO the named destination; raise RetryLater with a reason when it does not answer Success."""
    dest = destination(config, name)
    ae = make_ae(config)
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=NODELAY_HANDLERS
    )
    if not assoc.is_established:
        raise RetryLater(describe_failure(assoc, dest))
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or "Status" not in status:
        raise RetryLater(f"no C-ECHO response from {dest.ae_title}@{dest.host}:{dest.port} (timed out)")
    if status.Status != 0x0000:
        raise RetryLater(f"C-ECHO to {name} answered status 0x{status.Status:04X}")
