"""One connection's state: its two ends, its record, how it is closed, judged and logged.

:class:`Connection` is what the set-up steps (:mod:`l4proxy.pipeline`,
:mod:`l4proxy.tlsfront`) build up and what the data phase is handed; :func:`finish` is
the one place an access line is written, and the connection as a context manager
(with :func:`judge`) turns whatever ended it into its outcome.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from typing import TYPE_CHECKING

import trio
from OpenSSL import SSL

from .connect import describe_os_error
from .eager import own_task
from .errors import L4ProxyError
from .record import ConnectionRecord, Ended, Outcome
from .rejections import RejectionLog
from .sessions import SessionTable
from .tls.streams import SocketTLSStream, TLSStream

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from .addresses import Address
    from .balancing import BackendPool
    from .connect import Connector, Dialed, Target
    from .core import Link
    from .runtime import ListenerRuntime

LOGGER = logging.getLogger("l4proxy.connection")

#: ``OSError``s that mean "out of a resource", outcome ``error:resources``.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class Shared:
    """What every connection of one :class:`~l4proxy.Proxy` uses."""

    __slots__ = (
        "connect",
        "ids",
        "is_draining",
        "max_open",
        "open",
        "rejections",
        "sessions",
    )

    def __init__(
        self, connect: Connector | None, ids: Iterator[int], is_draining: Callable[[str], bool]
    ) -> None:
        self.connect = connect  # None: the default (raw sockets where they can be used)
        self.ids = ids
        self.is_draining = is_draining
        #: Session keys (PostgreSQL's BackendKeyData) of live connections: cancel routing.
        self.sessions: SessionTable[Connection] = SessionTable()
        #: Connections the admit step refused: counts, and which get an access line.
        self.rejections = RejectionLog()
        #: Connections open in the whole proxy, and its limit (top-level max_connections).
        self.open = 0
        self.max_open: int | None = None


class Connection:
    """One connection's two ends as the steps build them, and its record.

    ``client`` starts as the accepted socket (or the embedder's stream) and becomes a
    ``trio.SocketStream`` and a TLS stream as steps need them; ``backend`` likewise
    from the connect step on. Each side is only ever its outermost object: closing it
    closes what is beneath.

    It is also the context its steps run in: whatever ends the connection costs that
    connection only. :class:`~l4proxy.record.Ended` and other exceptions become its
    outcome (unexpected ones are logged with a traceback); ``Cancelled`` passes.
    """

    __slots__ = (
        "backend",
        "client",
        "client_key",
        "client_tls",
        "counted",
        "proxied_local",
        "record",
        "replay",
        "runtime",
        "session_key",
        "session_peer",
        "shared",
        "target",
    )

    def __init__(
        self,
        client: Dialed,
        record: ConnectionRecord,
        runtime: ListenerRuntime,
        shared: Shared,
    ) -> None:
        self.client: Dialed = client
        #: The client's TLS when OpenSSL drives the accepted socket itself (the fast
        #: path of step 6: ``client`` stays the raw socket; the data core takes both).
        self.client_tls: SSL.Connection | None = None
        self.backend: Dialed | None = None
        self.target: Target | None = None  # the backend of the pool it connected to
        self.replay = b""  # passthrough: what was read of the ClientHello, for the backend
        self.session_key: bytes | None = None  # in shared.sessions while the connection lives
        self.client_key: int | None = None  # counted in runtime.live.clients while it lives
        #: The pool this connection is counted open at, for its ``target`` (no tuple:
        #: one per connection would be an allocation on the hot path).
        self.counted: BackendPool[Target] | None = None
        #: The address the client connected to, as a trusted PROXY header gave it.
        self.proxied_local: Address | None = None
        #: The backend's own address when the key was noted (family, (host, port)): what
        #: a cancel for this session dials, even if the configured name resolves anew.
        self.session_peer: tuple[int, tuple[str, int]] | None = None
        self.record = record
        self.runtime = runtime
        self.shared = shared

    def client_stream(self) -> trio.abc.Stream:
        """The client as a trio stream (wrapping the accepted socket once, with its
        TLS if OpenSSL drives it)."""
        if isinstance(self.client, socket.socket):
            stream = socket_stream(self.client)
            tls, self.client_tls = self.client_tls, None
            self.client = stream if tls is None else SocketTLSStream(stream, tls)
        return self.client

    def backend_stream(self) -> trio.abc.Stream:
        assert self.backend is not None
        if isinstance(self.backend, socket.socket):
            self.backend = socket_stream(self.backend)
        return self.backend

    async def aclose(self) -> None:
        """Close both ends, the backend first; every one even when cancelled. A client
        whose TLS OpenSSL drives on the socket gets one close_notify attempt (never
        waiting), as the data core gives its links."""
        try:
            if self.backend is not None:
                await _close(self.backend)
        finally:
            tls, self.client_tls = self.client_tls, None
            if tls is not None:
                with contextlib.suppress(SSL.Error):
                    tls.shutdown()
            await _close(self.client)

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
        if self.record.outcome is None:
            judge(exc, self.record)
        else:  # it had ended already (closing failed): the first outcome stands
            LOGGER.warning(
                "connection %d on listener %r: closing failed: %s: %s",
                self.record.id, self.record.listener, type(exc).__name__, exc,
            )  # fmt: skip
        return True

    def link_done(self, link: Link) -> None:
        """The data core ended this connection's :class:`~l4proxy.core.Link` (both
        sockets closed): judge and log. Never awaits."""
        if link.error is not None:
            judge(link.error, self.record)
        else:
            self.record.outcome = link.outcome
        finish(self)


def finish(connection: Connection) -> None:
    """Step 10, the one place an access line is written."""
    runtime, record = connection.runtime, connection.record
    runtime.live.value -= 1
    connection.shared.open -= 1
    if connection.client_key is not None:
        runtime.live.clients.release(
            connection.client_key, trio.current_time(), runtime.config.rate_per_ip
        )
    pool, target = connection.counted, connection.target
    if pool is not None and target is not None:
        pool.closed(target)
    if connection.session_key is not None:
        connection.shared.sessions.discard(connection.session_key, connection)
    if record.outcome is None:
        record.outcome = (
            Outcome.DRAINED
            if connection.shared.is_draining(runtime.config.name)
            else Outcome.CANCELLED
        )
    record.duration = trio.current_time() - record.started
    runtime.live.tally.add(record)  # the metrics' counts: plain ints, no prometheus objects
    runtime.access_log.write(record, runtime.log_format)


def underlying_socket(side: object) -> socket.socket | trio.socket.SocketType | None:
    """The socket beneath one end (a raw socket, a trio socket stream, or our TLS stream
    over one); ``None`` for an embedder's other streams."""
    for _ in range(3):  # TLS over a socket stream over a socket, at the most
        if isinstance(side, trio.SocketStream):
            side = side.socket
        elif isinstance(side, TLSStream):
            side = side.transport
    return side if isinstance(side, (socket.socket, trio.socket.SocketType)) else None


