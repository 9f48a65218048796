"""Who may associate: calling AE title + source address + TLS client certificate -> accept or why not.

Pure: the caller (receive, at EVT_REQUESTED) passes what it knows about the connection; an
AE title alone is not an identity once ``security.peers`` is configured.
"""

from __future__ import annotations

import ipaddress

from gateway.config import Config


def _address(text: str):
    try:
        addr = ipaddress.ip_address(str(text).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def rejection(config: Config, calling_ae: str, address: str, over_tls: bool,
              client_cn: str | None) -> str | None:
    """None when the association may proceed, else the reason for one log line."""
    allowed = config.security.allowed_calling_aets
    if allowed and calling_ae not in allowed:
        return f"AE unknown: calling AE title {calling_ae!r} is not in security.allowed_calling_aets"
    peers = config.security.peers
    if not peers:
        return None
    peer = peers.get(calling_ae)
    if peer is None:
        return f"AE unknown: calling AE title {calling_ae!r} is not in security.peers"
    addr = _address(address)
    if addr is None or not any(addr.version == net.version and addr in net for net in peer.hosts):
        nets = ", ".join(str(n) for n in peer.hosts)
        return f"host not allowed: {address} is not in security.peers.{calling_ae}.hosts ({nets})"
    if peer.tls_subject_cn is not None:
        if not over_tls:
            return (f"TLS required: security.peers.{calling_ae}.tls_subject_cn is set, "
                    "so this AE must connect to the TLS port")
        if client_cn is None:
            return ("certificate name mismatch: no client certificate was presented, "
                    f"expected CN {peer.tls_subject_cn!r}")
        if client_cn != peer.tls_subject_cn:
            return (f"certificate name mismatch: the client certificate's CN is {client_cn!r}, "
                    f"security.peers.{calling_ae}.tls_subject_cn expects {peer.tls_subject_cn!r}")
    return None


def open_listener_warning(config: Config) -> str | None:
    """A sentence when the node listens on every interface and accepts any calling AE title."""
    host = config.node.host
    if host in ("0.0.0.0", "::", "") and not config.security.allowed_calling_aets \
            and not config.security.peers:
        return (f"node.host is {host} and neither security.allowed_calling_aets nor "
                "security.peers is set: anyone who can reach the DICOM port may store images")
    return None
