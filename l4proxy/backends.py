"""Backend pools: which backend to try next, and connecting with failover.

Selection is plain synchronous state (a round-robin cursor) owned by the running proxy,
not by the frozen config. Connecting tries each backend of the pool at most once per
client connection, in round-robin order starting at the cursor, each attempt bounded by
the listener's connect timeout.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import trio

from .addresses import Address, UnixAddress
from .errors import UpstreamConnectError

_T = TypeVar("_T")

#: How the proxy dials a backend; injectable, after Go tcpproxy's ``DialContext``.
Connector = Callable[[Address], Awaitable[trio.abc.Stream]]


async def open_connection(address: Address) -> trio.abc.Stream:
    """The default connector: TCP (names resolved off the event loop) or Unix socket.

    An IP literal is connected directly; only host names go through
    ``trio.open_tcp_stream`` (resolution in a thread, happy eyeballs), which costs
    several tasks per connection that a literal does not need.
    """
    if isinstance(address, UnixAddress):
        return await trio.open_unix_socket(address.path)
    assert address.host is not None  # backends always have a host (config rule)
    family = _literal_family(address.host)
    if family is None:
        return await trio.open_tcp_stream(address.host, address.port)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((address.host, address.port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


@functools.lru_cache(maxsize=1024)
def _literal_family(host: str) -> int | None:
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return None
    return socket.AF_INET if version == 4 else socket.AF_INET6


@attrs.frozen
class DirectTarget:
    """A backend at an IP literal or a Unix socket path, ready for a raw non-blocking
    ``connect``."""

    family: int
    sockaddr: tuple[str, int] | str
    name: str  # as the access log writes it


class BackendPool:
    """Round-robin over a listener's backends.

    ``direct`` holds, when every backend is an IP literal or a Unix socket, what a
    raw ``connect`` needs for each (see :func:`connect_direct`), worked out once here.

    Example:
        >>> pool = BackendPool(("a", "b", "c"))  # doctest: +SKIP
        >>> pool.order(), pool.order()  # ((a, b, c), (b, c, a))
    """

    __slots__ = ("_cursor", "backends", "direct")

    def __init__(self, backends: tuple[Address, ...]) -> None:
        if not backends:
            raise ValueError("a backend pool needs at least one backend")
        self.backends = backends
        self._cursor = 0
        targets = [_direct_target(address) for address in backends]
        self.direct: tuple[DirectTarget, ...] | None = (
            tuple(t for t in targets if t is not None) if None not in targets else None
        )

    def order(self) -> tuple[Address, ...]:
        """The backends in the order this connection should try them."""
        return self._rotate(self.backends)

    def direct_order(self) -> tuple[DirectTarget, ...]:
        """Like :meth:`order`, for pools with ``direct`` targets (same cursor)."""
        assert self.direct is not None
        return self._rotate(self.direct)

    def _rotate(self, items: tuple[_T, ...]) -> tuple[_T, ...]:
        start = self._cursor
        self._cursor = (start + 1) % len(items)
        return items if start == 0 else items[start:] + items[:start]


def _direct_target(address: Address) -> DirectTarget | None:
    if isinstance(address, UnixAddress):
        return DirectTarget(socket.AF_UNIX, address.path, str(address))
    if address.host is None:
        return None
    family = _literal_family(address.host)
    if family is None:
        return None
    return DirectTarget(family, (address.host, address.port), str(address))


async def connect_direct(
    pool: BackendPool, *, attempt_seconds: float
) -> tuple[socket.socket, DirectTarget]:
    """:func:`connect_pool` for a pool of IP literals and Unix sockets, without trio's
    socket wrappers.

    One non-blocking ``connect`` per attempt and a wait for writability: the fast
    path's way, a good deal cheaper per connection than a ``trio.SocketStream``. A Unix
    socket connects at once or fails at once, except when its listener's queue is
    full (``EAGAIN``): then the connect is retried every 10 ms within the attempt's
    time, as a blocking ``connect`` would wait.

    Returns:
        A connected non-blocking socket (``TCP_NODELAY`` set on TCP) and its target.

    Error handling:
        As :func:`connect_pool`: each backend at most once, then
        :class:`~l4proxy.errors.UpstreamConnectError` listing each and why.
    """
    attempts: list[tuple[str, str]] = []
    for target in pool.direct_order():
        try:
            sock = socket.socket(target.family, _NONBLOCKING_STREAM)
        except OSError as exc:  # e.g. EMFILE: this attempt failed, like connect_pool's
            attempts.append((target.name, describe_os_error(exc)))
            continue
        try:
            failure = await _connect(sock, target, attempt_seconds)
        except OSError as exc:  # raised rather than returned, e.g. a Unix path too long
            sock.close()
            attempts.append((target.name, describe_os_error(exc)))
            continue
        except BaseException:
            sock.close()
            raise
        if failure == 0:
            return sock, target
        sock.close()
        attempts.append(
            (
                target.name,
                f"timed out after {attempt_seconds:g}s"
                if failure < 0
                else os.strerror(failure).lower(),
            )
        )
    raise UpstreamConnectError(tuple(attempts))


#: TCP sockets are created non-blocking, so creating one costs no extra syscall.
_NONBLOCKING_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
#: How often a connect to a Unix socket whose queue is full is tried again.
UNIX_RETRY_SECONDS = 0.01


async def _connect(sock: socket.socket, target: DirectTarget, seconds: float) -> int:
    """One attempt: 0 when connected, an errno when refused, -1 when out of time."""
    if target.family == socket.AF_UNIX:
        assert isinstance(target.sockaddr, str)
        with trio.move_on_after(seconds):
            while (failure := sock.connect_ex(target.sockaddr)) == errno.EAGAIN:  # noqa: ASYNC110
                await trio.sleep(UNIX_RETRY_SECONDS)  # the kernel has no "queue has room" event
            return failure
        return -1
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    failure = sock.connect_ex(target.sockaddr)
    if failure != errno.EINPROGRESS:
        return failure
    if _connected(sock):
        return 0
    with trio.move_on_after(seconds):
        await trio.lowlevel.wait_writable(sock)
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    return -1


def _connected(sock: socket.socket) -> bool:
    """Whether a connect in progress already completed: on loopback and other local
    addresses the kernel finishes the handshake inside ``connect`` itself, and one
    ``getpeername`` saves a wait (and a cancel scope) per connection."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


