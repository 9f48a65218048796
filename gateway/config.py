"""Typed, frozen configuration, loaded once at start and passed down.

Every mistake in the YAML file is reported as ``key.path: reason, got value``, all of them
at once, so an admin fixes the file in one go. Unknown keys are mistakes too: a typo must
never be silently ignored.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    ValidationError,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError
from gateway.routing.settings import RuleConfig, SeriesCompleteConfig, TriggerConfig, raw_problems
from gateway.validation import key_path, show

DEFAULT_CONFIG_PATH = Path("config/gateway.yaml")
MAX_CONFIG_BYTES = 1024 * 1024

_AE_CHARS = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
_DEST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _ae_title(value: str) -> str:
    if not _AE_CHARS.match(value) or not value.strip():
        raise ValueError(
            "must be 1 to 16 printable ASCII characters, not only spaces and without a backslash"
        )
    return value.strip()


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _between(low: float, high: float):
    def check(value):
        if not low <= value <= high:
            raise ValueError(f"must be between {_num(low)} and {_num(high)}")
        return value

    return AfterValidator(check)


AETitle = Annotated[str, Strict(), AfterValidator(_ae_title)]
Port = Annotated[int, Strict(), _between(1, 65535)]
Seconds = Annotated[float, _between(0.001, 86400 * 7)]
Count = Annotated[int, Strict(), _between(1, 1_000_000)]
ByteCount = Annotated[int, Strict(), _between(0, 2**62)]
Host = Annotated[str, Strict(), Field(min_length=1, max_length=253)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _resolve(value: Any, info: ValidationInfo) -> Path:
    """Relative paths resolve against the config file's folder, not the working directory."""
    path = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path


def _resolve_optional(value: Any, info: ValidationInfo) -> Path | None:
    return None if value is None else _resolve(value, info)


class NodeTLSConfig(_Model):
    """The second listener, speaking DICOM over TLS (``node.tls``)."""

    port: Port
    cert_file: Path
    key_file: Path
    #: CA certificates trusted for client certificates.
    ca_file: Path | None = None
    require_client_cert: bool = True

    _paths = field_validator("cert_file", "key_file", "ca_file", mode="before")(_resolve_optional)


class NodeConfig(_Model):
    ae_title: AETitle = "DICOM-GATEWAY"
    host: Host = "127.0.0.1"
    #: The plain listener; null leaves only ``tls.port``.
    port: Port | None = 11112
    tls: NodeTLSConfig | None = None
    data_dir: Path = Path("var")
    #: Refuse associations whose called AE title is not ``ae_title``.
    require_called_ae_title: bool = True
    max_associations: Count = 16
    #: Largest PDU we accept (and advertise); bounds what one read may buffer.
    max_pdu_size: Annotated[int, Strict(), _between(4096, 16 * 1024 * 1024)] = 262_144
    network_timeout_seconds: Seconds = 60.0
    acse_timeout_seconds: Seconds = 30.0
    dimse_timeout_seconds: Seconds = 60.0

    _paths = field_validator("data_dir", mode="before")(_resolve)


def _network(value: Any):
    if not isinstance(value, str):
        raise ValueError("must be an IP network such as 10.1.2.0/24, or one address")
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"must be an IP network such as 10.1.2.0/24, or one address ({exc})") from None


Network = Annotated[Any, AfterValidator(_network)]


class PeerConfig(_Model):
    """One calling AE title under ``security.peers``: where it may come from, which certificate."""

    hosts: tuple[Network, ...]
    #: When set, the AE must come over TLS with a client certificate whose subject CN is this.
    tls_subject_cn: Annotated[str, Strict(), Field(min_length=1, max_length=255)] | None = None

    @field_validator("hosts")
    @classmethod
    def _some_hosts(cls, value: tuple) -> tuple:
        if not value:
            raise ValueError("must list at least one network (0.0.0.0/0 for any IPv4 address)")
        return value


class SecurityConfig(_Model):
    #: Empty means any calling AE title is accepted.
    allowed_calling_aets: tuple[AETitle, ...] = ()
    #: When present, only these calling AE titles may associate, each from its hosts.
    peers: dict[AETitle, PeerConfig] = {}


