"""The HTTP/1.1 head rules both codecs apply, before and after their parser. No I/O.

A parser that accepts what the next hop reads differently is how requests get
smuggled, and h11 and llhttp are each lenient somewhere. So every head is cut
from the buffer and scanned here *before* a parser sees it, and the same
semantic checks run on what either parser produced. This is what makes the
two codecs take the same decisions (``tests/test_codec_differential.py``
holds them to it):

====================================================  ======  =============
what the head contains, in the order it is checked    status  why
====================================================  ======  =============
empty lines (CRLF) before a request line              --      ignored, RFC
                                                              9112 2.2
a request line longer than ``max_head_bytes``         414     limit
more bytes than ``max_head_bytes``                    431     limit
a bare LF (a line ending without CR)                  400     RFC 9112 2.2
a bare CR not followed by LF                          400     RFC 9112 2.2
a line starting with SP or HTAB (obs-fold)            400     RFC 9112 5.2
a control character (other than HTAB) anywhere        400     RFC 9110 5.5
an empty line before a status line (upstream)         400     as h11
a framing field name with whitespace before ':'      400     RFC 9112 5.1
Transfer-Encoding together with Content-Length        400     RFC 9112 6.1
more than one Transfer-Encoding field                 400     ambiguity
Transfer-Encoding whose last coding is not chunked    400     RFC 9112 6.3
a Transfer-Encoding value that is not a token list    400     obfuscation
well-formed codings before chunked (gzip, chunked)    501     not supported
more than one Content-Length field, or a list         400     RFC 9110 8.6
  (even ``5, 5``, which h11 alone would merge)
a Content-Length not 1 to 20 digits, or >= 2**63      400     overflow (20:
                                                              as h11)
a start line or field line the grammar refuses        400     the parser
more than one Host field                              400     RFC 9112 3.2
an HTTP/1.1 request without Host (absolute form too)  400     RFC 9112 3.2
a Host value that is not an authority (targets.py)    400     RFC 9112 3.2
more fields than ``max_header_count``                 431     limit
an HTTP version other than 1.x                        505     (1.2 and up
                                                              are served as
                                                              1.1, RFC 9110
                                                              2.5)
CONNECT                                               501     not supported
the asterisk form (``*``) with a method not OPTIONS   400     RFC 9112 3.2.4
a target not in origin, absolute (http/s) or *        400     targets.py
  form; a bad authority; a path that climbs above
  / or that the next hop could read otherwise
====================================================  ======  =============

A head that breaks several rules gets the status of the first: the order is
part of the contract, since the two codecs must answer alike. The Host rows
come before the count because h11 checks Host while it builds its event,
before sluice sees the fields.

The body's framing lines follow the same rules, for both codecs:

====================================================  ======  =============
what a chunked body contains                          status  why
====================================================  ======  =============
a chunk-size line longer than 64 KiB                  431     limit (h11's)
a bare LF in a chunk-size line                        400     RFC 9112 2.2
a chunk-size line not ``1*20HEXDIG [; ext] OWS CRLF`` 400     h11's grammar
  with no CR in the extension (h11 alone allows one)
a chunk size >= 2**63                                 400     overflow
chunk data not followed by CRLF                       400     RFC 9112 7.1
a trailer section breaking a head's scan rules        400     as heads
  (bare CR/LF, obs-fold, control characters)
a trailer section longer than ``max_head_bytes``      431     limit
more trailer fields than ``max_header_count``         431     limit
a Content-Length or Transfer-Encoding trailer field   400     RFC 9110 6.5.1
====================================================  ======  =============

A response (the upstream's) goes through the same scan, framing and grammar
rules; besides, one whose version is not 1.0 or 1.1, whose status is below
100, or that is a 101 to a request that proposed no upgrade is refused.

Protocol upgrades (RFC 9110 7.8), the same in both codecs:

====================================================  =====================
a request                                             proposes an upgrade
====================================================  =====================
HTTP/1.1, no body, ``Connection`` lists ``upgrade``   yes: the ``Upgrade``
  and an ``Upgrade`` field is present                 value (fields joined)
HTTP/1.0 (RFC 9110 7.8: ignore its Upgrade)           no
with a body (Content-Length > 0 or chunked)           no: served as plain
``Upgrade`` without ``Connection: upgrade``           no (7.8: the sender
                                                      must list it)
====================================================  =====================

A server connection answers a proposal with ``switch()`` (a 101, then the
connection is a tunnel) or an ordinary response (the proposal lapses). A
client connection whose request carried an ``Upgrade`` field accepts a 101
and is then a tunnel; ``take_buffered()`` on either hands back the bytes
that followed the head, the tunnel's first.

A Content-Length that passes is forwarded in its canonical decimal form
(``0010`` leaves as ``10``), and a Transfer-Encoding as ``chunked``
(``Chunked`` is the same coding), never as the peer's bytes.
"""

