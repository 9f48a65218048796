"""The fence around pynetdicom's internals: every name beyond its public API, checked at start.

Assigning over a private name never fails, so a pynetdicom release that renames one would
make the fast path fall back silently (and ``storage.max_instance_bytes``, enforced in our
spool file, would vanish with it). ``missing()`` looks each name up with the kind the gateway
needs; ``run`` refuses to start when anything is off, naming it and the installed version.
``FAST_PATH`` lists what ``dimse.fastpath`` replaces (``performance.pynetdicom_fast_path:
false`` runs without them); ``EVERY_MODE`` what the rest of ``dimse`` reads in both modes (the
association's socket, the DUL's kill switch at shutdown and its queue to wake a thread waiting
for a request that will not come, the DIMSE provider's ``receive_primitive`` wrapped to catch
write errors of pynetdicom's own files, the AE's server list the TLS listener joins,
pynetdicom's chunked-transfer switches in its ``_config`` module). This module itself
imports no private name, so it can say what is missing.
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import PackageNotFoundError, version

#: (module, attribute path, kind). Kinds: module attribute / function / class / property /
#: method, or "instance attribute" (assigned in the class's __init__).
EVERY_MODE: tuple[tuple[str, str, str], ...] = (
    ("pynetdicom._config", "STORE_RECV_CHUNKED_DATASET", "attribute"),
    ("pynetdicom._config", "STORE_SEND_CHUNKED_DATASET", "attribute"),
    ("pynetdicom.association", "Association.dul", "instance attribute"),
    ("pynetdicom.dul", "DULServiceProvider.socket", "instance attribute"),
    ("pynetdicom.dul", "DULServiceProvider.kill_dul", "method"),
    ("pynetdicom.dul", "DULServiceProvider.to_user_queue", "instance attribute"),
    ("pynetdicom.dimse", "DIMSEServiceProvider.receive_primitive", "method"),
    ("pynetdicom.transport", "AssociationSocket.socket", "instance attribute"),
    ("pynetdicom.transport", "ThreadedAssociationServer", "class"),
    ("pynetdicom.ae", "ApplicationEntity._servers", "instance attribute"),
)
FAST_PATH: tuple[tuple[str, str, str], ...] = (
    ("pynetdicom.dimse_messages", "NamedTemporaryFile", "callable"),
    ("pynetdicom.dimse_messages", "create_file_meta", "function"),
    ("pynetdicom.dimse_messages", "write_file_meta_info", "function"),
    ("pynetdicom.dimse_messages", "DIMSEMessage.encoded_command_set", "instance attribute"),
    ("pynetdicom._handlers", "standard_dimse_recv_handler", "function"),
    ("pynetdicom._handlers", "standard_dimse_sent_handler", "function"),
    ("pynetdicom._handlers", "standard_pdu_recv_handler", "function"),
    ("pynetdicom._handlers", "standard_pdu_sent_handler", "function"),
    ("pynetdicom.transport", "AssociationSocket", "class"),
    ("pynetdicom.transport", "AssociationSocket.recv", "method"),
    ("pynetdicom.transport", "AssociationSocket.ready", "property"),
    ("pynetdicom.transport", "AssociationSocket._is_connected", "instance attribute"),
    ("pynetdicom.dul", "DULServiceProvider._is_transport_event", "method"),
    ("pynetdicom.dul", "DULServiceProvider._run_loop_delay", "instance attribute"),
    ("pynetdicom.dul", "DULServiceProvider._idle_timer", "instance attribute"),
    ("pynetdicom.dul", "DULServiceProvider.to_provider_queue", "instance attribute"),
    ("pynetdicom.dul", "DULServiceProvider.event_queue", "instance attribute"),
    ("pynetdicom.timer", "Timer.restart", "method"),
    ("pynetdicom.dimse", "DIMSEServiceProvider.msg_queue", "instance attribute"),
    ("pynetdicom.dimse", "DIMSEServiceProvider.message", "instance attribute"),
    ("pynetdicom.dimse", "DIMSEServiceProvider.send_msg", "method"),
    ("pynetdicom.association", "Association._serve_request", "method"),
    ("pynetdicom.association", "Association._run_reactor", "method"),
    ("pynetdicom.association", "Association._kill", "instance attribute"),
    ("pynetdicom.association", "Association._is_paused", "instance attribute"),
    ("pynetdicom.association", "Association._reactor_checkpoint", "instance attribute"),
    ("pynetdicom.association", "Association.network_timeout_response", "instance attribute"),
    ("pynetdicom.dimse", "DIMSEServiceProvider.get_msg", "method"),
    ("pynetdicom.dul", "DULServiceProvider.idle_timer_expired", "method"),
    ("pynetdicom.acse", "ACSE.is_release_requested", "method"),
    ("pynetdicom.association", "Association._accepted_cx", "instance attribute"),
)


def pynetdicom_version() -> str:
    try:
        return version("pynetdicom")
    except PackageNotFoundError:
        return "unknown"


def _kind_ok(owner, name: str, kind: str) -> bool:
    if kind == "instance attribute":
        try:
            source = inspect.getsource(owner.__init__)
        except (OSError, TypeError):
            return False
        return f"self.{name}" in source
    raw = inspect.getattr_static(owner, name, None) if inspect.isclass(owner) else getattr(owner, name, None)
    if raw is None and not (kind == "attribute" and hasattr(owner, name)):
        return False
    if kind == "attribute":
        return True
    if kind == "callable":
        return callable(raw)
    if kind == "function":
        return inspect.isfunction(raw)
    if kind == "class":
        return inspect.isclass(raw)
    if kind == "property":
        return isinstance(raw, property)
    if kind == "method":
        return inspect.isfunction(raw)
    raise ValueError(kind)


def missing(fast_path: bool = True) -> list[str]:
    """What the gateway needs in this mode and the installed pynetdicom lacks: 'module.name (kind)' each."""
    return missing_from(EVERY_MODE + (FAST_PATH if fast_path else ()))


def missing_from(entries: tuple[tuple[str, str, str], ...]) -> list[str]:
    """Which of ``entries`` (module, attribute path, kind) the installed packages lack, named."""
    problems = []
    for module_name, path, kind in entries:
        try:
            owner = importlib.import_module(module_name)
        except ImportError:
            problems.append(f"{module_name} (module)")
            continue
        *parents, name = path.split(".")
        ok = True
        for part in parents:
            owner = getattr(owner, part, None)
            if owner is None:
                ok = False
                break
        if not ok or not _kind_ok(owner, name, kind):
            problems.append(_named((module_name, path, kind)))
    return problems


def _named(entry: tuple[str, str, str]) -> str:
    return f"{entry[0]}.{entry[1]} ({entry[2]})"


def refusal(problems: list[str], fast_path: bool = True) -> str:
    """The one sentence ``run`` refuses with (a config problem: ``key.path: reason, got value``)."""
    every_mode = {_named(entry) for entry in EVERY_MODE}
    if not any(p in every_mode for p in problems):
        return (f"performance.pynetdicom_fast_path: pynetdicom {pynetdicom_version()} lacks "
                f"{', '.join(problems)}, which the fast path replaces; set it to false to run on "
                "pynetdicom's public API, or install the pynetdicom version pyproject.toml names, got true")
    return (f"performance.pynetdicom_fast_path: pynetdicom {pynetdicom_version()} lacks "
            f"{', '.join(problems)}, which the gateway uses in both modes; install the pynetdicom "
            f"version pyproject.toml names, got {str(fast_path).lower()}")
