"""Plugin ``auth``: the ``api_key`` and ``basic`` filters.

Both answer 401 with a ``WWW-Authenticate`` challenge, record who passed in
``ctx.vars["auth.user"]`` and how in ``ctx.vars["auth.method"]`` (``"api_key"``:
the key's name; ``"basic"``: the user), and by default remove the credential before the
request goes upstream. A route opts out with
``filters = { api_key = { disabled = true } }``.

``api_key``: keys are configured as SHA-256 hex digests, never in clear
(``printf %s "$KEY" | sha256sum``); a presented key is hashed and looked up.

``basic``: an htpasswd file of bcrypt hashes (``htpasswd -B``); other hash
schemes (MD5-crypt, SHA1, crypt) are refused at load. bcrypt is slow on
purpose, so checks run in a worker thread, and a successful check is
remembered (as a SHA-256 of user and password) for ``cache_seconds``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from pathlib import Path
from typing import Annotated

import bcrypt
import trio
from pydantic import Field, FilePath, field_validator

from sluice import CONTINUE, ConfigError, Filter, FilterConfig, LocalReply, hookimpl

__all__ = ["ApiKey", "Basic"]

_SHA256_HEX = r"^[0-9a-fA-F]{64}$"


class ApiKey(Filter):
    """Admits requests that carry a known API key (keys stored as SHA-256)."""

    name = "api_key"

    class Config(FilterConfig):
        header: str = "x-api-key"
        # name -> SHA-256 hex digest of the key
        keys: Annotated[dict[str, Annotated[str, Field(pattern=_SHA256_HEX)]], Field(min_length=1)]
        forward_key: bool = False

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._header = config.header.lower().encode("latin-1")
        self._owners = {digest.lower(): name for name, digest in config.keys.items()}
        self._challenge = [("www-authenticate", f'ApiKey header="{config.header}"')]

    async def on_request_headers(self, ctx, request):
        presented = request.headers.get_raw(self._header)
        owner = self._owners.get(hashlib.sha256(presented).hexdigest()) if presented else None
        if owner is None:
            return LocalReply(401, "missing or invalid API key\n", self._challenge)
        ctx.vars["auth.user"] = owner
        ctx.vars["auth.method"] = "api_key"
        if not self.config.forward_key:
            request.headers.remove(self._header)
        return CONTINUE


def _load_htpasswd(path: Path) -> dict[bytes, bytes]:
    users: dict[bytes, bytes] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        user, sep, hashed = line.partition(b":")
        if not sep or not user:
            raise ValueError(f"line {n}: expected user:hash")
        if not hashed.startswith((b"$2a$", b"$2b$", b"$2y$")):
            raise ValueError(
                f"line {n}: user {user.decode(errors='replace')!r} has a non-bcrypt hash; "
                "only bcrypt is accepted (htpasswd -B)"
            )
        users[user] = b"$2b$" + hashed[4:]  # $2y$ is $2b$ under another name
    return users


class Basic(Filter):
    """HTTP Basic authentication against a bcrypt htpasswd file."""

    name = "basic"

    class Config(FilterConfig):
        htpasswd: FilePath
        realm: str = "sluice"
        forward_credentials: bool = False
        cache_seconds: Annotated[float, Field(ge=0)] = 300.0
        max_concurrent_checks: Annotated[int, Field(ge=1)] = 2

        @field_validator("realm")
        @classmethod
        def _quotable(cls, value: str) -> str:
            if '"' in value or "\\" in value:
                raise ValueError("must not contain quotes or backslashes")
            return value

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        try:
            self._users = _load_htpasswd(Path(config.htpasswd))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"filters.basic.htpasswd: {config.htpasswd}: {exc}") from None
        self._challenge = [("www-authenticate", f'Basic realm="{config.realm}", charset="UTF-8"')]
        self._verified: dict[bytes, float] = {}  # sha256(user:password) -> expiry
        self._limiter = trio.CapacityLimiter(config.max_concurrent_checks)

    def _deny(self) -> LocalReply:
        return LocalReply(401, "authentication required\n", self._challenge)

    async def on_request_headers(self, ctx, request):
        value = request.headers.get_raw(b"authorization")
        scheme, _, token = (value or b"").partition(b" ")
        if scheme.lower() != b"basic":
            return self._deny()
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return self._deny()
        hashed = self._users.get(user)
        if not sep or hashed is None or not await self._check(user, password, hashed):
            return self._deny()
        ctx.vars["auth.user"] = user.decode("utf-8", "replace")
        ctx.vars["auth.method"] = "basic"
        if not self.config.forward_credentials:
            request.headers.remove(b"authorization")
        return CONTINUE

    async def _check(self, user: bytes, password: bytes, hashed: bytes) -> bool:
        if len(password) > 72:  # bcrypt's limit: no stored hash can match a longer one
            return False
        key = hashlib.sha256(user + b"\0" + password).digest()
        now = time.monotonic()
        if self._verified.get(key, 0.0) > now:
            return True
        ok = await trio.to_thread.run_sync(bcrypt.checkpw, password, hashed, limiter=self._limiter)
        if ok and self.config.cache_seconds:
            if len(self._verified) > 10_000:  # bound memory: forget expired entries
                self._verified = {k: t for k, t in self._verified.items() if t > now}
            self._verified[key] = now + self.config.cache_seconds
        return ok


@hookimpl
def sluice_filters():
    return [ApiKey, Basic]
