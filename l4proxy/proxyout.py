"""Step 8's PROXY header out (issue #10): tell the backend who the client was.

With ``proxy_protocol = "v1"`` or ``"v2"`` every backend connection starts with a PROXY
header (encoded by :mod:`l4proxy.protocols.proxyheader`), before any other byte: before
a backend preamble and before backend TLS, as HAProxy's ``send-proxy`` does. Source:
the client (or the client a trusted PROXY header named); destination: the address the
client connected to. Version 2 also carries, as TLVs, what the proxy learnt of the
client's TLS: the server name (authority), the agreed ALPN protocol, the TLS version
and cipher and the client certificate's CN (SSL), and the connection id (unique id).

The header is written straight to the raw socket when the backend is one, so a
connection that then splices raw keeps its fast path, and there it goes out with the
client's first bytes in one segment. Built for every backend connection, it is built
cheaply: addresses packed with ``inet_pton``, the listening address once per listener.
"""

from __future__ import annotations

import functools
import math
import socket
from typing import TYPE_CHECKING

from .addresses import TCPAddress, UnixAddress
from .connection import underlying_socket
from .eager import own_task, wait_socket
from .protocols.proxyheader import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    InetEndpoint,
    UnixEndpoint,
    encode_v1,
    encode_v2,
    encode_v2_inet,
    ssl_value,
    tlv,
)

if TYPE_CHECKING:
    from .addresses import Address
    from .connection import Connection
    from .record import ConnectionRecord

__all__ = ["proxy_header", "send_proxy_header"]


async def send_proxy_header(connection: Connection, version: str, *, splices_next: bool) -> bool:
    """Write the header to the freshly connected backend; ``True`` if the kernel holds it.

    ``splices_next``: the data phase that follows splices the raw client socket to this
    backend, and starts at once with a splice of what the client has sent. Then the
    header goes with ``MSG_MORE``: the kernel holds it, and that first splice sends both
    in one segment, as HAProxy does when the client's bytes are waiting. A header sent
    alone costs a whole transmit (on loopback the backend's receive path too). If the
    client has sent nothing yet (the backend speaks first), the splice link pushes the
    held header out before it waits (``Link.held`` in the data core), so it never waits for the
    kernel's timer.
    """
    record = connection.record
    if connection.proxied_local is not None:  # what a trusted PROXY header named
        destination = _inet(connection.proxied_local)
    else:
        destination = _listening(record.local)
        if destination is _WILDCARD:  # the address this client reached
            destination = _inet(_accepted_on(connection)) or _inet(record.local)
    header = _header(record, version, destination, connection.proxied_local or record.local)
    backend = connection.backend
    if isinstance(backend, socket.socket):
        flags = socket.MSG_MORE if splices_next else 0
        view = memoryview(header)
        while view:
            try:
                view = view[backend.send(view, flags) :]
                continue
            except BlockingIOError:
                pass
            await wait_socket(backend, writable=True, deadline=math.inf)  # see eager.py
        return splices_next
    await own_task()
    await connection.backend_stream().send_all(header)
    return False


def proxy_header(record: ConnectionRecord, version: str, local: Address | None) -> bytes:
    """The header for ``record``'s client, who connected to ``local``."""
    return _header(record, version, _inet(local), local)


#: An IP address and port: (packed address, text, port).
Inet = tuple[bytes, str, int]


def _header(
    record: ConnectionRecord, version: str, destination: Inet | None, local: Address | None
) -> bytes:
    client = record.proxied_client or record.client
    source = _inet(client)
    if source is not None and destination is not None and len(source[0]) != len(destination[0]):
        source = destination = None  # IPv4 and IPv6: no common family to name them in
    if version == "v1":
        if source is None or destination is None:
            return encode_v1(None, None)
        return encode_v1(InetEndpoint(*source[1:]), InetEndpoint(*destination[1:]))
    tlvs: list[tuple[int, bytes]] = []
    if record.sni:
        tlvs.append((PP2_TYPE_AUTHORITY, record.sni.encode("ascii")))
    if record.tls_version is not None:  # terminated here: the ALPN agreed, the session
        if record.alpn:
            tlvs.append((PP2_TYPE_ALPN, record.alpn.encode("ascii")))
        tlvs.append(
            (
                PP2_TYPE_SSL,
                ssl_value(
                    version=record.tls_version,
                    cipher=record.cipher,
                    common_name=_common_name(record.client_subject),
                    client_certificate=record.client_subject is not None,
                ),
            )
        )
    unique_id = str(record.id).encode("ascii")
    if source is not None and destination is not None:
        encoded = b"".join([tlv(kind, value) for kind, value in tlvs]) if tlvs else b""
        encoded += tlv(PP2_TYPE_UNIQUE_ID, unique_id)
        return encode_v2_inet(source[0], destination[0], source[2], destination[2], encoded)
    tlvs.append((PP2_TYPE_UNIQUE_ID, unique_id))
    return encode_v2(_unix(client), _unix(local), tuple(tlvs))  # Unix sockets, or UNSPEC


#: An IPv4-mapped IPv6 address's first 12 bytes (``::ffff:a.b.c.d``).
_MAPPED = bytes(10) + b"\xff\xff"
#: What :func:`_listening` says of a wildcard listening address (``0.0.0.0``, ``::``).
_WILDCARD: Inet = (b"", "", 0)


def _inet(address: Address | None) -> Inet | None:
    """An IP address and port as :data:`Inet`, or ``None`` (a Unix socket, or a host
    that is not an IP address). A dual-stack socket's IPv4 client (IPv4-mapped) is an
    IPv4 client; an IPv6 zone is dropped. ``inet_pton`` rather than ``ipaddress``: a
    fifteenth of the cost."""
    if not isinstance(address, TCPAddress) or not address.host:
        return None
    host = address.host
    try:
        if ":" not in host:
            return socket.inet_pton(socket.AF_INET, host), host, address.port
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    except OSError:
        return None
    if packed[:12] == _MAPPED:
        return packed[12:], socket.inet_ntop(socket.AF_INET, packed[12:]), address.port
    return packed, socket.inet_ntop(socket.AF_INET6, packed), address.port


@functools.lru_cache(maxsize=256)
def _listening(local: Address | None) -> Inet | None:
    """A listening address as :func:`_inet` gives it, worked out once per listener;
    :data:`_WILDCARD` for a wildcard one (each connection asks the kernel instead)."""
    if isinstance(local, TCPAddress) and local.host is None:
        return _WILDCARD
    found = _inet(local)
    if found is not None and not any(found[0]):
        return _WILDCARD
    return found


def _unix(address: Address | None) -> UnixEndpoint | None:
    if isinstance(address, UnixAddress):
        return UnixEndpoint(address.path.encode()[:108])
    return None


def _accepted_on(connection: Connection) -> TCPAddress | None:
    """The address the client's connection arrived at (one ``getsockname``)."""
    sock = underlying_socket(connection.client)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return None
    return TCPAddress(host, port)


def _common_name(subject: str | None) -> str | None:
    """The CN of an RFC 4514 subject (``CN=alice,O=Example``), if it has one."""
    if not subject:
        return None
    for part in subject.split(","):
        name, _, value = part.partition("=")
        if name.strip().upper() == "CN":
            return value.strip()
    return None
