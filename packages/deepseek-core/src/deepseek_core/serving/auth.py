"""API-key checks (constant-time) and key ids for logs: a hash prefix, never the key itself."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from pathlib import Path

from .errors import OpenAIError

KEY_ID_CHARS = 12


def key_id(key: str | None) -> str | None:
    """A short, stable, non-reversible id of an API key (sha256 hex prefix); None without a key."""
    if not key:
        return None
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:KEY_ID_CHARS]


def read_key_file(path: str | os.PathLike[str]) -> list[str]:
    """Keys from a file: one per line; blank lines and lines starting with '#' are skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"--api-key-file {p}: cannot read ({exc.strerror or exc})") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ValueError(f"--api-key-file {p}: no keys in the file (one key per line)")
    return keys


def bearer_token(authorization: str | None) -> str | None:
    """The token of an 'Authorization: Bearer TOKEN' header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class APIKeyChecker:
    """Accepts a request whose bearer token equals one of `keys` (every key compared, in constant time)."""

    def __init__(self, keys: Iterable[str] | None) -> None:
        self._keys = [k.encode("utf-8") for k in (keys or []) if k]

    @property
    def enabled(self) -> bool:
        """True when keys are configured (otherwise every request is accepted)."""
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        """Raise a 401 OpenAIError unless the header carries a valid key."""
        if not self._keys:
            return
        token = bearer_token(authorization)
        if token is None:
            raise OpenAIError(
                401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key"
            )
        candidate = token.encode("utf-8")
        matched = False
        for key in self._keys:  # no early exit: the time taken does not depend on which key matched
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise OpenAIError(401, "incorrect API key provided", code="invalid_api_key")
