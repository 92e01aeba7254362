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
from OpenSSL import SSL

from .addresses import TCPAddress
from .connection import prepare_socket
from .eager import TooSlow, own_task, wait_socket
from .errors import ClientHelloError
from .protocols.clienthello import DEFAULT_LIMIT, ClientHello, next_size, parse_client_hello
from .record import Ended, Outcome
from .tls import (
    ALERT_NO_APPLICATION_PROTOCOL,
    ALERT_UNRECOGNIZED_NAME,
    ClientCertificateRejected,
    SocketTLSStream,
    TLSStream,
    describe_ssl_error,
)
from .tls.streams import alpn_protocol, cipher, peer_gone, protocol_version

if TYPE_CHECKING:
    from .balancing import BackendPool
    from .connect import Target
    from .connection import Connection
    from .protocols.dialogue import StartClientTLS
    from .routing import Route
    from .tls import BackendTLS, ServerTLS


#: Linux's TCP_NOTSENT_LOWAT, and the 16 KiB trio's streams set: the kernel keeps at
#: most that much unsent data for a TLS client, so a slow reader shows as a full socket
#: (WantWriteError) early and the data core mutes the backend, as on the stream path.
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
NOTSENT_LOWAT = 16384


async def read_tls_front(connection: Connection) -> Route[BackendPool[Target]]:
    """Steps 4-6: read the ClientHello, route on it, terminate TLS if the listener does.

    The ClientHello and the handshake share one deadline. Passthrough keeps what was
    read of the ClientHello for the backend (``connection.replay``). A client that is
    the accepted socket takes the fast path (:func:`_on_the_socket`): peeked, and the
    handshake done by OpenSSL on the socket, each wait in the data core (no task); a
    ClientHello that comes in pieces, or a stream, goes through trio streams in a task.
    """
    seconds = connection.runtime.config.handshake_timeout
    deadline = trio.current_time() + seconds
    try:
        if type(connection.client) is socket.socket:
            route = await _on_the_socket(connection, connection.client, deadline)
            if route is not None:
                return route
            peek = False  # peeked already: not all there, so read it
        else:
            peek = True
        await own_task()  # trio streams from here
        with trio.move_on_at(deadline):
            return await tls_front(connection, peek=peek)
    except TooSlow:
        pass
    raise Ended(
        Outcome.HANDSHAKE_TIMEOUT, f"no complete ClientHello and handshake within {seconds:g}s"
    )


async def tls_front(
    connection: Connection, start: StartClientTLS | None = None, *, peek: bool = True
) -> Route[BackendPool[Target]]:
    """Steps 4-6 without a deadline of their own, over trio streams: a preamble
    (:mod:`l4proxy.preamble`) runs them under its deadline when its dialogue asks for
    TLS (``start``: the ALPN to select and whether the client must offer it, bytes of
    the ClientHello that the dialogue already read). ``peek``: try the peek first."""
    runtime = connection.runtime
    stream = connection.client_stream()
    replay = start.replay if start else b""
    hello, consumed, in_socket = await _client_hello(stream, replay, peek=peek)
    try:
        route, alpn = _route(connection, hello, start)
    except _Refused as refused:
        await _refuse(stream, hello, in_socket, refused.alert)
        raise refused.ended from None
    if runtime.server_tls is None:
        connection.replay = consumed
        return route
    await _terminate(connection, hello, consumed, in_socket, alpn, runtime.server_tls)
    return route


class _Refused(Exception):
    """Step 5 found no way on: the alert to send (may be empty), then ``ended``."""

    def __init__(self, alert: bytes, ended: Ended) -> None:
        super().__init__(alert, ended)
        self.alert, self.ended = alert, ended


def _route(
    connection: Connection, hello: ClientHello, start: StartClientTLS | None
) -> tuple[Route[BackendPool[Target]], tuple[bytes, ...]]:
    """Step 5: note what the ClientHello offers, pick the route; return it and the
    ALPN protocols to select. Raises :class:`_Refused`."""
    runtime = connection.runtime
    record = connection.record
    record.sni = hello.server_name
    record.alpn = ",".join(p.decode("ascii", "replace") for p in hello.alpn_protocols) or None
    route = runtime.router.match(hello.server_name, hello.alpn_protocols)
    if route is None:
        alert = ALERT_UNRECOGNIZED_NAME if runtime.server_tls else b""
        raise _Refused(alert, Ended(Outcome.NO_ROUTE, _no_route(hello, runtime.config.name)))
    record.route = route.name  # logged even if the handshake fails
    alpn = route.alpn
    if start is not None and runtime.server_tls is not None:
        alpn = alpn or start.alpn
        if start.require_alpn and not any(p in hello.alpn_protocols for p in start.alpn):
            wanted = ", ".join(repr(p.decode("ascii", "replace")) for p in start.alpn)
            ended = Ended(Outcome.BAD_PREAMBLE, f"TLS at once without ALPN {wanted} offered")
            raise _Refused(ALERT_NO_APPLICATION_PROTOCOL, ended)
    return route, alpn


