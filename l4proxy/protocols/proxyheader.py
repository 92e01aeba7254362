"""The PROXY protocol, versions 1 and 2, sans-IO: encode a header, parse one.

A load balancer or proxy in front of a server opens each connection with a PROXY header
that says who the client was (HAProxy's spec, "The PROXY protocol", versions 1 and 2).
l4proxy sends one to backends (``proxy_protocol``) and accepts one from trusted peers
(``accept_proxy_protocol``); both directions are here, without I/O.

Contract (as :mod:`l4proxy.protocols.clienthello`):

* :func:`parse_proxy_header` returns ``None`` while the bytes so far are a valid prefix
  of a header, and a frozen :class:`ProxyHeader` once the whole header arrived (its
  ``size`` says how many bytes it took: what follows is the client's payload).
* It raises :class:`~l4proxy.errors.ProxyHeaderError` as soon as the bytes cannot be a
  header (version 1 or 2 is told from the first byte), and when one would be longer than
  the caps (:data:`V1_MAX_SIZE`, the spec's 107 bytes; :data:`V2_MAX_SIZE`): the caller
  never buffers more than that. Nothing else escapes, whatever the bytes.
* Version 2's LOCAL command (a load balancer's health check) and the UNSPEC family
  parse to a header without addresses: the connection's own endpoints stand.
"""

from __future__ import annotations

import enum
import ipaddress
import struct

import attrs

from l4proxy.errors import ProxyHeaderError

__all__ = [
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "V1_MAX_SIZE",
    "V2_MAX_SIZE",
    "V2_SIGNATURE",
    "Command",
    "InetEndpoint",
    "ProxyHeader",
    "SSLInfo",
    "UnixEndpoint",
    "crc32c",
    "encode_v1",
    "encode_v2",
    "encode_v2_inet",
    "parse_proxy_header",
    "ssl_value",
    "tlv",
]

#: The longest version 1 header, CRLF included (the spec's worst case, TCP6).
V1_MAX_SIZE = 107
#: The longest version 2 header accepted: 16 bytes of fixed part, then addresses and
#: TLVs. The spec allows 65,551; real senders stay well under 1 KiB (addresses, ALPN,
#: SNI, a certificate's CN, a cipher name), so a longer one is refused, not buffered.
V2_MAX_SIZE = 4096
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

_FAMILY_UNSPEC, _FAMILY_INET, _FAMILY_INET6, _FAMILY_UNIX = 0, 1, 2, 3
_ADDRESS_SIZES = {_FAMILY_UNSPEC: 0, _FAMILY_INET: 12, _FAMILY_INET6: 36, _FAMILY_UNIX: 216}
_UNIX_PATH_SIZE = 108


class Command(enum.IntEnum):
    LOCAL = 0  # the peer's own connection (a health check): use the real endpoints
    PROXY = 1  # on behalf of the client the addresses name


@attrs.frozen
class InetEndpoint:
    """An IPv4 or IPv6 address (compressed text form) and a port."""

    host: str
    port: int

    @property
    def ipv6(self) -> bool:
        return ":" in self.host


@attrs.frozen
class UnixEndpoint:
    """A Unix socket path (version 2 only), as bytes: the spec does not say its encoding."""

    path: bytes


Endpoint = InetEndpoint | UnixEndpoint


@attrs.frozen
class SSLInfo:
    """Version 2's PP2_TYPE_SSL: what the sender knew of the client's TLS."""

    client: int  # PP2_CLIENT_* flags
    verify: int  # 0: the client's certificate was verified (when it sent one)
    version: str | None = None
    cipher: str | None = None
    common_name: str | None = None