async def connect_pool(
    pool: BackendPool, connect: Connector, *, attempt_seconds: float
) -> tuple[trio.abc.Stream, Address]:
    """Connect to the first backend that accepts, trying each at most once.

    Returns:
        The connected stream and the backend it goes to.

    Error handling:
        A refusal, a resolution failure or an attempt exceeding ``attempt_seconds`` moves
        on to the next backend. When every backend failed, raises
        :class:`~l4proxy.errors.UpstreamConnectError` listing each and why.
    """
    attempts: list[tuple[str, str]] = []
    for address in pool.order():
        with trio.move_on_after(attempt_seconds):
            try:
                return await connect(address), address
            except OSError as exc:
                attempts.append((str(address), describe_os_error(exc)))
                continue
        attempts.append((str(address), f"timed out after {attempt_seconds:g}s"))
    raise UpstreamConnectError(tuple(attempts))


def describe_os_error(exc: OSError) -> str:
    """A short, lowercase reason: 'connection refused', 'cannot resolve host', ..."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host ({exc.strerror or exc})"
    if exc.errno is not None and exc.errno in errno.errorcode:
        return os.strerror(exc.errno).lower()
    # trio.open_tcp_stream wraps per-address failures; report the first concrete one.
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        for inner in cause.exceptions:
            if isinstance(inner, OSError):
                return describe_os_error(inner)
    if isinstance(cause, OSError):
        return describe_os_error(cause)
    return str(exc).lower() or type(exc).__name__
