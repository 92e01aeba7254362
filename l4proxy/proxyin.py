"""Step 2, PROXY header in (issue #10): a trusted peer (a load balancer in front) says
who the client was.

Only peers in ``accept_proxy_protocol`` have a header read at all; from anyone else a
header would be ordinary payload. A trusted peer must open with a v1 or v2 header
(autodetected) within ``handshake_timeout``. Its source becomes the client everywhere
after: the admit step's lists and limits (decided here, not in the accept loop, since
the accept loop only knew the load balancer), routing, the access log and the PROXY
header sent on; its destination becomes the address the client connected to. A v2
LOCAL header (the load balancer's own health check) keeps the real endpoints.

The header is read without reading past it: the bytes are peeked, and only the
header's own bytes are taken from the socket, so whatever follows (a ClientHello, a
preamble, payload) is still there for the next step.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import trio

from .addresses import TCPAddress, UnixAddress
from .admit import admit
from .connection import prepare_socket
from .errors import ProxyHeaderError
from .protocols.proxyheader import V2_MAX_SIZE, Command, InetEndpoint, parse_proxy_header
from .record import Ended, Outcome

if TYPE_CHECKING:
    from .addresses import Address
    from .connection import Connection
    from .protocols.proxyheader import Endpoint, ProxyHeader

__all__ = ["accept_proxy_header"]


async def accept_proxy_header(connection: Connection) -> None:
    """Read the trusted peer's header and apply it (then admit the real client)."""
    sock = connection.client
    assert isinstance(sock, socket.socket)  # only accepted sockets come from trusted peers
    prepare_socket(sock, True)  # as every later step would have it (trusted peers: TCP)
    seconds = connection.runtime.config.handshake_timeout
    header = None
    with trio.move_on_after(seconds):
        header = await _read_header(sock)
    if header is None:
        raise Ended(Outcome.HANDSHAKE_TIMEOUT, f"no PROXY header within {seconds:g}s")
    record = connection.record
    if header.command is Command.LOCAL or header.source is None:
        return  # a health check, or UNKNOWN/UNSPEC: the real endpoints stand
    record.proxied_client = _address(header.source)
    connection.proxied_local = _address(header.destination)
    if not connection.runtime.admits_all and isinstance(header.source, InetEndpoint):
        refusal, key = admit(connection.runtime, connection.shared, header.source.host)
        if refusal is not None:
            raise Ended(refusal, f"client {record.proxied_client} (PROXY header)")
        connection.client_key = key


async def _read_header(sock: socket.socket) -> ProxyHeader:
    """Peek until a whole header is there, then take exactly its bytes. An incomplete
    header's bytes are taken as they come (all of them are header) so that waiting for
    more is waiting for new bytes, not for bytes already seen."""
    taken = bytearray()
    while True:
        try:
            peeked = sock.recv(V2_MAX_SIZE - len(taken), socket.MSG_PEEK)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        if not peeked:
            raise Ended(Outcome.BAD_PROXY_HEADER, "connection closed before a PROXY header")
        try:
            header = parse_proxy_header(taken + peeked)
        except ProxyHeaderError as exc:
            raise Ended(Outcome.BAD_PROXY_HEADER, str(exc)) from None
        if header is not None:
            sock.recv(header.size - len(taken))  # peeked: all there
            return header
        taken += sock.recv(len(peeked))
        await trio.lowlevel.wait_readable(sock)


def _address(endpoint: Endpoint | None) -> Address | None:
    if isinstance(endpoint, InetEndpoint):
        return TCPAddress(endpoint.host, endpoint.port)
    if endpoint is not None:
        return UnixAddress(endpoint.path.decode(errors="replace"))
    return None