@attrs.frozen
class ProxyHeader:
    """A parsed header.

    Attributes:
        version: 1 or 2.
        command: ``PROXY``, or ``LOCAL`` (version 2 only): then there are no addresses.
        source, destination: the client's and the address it connected to; ``None`` for
            ``LOCAL``, v1 ``UNKNOWN`` and v2 ``UNSPEC``.
        tlvs: version 2's type-length-values, in order (NOOP and CRC32C included).
        size: the header's length in bytes.
    """

    version: int
    command: Command
    source: Endpoint | None
    destination: Endpoint | None
    tlvs: tuple[tuple[int, bytes], ...] = ()
    size: int = 0

    def tlv(self, kind: int) -> bytes | None:
        """The value of the first TLV of this type, if any."""
        for found, value in self.tlvs:
            if found == kind:
                return value
        return None

    @property
    def alpn(self) -> bytes | None:
        return self.tlv(PP2_TYPE_ALPN)

    @property
    def authority(self) -> str | None:
        value = self.tlv(PP2_TYPE_AUTHORITY)
        return None if value is None else value.decode("utf-8", "replace")

    @property
    def unique_id(self) -> bytes | None:
        return self.tlv(PP2_TYPE_UNIQUE_ID)

    @property
    def ssl(self) -> SSLInfo | None:
        value = self.tlv(PP2_TYPE_SSL)
        return None if value is None else _parse_ssl(value)


# --------------------------------------------------------------------------- encoding


def encode_v1(source: InetEndpoint | None, destination: InetEndpoint | None) -> bytes:
    """A version 1 line; ``UNKNOWN`` when an address is missing or the families differ."""
    if source is None or destination is None or source.ipv6 != destination.ipv6:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP6" if source.ipv6 else "TCP4"
    line = f"PROXY {family} {source.host} {destination.host} {source.port} {destination.port}\r\n"
    return line.encode("ascii")


def encode_v2(
    source: Endpoint | None,
    destination: Endpoint | None,
    tlvs: tuple[tuple[int, bytes], ...] = (),
    *,
    command: Command = Command.PROXY,
    checksum: bool = False,
) -> bytes:
    """A version 2 header. Without both addresses (or with differing kinds) the family
    is UNSPEC. With ``checksum`` a CRC32C TLV is appended and filled in."""
    family, addresses = _FAMILY_UNSPEC, b""
    if type(source) is type(destination) and source is not None and destination is not None:
        family, addresses = _encode_addresses(source, destination)
    body = bytearray(addresses)
    for kind, value in tlvs:
        body += tlv(kind, value)
    if checksum:
        body += tlv(PP2_TYPE_CRC32C, bytes(4))
    size = len(body)
    if 16 + size > V2_MAX_SIZE:
        raise ValueError(f"PROXY v2 header of {16 + size} bytes over the {V2_MAX_SIZE} cap")
    transport = 1 if family else 0  # STREAM, or UNSPEC with UNSPEC
    header = bytearray(V2_SIGNATURE)
    header += bytes([0x20 | command, family << 4 | transport]) + size.to_bytes(2, "big")
    header += body
    if checksum:
        header[-4:] = crc32c(bytes(header)).to_bytes(4, "big")
    return bytes(header)


#: The start of a version 2 PROXY command over TCP, per family (IPv4, IPv6), before
#: the length: signature, version and command, family and transport.
_V2_TCP_STARTS = {
    4: V2_SIGNATURE + bytes([0x21, _FAMILY_INET << 4 | 1]),
    16: V2_SIGNATURE + bytes([0x21, _FAMILY_INET6 << 4 | 1]),
}
_PORTS = struct.Struct("!HH")


def encode_v2_inet(
    source_ip: bytes,
    destination_ip: bytes,
    source_port: int,
    destination_port: int,
    tlvs: bytes = b"",
) -> bytes:
    """The common header, quickly: a PROXY command over TCP between two packed addresses
    of one family (4 bytes each for IPv4, 16 for IPv6), followed by already encoded
    TLVs (:func:`tlv`). The same bytes as :func:`encode_v2` with :class:`InetEndpoint`
    endpoints at a fraction of its cost: the backend PROXY header is built for every
    connection, and the caller has the addresses packed already (``inet_pton``).
    """
    start = _V2_TCP_STARTS.get(len(source_ip))
    if start is None or len(destination_ip) != len(source_ip):
        raise ValueError("addresses must be both 4 (IPv4) or both 16 (IPv6) bytes long")
    size = 2 * len(source_ip) + 4 + len(tlvs)
    if size > V2_MAX_SIZE - 16:
        raise ValueError(f"PROXY v2 header of {16 + size} bytes over the {V2_MAX_SIZE} cap")
    ports = _PORTS.pack(source_port, destination_port)
    return b"".join((start, size.to_bytes(2, "big"), source_ip, destination_ip, ports, tlvs))


