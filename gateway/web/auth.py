"""Who is calling and what they may do: Bearer tokens and HTTP Basic users from ``http.auth``.

``require_scope("write")`` is the FastAPI dependency every route names. No credentials sent
(or wrong ones): 401 with ``WWW-Authenticate``; a known identity without the scope: 403.
With no tokens and no users configured (allowed on loopback only, see ``config``), every
local caller is ``anonymous`` with every scope. Verifying a scrypt hash costs tens of ms, so
outcomes are cached in memory by a SHA-256 of the presented credential (never the secret
itself), bounded in size.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

from fastapi import HTTPException, Request

from gateway.config import HttpAuthConfig, Scope
from gateway.web import hashing

CACHE_SIZE = 1024


@dataclass(frozen=True)
class Identity:
    name: str  # the credential's name from the config, or "anonymous"
    kind: str  # "token" | "user" | "anonymous"
    scopes: frozenset[Scope]

    def __str__(self) -> str:
        return self.name if self.kind == "anonymous" else f"{self.kind}:{self.name}"


ANONYMOUS = Identity("anonymous", "anonymous", frozenset(Scope))


class Authenticator:
    """Maps an ``Authorization`` header to an ``Identity`` (or None); thread-safe, cached."""

    def __init__(self, auth: HttpAuthConfig):
        self.auth = auth
        self._cache: OrderedDict[bytes, Identity | None] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def challenge(self) -> str:
        realm = self.auth.realm
        parts = []
        if self.auth.tokens:
            parts.append(f'Bearer realm="{realm}"')
        if self.auth.users:
            parts.append(f'Basic realm="{realm}", charset="UTF-8"')
        return ", ".join(parts)

    def identify(self, authorization: str | None) -> Identity | None:
        """The identity behind this header; ANONYMOUS when auth is off; None when not known."""
        if not self.auth.enabled:
            return ANONYMOUS
        if not authorization:
            return None
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if not value or len(value) > 2 * hashing.MAX_SECRET_BYTES:
            return None
        key = hashlib.sha256(f"{scheme.lower()} {value}".encode("utf-8", "replace")).digest()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        identity = self._verify(scheme.lower(), value)
        with self._lock:
            self._cache[key] = identity
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return identity

    def _verify(self, scheme: str, value: str) -> Identity | None:
        if scheme == "bearer":
            for token in self.auth.tokens:
                if hashing.verify(value, token.hash):
                    return Identity(token.name, "token", frozenset(token.scopes))
            return None
        if scheme == "basic":
            try:
                user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, ValueError):
                return None
            if not sep:
                return None
            for cred in self.auth.users:
                if cred.name == user and hashing.verify(password, cred.hash):
                    return Identity(cred.name, "user", frozenset(cred.scopes))
            return None
        return None


def require_scope(scope: str | Scope):
    """FastAPI dependency: the caller's ``Identity`` when it holds ``scope``; else 401 or 403.

    Use as ``identity: Identity = Depends(require_scope("read"))`` or in a router's
    ``dependencies=[Depends(require_scope("admin"))]``. It also records the identity for
    the request log line.
    """
    scope = Scope(scope)

    def dependency(request: Request) -> Identity:
        authenticator: Authenticator = request.app.state.authenticator
        identity = authenticator.identify(request.headers.get("authorization"))
        if identity is None:
            raise HTTPException(
                status_code=401,
                detail="authentication required: send a valid 'Authorization: Bearer <token>' "
                "or HTTP Basic credentials",
                headers={"WWW-Authenticate": authenticator.challenge},
            )
        request.state.identity = str(identity)
        if scope not in identity.scopes:
            raise HTTPException(
                status_code=403,
                detail=f"{identity} lacks the '{scope.value}' scope this request needs",
            )
        return identity

    dependency.__name__ = f"require_{scope.value}"
    return dependency