class AuditConfig(_Model):
    #: ``audit.jsonl`` is renamed to ``audit.jsonl.1`` (older ones shift) when it reaches this size.
    rotate_bytes: Annotated[int, Strict(), _between(4096, 2**40)] = 50 * 1024**2
    #: Rotated files kept besides the current one.
    keep_files: Annotated[int, Strict(), _between(1, 1000)] = 10


class StorageConfig(_Model):
    #: Refuse new instances (0xA700) when the store's disk has less free space than this.
    min_free_bytes: ByteCount = 2 * 1024**3
    #: Largest single instance accepted; bigger ones are refused with 0xA700.
    max_instance_bytes: ByteCount = 4 * 1024**3


class InboxConfig(_Model):
    path: Path = Path("var/inbox")
    poll_interval_seconds: Seconds = 5.0
    source_wait_seconds: Annotated[float, _between(0, 86400 * 7)] = 300.0
    #: Keep empty frames in segmentations (off: frames with no set pixel are left out).
    keep_empty_frames: bool = False
    #: Also react to file events (inotify) at once; the poll stays as the safety net.
    watch_events: bool = True

    _paths = field_validator("path", mode="before")(_resolve)


class DestinationTLSConfig(_Model):
    """DICOM over TLS to a destination; its certificate is verified, and its name by default."""

    #: CA certificates trusted for the destination's certificate (default: the system's).
    ca_file: Path | None = None
    #: Our client certificate and key, when the destination asks for one.
    cert_file: Path | None = None
    key_file: Path | None = None
    #: The name the destination's certificate must carry (default: ``host``).
    server_name: Host | None = None
    check_hostname: bool = True

    _paths = field_validator("ca_file", "cert_file", "key_file", mode="before")(_resolve_optional)


class DestinationConfig(_Model):
    """A DICOM (C-STORE) destination: ``type: dimse``, the default."""

    type: Literal["dimse"] = "dimse"
    ae_title: AETitle
    host: Host
    port: Port
    tls: DestinationTLSConfig | None = None


# ---------------------------------------------------------------- DICOMweb destinations


def _secret_file(value: Any, info: ValidationInfo) -> Path | None:
    """A secret's file must be readable now and closed to other users: caught at check-config, not at 3 a.m."""
    if value is None:
        return None
    path = _resolve(value, info)
    try:
        with open(path, "rb") as f:
            content = f.read(MAX_SECRET_BYTES + 1)
        mode = path.stat().st_mode
    except OSError as exc:
        raise ValueError(f"cannot read the secret file ({exc.strerror or exc})") from None
    if len(content) > MAX_SECRET_BYTES:
        raise ValueError("the secret file is larger than 64 KiB; is this the right file?")
    if not content.strip():
        raise ValueError("the secret file is empty")
    if mode & 0o007:
        raise ValueError(f"the secret file is open to other users (mode {mode & 0o777:o}); chmod 600 it")
    return path