def ssl_value(
    *,
    version: str | None,
    cipher: str | None,
    common_name: str | None = None,
    client_certificate: bool = False,
    verified: bool = True,
) -> bytes:
    """The value of a PP2_TYPE_SSL TLV for a client whose TLS the sender terminated."""
    flags = PP2_CLIENT_SSL | (PP2_CLIENT_CERT_CONN if client_certificate else 0)
    value = bytearray([flags]) + (0 if verified else 1).to_bytes(4, "big")
    for kind, text in (
        (PP2_SUBTYPE_SSL_VERSION, version),
        (PP2_SUBTYPE_SSL_CIPHER, cipher),
        (PP2_SUBTYPE_SSL_CN, common_name),
    ):
        if text is not None:
            value += tlv(kind, text.encode("utf-8"))
    return bytes(value)


def tlv(kind: int, value: bytes) -> bytes:
    """One encoded TLV: type, length, value."""
    if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
        raise ValueError(f"TLV type {kind} or length {len(value)} out of range")
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def _encode_addresses(source: Endpoint, destination: Endpoint) -> tuple[int, bytes]:
    if isinstance(source, UnixEndpoint) and isinstance(destination, UnixEndpoint):
        if max(len(source.path), len(destination.path)) > _UNIX_PATH_SIZE:
            raise ValueError("Unix socket path longer than 108 bytes")
        return _FAMILY_UNIX, source.path.ljust(108, b"\0") + destination.path.ljust(108, b"\0")
    assert isinstance(source, InetEndpoint)
    assert isinstance(destination, InetEndpoint)
    if source.ipv6 != destination.ipv6:
        return _FAMILY_UNSPEC, b""
    packed = (
        ipaddress.ip_address(source.host).packed
        + ipaddress.ip_address(destination.host).packed
        + source.port.to_bytes(2, "big")
        + destination.port.to_bytes(2, "big")
    )
    return (_FAMILY_INET6 if source.ipv6 else _FAMILY_INET), packed


# --------------------------------------------------------------------------- parsing