from __future__ import annotations

import re

from .events import ProtocolError
from .targets import check_host, request_target

__all__ = [
    "HEAD_END",
    "MAX_CHUNK",
    "NOTED",
    "Facts",
    "annotate",
    "check_request",
    "check_response_line",
    "proposed_upgrade",
    "content_length",
    "facts",
    "take_block",
    "take_chunk_line",
    "take_head",
    "take_next_head",
    "take_trailers",
    "wants_close",
]

HEAD_END = b"\r\n\r\n"
# A bare CR, a bare LF, a continuation line (obs-fold), or a control
# character other than HTAB, in a head still arriving. A CR as the very last
# byte is not matched: its LF may still be in flight.
_BAD_BYTES = re.compile(rb"\r[^\n]|(?<!\r)\n|\n[ \t]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CTL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _bad_block(block: bytes) -> bool:
    """What ``_BAD_BYTES`` finds, on a complete block, in a third of its time
    (counting is cheaper than one regex with alternatives: 1.5 us against
    3.7 us on a 150-byte head)."""
    crlf = block.count(b"\r\n")
    return (
        block.count(b"\n") != crlf
        or block.count(b"\r") != crlf
        or b"\n " in block
        or b"\n\t" in block
        or _CTL.search(block) is not None
    )


# Chunk sizes past 63 bits are an overflow attack on whoever parses them next.
MAX_CHUNK = 2**63
MAX_CHUNK_LINE = 64 * 1024  # h11's limit on an incomplete event
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DIGITS = re.compile(rb"[0-9]{1,20}")  # h11 refuses more digits, even leading zeros
# h11's chunk-size line, except that a CR may not hide in the extension
# (h11's ``;.*`` lets one through, llhttp and the line rule do not).
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\r\n]*)?[ \t]*")
_KNOWN_CODINGS = {b"gzip", b"x-gzip", b"deflate", b"compress", b"x-compress"}


def take_head(buf: bytearray, max_head_bytes: int, *, request: bool = False) -> bytes | None:
    """Cut one scanned head (start line to the empty line) off ``buf``.

    None while it is incomplete; ProtocolError when it breaks a rule of the
    table above that can be seen on the raw bytes. ``request``: empty lines
    before the start line are dropped (a client may send a CRLF after a
    body, RFC 9112 2.2), and a start line that alone passes the limit is 414.
    """
    if request and buf[:2] == b"\r\n":
        while buf[:2] == b"\r\n":
            del buf[:2]
    try:
        head = take_block(buf, max_head_bytes)
    except ProtocolError as exc:
        if request and exc.status == 431 and buf.find(b"\r\n", 0, max_head_bytes) < 0:
            raise ProtocolError("request line too long", 414) from None
        raise
    if head is None:
        return None
    if head[:2] == b"\r\n":
        raise ProtocolError("empty line before the start line")
    lowered = head.lower()
    if b"transfer-encoding" in lowered or lowered.count(b"content-length") > 1:
        _check_framing(head)
    elif (at := lowered.find(b"content-length")) >= 0 and b"," in head[at:head.find(b"\r\n", at)]:
        # A list must be refused here, before a parser: h11 would merge
        # "5, 5" into 5. A lone plain Content-Length the codecs check later.
        _check_framing(head)
    return head


def take_next_head(buf: bytearray, max_head_bytes: int, eof: bool, request: bool) -> bytes | None:
    """``take_head`` knowing whether the peer closed: None while the head is
    incomplete and more may come, ``b""`` when the peer closed between
    messages, ProtocolError when it closed inside a head."""
    head = take_head(buf, max_head_bytes, request=request)
    if head is None and eof:
        if buf:
            raise ProtocolError("connection closed inside a message head")
        return b""
    return head


def take_block(buf: bytearray, max_bytes: int) -> bytes | None:
    """Cut lines up to and including an empty line off ``buf`` (a head, or a
    trailer section), scanned for bare CR/LF, obs-fold and control bytes."""
    idx = buf.find(HEAD_END)
    if idx < 0:
        if len(buf) > max_bytes:
            raise ProtocolError("message head too large", 431)
        # A bare LF means the head would never end in CRLF CRLF: fail now,
        # not at the header-read timeout.
        if _BAD_BYTES.search(buf):
            raise ProtocolError("bare CR or LF, obs-fold or a control character in message head")
        return None
    end = idx + 4
    if end > max_bytes:
        raise ProtocolError("message head too large", 431)
    block = bytes(buf[:end])
    if _bad_block(block):
        raise ProtocolError("bare CR or LF, obs-fold or a control character in message head")
    del buf[:end]
    return block


