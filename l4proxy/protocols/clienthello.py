"""A sans-IO TLS ClientHello parser: bytes in, ``ClientHello`` (or "need more") out.

It reads exactly what routing needs before any TLS is spoken: the server name (SNI,
RFC 6066 §3), the offered ALPN protocols (RFC 7301) and the offered versions (RFC 8446
§4.2.1). It never does I/O and never awaits, so it is tested with plain bytes.

Contract (after mitmproxy's and h11's):

* :func:`parse_client_hello` returns ``None`` while the bytes so far are a valid prefix
  of a ClientHello, and a frozen :class:`ClientHello` once the whole message arrived.
* It raises :class:`~l4proxy.errors.ClientHelloError` as soon as the bytes cannot be a
  ClientHello (so garbage is classified on its first byte), and when the message would
  need more than ``limit`` bytes of records: the caller never buffers more than that.
* The message may be split across TCP segments and across several TLS records
  (RFC 8446 §5.1 allows fragmenting handshake messages); post-quantum key shares make
  ClientHellos of 1.5 KB and more common, so the default cap is 64 KiB.
"""

from __future__ import annotations

import attrs

from l4proxy.errors import ClientHelloError

__all__ = ["DEFAULT_LIMIT", "MAX_RECORDS", "ClientHello", "next_size", "parse_client_hello"]

#: Largest number of bytes (records included) the parser will ask the caller to buffer.
DEFAULT_LIMIT = 64 * 1024

_HANDSHAKE_RECORD = 22
_CLIENT_HELLO = 1
_MAX_RECORD = 2**14 + 256  # RFC 8446 §5.2 allows a little expansion over 2^14
#: Real clients use one record (a few for a huge post-quantum ClientHello); a peer that
#: fragments into many tiny records only makes the proxy work harder.
MAX_RECORDS = 64
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43

_VERSION_NAMES = {
    0x0300: "SSLv3",
    0x0301: "TLSv1",
    0x0302: "TLSv1.1",
    0x0303: "TLSv1.2",
    0x0304: "TLSv1.3",
}


@attrs.frozen
class ClientHello:
    """What a client asked for, read before the handshake.

    Attributes:
        server_name: the SNI host name, lower-cased and without a trailing dot; ``None``
            when the client sent none.
        alpn_protocols: the offered ALPN protocols, in the client's order.
        versions: the offered protocol versions (``supported_versions`` if present,
            else the legacy version), e.g. ``(0x0304, 0x0303)``.
        size: how many bytes of the stream the ClientHello occupied (whole records).
    """

    server_name: str | None
    alpn_protocols: tuple[bytes, ...]
    versions: tuple[int, ...]
    size: int

    @property
    def version_names(self) -> tuple[str, ...]:
        return tuple(_VERSION_NAMES.get(v, hex(v)) for v in self.versions)


