"""Request targets: what form a target may take, and the path sluice routes and forwards. No I/O.

Routing and forwarding see the same, normalised target, so that a filter
guarding a prefix cannot be bypassed by spelling the path another way.
"""

from __future__ import annotations

import re

from .events import ProtocolError

__all__ = ["normalize_path", "request_target"]


def request_target(target: bytes, fields: list[tuple[bytes, bytes]]) -> bytes:
    """The target to route and forward, in origin form (or ``*``).

    ``fields`` (lower-case names) may be rewritten in place: an absolute-form
    target moves its authority into Host.
    """
    if target[:1] != b"/" and target != b"*":
        target = _origin_form(target, fields)
    if b"/." in target or b"%2" in target:
        target = normalize_path(target)
    return target


def _origin_form(target: bytes, fields: list[tuple[bytes, bytes]]) -> bytes:
    """Rewrite an absolute-form target to origin form (RFC 9112 3.2.2).

    The target's authority replaces the Host field, as the RFC requires of
    a server receiving absolute form.
    """
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise ProtocolError("request target is neither origin nor absolute form")
    authority, slash, path = rest.partition(b"/")
    if not authority or b"@" in authority:
        raise ProtocolError("bad authority in request target")
    fields[:] = [(n, v) for n, v in fields if n != b"host"]
    fields.insert(0, (b"host", authority))
    return slash + path if slash else b"/"


_ENCODED_DOT = re.compile(rb"%2[eE]")


def normalize_path(target: bytes) -> bytes:
    """Remove dot-segments from a target's path (RFC 3986 5.2.4).

    ``/public/../admin`` must route (and reach the upstream) as ``/admin``,
    or a route that exempts ``/public`` from authentication exempts
    everything. ``%2e`` is a dot in disguise (RFC 3986 2.3) and counts too.
    The query is left alone.
    """
    path, sep, query = target.partition(b"?")
    path = _ENCODED_DOT.sub(b".", path)
    if b"/." not in path:
        return target if path == target.partition(b"?")[0] else path + sep + query
    segments = path.split(b"/")[1:]
    out: list[bytes] = []
    for segment in segments:
        if segment == b"..":
            if out:
                out.pop()
        elif segment != b".":
            out.append(segment)
    if segments and segments[-1] in (b".", b".."):
        out.append(b"")  # "/a/b/.." names the directory "/a/"
    return b"/" + b"/".join(out) + sep + query
