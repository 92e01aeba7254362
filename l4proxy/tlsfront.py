"""The TLS set-up steps: ClientHello, route, termination (client side), and backend TLS.

Steps 4 to 6 of the pipeline (:mod:`l4proxy.pipeline`) run under one deadline, the
listener's ``handshake_timeout`` (slowloris protection), and step 8's backend TLS under
another of the same length. Each step fills in the connection record and either
returns or raises :class:`~l4proxy.record.Ended` with the outcome.
"""

from __future__ import annotations

import contextlib
import socket
from typing import TYPE_CHECKING

import trio

from .addresses import TCPAddress
from .errors import ClientHelloError
from .protocols.clienthello import DEFAULT_LIMIT, ClientHello, next_size, parse_client_hello
from .record import Ended, Outcome
from .tls import (
    ALERT_NO_APPLICATION_PROTOCOL,
    ALERT_UNRECOGNIZED_NAME,
    ClientCertificateRejected,
    SocketTLSStream,
    TLSStream,
)

if TYPE_CHECKING:
    from .balancing import BackendPool
    from .connect import Target
    from .connection import Connection
    from .protocols.dialogue import StartClientTLS
    from .routing import Route
    from .tls import BackendTLS, ServerTLS


async def read_tls_front(connection: Connection) -> Route[BackendPool[Target]]:
    """Steps 4-6: read the ClientHello, route on it, terminate TLS if the listener does.

    The ClientHello and the handshake share one deadline. Passthrough keeps what was
    read of the ClientHello for the backend (``connection.replay``).
    """
    seconds = connection.runtime.config.handshake_timeout
    with trio.move_on_after(seconds):
        return await tls_front(connection)
    raise Ended(
        Outcome.HANDSHAKE_TIMEOUT, f"no complete ClientHello and handshake within {seconds:g}s"
    )


async def tls_front(
    connection: Connection, start: StartClientTLS | None = None
) -> Route[BackendPool[Target]]:
    """Steps 4-6 without a deadline of their own: a preamble (:mod:`l4proxy.preamble`)
    runs them under its deadline when its dialogue asks for TLS (``start``: the ALPN
    to select and whether the client must offer it, bytes of the ClientHello that the
    dialogue already read)."""
    runtime = connection.runtime
    stream = connection.client_stream()
    hello, consumed, in_socket = await _client_hello(stream, start.replay if start else b"")
    record = connection.record
    record.sni = hello.server_name
    record.alpn = ",".join(p.decode("ascii", "replace") for p in hello.alpn_protocols) or None
    route = runtime.router.match(hello.server_name, hello.alpn_protocols)
    if route is None:
        await _refuse(
            stream, hello, in_socket, ALERT_UNRECOGNIZED_NAME if runtime.server_tls else b""
        )
        raise Ended(Outcome.NO_ROUTE, _no_route(hello, runtime.config.name))
    record.route = route.name  # logged even if the handshake fails
    if runtime.server_tls is None:
        connection.replay = consumed
        return route
    alpn = route.alpn
    if start is not None:
        alpn = alpn or start.alpn
        if start.require_alpn and not any(p in hello.alpn_protocols for p in start.alpn):
            await _refuse(stream, hello, in_socket, ALERT_NO_APPLICATION_PROTOCOL)
            wanted = ", ".join(repr(p.decode("ascii", "replace")) for p in start.alpn)
            raise Ended(Outcome.BAD_PREAMBLE, f"TLS at once without ALPN {wanted} offered")
    await _terminate(connection, hello, consumed, in_socket, alpn, runtime.server_tls)
    return route


def _no_route(hello: ClientHello, listener: str) -> str:
    if hello.server_name:
        return f"no route for sni {hello.server_name!r} on listener {listener!r}"
    return f"no route for a ClientHello without sni on listener {listener!r}"