def _readable_file(value: Any, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    path = _resolve(value, info)
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ValueError(f"cannot read the file ({exc.strerror or exc})") from None
    return path


MAX_SECRET_BYTES = 65536
_SECRET_KEYS = {"token": "token_file", "password": "password_file", "client_secret": "client_secret_file"}


class _AuthModel(_Model):
    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, file_key in _SECRET_KEYS.items():
                if key in data:
                    raise ValueError(
                        f"secrets are never written in the config: put it in a file (chmod 600) and "
                        f"name that file with {file_key}, got {key}: (hidden)"
                    )
        return data


class BearerAuth(_AuthModel):
    """``Authorization: Bearer`` with a token read from a file (re-read when the file changes)."""

    type: Literal["bearer"]
    token_file: Path

    _files = field_validator("token_file", mode="before")(_secret_file)


class BasicAuth(_AuthModel):
    """HTTP Basic: a user name and a password read from a file."""

    type: Literal["basic"]
    username: Annotated[str, Strict(), Field(min_length=1, max_length=256)]
    password_file: Path

    _files = field_validator("password_file", mode="before")(_secret_file)


class OAuth2Auth(_AuthModel):
    """OAuth2 client credentials grant: token cached, refreshed before expiry and once on 401."""

    type: Literal["oauth2"]
    token_url: Annotated[str, Strict(), AfterValidator(lambda v: _http_url(v, "token_url"))]
    client_id: Annotated[str, Strict(), Field(min_length=1, max_length=1024)]
    client_secret_file: Path
    scope: Annotated[str, Strict(), Field(max_length=4096)] | None = None

    _files = field_validator("client_secret_file", mode="before")(_secret_file)

    @field_validator("token_url")
    @classmethod
    def _token_url_secure(cls, value: str) -> str:
        parsed = urlsplit(value)
        if parsed.scheme == "http" and not _loopback(parsed.hostname or ""):
            raise ValueError(
                "the client secret would cross the network in clear text: use an https:// token_url "
                "(plain http is allowed only to a loopback address)"
            )
        return value


def _http_url(value: str, what: str = "url") -> str:
    parsed = urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parsed.query or parsed.fragment:
        raise ValueError("must not have a query (?...) or fragment (#...)")
    if parsed.username or parsed.password:
        raise ValueError("must not hold credentials: use auth with a secret file")
    return value.rstrip("/") if what == "url" else value


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class HttpTlsConfig(_Model):
    """TLS for an https:// destination: the server is verified against the system CAs by default."""

    #: CA certificates (PEM) that sign the server's certificate, instead of the system's.
    ca_file: Path | None = None
    #: Verify the server's certificate and host name; false is for tests only.
    verify: bool = True
    #: A client certificate (PEM) and its key, for servers that require one.
    client_cert_file: Path | None = None
    client_key_file: Path | None = None

    _files = field_validator("ca_file", "client_cert_file", mode="before")(_readable_file)
    _keys = field_validator("client_key_file", mode="before")(_secret_file)

    @model_validator(mode="after")
    def _pair(self) -> "HttpTlsConfig":
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("client_cert_file and client_key_file go together: set both or neither")
        import ssl

        ctx = ssl.create_default_context()
        if self.ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=str(self.ca_file))
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"ca_file holds no usable PEM CA certificate ({exc}), "
                                 f"got {str(self.ca_file)!r}") from None
        if self.client_cert_file is not None:
            try:
                ctx.load_cert_chain(str(self.client_cert_file), str(self.client_key_file))
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"client_cert_file and client_key_file do not load as a certificate "
                                 f"and its key ({exc}), got {str(self.client_cert_file)!r}") from None
        return self


Auth = Annotated[BearerAuth | BasicAuth | OAuth2Auth, Field(discriminator="type")]
MebiByte = 1024 * 1024


class DicomwebDestinationConfig(_Model):
    """A DICOMweb destination: STOW-RS to ``{url}/studies``."""

    type: Literal["dicomweb"]
    #: The DICOMweb root, e.g. https://archive.example.org/dicom-web
    url: Annotated[str, Strict(), Field(max_length=2048), AfterValidator(_http_url)]
    auth: Auth | None = None
    tls: HttpTlsConfig = HttpTlsConfig()
    #: Instances per request up to this many bytes (one instance may exceed it alone).
    max_request_bytes: Annotated[ByteSize, _between(1, 2**40)] = ByteSize(64 * MebiByte)
    timeout_seconds: Seconds = 120.0
    #: Send bodies with chunked transfer encoding (servers can store each instance as it
    #: arrives); false, or a server answering 411, sends Content-Length instead.
    chunked: bool = True

    @model_validator(mode="after")
    def _secure(self) -> "DicomwebDestinationConfig":
        parsed = urlsplit(self.url)
        if self.auth is not None and parsed.scheme == "http" and not _loopback(parsed.hostname or ""):
            raise ValueError(
                "credentials would cross the network in clear text: use an https:// url "
                f"(plain http is allowed only to a loopback address), got {self.url!r}"
            )
        if self.tls.client_cert_file is not None and parsed.scheme != "https":
            raise ValueError(f"tls.client_cert_file needs an https:// url, got {self.url!r}")
        return self


