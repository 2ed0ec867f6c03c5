"""Plugin ``auth``: the ``api_key`` and ``basic`` filters.

Both answer 401 with a ``WWW-Authenticate`` challenge, record who passed in
``ctx.vars["auth.user"]`` and how in ``ctx.vars["auth.method"]`` (``"api_key"``:
the key's name; ``"basic"``: the user), and by default remove the credential before the
request goes upstream. A route opts out with
``filters = { api_key = { disabled = true } }``.

``api_key``: keys are configured as SHA-256 hex digests, never in clear
(``printf %s "$KEY" | sha256sum``), inline (``keys``) or in a file
(``keys_file``: ``name digest`` per line); a presented key is hashed and looked
up. The lookup is a dict probe on the *digest of the presented key*: its
timing can depend on how much of that digest matches a stored one, which
tells an attacker nothing about a key (finding a key whose digest shares a
longer prefix is a preimage search on SHA-256), so no constant-time
compare is needed there.

``basic``: an htpasswd file of bcrypt hashes (``htpasswd -B``); other hash
schemes (MD5-crypt, SHA1, crypt) are refused at load. bcrypt is slow on
purpose, so checks run in a worker thread, and a successful check is
remembered for ``cache_seconds`` under a SHA-256 of user, password and the
stored hash (a changed password is a different key). bcrypt compares in
constant time; an unknown user is checked against a dummy hash of the same
cost, so the answer's timing does not tell which users exist.

Brute force: failures from one client address (``ctx.client_ip``) are counted
in the workers' shared table (``sluice.shared.local()``); past
``brute_force.max_failures`` within ``window`` seconds, every request from
that address carrying a credential gets 429 with ``Retry-After`` for
``cooldown`` seconds, without its credential being checked (so a right
guess cannot be told from a wrong one meanwhile). A success does not reset
anyone's count, the client's own included: failures age out with the
window, and an attacker holding one valid credential cannot wash his
failed guesses at others away with it.

Reload: the htpasswd file and ``keys_file`` are looked at every
``watch_interval`` seconds (1); a change is loaded without a config reload,
and a file that no longer loads keeps the last good set, with
``credentials reload failed`` naming the file and line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import bcrypt
import structlog
import trio
from pydantic import Field, FilePath, field_validator, model_validator

from sluice import CONTINUE, ConfigError, Filter, FilterConfig, LocalReply, hookimpl, metrics
from sluice.filestamp import FileStamp
from sluice.shared import local

__all__ = ["ApiKey", "Basic"]

_SHA256_HEX = r"^[0-9a-fA-F]{64}$"
_log = structlog.get_logger("sluice")


class BruteForce(FilterConfig):
    max_failures: Annotated[int, Field(ge=0)] = 10  # 0: no limit
    window: Annotated[float, Field(gt=0)] = 60.0
    cooldown: Annotated[float, Field(gt=0)] = 300.0


def _brute_force_counter():
    return metrics.counter("auth_brute_force", "Brute-force limit: lockouts begun, and requests refused during one",
                           labels=["filter", "event"])


class _Guard:
    """The brute-force limit of one filter, kept in the workers' shared table.

    Failures take from a token bucket per client (``max_failures`` deep,
    refilled over ``window``); an empty bucket starts a lockout, stored as the
    monotonic millisecond it ends (a counter: one clock for every process).
    ``scope`` separates filters with different credential sets.
    """

    def __init__(self, name: str, scope: str, config: BruteForce) -> None:
        self.config, self.name = config, name
        self._prefix = f"auth:{name}:{hashlib.sha256(scope.encode()).hexdigest()[:16]}:"
        counter = _brute_force_counter()
        self._lockouts, self._refused = counter.labels(name, "lockout"), counter.labels(name, "refused")

    def _reply(self, seconds: float) -> LocalReply:
        return LocalReply(429, "too many failed authentication attempts\n",
                          [("retry-after", str(max(1, math.ceil(seconds))))])

    async def locked(self, ctx) -> LocalReply | None:
        if not self.config.max_failures:
            return None
        until_ms = await local().incr(self._prefix + "lock:" + ctx.client_ip, 0)
        left = until_ms / 1000 - time.monotonic()
        if left > 0:
            self._refused.inc()
            return self._reply(left)
        return None

    async def failed(self, ctx, log: Any) -> LocalReply | None:
        """Count a failure; the one past the limit starts a lockout and gets its 429."""
        c = self.config
        if not c.max_failures:
            return None
        state, ip = local(), ctx.client_ip
        if await state.hit(self._prefix + "fail:" + ip, rate=c.max_failures / c.window, burst=c.max_failures):
            return None
        key = self._prefix + "lock:" + ip
        now = time.monotonic()
        until_ms = math.ceil((now + c.cooldown) * 1000)
        await state.incr(key, until_ms - await state.incr(key, 0))
        self._lockouts.inc()
        self._refused.inc()
        log.warning("auth lockout", client_ip=ip, max_failures=c.max_failures, window=c.window,
                    cooldown=c.cooldown)
        return self._reply(c.cooldown)


async def _follow(path: Path, load: Callable[[], Awaitable[None]], every: float,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Call ``load()`` each time the file at ``path`` looks changed, checking every ``every`` s.

    ``sluice.filestamp``'s stat check, on the event loop, not watchfiles: its
    thread takes the GIL back every 50 ms, which cost ~15 us on every request
    of a busy worker (``benchmarks/filter_cost.py``, basic: +28 us with the
    watch thread, +12 without). ``load`` compares contents and keeps its last
    good set when the file does not load.
    """
    stamp = FileStamp([path])
    task_status.started()
    while True:
        await trio.sleep(every)
        if stamp.changed():
            await load()