async def _refuse(
    stream: trio.abc.Stream, hello: ClientHello, in_socket: bool, alert: bytes
) -> None:
    """Refuse a ClientHello: read what was only peeked (closing with unread bytes is a
    reset), then send the fatal alert, if any (RFC 6066 §3 ``unrecognized_name``, RFC
    7301 §3.2 ``no_application_protocol``)."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        if in_socket:
            await stream.receive_some(hello.size)
        if alert:
            await stream.send_all(alert)


async def _client_hello(stream: trio.abc.Stream, replay: bytes) -> tuple[ClientHello, bytes, bool]:
    """The ClientHello, the bytes consumed to get it, and whether it is still in the socket.

    Fast path: most clients send the whole ClientHello in their first segment, so peek
    at it (``MSG_PEEK``) and leave it in the socket; then OpenSSL can read it itself
    and passthrough needs no replay. Anything else (a partial peek, a stream that is
    not a plain socket) falls back to reading and keeping the bytes.

    Error handling:
        ``ClientHelloError`` (garbage, malformed, too large, EOF first) ends the
        connection as ``bad_client_hello``.
    """
    try:
        if type(stream) is trio.SocketStream and not replay:
            try:
                data = await stream.socket.recv(DEFAULT_LIMIT, socket.MSG_PEEK)
            except OSError as exc:
                raise trio.BrokenResourceError(f"while peeking at the ClientHello: {exc}") from exc
            if not data:
                raise ClientHelloError("connection closed before a ClientHello")
            try:
                hello = parse_client_hello(data)  # garbage is recognised at once
            except ClientHelloError:
                # Read what was only peeked: closing with unread bytes would send a reset.
                await stream.receive_some(len(data))
                raise
            if hello is not None:
                return hello, b"", True
        hello, consumed = await read_client_hello(stream, initial=replay)
    except ClientHelloError as exc:
        raise Ended(Outcome.BAD_CLIENT_HELLO, str(exc)) from None
    return hello, consumed, False


async def read_client_hello(
    stream: trio.abc.ReceiveStream, *, limit: int = DEFAULT_LIMIT, initial: bytes = b""
) -> tuple[ClientHello, bytes]:
    """Read until a whole ClientHello arrived; return it and every byte read (to replay),
    ``initial`` (its first bytes, already read) included.

    Never reads more than ``limit`` bytes. Raises ``ClientHelloError`` for anything
    that is not a ClientHello, including EOF before a complete one.
    """
    buffer = bytearray(initial)
    if buffer:
        hello = parse_client_hello(buffer, limit=limit)
        if hello is not None:
            return hello, bytes(buffer)
    parse_at = next_size(buffer) if buffer else 1  # parse once a record can be complete
    while True:
        chunk = await stream.receive_some(limit - len(buffer))
        if not chunk:
            raise ClientHelloError(
                f"connection closed after {len(buffer)} bytes, before a complete ClientHello"
            )
        buffer += chunk
        if len(buffer) < parse_at:
            continue
        hello = parse_client_hello(buffer, limit=limit)
        if hello is not None:
            return hello, bytes(buffer)
        parse_at = next_size(buffer)


async def _terminate(
    connection: Connection,
    hello: ClientHello,
    consumed: bytes,
    in_socket: bool,
    route_alpn: tuple[bytes, ...],
    server_tls: ServerTLS,
) -> None:
    """Step 6: the TLS handshake with the client, on the context for its SNI; then the
    client-certificate allow lists. The TLS stream becomes the connection's client."""
    stream = connection.client_stream()
    alpn = route_alpn or None
    if in_socket and isinstance(stream, trio.SocketStream):  # OpenSSL reads the socket itself
        tls: TLSStream = SocketTLSStream(
            stream, server_tls.connection(hello.server_name, alpn, sock=stream.socket)
        )
    else:
        tls = TLSStream(stream, server_tls.connection(hello.server_name, alpn), initial=consumed)
    connection.client = tls  # closing the connection closes it (and the socket beneath)
    started = trio.current_time()  # for the handshake latency histogram (metrics)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        raise Ended(Outcome.TLS_HANDSHAKE_FAILED, str(exc)) from None
    record = connection.record
    record.handshake_seconds = trio.current_time() - started
    record.tls_version, record.cipher, record.alpn = (
        tls.protocol_version,
        tls.cipher,
        tls.alpn_protocol,
    )
    if server_tls.verifies_clients:
        try:
            record.client_subject = server_tls.client_identity(tls.connection)
        except ClientCertificateRejected as exc:
            raise Ended(Outcome.CLIENT_CERT_REJECTED, str(exc)) from None


async def secure_backend(connection: Connection, backend_tls: BackendTLS) -> None:
    """Step 8's TLS: a verified TLS session with the backend before any client byte
    goes to it, under a deadline of ``handshake_timeout`` of its own."""
    address = connection.record.backend
    host = address.host if isinstance(address, TCPAddress) else None
    transport = connection.backend_stream()
    if type(transport) is trio.SocketStream:  # OpenSSL reads and writes the socket itself
        tls_connection, name = backend_tls.connection(host, sock=transport.socket)
        tls: TLSStream = SocketTLSStream(transport, tls_connection)
    else:  # an embedder's stream
        tls_connection, name = backend_tls.connection(host)
        tls = TLSStream(transport, tls_connection)
    connection.backend = tls
    seconds = connection.runtime.config.handshake_timeout
    with trio.move_on_after(seconds):
        try:
            await tls.do_handshake()
            backend_tls.verify(tls_connection, name)
        except trio.BrokenResourceError as exc:
            raise Ended(Outcome.BACKEND_TLS_FAILED, str(exc)) from None
        return
    raise Ended(Outcome.BACKEND_TLS_FAILED, f"backend handshake took longer than {seconds:g}s")
