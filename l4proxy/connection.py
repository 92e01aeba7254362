"""One client connection's life: read the ClientHello, route, terminate TLS, connect a
backend, pump bytes, write the access line.

:func:`serve_connection` is the per-connection orchestrator. It reads like a table of
contents; each step is a short function here or lives in its own module. It is also
where per-connection failures are contained: whatever one peer or backend does costs
that connection only.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import time
from typing import TYPE_CHECKING

import attrs
import trio

from .accesslog import AccessRecord, AccessSink
from .addresses import Address, TCPAddress
from .backends import (
    BackendPool,
    Connector,
    connect_direct,
    connect_pool,
    describe_os_error,
)
from .clienthello import DEFAULT_LIMIT, ClientHello, next_size, parse_client_hello
from .errors import ClientHelloError, L4ProxyError, UpstreamConnectError
from .pump import Transfer, pump
from .splice import SpliceLink
from .tls import ALERT_UNRECOGNIZED_NAME, ClientCertificateRejected, SocketTLSStream, TLSStream

if TYPE_CHECKING:
    from collections.abc import Callable

    from .config import ListenerConfig
    from .parking import ParkingLot
    from .routing import Router
    from .splice import PipePool
    from .tls import BackendTLS, ServerTLS

LOGGER = logging.getLogger("l4proxy.connection")


class LiveCount:
    """Connections of one listener that are open right now (kept across reloads)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


@attrs.frozen(eq=False)
class ListenerRuntime:
    """What a listener needs at run time, built once from its config (and on reload)."""

    config: ListenerConfig
    router: Router[BackendPool]
    access_log: AccessSink
    server_tls: ServerTLS | None = None
    backend_tls: BackendTLS | None = None
    pipes: PipePool | None = None  # zero-copy splice for plain TCP, when enabled
    #: The plain-TCP fast path's pool (see :func:`serve_socket`), when it applies.
    direct: BackendPool | None = None
    live: LiveCount = attrs.field(factory=LiveCount)


@attrs.define(slots=True, eq=False)
class _Connection(Transfer):
    """What the access line will say; filled in as the steps run (the byte counters by
    the pump: this is its :class:`~l4proxy.pump.Transfer`)."""

    id: int = 0
    client: str = "-"
    started_wall: float = 0.0
    started: float = 0.0
    outcome: str | None = None
    error: str | None = None
    backend: str | None = None
    sni: str | None = None
    alpn: str | None = None
    tls_version: str | None = None
    cipher: str | None = None
    client_subject: str | None = None

    def fail(self, outcome: str, error: str | None = None) -> None:
        self.outcome, self.error = outcome, error


class _Contained:
    """Whatever ends a connection costs that connection only: exceptions become its
    outcome (unexpected ones are logged with a traceback); ``Cancelled`` passes."""

    __slots__ = ("listener", "state")

    def __init__(self, state: _Connection, listener: str) -> None:
        self.state, self.listener = state, listener

    def __enter__(self) -> None:
        pass

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        if exc is None:
            return False
        if isinstance(exc, BaseExceptionGroup):
            # A pump's nursery wraps what one direction raised; judge the one inside.
            exc = _single(exc)
        if not isinstance(exc, Exception):
            return False  # Cancelled (or KeyboardInterrupt) inside: never swallowed
        _judge(exc, self.state, self.listener)
        return True


def _write_access(listener: ListenerRuntime, state: _Connection, is_draining: bool) -> None:
    listener.live.value -= 1
    if state.outcome is None:
        state.outcome = "drained" if is_draining else "cancelled"
    config = listener.config
    listener.access_log.write(
        AccessRecord(
            time=state.started_wall,
            id=state.id,
            listener=config.name,
            client=state.client,
            backend=state.backend,
            bytes_to_backend=state.to_backend,
            bytes_to_client=state.to_client,
            duration=trio.current_time() - state.started,
            outcome=state.outcome,
            error=state.error,
            sni=state.sni,
            alpn=state.alpn,
            tls_version=state.tls_version,
            cipher=state.cipher,
            client_subject=state.client_subject,
        ),
        config.log_format,
    )