class _Reloading(Filter):
    """A filter whose credentials come from a file it follows while it lives."""

    _scope: trio.CancelScope | None = None
    _watched: Path | None = None
    _loaded: bytes | None = None  # the digest of what was last loaded

    async def _reload(self) -> None:
        path = self._watched
        try:
            data = path.read_bytes()
            if hashlib.sha256(data).digest() == self._loaded:
                return
            count = await trio.to_thread.run_sync(self._apply, data)  # bcrypt's dummy hash takes a while
        except (OSError, ValueError) as exc:
            _log.error("credentials reload failed", filter=self.name, file=str(path),
                       error=getattr(exc, "strerror", None) or str(exc))
            return
        self._loaded = hashlib.sha256(data).digest()
        _log.info("credentials reloaded", filter=self.name, file=str(path), entries=count)

    def _apply(self, data: bytes) -> int:
        raise NotImplementedError

    def _load_first(self, path: Path, key: str) -> None:
        """Load ``path`` at build, and follow it from then on; one that does not load is
        the config error of ``key`` (the reloads after it keep the last good set instead)."""
        self._watched = Path(path)
        try:
            data = self._watched.read_bytes()
            self._apply(data)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{key}: {path}: {getattr(exc, 'strerror', None) or exc}") from None
        self._loaded = hashlib.sha256(data).digest()

    async def open(self, nursery: Any) -> None:
        if self._watched is None:
            return

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with trio.CancelScope() as self._scope:
                await _follow(self._watched, self._reload, self.config.watch_interval, task_status=task_status)

        await nursery.start(run)

    async def close(self) -> None:
        if self._scope is not None:
            self._scope.cancel()


def _load_keys(data: bytes) -> dict[str, str]:
    """``name digest`` per line (``#`` comments): name -> lowercase SHA-256 hex."""
    keys: dict[str, str] = {}
    for n, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not re.match(_SHA256_HEX, parts[1]):
            raise ValueError(f"line {n}: expected 'name sha256-hex-digest'")
        if parts[0] in keys:
            raise ValueError(f"line {n}: key name {parts[0]!r} given twice")
        keys[parts[0]] = parts[1].lower()
    return keys


