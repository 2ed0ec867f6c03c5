"""sluice-redact: a streaming redactor of response bodies (card numbers, e-mail addresses, ...).

It rewrites text as it streams, never holding a whole body: each chunk is
searched, and its last ``max_match`` bytes are held back and searched again
with the next chunk, so a card number cut in two by the network is still
found. A redacted body changes size, so ``on_response_headers`` removes the
upstream's ``Content-Length`` (and weakens a strong ``ETag``); the core then
frames the body itself, chunked on HTTP/1.1 (``sluice.proxy.exchange``).

Only bodies worth reading are touched: a content type in ``content_types``
(globs), not compressed (a ``Content-Encoding`` other than identity passes
untouched, logged), not a 206 range. By default the filter also removes
``Accept-Encoding`` from requests, so upstreams answer in plain text that
it can read.

Patterns are bytes regexes by name; a match becomes ``replacement`` with
``{name}`` filled in. Matches of ``card`` must also pass the Luhn check
(``luhn``), so order numbers and timestamps are left alone. A pattern must
not match more than ``max_match`` bytes, or a match cut by a chunk boundary
may be missed.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Annotated

from pydantic import Field, field_validator

from sluice import CONTINUE, Filter, FilterConfig, hookimpl

__all__ = ["Redact"]

PATTERNS = {
    # 13 to 19 digits, single spaces or dashes between groups allowed
    "card": r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])",
    "email": r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,24}",
}
TEXT_TYPES = ["text/*", "application/json", "application/*+json", "application/xml", "application/*+xml",
              "application/javascript", "application/x-www-form-urlencoded"]


def luhn(digits: bytes) -> bool:
    """The card-number checksum (ISO/IEC 7812)."""
    total = 0
    for i, d in enumerate(reversed([c - 48 for c in digits if 48 <= c <= 57])):
        total += d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2)
    return total % 10 == 0


class _Stream:
    """One response's redaction: what is held back, and what was replaced."""

    __slots__ = ("active", "tail", "seen", "counts")

    def __init__(self) -> None:
        self.active = False
        self.tail = b""  # bytes held back, after ``seen`` bytes already sent
        self.seen = 0
        self.counts: dict[str, int] = {}


class Redact(Filter):
    """Replaces card numbers, e-mail addresses (or your patterns) in text response bodies, as they stream."""

    name = "redact"

    class Config(FilterConfig):
        patterns: dict[Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]*$")], str] = PATTERNS
        replacement: str = "[{name}]"
        luhn: bool = True  # "card" matches must pass the Luhn check
        content_types: list[str] = TEXT_TYPES  # globs on the media type
        max_match: Annotated[int, Field(ge=8, le=65536)] = 256  # bytes held back between chunks
        strip_accept_encoding: bool = True  # ask upstreams for plain text

        @field_validator("patterns")
        @classmethod
        def _compiles(cls, value: dict[str, str]) -> dict[str, str]:
            if not value:
                raise ValueError("at least one pattern")
            for name, pattern in value.items():
                try:
                    if re.compile(pattern.encode()).match(b""):
                        raise ValueError(f"pattern {name!r} matches the empty string")
                except re.error as exc:
                    raise ValueError(f"pattern {name!r}: {exc}") from None
            return value

        @field_validator("replacement")
        @classmethod
        def _formats(cls, value: str) -> str:
            try:
                value.format(name="x")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"only {{name}} may be filled in: {exc!r}") from None
            return value

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._regex = re.compile(b"|".join(b"(?P<%s>%s)" % (name.encode(), pattern.encode())
                                           for name, pattern in config.patterns.items()))
        self._replacements = {name: config.replacement.format(name=name).encode()
                              for name in config.patterns}

    def new_state(self) -> _Stream:
        return _Stream()

    async def on_request_headers(self, ctx, request):
        if self.config.strip_accept_encoding:
            request.headers.remove("accept-encoding")
        return CONTINUE

    def _readable(self, response) -> str | None:
        """Why the body is left alone, or None to redact it."""
        if response.status == 206:
            return "a range"
        encoding = (response.headers.get("content-encoding") or "identity").strip().lower()
        if encoding != "identity":
            return f"encoded {encoding}"
        media = (response.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
        if not any(fnmatch.fnmatchcase(media, glob) for glob in self.config.content_types):
            return f"content type {media or 'absent'}"
        return None

    async def on_response_headers(self, ctx, response):
        stream = ctx.state(self)
        # (a core 502 after the upstream's head runs this phase again: start over)
        stream.active, stream.tail, stream.seen = False, b"", 0
        skipped = self._readable(response)
        if skipped is not None:
            self.log(ctx).debug("redact skipped", reason=skipped)
            return CONTINUE
        stream.active = True
        response.headers.remove("content-length")  # the size changes: the core re-frames
        etag = response.headers.get("etag")
        if etag is not None and not etag.startswith("W/"):
            response.headers.set("etag", "W/" + etag)  # no longer byte-for-byte the upstream's
        return CONTINUE

    async def on_response_body(self, ctx, chunk, end):
        stream = ctx.state(self)
        if not stream.active:
            return CONTINUE
        # The held-back tail starts with one byte already sent: context for
        # look-behinds (a digit before a card number), never sent again.
        start = stream.seen
        data = stream.tail + chunk if stream.tail else chunk
        limit = len(data) if end else len(data) - self.config.max_match
        out, pos = [], start
        for match in self._regex.finditer(data, start):
            if not end and match.end() > limit:  # might go on in the next chunk: hold it back
                limit = min(limit, match.start())
                break
            name = match.lastgroup
            if name == "card" and self.config.luhn and not luhn(match.group()):
                continue
            out += (data[pos:match.start()], self._replacements[name])
            pos = match.end()
            stream.counts[name] = stream.counts.get(name, 0) + 1
        cut = max(limit, pos)
        out.append(data[pos:cut])
        stream.seen = 1 if cut > 0 else start
        stream.tail = data[cut - stream.seen:]
        if end and stream.counts:
            self.log(ctx).info("redacted", **stream.counts)
        return b"".join(out)


@hookimpl
def sluice_filters():
    return [Redact]