async def _on_the_socket(
    connection: Connection, sock: socket.socket, deadline: float
) -> Route[BackendPool[Target]] | None:
    """Steps 4-6 on the accepted socket itself: the ClientHello peeked (it stays in
    the socket, for OpenSSL or the backend), the handshake by OpenSSL on the socket,
    every wait :func:`~l4proxy.eager.wait_socket` (in the data core when driven
    there). ``None``: the ClientHello is not all there yet (the caller reads it).
    Raises ``TooSlow`` at ``deadline``."""
    tcp = type(connection.record.client) is TCPAddress
    if sock.getblocking():  # (not prepared by step 2)
        prepare_socket(sock, tcp)
    if tcp:  # what a trio.SocketStream sets: bounded unsent data in the kernel
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
    # The waits stay outside the except blocks: a parked set-up keeps no exception alive.
    while True:
        try:
            data = sock.recv(DEFAULT_LIMIT, socket.MSG_PEEK)
            break
        except BlockingIOError:
            pass
        except OSError as exc:
            raise trio.BrokenResourceError(f"while peeking at the ClientHello: {exc}") from exc
        await wait_socket(sock, deadline=deadline)
    if not data:
        raise Ended(Outcome.BAD_CLIENT_HELLO, "connection closed before a ClientHello")
    try:
        hello = parse_client_hello(data)  # garbage is recognised at once
    except ClientHelloError as exc:
        _refuse_on(sock, len(data), b"")
        raise Ended(Outcome.BAD_CLIENT_HELLO, str(exc)) from None
    if hello is None:
        return None
    runtime = connection.runtime
    try:
        route, alpn = _route(connection, hello, None)
    except _Refused as refused:
        _refuse_on(sock, hello.size, refused.alert)
        raise refused.ended from None
    server_tls = runtime.server_tls
    if server_tls is None:
        return route  # passthrough: the ClientHello is still in the socket
    tls = server_tls.connection(hello.server_name, alpn or None, sock=sock)
    started = trio.current_time()
    while True:
        try:
            tls.do_handshake()
            break
        except SSL.WantReadError:
            writable = False
        except SSL.WantWriteError:
            writable = True
        except (SSL.ZeroReturnError, SSL.SysCallError) as exc:
            raise Ended(Outcome.TLS_HANDSHAKE_FAILED, peer_gone(exc)) from None
        except SSL.Error as exc:  # OpenSSL sent its alert itself
            raise Ended(Outcome.TLS_HANDSHAKE_FAILED, describe_ssl_error(exc)) from None
        await wait_socket(sock, writable=writable, deadline=deadline)
    connection.client_tls = tls  # closing the connection closes it with the socket
    _note_tls(connection, tls, server_tls, started)
    return route


def _refuse_on(sock: socket.socket, size: int, alert: bytes) -> None:
    """:func:`_refuse` on the socket itself, never waiting: read what was peeked,
    then the alert if the socket takes it."""
    with contextlib.suppress(OSError):
        sock.recv(size)
        if alert:
            sock.send(alert)


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


async def _client_hello(
    stream: trio.abc.Stream, replay: bytes, *, peek: bool = True
) -> tuple[ClientHello, bytes, bool]:
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
        if peek and type(stream) is trio.SocketStream and not replay:
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
    _note_tls(connection, tls.connection, server_tls, started)


def _note_tls(
    connection: Connection, tls: SSL.Connection, server_tls: ServerTLS, started: float
) -> None:
    """After the handshake: what was agreed, into the record; then the client
    certificate's allow lists."""
    record = connection.record
    record.handshake_seconds = trio.current_time() - started
    record.tls_version = protocol_version(tls)
    record.cipher = cipher(tls)
    record.alpn = alpn_protocol(tls)
    if server_tls.verifies_clients:
        try:
            record.client_subject = server_tls.client_identity(tls)
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