@attrs.frozen(eq=False)
class _Front:
    """The client side once routing (and TLS termination) is done."""

    stream: trio.abc.Stream
    pool: BackendPool
    replay: bytes = b""  # passthrough: the peeked ClientHello, for the backend


async def serve_connection(
    stream: trio.abc.Stream,
    listener: ListenerRuntime,
    client: str,
    connection_id: int,
    connect: Connector,
    is_draining: Callable[[], bool],
) -> None:
    """Proxy one accepted connection, then log it.

    Resource handling:
        Closes ``stream`` (and every stream built on it or on the backend) on every
        path, cancellation included.

    Error handling:
        Protocol errors, TLS failures, backend failures, resets and OS errors end this
        connection with an ``outcome`` in the access log. Anything unexpected is logged
        with a traceback and the connection's identity, and also ends only this
        connection. ``Cancelled`` is never swallowed; a connection cut by a drain
        deadline is logged as ``drained``.
    """
    state = _Connection(
        id=connection_id, client=client, started_wall=time.time(), started=trio.current_time()
    )
    listener.live.value += 1
    try:
        with _Contained(state, listener.config.name):
            async with stream:
                front = await _open_front(stream, listener, state)
                if front is None:
                    return
                try:
                    await _proxy_to_backend(front, listener, state, connect)
                finally:
                    if front.stream is not stream:
                        await front.stream.aclose()
    finally:
        _write_access(listener, state, is_draining())


async def serve_socket(
    sock: socket.socket,
    listener: ListenerRuntime,
    client: str,
    connection_id: int,
    connect: Connector,
    is_draining: Callable[[], bool],
    lot: ParkingLot,
) -> None:
    """Proxy one accepted socket: the plain-TCP fast path when it applies, else
    :func:`serve_connection` on a ``trio.SocketStream``.

    The fast path (``listener.direct``, decided once per runtime) is for plain
    listeners whose backends are IP literals or Unix sockets (nothing to resolve), with
    splice on, no backend TLS and the default connector: no stream wrappers, a raw
    non-blocking ``connect`` (:func:`~l4proxy.backends.connect_direct`), and a
    :class:`~l4proxy.splice.SpliceLink` whose second direction runs as a sibling task
    in the listener's nursery (``lot.nursery``), the last direction to end closing
    both sockets and writing the access line; while idle both ways, the link waits in
    the listener's :class:`~l4proxy.parking.ParkingLot` instead, without tasks. It
    keeps every behaviour of the general path (failover, timeouts, half-close,
    outcomes, the access line) at about half the CPU per connection
    (docs/performance.md).

    Resource handling:
        ``sock`` is closed on every path, cancellation included.
    """
    pool = listener.direct
    if pool is None:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        await serve_connection(stream, listener, client, connection_id, connect, is_draining)
        return
    assert listener.pipes is not None  # part of what "direct" means
    state = _Spliced(
        id=connection_id,
        client=client,
        started_wall=time.time(),
        started=trio.current_time(),
        runtime=listener,
        is_draining=is_draining,
    )
    listener.live.value += 1
    config = listener.config
    backend = None
    linked = False
    try:
        with _Contained(state, config.name):
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                backend, target = await connect_direct(pool, attempt_seconds=config.connect_timeout)
            except UpstreamConnectError as exc:
                state.fail("connect_failed", _attempts(exc))
                return
            state.backend = target.name
            link = SpliceLink(
                sock, backend, state, listener.pipes, config.idle_timeout, state.link_done, lot
            )
            lot.nursery.start_soon(link.run, False)
            linked = True
            await link.run(True)
    finally:
        if not linked:  # else the link's last direction finishes the connection
            sock.close()
            if backend is not None:
                backend.close()
            _write_access(listener, state, is_draining())


