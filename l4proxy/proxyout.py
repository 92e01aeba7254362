"""Step 8's PROXY header out (issue #10): tell the backend who the client was.

With ``proxy_protocol = "v1"`` or ``"v2"`` every backend connection starts with a PROXY
header (encoded by :mod:`l4proxy.protocols.proxyheader`), before any other byte: before
a backend preamble and before backend TLS, as HAProxy's ``send-proxy`` does. Source:
the client (or the client a trusted PROXY header named); destination: the address the
client connected to. Version 2 also carries, as TLVs, what the proxy learnt of the
client's TLS: the server name (authority), the agreed ALPN protocol, the TLS version
and cipher and the client certificate's CN (SSL), and the connection id (unique id).

The header is written straight to the raw socket when the backend is one, so a
connection that then splices raw keeps its fast path.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING

import trio

from .addresses import TCPAddress, UnixAddress
from .connection import underlying_socket
from .protocols.proxyheader import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    InetEndpoint,
    UnixEndpoint,
    encode_v1,
    encode_v2,
    ssl_value,
)

if TYPE_CHECKING:
    from .addresses import Address
    from .connection import Connection
    from .record import ConnectionRecord

__all__ = ["proxy_header", "send_proxy_header"]


async def send_proxy_header(connection: Connection, version: str) -> None:
    """Write the header to the freshly connected backend."""
    record = connection.record
    local = connection.proxied_local or record.local
    if (
        connection.proxied_local is None
        and isinstance(local, TCPAddress)
        and (local.host is None or _unspecified(local.host))
    ):
        local = _accepted_on(connection) or local  # a wildcard listener: the real address
    header = proxy_header(record, version, local)
    backend = connection.backend
    if isinstance(backend, socket.socket):
        view = memoryview(header)
        while view:
            try:
                view = view[backend.send(view) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(backend)
    else:
        await connection.backend_stream().send_all(header)


def proxy_header(record: ConnectionRecord, version: str, local: Address | None) -> bytes:
    """The header for ``record``'s client, who connected to ``local``."""
    client = record.proxied_client or record.client
    source, destination = _endpoint(client), _endpoint(local)
    if version == "v1":
        inet = isinstance(source, InetEndpoint) and isinstance(destination, InetEndpoint)
        return encode_v1(source, destination) if inet else encode_v1(None, None)  # type: ignore[arg-type]
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
    tlvs.append((PP2_TYPE_UNIQUE_ID, str(record.id).encode("ascii")))
    return encode_v2(source, destination, tuple(tlvs))


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_unspecified
    except ValueError:
        return False


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


def _endpoint(address: Address | None) -> InetEndpoint | UnixEndpoint | None:
    if isinstance(address, UnixAddress):
        return UnixEndpoint(address.path.encode()[:108])
    if isinstance(address, TCPAddress) and address.host:
        try:
            host = ipaddress.ip_address(address.host.partition("%")[0])
        except ValueError:
            return None
        if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
            host = host.ipv4_mapped  # a dual-stack socket's IPv4 client is an IPv4 client
        return InetEndpoint(str(host), address.port)
    return None


def _common_name(subject: str | None) -> str | None:
    """The CN of an RFC 4514 subject (``CN=alice,O=Example``), if it has one."""
    if not subject:
        return None
    for part in subject.split(","):
        name, _, value = part.partition("=")
        if name.strip().upper() == "CN":
            return value.strip()
    return None