def prepare_socket(sock: socket.socket, tcp: bool) -> None:
    """An accepted socket the steps use as it is: non-blocking, ``TCP_NODELAY``
    (``tcp``: the caller knows the family without asking the socket).

    Done before the backend connect rather than after it: the same two syscalls, but
    about 4 µs less system time per connection that way (benchmarks/profile_proxy.py,
    A/B, issue #8). A socket that a step wraps in a ``trio.SocketStream`` gets both
    from trio instead."""
    sock.setblocking(False)
    if tcp:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def socket_stream(sock: socket.socket) -> trio.SocketStream:
    """A raw socket as a trio stream (the inverse: :func:`~l4proxy.tls.streams.detach_socket`)."""
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def _close(side: Dialed) -> None:
    if isinstance(side, socket.socket):
        side.close()
    else:
        await own_task()  # closing a stream checkpoints
        await side.aclose()


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception inside a group of exactly one (nested groups unwrapped), or the group."""
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
    return inner


def judge(exc: Exception, record: ConnectionRecord) -> None:
    """The outcome for an exception that ended a connection."""
    if isinstance(exc, Ended):
        record.fail(exc.outcome, exc.error)
    elif isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
        record.fail(Outcome.RESET, str(exc) or None)
    elif isinstance(exc, OSError):
        name = errno.errorcode.get(exc.errno or 0)
        detail = describe_os_error(exc)
        record.fail(
            Outcome.OUT_OF_RESOURCES if exc.errno in RESOURCE_ERRNOS else Outcome.OS_ERROR,
            f"{name}: {detail}" if name else detail,
        )
    elif isinstance(exc, L4ProxyError):
        record.fail(Outcome.PROXY_ERROR, str(exc))
    else:
        LOGGER.exception(
            "connection %d from %s on listener %r failed unexpectedly",
            record.id, record.client or "-", record.listener, exc_info=exc,
        )  # fmt: skip
        record.fail(Outcome.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