def take_trailers(buf: bytearray, max_bytes: int, max_count: int) -> bytes | None:
    """Cut a trailer section (after the last chunk) off ``buf``, scanned as a
    head is; ProtocolError if it carries a framing field, or more than
    ``max_count`` fields (431).

    A recipient may merge trailers into the header section (RFC 9110 6.5.1):
    a Content-Length or Transfer-Encoding there would reframe a message
    already framed.
    """
    if buf[:2] == b"\r\n":
        del buf[:2]
        return b"\r\n"
    block = take_block(buf, max_bytes)
    if block is not None:
        if block.count(b"\r\n") - 1 > max_count:
            raise ProtocolError("too many trailer fields", 431)
        for line in block.split(b"\r\n"):
            name = line.partition(b":")[0].strip(b" \t").lower()
            if name == b"content-length" or name == b"transfer-encoding":
                raise ProtocolError("a framing field in a trailer section")
    return block


def take_chunk_line(buf: bytearray, start: int = 0) -> int | None:
    """Cut the chunk-size line at ``buf[start:]`` off ``buf`` and return the
    size it announces; None while the line is incomplete."""
    end = buf.find(b"\r\n", start)
    if end < 0:
        if len(buf) - start > MAX_CHUNK_LINE:
            raise ProtocolError("chunk-size line too long", 431)
        if buf.find(b"\n", start) >= 0:  # the line would never end: fail now
            raise ProtocolError("bare LF in a chunk-size line")
        return None
    size = _chunk_size(bytes(buf[start:end]))
    del buf[start:end + 2]
    return size


def _chunk_size(line: bytes) -> int:
    match = _CHUNK_LINE.fullmatch(line)
    if match is None:
        raise ProtocolError("malformed chunk-size line")
    size = int(match[1], 16)
    if size >= MAX_CHUNK:
        raise ProtocolError("chunk size too large")
    return size


def _check_framing(head: bytes) -> None:
    """Reject ambiguous Transfer-Encoding / Content-Length combinations."""
    te_values: list[bytes] = []
    cl_values: list[bytes] = []
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        lname = name.lower()
        if lname == b"transfer-encoding":
            te_values.append(value.strip(b" \t"))
        elif lname == b"content-length":
            cl_values.append(value.strip(b" \t"))
        elif lname.strip(b" \t") in (b"transfer-encoding", b"content-length"):
            raise ProtocolError("whitespace around a framing field name")
    if cl_values:
        if te_values:
            raise ProtocolError("Content-Length together with Transfer-Encoding")
        if len(cl_values) > 1:
            raise ProtocolError("more than one Content-Length field")
        content_length(cl_values[0])
        return
    if not te_values:
        return
    if len(te_values) > 1:
        raise ProtocolError("more than one Transfer-Encoding field")
    value = te_values[0].lower()
    if value == b"chunked":
        return
    codings = [c.strip(b" \t") for c in value.split(b",")]
    well_formed = all(_TOKEN.fullmatch(c) for c in codings)
    if (
        well_formed
        and codings[-1] == b"chunked"
        and codings.count(b"chunked") == 1
        and all(c in _KNOWN_CODINGS for c in codings[:-1])
    ):
        raise ProtocolError("transfer codings other than chunked are not supported", 501)
    raise ProtocolError("malformed Transfer-Encoding")


def content_length(value: bytes) -> int:
    """A Content-Length value as a number; ProtocolError unless 1 to 20 digits below 2**63."""
    if not _DIGITS.fullmatch(value):
        raise ProtocolError("malformed Content-Length")
    n = int(value)
    if n >= MAX_CHUNK:
        raise ProtocolError("Content-Length too large")
    return n


def wants_close(fields: list[tuple[bytes, bytes]]) -> bool:
    """Whether a ``Connection`` field carries the ``close`` option."""
    return any(n == b"connection" and _lists(v, b"close") for n, v in fields)


def check_request(method: bytes, target: bytes, version: bytes, fields: list[tuple[bytes, bytes]],
                  known: Facts, max_header_count: int) -> tuple[bytes, bytes]:
    """The semantic checks on a parsed request head; returns the target to
    route and the version to serve (``1.0`` or ``1.1``).

    ``fields`` (lower-case names) may be rewritten in place: an absolute-form
    target moves its authority into Host. The checks run in the table's order.
    """
    if version != b"1.1" and version != b"1.0":
        # A later minor version is served as the highest we speak (RFC 9110 2.5).
        version = b"1.1" if version[:2] == b"1." else version
    hosts = known.hosts
    if hosts > 1:
        raise ProtocolError("more than one Host field")
    if hosts == 0 and version == b"1.1":
        raise ProtocolError("an HTTP/1.1 request needs a Host field")  # RFC 9112 3.2
    if hosts:
        check_host(known.host)
    if len(fields) > max_header_count:
        raise ProtocolError("too many header fields", 431)
    if version != b"1.1" and version != b"1.0":
        raise ProtocolError("HTTP version not supported", 505)
    if method == b"CONNECT":
        raise ProtocolError("CONNECT is not supported", 501)
    if target == b"*" and method != b"OPTIONS":
        raise ProtocolError("the asterisk form is for OPTIONS only")  # RFC 9112 3.2.4
    return request_target(target, fields), version