class ApiKey(_Reloading):
    """Admits requests that carry a known API key (keys stored as SHA-256)."""

    name = "api_key"

    class Config(FilterConfig):
        header: str = "x-api-key"
        # name -> SHA-256 hex digest of the key
        keys: dict[str, Annotated[str, Field(pattern=_SHA256_HEX)]] = {}
        keys_file: FilePath | None = None  # more of them, `name digest` per line, followed
        forward_key: bool = False
        brute_force: BruteForce = BruteForce()
        watch_interval: Annotated[float, Field(gt=0)] = 1.0  # seconds between looks at keys_file

        @model_validator(mode="after")
        def _some_keys(self):
            if not self.keys and self.keys_file is None:
                raise ValueError("give keys, keys_file or both")
            return self

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._header = config.header.lower().encode("latin-1")
        self._inline = {digest.lower(): name for name, digest in config.keys.items()}
        self._owners = dict(self._inline)
        if config.keys_file is not None:
            self._load_first(config.keys_file, "filters.api_key.keys_file")
        self._challenge = [("www-authenticate", f'ApiKey header="{config.header}"')]
        self._guard = _Guard(self.name, " ".join(sorted(self._owners)) + config.header, config.brute_force)

    def _apply(self, data: bytes) -> int:
        owners = dict(self._inline)
        for name, digest in _load_keys(data).items():
            if name in self.config.keys:
                raise ValueError(f"key name {name!r} is in keys too")
            owners[digest] = name
        self._owners = owners
        return len(owners)

    async def on_request_headers(self, ctx, request):
        presented = request.headers.get_raw(self._header)
        if not presented:
            return LocalReply(401, "missing or invalid API key\n", self._challenge)
        locked = await self._guard.locked(ctx)
        if locked is not None:
            return locked
        owner = self._owners.get(hashlib.sha256(presented).hexdigest())
        if owner is None:
            return await self._guard.failed(ctx, self.log(ctx)) or LocalReply(
                401, "missing or invalid API key\n", self._challenge)
        ctx.vars["auth.user"] = owner
        ctx.vars["auth.method"] = "api_key"
        if not self.config.forward_key:
            request.headers.remove(self._header)
        return CONTINUE


def _load_htpasswd(data: bytes) -> dict[bytes, bytes]:
    users: dict[bytes, bytes] = {}
    for n, line in enumerate(data.splitlines(), 1):
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


def _dummy_hash(users: dict[bytes, bytes]) -> bytes:
    """A hash nobody's password matches, of the highest cost in the file (unknown users cost as much)."""
    costs = [int(h[4:6]) for h in users.values() if h[4:6].isdigit()]
    return bcrypt.hashpw(b"\0not a password", bcrypt.gensalt(rounds=max(costs, default=10)))


class Basic(_Reloading):
    """HTTP Basic authentication against a bcrypt htpasswd file."""

    name = "basic"

    class Config(FilterConfig):
        htpasswd: FilePath
        realm: str = "sluice"
        forward_credentials: bool = False
        cache_seconds: Annotated[float, Field(ge=0)] = 300.0
        max_concurrent_checks: Annotated[int, Field(ge=1)] = 2
        brute_force: BruteForce = BruteForce()
        watch_interval: Annotated[float, Field(gt=0)] = 1.0  # seconds between looks at the htpasswd file

        @field_validator("realm")
        @classmethod
        def _quotable(cls, value: str) -> str:
            if '"' in value or "\\" in value:
                raise ValueError("must not contain quotes or backslashes")
            return value

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._load_first(config.htpasswd, "filters.basic.htpasswd")
        self._challenge = [("www-authenticate", f'Basic realm="{config.realm}", charset="UTF-8"')]
        self._verified: dict[bytes, float] = {}  # sha256(user, password, hash) -> expiry
        self._limiter = trio.CapacityLimiter(config.max_concurrent_checks)
        self._guard = _Guard(self.name, str(self._watched.resolve()) + config.realm, config.brute_force)

    def _apply(self, data: bytes) -> int:
        users = _load_htpasswd(data)
        self._users, self._dummy = users, _dummy_hash(users)
        return len(users)

    def _deny(self) -> LocalReply:
        return LocalReply(401, "authentication required\n", self._challenge)

    async def on_request_headers(self, ctx, request):
        value = request.headers.get_raw(b"authorization")
        scheme, _, token = (value or b"").partition(b" ")
        if scheme.lower() != b"basic":
            return self._deny()
        locked = await self._guard.locked(ctx)
        if locked is not None:
            return locked
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            sep = b""
        if not sep:
            return await self._guard.failed(ctx, self.log(ctx)) or self._deny()
        hashed = self._users.get(user)
        ok = await self._check(user, password, hashed if hashed is not None else self._dummy)
        if not ok or hashed is None:
            return await self._guard.failed(ctx, self.log(ctx)) or self._deny()
        ctx.vars["auth.user"] = user.decode("utf-8", "replace")
        ctx.vars["auth.method"] = "basic"
        if not self.config.forward_credentials:
            request.headers.remove(b"authorization")
        return CONTINUE

    async def _check(self, user: bytes, password: bytes, hashed: bytes) -> bool:
        if len(password) > 72:  # bcrypt's limit: no stored hash can match a longer one
            return False
        key = hashlib.sha256(b"\0".join((user, password, hashed))).digest()
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