@attrs.define(slots=True, eq=False)
class _Spliced(_Connection):
    """A fast-path connection: its access line, and what its last direction needs to
    finish it (:meth:`link_done`, a bound method rather than a closure)."""

    runtime: ListenerRuntime = attrs.field(kw_only=True)
    is_draining: Callable[[], bool] = attrs.field(kw_only=True)

    def link_done(self, link: SpliceLink) -> None:
        """Close both sockets and write the access line; runs in a ``finally``."""
        if not link.closed:  # both directions have returned: nobody waits on them
            link.client.close()
            link.backend.close()
        if link.error is not None:
            _judge(link.error, self, self.runtime.config.name)
        else:
            self.outcome = link.outcome
        _write_access(self.runtime, self, self.is_draining())


def _attempts(exc: UpstreamConnectError) -> str:
    return "; ".join(f"{address}: {reason}" for address, reason in exc.attempts)


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception inside a group of exactly one (nested groups unwrapped), or the group."""
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
    return inner


def _judge(exc: Exception, state: _Connection, listener: str) -> None:
    """The outcome for an exception that ended a connection."""
    if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
        state.fail("error:reset", str(exc) or None)
    elif isinstance(exc, OSError):
        state.fail(
            f"error:{errno.errorcode.get(exc.errno or 0, 'os_error').lower()}",
            describe_os_error(exc),
        )
    elif isinstance(exc, L4ProxyError):
        state.fail("error:proxy", str(exc))
    else:
        LOGGER.exception(
            "connection %d from %s on listener %r failed unexpectedly", state.id, state.client, listener,
            exc_info=exc,
        )  # fmt: skip
        state.fail("error:internal", f"{type(exc).__name__}: {exc}")


async def _open_front(
    stream: trio.abc.Stream, listener: ListenerRuntime, state: _Connection
) -> _Front | None:
    """Route the connection; for TLS listeners read the ClientHello and maybe terminate.

    Returns ``None`` (with ``state`` saying why) when the connection ends here. The
    ClientHello and the handshake share one deadline: slowloris protection.
    """
    config = listener.config
    default = listener.router.match(None, ())
    if not config.inspects_tls:
        assert default is not None  # a plain listener always has a default pool
        return _Front(stream, default.pool)
    with trio.move_on_after(config.handshake_timeout):
        try:
            hello, peeked, in_socket = await _client_hello(stream)
        except ClientHelloError as exc:
            state.fail("bad_client_hello", str(exc))
            return None
        state.sni = hello.server_name
        state.alpn = ",".join(p.decode("ascii", "replace") for p in hello.alpn_protocols) or None
        route = listener.router.match(hello.server_name, hello.alpn_protocols)
        if route is None:
            state.fail(
                "no_route",
                f"no route for sni {hello.server_name!r} on listener {config.name!r}"
                if hello.server_name
                else f"no route for a ClientHello without sni on listener {config.name!r}",
            )
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                if in_socket:  # read what was only peeked: closing with unread bytes is a reset
                    await stream.receive_some(hello.size)
                if listener.server_tls is not None:  # RFC 6066 §3: a fatal unrecognized_name
                    await stream.send_all(ALERT_UNRECOGNIZED_NAME)
            return None
        if listener.server_tls is None:  # passthrough: replay only what was consumed
            return _Front(stream, route.pool, replay=peeked)
        tls = await _terminate(
            stream, peeked, in_socket, hello, route.alpn, listener.server_tls, state
        )
        return None if tls is None else _Front(tls, route.pool)
    state.fail(
        "handshake_timeout",
        f"no complete ClientHello and handshake within {config.handshake_timeout:g}s",
    )
    return None


async def _client_hello(stream: trio.abc.Stream) -> tuple[ClientHello, bytes, bool]:
    """The ClientHello, the bytes consumed to get it, and whether it is still in the socket.

    Fast path: most clients send the whole ClientHello in their first segment, so peek
    at it (``MSG_PEEK``) and leave it in the socket; then OpenSSL can read it itself
    and passthrough needs no replay. Anything else (a partial peek, a stream that is
    not a plain socket) falls back to reading and keeping the bytes.
    """
    if type(stream) is trio.SocketStream:
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
    hello, consumed = await read_client_hello(stream)
    return hello, consumed, False


async def read_client_hello(
    stream: trio.abc.ReceiveStream, *, limit: int = DEFAULT_LIMIT
) -> tuple[ClientHello, bytes]:
    """Read until a whole ClientHello arrived; return it and every byte read (to replay).

    Never reads more than ``limit`` bytes. Raises ``ClientHelloError`` for anything
    that is not a ClientHello, including EOF before a complete one.
    """
    buffer = bytearray()
    parse_at = 1  # parse only once a record can have completed: linear, not quadratic
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
    stream: trio.abc.Stream,
    peeked: bytes,
    in_socket: bool,
    hello: ClientHello,
    route_alpn: tuple[bytes, ...],
    server_tls: ServerTLS,
    state: _Connection,
) -> TLSStream | None:
    """The TLS handshake with the client, on the context for its SNI."""
    alpn = route_alpn or None
    if in_socket and isinstance(stream, trio.SocketStream):  # OpenSSL reads the socket itself
        tls: TLSStream = SocketTLSStream(
            stream, server_tls.connection(hello.server_name, alpn, sock=stream.socket)
        )
    else:
        tls = TLSStream(stream, server_tls.connection(hello.server_name, alpn), initial=peeked)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        state.fail("tls_handshake_failed", str(exc))
        await tls.aclose()
        return None
    state.tls_version, state.cipher, state.alpn = (
        tls.protocol_version,
        tls.cipher,
        tls.alpn_protocol,
    )
    if server_tls.verifies_clients:
        try:
            state.client_subject = server_tls.client_identity(tls.connection)
        except ClientCertificateRejected as exc:
            state.fail("client_cert_rejected", str(exc))
            await tls.aclose()
            return None
    return tls


async def _proxy_to_backend(
    front: _Front, listener: ListenerRuntime, state: _Connection, connect: Connector
) -> None:
    config = listener.config
    try:
        upstream, address = await connect_pool(
            front.pool, connect, attempt_seconds=config.connect_timeout
        )
    except UpstreamConnectError as exc:
        state.fail("connect_failed", _attempts(exc))
        return
    state.backend = str(address)
    async with upstream:
        back = upstream
        if listener.backend_tls is not None:
            secured = await _secure_backend(
                upstream, address, listener.backend_tls, config.handshake_timeout, state
            )
            if secured is None:
                return
            back = secured
        try:
            if front.replay:
                await back.send_all(front.replay)
                state.to_backend += len(front.replay)
            state.outcome = await pump(
                front.stream, back, state, idle_seconds=config.idle_timeout, pipes=listener.pipes
            )
        finally:
            if back is not upstream:
                await back.aclose()


async def _secure_backend(
    upstream: trio.abc.Stream,
    address: Address,
    backend_tls: BackendTLS,
    seconds: float,
    state: _Connection,
) -> TLSStream | None:
    """TLS to the backend, verified before any client byte goes to it."""
    host = address.host if isinstance(address, TCPAddress) else None
    connection, name = backend_tls.connection(host)
    tls = TLSStream(upstream, connection)
    with trio.move_on_after(seconds):
        try:
            await tls.do_handshake()
            backend_tls.verify(connection, name)
        except trio.BrokenResourceError as exc:
            state.fail("backend_tls_failed", str(exc))
            await tls.aclose()
            return None
        return tls
    state.fail("backend_tls_failed", f"backend handshake took longer than {seconds:g}s")
    await tls.aclose()
    return None