def _destination_type(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("type", "dimse")
    return getattr(value, "type", "dimse")


AnyDestination = Annotated[
    Annotated[DestinationConfig, Tag("dimse")] | Annotated[DicomwebDestinationConfig, Tag("dicomweb")],
    Discriminator(
        _destination_type,
        custom_error_type="destination_type",
        custom_error_message="type must be dimse (the default) or dicomweb",
    ),
]


class RoutesConfig(_Model):
    #: Destinations that receive every derived object.
    results: tuple[str, ...] = ()
    #: Destinations that receive every received instance as well.
    received: tuple[str, ...] = ()
    #: Conditional routes for received instances (routing/rules.py).
    rules: tuple[RuleConfig, ...] = ()


class RetryConfig(_Model):
    max_attempts: Count = 10
    initial_backoff_seconds: Seconds = 5.0
    max_backoff_seconds: Seconds = 600.0


class ForwardConfig(_Model):
    #: How often each destination's sender looks for due items.
    poll_interval_seconds: Seconds = 1.0
    #: Most items sent over one association before it is released.
    batch_size: Count = 500
    connect_timeout_seconds: Seconds = 10.0
    acse_timeout_seconds: Seconds = 30.0
    dimse_timeout_seconds: Seconds = 60.0
    #: Our AE title when we call a destination (default: node.ae_title).
    calling_ae_title: AETitle | None = None


def _byte_size(value: Any) -> Any:
    """Accept ``8 GiB``, ``600 MB`` or a plain integer of bytes."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", value, re.IGNORECASE)
        if not match:
            raise ValueError("must be a number of bytes, e.g. 1048576 or '8 GiB'")
        units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                 "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
        return int(float(match.group(1)) * units[(match.group(2) or "").lower()])
    return value


ByteSize = Annotated[int, BeforeValidator(_byte_size), Strict(), _between(0, 2**62)]
_CRED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def _cred_name(value: str) -> str:
    if not _CRED_NAME.match(value):
        raise ValueError("must be 1 to 64 letters, digits, '_', '.', '@' or '-' (no ':' or spaces)")
    return value


def _secret_hash(value: str) -> str:
    from gateway.web.hashing import check_format

    return check_format(value)


class Scope(str, enum.Enum):
    READ = "read"  # QIDO-RS, WADO-RS, job and status reads
    WRITE = "write"  # STOW-RS, POST /api/inbox/jobs
    ADMIN = "admin"  # the admin API


class CredentialConfig(_Model):
    #: Who this is in the request log (never the secret).
    name: Annotated[str, Strict(), AfterValidator(_cred_name)]
    #: ``dicom-gateway hash-secret`` output: a salted scrypt hash, never the secret.
    hash: Annotated[str, Strict(), AfterValidator(_secret_hash)]
    scopes: tuple[Scope, ...] = (Scope.READ,)


class HttpAuthConfig(_Model):
    #: ``Authorization: Bearer <token>`` credentials.
    tokens: tuple[CredentialConfig, ...] = ()
    #: HTTP Basic users (``name`` is the user name).
    users: tuple[CredentialConfig, ...] = ()
    realm: Annotated[str, Strict(), Field(min_length=1, max_length=64, pattern=r'^[^"\\]+$')] = "dicom-gateway"

    @property
    def enabled(self) -> bool:
        return bool(self.tokens or self.users)


class HttpConfig(_Model):
    enabled: bool = True
    host: Host = "127.0.0.1"
    port: Port = 8080
    #: Largest request body (a STOW-RS upload of many instances); bigger ones get 413.
    max_request_bytes: ByteSize = 8 * 1024**3
    #: A request whose body stalls this long between reads gets 408 and is dropped.
    read_timeout_seconds: Seconds = 60.0
    #: Concurrent connections served; more get 503 at once.
    max_connections: Count = 64
    #: External base URL for RetrieveURL/BulkDataURI (behind a proxy); default: the request's own.
    base_url: Annotated[str, Strict(), Field(pattern=r"^https?://[^\s]+[^/\s]$")] | None = None
    auth: HttpAuthConfig = HttpAuthConfig()


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and ``localhost`` are loopback; any other name or address is not."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _http_problems(config: "Config") -> list[str]:
    """Secure by default: no listener off loopback without credentials."""
    http = config.http
    problems = []
    if http.enabled and not is_loopback(http.host) and not http.auth.enabled:
        problems.append(
            f"http.host: listening on a non-loopback address needs http.auth.tokens or http.auth.users "
            f"(make hashes with 'dicom-gateway hash-secret'), got {show(http.host)}"
        )
    for kind in ("tokens", "users"):
        seen: set[str] = set()
        for i, cred in enumerate(getattr(http.auth, kind)):
            if cred.name in seen:
                problems.append(f"http.auth.{kind}[{i}].name: names must be unique, got {show(cred.name)}")
            seen.add(cred.name)
    return problems


class LoggingConfig(_Model):
    level: str = "INFO"
    #: ``text``: one readable line per event; ``json``: one JSON object per line, same fields.
    format: str = "text"

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return value

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value not in {"text", "json"}:
            raise ValueError("must be text or json")
        return value


class PerformanceConfig(_Model):
    #: true: dimse.fastpath replaces parts of pynetdicom's internals (checked at start: a
    #: missing name refuses to start); false: pynetdicom's public API only, same promises.
    pynetdicom_fast_path: Annotated[bool, Strict()] = True


class Config(_Model):
    node: NodeConfig = NodeConfig()
    security: SecurityConfig = SecurityConfig()
    storage: StorageConfig = StorageConfig()
    inbox: InboxConfig = InboxConfig()
    destinations: dict[str, AnyDestination] = {}
    routes: RoutesConfig = RoutesConfig()
    retry: RetryConfig = RetryConfig()
    forward: ForwardConfig = ForwardConfig()
    logging: LoggingConfig = LoggingConfig()
    series_complete: SeriesCompleteConfig = SeriesCompleteConfig()
    #: Series-complete triggers: export folder + webhook for AI tools (routing/triggers.py).
    triggers: tuple[TriggerConfig, ...] = ()
    http: HttpConfig = HttpConfig()
    audit: AuditConfig = AuditConfig()
    performance: PerformanceConfig = PerformanceConfig()
    #: Where the file was loaded from (set by ``load``; not a YAML key).
    source_path: Path | None = Field(default=None, exclude=True)

    @property
    def db_path(self) -> Path:
        return self.node.data_dir / "gateway.sqlite3"

    @property
    def store_dir(self) -> Path:
        return self.node.data_dir / "store"

    @property
    def audit_path(self) -> Path:
        return self.node.data_dir / "audit.jsonl"

    @property
    def calling_ae_title(self) -> str:
        return self.forward.calling_ae_title or self.node.ae_title


_REASONS = {
    "extra_forbidden": "unknown key (check the spelling against config/gateway.yaml)",
    "missing": "is required",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a text string",
    "string_too_short": "must not be empty",
    "string_too_long": "is too long",
    "dict_type": "must be a mapping of keys to values",
    "model_type": "must be a mapping of keys to values",
    "model_attributes_type": "must be a mapping of keys to values",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "path_type": "must be a path",
    "string_pattern_mismatch": "has characters or a form that is not allowed here",
    "enum": "must be one of read, write, admin",
    "byte_size": "must be a size such as 67108864, 64 MiB or 500 kB",
    "byte_size_unit": "must be a size such as 67108864, 64 MiB or 500 kB",
}


_UNION_REASONS = {
    "destination_type": "must be dimse (the default) or dicomweb",
    "union_tag_invalid": "must be one of: bearer, basic, oauth2",
    "union_tag_not_found": "needs a type: bearer, basic or oauth2",
}


def _untag(loc: tuple) -> tuple:
    """Drop the union tags pydantic puts in a location (destinations.X.dicomweb.url -> destinations.X.url)."""
    out: list = []
    for i, item in enumerate(loc):
        if (i == 2 and loc[0] == "destinations" and item in ("dimse", "dicomweb")) or (
            out and out[-1] == "auth" and item in ("bearer", "basic", "oauth2")
        ):
            continue
        out.append(item)
    return tuple(out)


def _hide_secrets(value: Any) -> Any:
    """Never echo a secret someone wrote into the YAML by mistake."""
    if isinstance(value, dict):
        return {k: ("(hidden)" if k in _SECRET_KEYS else _hide_secrets(v)) for k, v in value.items()}
    return value


def _problems(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = _untag(tuple(err["loc"]))
        kind = err["type"]
        if kind == "value_error":
            reason = str(err["ctx"]["error"]) if "ctx" in err else err["msg"]
        else:
            reason = _UNION_REASONS.get(kind) or _REASONS.get(kind, err["msg"][0].lower() + err["msg"][1:])
        if kind == "destination_type":
            line = f"{key_path(loc)}.type: {reason}, got {show(err['input'].get('type'))}"
        elif kind == "union_tag_invalid":
            line = f"{key_path(loc)}.type: {reason}, got {show(err['ctx']['tag'])}"
        else:
            line = f"{key_path(loc)}: {reason}"
            if kind != "missing" and ", got " not in reason:
                line += f", got {show(_hide_secrets(err['input']))}"
        problems.append(line)
    return problems


def _route_problems(raw: dict) -> list[str]:
    """Routes must name configured destinations; checked on the raw data so it adds to other mistakes."""
    problems = []
    dests = raw.get("destinations") or {}
    routes = raw.get("routes") or {}
    if isinstance(dests, dict):
        for name in dests:
            if not isinstance(name, str) or not _DEST_NAME.match(name):
                problems.append(
                    f"destinations.{name}: destination names must be letters, digits, '_', '-' or '.', "
                    f"got {show(name)}"
                )
    if isinstance(routes, dict) and isinstance(dests, dict):
        for route in ("results", "received"):
            names = routes.get(route) or []
            if isinstance(names, list):
                for i, name in enumerate(names):
                    if isinstance(name, str) and name not in dests:
                        known = ", ".join(sorted(map(str, dests))) or "none configured"
                        problems.append(
                            f"routes.{route}[{i}]: must name a destination under 'destinations' "
                            f"({known}), got {show(name)}"
                        )
    return problems


def _tls_problems(config: Config, now: datetime) -> list[str]:
    """Certificates and keys are read at load time: a mistake is a config error, not a failed handshake."""
    from gateway.dimse import tls

    problems = []
    node = config.node
    if node.port is None and node.tls is None:
        problems.append("node.port: null leaves no listener; set it or configure node.tls, got null")
    if node.tls is not None:
        t = node.tls
        if node.port is not None and t.port == node.port:
            problems.append(f"node.tls.port: must differ from node.port, got {t.port}")
        for which, reason in tls.check_pair(t.cert_file, t.key_file, now):
            problems.append(f"node.tls.{which}: {reason}, got {show(str(getattr(t, which)))}")
        if t.require_client_cert and t.ca_file is None:
            problems.append("node.tls.require_client_cert: needs node.tls.ca_file (the CA that signs "
                            "client certificates), or set it to false, got true")
        if t.ca_file is not None:
            for reason in tls.check_ca(t.ca_file, now):
                problems.append(f"node.tls.ca_file: {reason}, got {show(str(t.ca_file))}")
    for name, dest in config.destinations.items():
        t = dest.tls if dest.type == "dimse" else None
        if t is None:
            continue
        where = f"destinations.{name}.tls"
        if (t.cert_file is None) != (t.key_file is None):
            missing = "key_file" if t.key_file is None else "cert_file"
            problems.append(f"{where}.{missing}: is required when "
                            f"{'cert_file' if missing == 'key_file' else 'key_file'} is set")
        elif t.cert_file is not None:
            for which, reason in tls.check_pair(t.cert_file, t.key_file, now):
                problems.append(f"{where}.{which}: {reason}, got {show(str(getattr(t, which)))}")
        if t.ca_file is not None:
            for reason in tls.check_ca(t.ca_file, now):
                problems.append(f"{where}.ca_file: {reason}, got {show(str(t.ca_file))}")
    return problems


def parse(raw: Any, base_dir: Path | None = None, now: datetime | None = None) -> Config:
    """Validate already-parsed YAML data; raise ConfigError listing every mistake."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"(top level): must be a mapping of sections, got {show(raw)}"])
    problems: list[str] = []
    config = None
    # Absent sections are validated as empty ones so their default paths resolve too.
    sections = ("node", "security", "storage", "inbox", "routes", "retry", "forward", "logging",
                "series_complete", "http", "audit")
    filled = {name: {} for name in sections}
    filled.update({k: ({} if v is None and k in sections else v) for k, v in raw.items()})
    try:
        config = Config.model_validate(filled, context={"base_dir": base_dir})
    except ValidationError as exc:
        problems.extend(_problems(exc))
    problems.extend(_route_problems(raw))
    problems.extend(raw_problems(raw))
    if config is not None:
        problems.extend(_http_problems(config))
        problems.extend(_tls_problems(config, now or datetime.now().astimezone()))
    if problems:
        raise ConfigError(problems)
    assert config is not None
    return config


def load(path: Path | str) -> Config:
    """Read and validate the YAML config at ``path``.

    Relative paths in the file resolve against the file's folder. Raises ``ConfigError``
    with one ``key.path: reason, got value`` line per mistake (all mistakes, not just the
    first); never returns a partly valid config.
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError([f"{path}: config file is larger than 1 MiB; is this the right file?"])
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found (pass -c PATH)"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([f"{path}: not valid YAML{where}: {problem}"]) from None
    base = path.resolve().parent
    config = parse(raw, base_dir=base)
    return config.model_copy(update={"source_path": path.resolve()})