# The request line's method and target, for the access log of a refused head
# (the target's grammar is h11's, as the codecs match it).
_METHOD_START = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}) ")
_REQUEST_START = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}) ([\x21-\x7e]{1,4096})[ \r]")


def annotate(exc: ProtocolError, head: bytes | bytearray) -> None:
    """Note on ``exc`` the method and target of the request line starting
    ``head``, when there is one to read (a target over 4 KiB is left out)."""
    if exc.method is None:
        match = _REQUEST_START.match(head)
        if match is not None:
            exc.method = match[1].decode("ascii")
            exc.target = match[2].decode("ascii")
        elif (m := _METHOD_START.match(head)) is not None:
            exc.method = m[1].decode("ascii")


def check_response_line(version: bytes, status: int, proposed: bool = False) -> None:
    """The rules for a status line beyond its grammar (see above);
    ``proposed``: the request carried an ``Upgrade`` field."""
    if version != b"1.1" and version != b"1.0":
        raise ProtocolError("unsupported HTTP version in response")
    if status < 100:
        raise ProtocolError("malformed status code")
    if status == 101 and not proposed:
        raise ProtocolError("101 Switching Protocols, though no upgrade was proposed")


def proposed_upgrade(known: Facts, version: bytes, has_body: bool) -> bytes | None:
    """The ``Upgrade`` value a request head proposes, or None (the table above)."""
    if known.upgrade and known.protocols and version == b"1.1" and not has_body:
        return known.protocols
    return None


# The fields the core must read on every head; a parser notes them as it goes.
NOTED = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection", b"expect",
                   b"upgrade"})


class Facts:
    """What the core needs of a head's fields, read in one pass."""

    __slots__ = ("hosts", "host", "length", "chunked", "close", "keep_alive", "expect", "upgrade",
                 "protocols")

    def __init__(self) -> None:
        self.hosts = 0  # Host fields
        self.host = b""  # the (last) Host field's value
        self.length: int | None = None  # the Content-Length
        self.chunked = False  # Transfer-Encoding (take_head let it through as chunked only)
        self.close = False  # Connection lists close
        self.keep_alive = False  # Connection lists keep-alive (HTTP/1.0's opt-in)
        self.expect = False  # Expect lists 100-continue
        self.upgrade = False  # Connection lists upgrade
        self.protocols: bytes | None = None  # the Upgrade field's value (several: joined)


def facts(fields: list[tuple[bytes, bytes]],
          noted: list[tuple[int, bytes, bytes]] | None = None) -> Facts:
    """The facts of checked fields (names lower-case), from the ``(index,
    name, value)`` of those in ``NOTED`` when a parser noted them while
    reading; Content-Length and Transfer-Encoding are made canonical in place.
    One pass here replaces one per question (five on a request head)."""
    if noted is None:
        noted = [(i, n, v) for i, (n, v) in enumerate(fields) if n in NOTED]
    result = Facts()
    for i, n, v in noted:
        if n == b"host":
            result.hosts += 1
            result.host = v
        elif n == b"content-length":
            length = result.length = content_length(v)
            canonical = b"%d" % length
            if v != canonical:
                fields[i] = (n, canonical)
        elif n == b"transfer-encoding":
            result.chunked = True
            if v != b"chunked":
                fields[i] = (n, b"chunked")
        elif n == b"connection":
            low = v.lower()
            if low == b"keep-alive":  # the common case, without a split
                result.keep_alive = True
            elif low == b"close":
                result.close = True
            else:
                result.close = result.close or b"close" in low and _has_token(low, b"close")
                result.keep_alive = result.keep_alive or b"keep-alive" in low and _has_token(low, b"keep-alive")
                result.upgrade = result.upgrade or b"upgrade" in low and _has_token(low, b"upgrade")
        elif n == b"expect":
            result.expect = result.expect or _lists(v, b"100-continue")
        else:
            result.protocols = v if result.protocols is None else result.protocols + b", " + v
    return result


def _lists(value: bytes, option: bytes) -> bool:
    """Whether a list field's value carries ``option``, in any case."""
    low = value.lower()
    return option in low and _has_token(low, option)


def _has_token(low: bytes, option: bytes) -> bool:
    """Whether a lower-cased list value has ``option`` as one of its members."""
    return any(t.strip(b" \t") == option for t in low.split(b","))