def parse_client_hello(
    data: bytes | bytearray | memoryview, *, limit: int = DEFAULT_LIMIT
) -> ClientHello | None:
    """Parse the ClientHello at the start of ``data``.

    Returns:
        ``None`` if more bytes are needed, else the parsed :class:`ClientHello`.

    Raises:
        ClientHelloError: the bytes are not a TLS ClientHello, are malformed, or the
            message would not fit in ``limit`` bytes.

    Example:
        >>> parse_client_hello(b"\\x16\\x03\\x01") is None
        True
    """
    view = memoryview(data)
    body = bytearray()
    needed: int | None = None  # length of the handshake message once its header is known
    offset = 0
    records = 0
    while needed is None or len(body) < needed + 4:
        if records == MAX_RECORDS:
            raise ClientHelloError(f"ClientHello split into more than {MAX_RECORDS} records")
        records += 1
        if len(view) - offset < 5:
            _check_record_header(view[offset:])
            _check_fits(offset + 5, limit)
            return None
        content_type, major, _minor = view[offset], view[offset + 1], view[offset + 2]
        length = int.from_bytes(view[offset + 3 : offset + 5], "big")
        if content_type != _HANDSHAKE_RECORD:
            raise ClientHelloError(f"not a TLS handshake record (content type {content_type})")
        if major != 3:
            raise ClientHelloError(f"not a TLS record (version byte {major})")
        if length == 0 or length > _MAX_RECORD:
            raise ClientHelloError(f"bad TLS record length {length}")
        if offset + 5 + length > limit:
            raise ClientHelloError(f"ClientHello larger than the {limit}-byte limit")
        if len(view) < offset + 5 + length:
            fragment = view[offset + 5 :]
            _check_handshake_prefix(bytes(body) + bytes(fragment[: max(0, 4 - len(body))]))
            _check_fits(offset + 5 + length, limit)
            return None
        body += view[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if needed is None and len(body) >= 4:
            _check_handshake_prefix(body)
            needed = int.from_bytes(body[1:4], "big")
            if needed + 4 > limit:
                raise ClientHelloError(f"ClientHello larger than the {limit}-byte limit")
    if len(body) != needed + 4:
        raise ClientHelloError("data after the ClientHello in the same record")
    return _parse_body(memoryview(body)[4:], size=offset)


def next_size(data: bytes | bytearray | memoryview) -> int:
    """The buffer size at which parsing ``data`` again can make progress: the end of
    the record being received (or one more byte while a record header is incomplete).

    Lets a caller that reads a trickle parse once per record instead of once per read,
    so the work stays linear in the ClientHello's size. It only walks record headers.
    """
    view = memoryview(data)
    offset = 0
    while len(view) - offset >= 5:
        end = offset + 5 + int.from_bytes(view[offset + 3 : offset + 5], "big")
        if end > len(view):
            return end
        offset = end
    return len(view) + 1


def _check_fits(required: int, limit: int) -> None:
    if required > limit:
        raise ClientHelloError(f"ClientHello larger than the {limit}-byte limit")


def _check_record_header(head: memoryview) -> None:
    """Classify garbage from the first bytes, before a whole record header arrived."""
    if len(head) >= 1 and head[0] != _HANDSHAKE_RECORD:
        raise ClientHelloError(f"not a TLS handshake record (content type {head[0]})")
    if len(head) >= 2 and head[1] != 3:
        raise ClientHelloError(f"not a TLS record (version byte {head[1]})")


def _check_handshake_prefix(prefix: bytes | bytearray) -> None:
    if prefix and prefix[0] != _CLIENT_HELLO:
        raise ClientHelloError(f"first handshake message is type {prefix[0]}, not ClientHello")


class _Reader:
    """Bounds-checked big-endian reads over a memoryview; raises ClientHelloError."""

    __slots__ = ("data", "position")

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.position = 0

    def take(self, count: int, what: str) -> memoryview:
        end = self.position + count
        if end > len(self.data):
            raise ClientHelloError(f"truncated ClientHello: {what}")
        chunk = self.data[self.position : end]
        self.position = end
        return chunk

    def integer(self, size: int, what: str) -> int:
        position = self.position
        end = position + size
        data = self.data
        if end > len(data):
            raise ClientHelloError(f"truncated ClientHello: {what}")
        self.position = end
        if size == 2:  # the usual length and type fields, without a slice
            return (data[position] << 8) | data[position + 1]
        return int.from_bytes(data[position:end], "big")

    def vector(self, length_size: int, what: str) -> _Reader:
        return _Reader(self.take(self.integer(length_size, what), what))

    @property
    def remaining(self) -> int:
        return len(self.data) - self.position


def _parse_body(body: memoryview, *, size: int) -> ClientHello:
    reader = _Reader(body)
    legacy_version = reader.integer(2, "version")
    reader.take(32, "random")
    session_id = reader.vector(1, "session id")
    if session_id.remaining > 32:
        raise ClientHelloError("session id longer than 32 bytes")
    suites = reader.vector(2, "cipher suites")
    if suites.remaining == 0 or suites.remaining % 2:
        raise ClientHelloError("bad cipher suite list")
    if reader.vector(1, "compression methods").remaining == 0:
        raise ClientHelloError("empty compression method list")
    server_name: str | None = None
    alpn: tuple[bytes, ...] = ()
    versions: tuple[int, ...] = (legacy_version,)
    if reader.remaining:
        extensions = reader.vector(2, "extensions")
        # The extension walk, written out: a ClientHello carries 10-20 extensions and
        # this runs once per TLS connection (measured: half the parse's time).
        data, position, end = extensions.data, 0, len(extensions.data)
        seen: set[int] = set()
        while position < end:
            if end - position < 2:
                raise ClientHelloError("truncated ClientHello: extension type")
            if end - position < 4:
                raise ClientHelloError("truncated ClientHello: extension data")
            kind = (data[position] << 8) | data[position + 1]
            start = position + 4
            position = start + ((data[position + 2] << 8) | data[position + 3])
            if position > end:
                raise ClientHelloError("truncated ClientHello: extension data")
            if kind in seen:
                raise ClientHelloError(f"duplicate extension {kind}")  # RFC 8446 §4.2
            seen.add(kind)
            if kind == _EXT_SERVER_NAME:
                server_name = _server_name(_Reader(data[start:position]))
            elif kind == _EXT_ALPN:
                alpn = _alpn(_Reader(data[start:position]))
            elif kind == _EXT_SUPPORTED_VERSIONS:
                versions = _versions(_Reader(data[start:position]))
    if reader.remaining:
        raise ClientHelloError("trailing bytes after extensions")
    return ClientHello(server_name=server_name, alpn_protocols=alpn, versions=versions, size=size)


def _server_name(payload: _Reader) -> str | None:
    names = payload.vector(2, "server name list")
    if payload.remaining:
        raise ClientHelloError("trailing bytes in server_name")
    host: str | None = None
    while names.remaining:
        name_type = names.integer(1, "server name type")
        name = bytes(names.take(names.integer(2, "server name length"), "server name"))
        if name_type != 0 or host is not None:
            continue  # RFC 6066 §3: only one host_name; other types are ignored
        if not name:
            raise ClientHelloError("empty server name")  # host_name<1..2^16-1>
        text = name.decode("ascii", "replace").lower().removesuffix(".")
        if len(name) <= 255 and text and all(c.isalnum() or c in "-._*" for c in text):
            host = text
        # Anything else is well-formed but not a host name, and counts as no SNI, as
        # OpenSSL and PostgreSQL take it: libpq < 18 given only hostaddr= sends its
        # default socket directory ("/var/run/postgresql") as the server name.
    return host


def _alpn(payload: _Reader) -> tuple[bytes, ...]:
    protocols = payload.vector(2, "ALPN list")
    if payload.remaining:
        raise ClientHelloError("trailing bytes in ALPN")
    result = []
    while protocols.remaining:
        protocol = bytes(protocols.take(protocols.integer(1, "ALPN length"), "ALPN protocol"))
        if not protocol:
            raise ClientHelloError("empty ALPN protocol name")  # RFC 7301 §3.1
        result.append(protocol)
    if not result:
        raise ClientHelloError("empty ALPN list")
    return tuple(result)


def _versions(payload: _Reader) -> tuple[int, ...]:
    versions = payload.vector(1, "supported versions")
    if payload.remaining or versions.remaining == 0 or versions.remaining % 2:
        raise ClientHelloError("bad supported_versions")
    return tuple(versions.integer(2, "version") for _ in range(versions.remaining // 2))