def parse_proxy_header(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """The header at the start of ``data``, or ``None`` if more bytes are needed."""
    view = bytes(data[:V2_MAX_SIZE])
    if not view:
        return None
    if view[0] == _V1_PREFIX[0]:
        return _parse_v1(view)
    if view[0] == V2_SIGNATURE[0]:
        return _parse_v2(view)
    raise ProxyHeaderError("not a PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    prefix = data[: len(_V1_PREFIX)]
    if not _V1_PREFIX.startswith(prefix):
        raise ProxyHeaderError("not a PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX_SIZE)
    if end < 0:
        if len(data) >= V1_MAX_SIZE or b"\n" in data:
            raise ProxyHeaderError(f"PROXY v1 header without CRLF in {V1_MAX_SIZE} bytes")
        return None
    size = end + 2
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 header not ASCII") from None
    words = line.split(" ")
    if len(words) >= 2 and words[1] == "UNKNOWN":  # the rest is to be ignored
        return ProxyHeader(1, Command.PROXY, None, None, size=size)
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"malformed PROXY v1 header {line[:60]!r}")
    ipv6 = words[1] == "TCP6"
    source = InetEndpoint(_v1_address(words[2], ipv6), _v1_port(words[4]))
    destination = InetEndpoint(_v1_address(words[3], ipv6), _v1_port(words[5]))
    return ProxyHeader(1, Command.PROXY, source, destination, size=size)


def _v1_address(text: str, ipv6: bool) -> str:
    try:
        address = ipaddress.IPv6Address(text) if ipv6 else ipaddress.IPv4Address(text)
    except ValueError:
        raise ProxyHeaderError(f"bad address {text[:45]!r} in PROXY v1 header") from None
    return str(address)


def _v1_port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or text != str(int(text)):
        raise ProxyHeaderError(f"bad port {text[:8]!r} in PROXY v1 header")
    port = int(text)
    if port > 0xFFFF:
        raise ProxyHeaderError(f"bad port {text!r} in PROXY v1 header")
    return port


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if not V2_SIGNATURE.startswith(data[:12]):
        raise ProxyHeaderError("not a PROXY protocol header")
    if len(data) < 16:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyHeaderError(f"PROXY v2 header with version {version}")
    if command > Command.PROXY:
        raise ProxyHeaderError(f"PROXY v2 header with command {command}")
    family, transport = data[13] >> 4, data[13] & 0x0F
    if family not in _ADDRESS_SIZES or transport > 2:
        raise ProxyHeaderError(f"PROXY v2 header with family byte {data[13]:#04x}")
    size = 16 + int.from_bytes(data[14:16], "big")
    if size > V2_MAX_SIZE:
        raise ProxyHeaderError(f"PROXY v2 header of {size} bytes over the {V2_MAX_SIZE} cap")
    if len(data) < size:
        return None
    header = data[:size]
    if family == _FAMILY_UNSPEC:  # no addresses, and the rest is to be skipped
        return ProxyHeader(2, Command(command), None, None, size=size)
    address_size = _ADDRESS_SIZES[family]
    if size - 16 < address_size:
        raise ProxyHeaderError(f"PROXY v2 header too short for its addresses ({size} bytes)")
    source, destination = _v2_addresses(family, header[16 : 16 + address_size])
    tlvs = _parse_tlvs(header[16 + address_size :], "PROXY v2 TLV")
    position = 16 + address_size
    for kind, value in tlvs:
        if kind == PP2_TYPE_CRC32C:
            _check_crc(header, position, value)
        elif kind == PP2_TYPE_SSL:
            _parse_ssl(value)  # checked here, so the ``ssl`` property cannot fail later
        position += 3 + len(value)
    if command == Command.LOCAL:  # the addresses are to be ignored
        return ProxyHeader(2, Command.LOCAL, None, None, tlvs, size)
    return ProxyHeader(2, Command.PROXY, source, destination, tlvs, size)


def _v2_addresses(family: int, block: bytes) -> tuple[Endpoint, Endpoint]:
    if family == _FAMILY_UNIX:
        return UnixEndpoint(block[:108].split(b"\0", 1)[0]), UnixEndpoint(
            block[108:].split(b"\0", 1)[0]
        )
    width = 4 if family == _FAMILY_INET else 16
    source = str(ipaddress.ip_address(block[:width]))
    destination = str(ipaddress.ip_address(block[width : 2 * width]))
    ports = block[2 * width :]
    return (
        InetEndpoint(source, int.from_bytes(ports[:2], "big")),
        InetEndpoint(destination, int.from_bytes(ports[2:4], "big")),
    )


def _parse_tlvs(block: bytes, what: str) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    position = 0
    while position < len(block):
        if len(block) - position < 3:
            raise ProxyHeaderError(f"{what} truncated")
        kind = block[position]
        length = int.from_bytes(block[position + 1 : position + 3], "big")
        end = position + 3 + length
        if end > len(block):
            raise ProxyHeaderError(f"{what} of type {kind:#04x} longer than the header")
        tlvs.append((kind, block[position + 3 : end]))
        position = end
    return tuple(tlvs)


def _check_crc(header: bytes, offset: int, value: bytes) -> None:
    """The checksum covers the whole header with its own value zeroed."""
    if len(value) != 4:
        raise ProxyHeaderError("PROXY v2 CRC32C TLV not 4 bytes")
    zeroed = header[: offset + 3] + bytes(4) + header[offset + 7 :]
    if crc32c(zeroed) != int.from_bytes(value, "big"):
        raise ProxyHeaderError("PROXY v2 header fails its CRC32C")


def _parse_ssl(value: bytes) -> SSLInfo:
    if len(value) < 5:
        raise ProxyHeaderError("PROXY v2 SSL TLV shorter than 5 bytes")
    texts: dict[int, str] = {}
    for kind, sub in _parse_tlvs(value[5:], "PROXY v2 SSL sub-TLV"):
        texts.setdefault(kind, sub.decode("utf-8", "replace"))
    return SSLInfo(
        client=value[0],
        verify=int.from_bytes(value[1:5], "big"),
        version=texts.get(PP2_SUBTYPE_SSL_VERSION),
        cipher=texts.get(PP2_SUBTYPE_SSL_CIPHER),
        common_name=texts.get(PP2_SUBTYPE_SSL_CN),
    )


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as the PP2_TYPE_CRC32C TLV carries it."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
