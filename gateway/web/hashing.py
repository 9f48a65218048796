"""Salted secret hashes for ``http.auth`` (stdlib scrypt): the config holds hashes, never secrets.

Format: ``scrypt$N$r$p$<salt, base64>$<key, base64>``. ``dicom-gateway hash-secret`` makes
one; ``verify`` compares in constant time. Pure except for the salt's random source.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re

SCHEME = "scrypt"
N, R, P = 2**14, 8, 1  # ~16 MiB and a few tens of ms per hash: costly to guess, cheap to cache
KEY_BYTES = 32
SALT_BYTES = 16
MAX_SECRET_BYTES = 4096
_FORMAT = re.compile(r"^scrypt\$(\d{1,7})\$(\d{1,3})\$(\d{1,3})\$([A-Za-z0-9+/=]{8,88})\$([A-Za-z0-9+/=]{16,88})$")


def _kdf(secret: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, dklen=length, maxmem=256 * 1024 * 1024)


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    """The config line for ``secret``: ``scrypt$N$r$p$salt$key`` with a fresh random salt."""
    data = secret.encode("utf-8")
    if not data:
        raise ValueError("the secret is empty")
    if len(data) > MAX_SECRET_BYTES:
        raise ValueError(f"the secret is longer than {MAX_SECRET_BYTES} bytes")
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    key = _kdf(data, salt, N, R, P, KEY_BYTES)
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    return f"{SCHEME}${N}${R}${P}${b64(salt)}${b64(key)}"


def check_format(value: str) -> str:
    """Raise ``ValueError`` (config wording) unless ``value`` is a hash this module made."""
    match = _FORMAT.match(value)
    if not match:
        raise ValueError("must be a hash printed by 'dicom-gateway hash-secret' (scrypt$N$r$p$salt$key), "
                         "never the secret itself")
    n, r, p = (int(x) for x in match.groups()[:3])
    if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or n * r > 2**24:
        raise ValueError("has scrypt parameters out of range; make a new one with 'dicom-gateway hash-secret'")
    try:
        base64.b64decode(match.group(4), validate=True)
        base64.b64decode(match.group(5), validate=True)
    except ValueError:
        raise ValueError("has a salt or key that is not valid base64; copy the whole line again") from None
    return value


def verify(secret: str | bytes, stored: str) -> bool:
    """Whether ``secret`` hashes to ``stored`` (constant-time comparison of the keys)."""
    match = _FORMAT.match(stored)
    if not match:
        return False
    data = secret.encode("utf-8") if isinstance(secret, str) else secret
    if not data or len(data) > MAX_SECRET_BYTES:
        return False
    n, r, p = (int(x) for x in match.groups()[:3])
    salt = base64.b64decode(match.group(4))
    key = base64.b64decode(match.group(5))
    return hmac.compare_digest(_kdf(data, salt, n, r, p, len(key)), key)
