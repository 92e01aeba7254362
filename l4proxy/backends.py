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

import trio

from .addresses import Address, UnixAddress
from .errors import UpstreamConnectError

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


class BackendPool:
    """Round-robin over a listener's backends.

    Example:
        >>> pool = BackendPool(("a", "b", "c"))  # doctest: +SKIP
        >>> pool.order(), pool.order()  # ((a, b, c), (b, c, a))
    """

    __slots__ = ("_cursor", "backends")

    def __init__(self, backends: tuple[Address, ...]) -> None:
        if not backends:
            raise ValueError("a backend pool needs at least one backend")
        self.backends = backends
        self._cursor = 0

    def order(self) -> tuple[Address, ...]:
        """The backends in the order this connection should try them."""
        start = self._cursor
        self._cursor = (start + 1) % len(self.backends)
        if start == 0:
            return self.backends
        return self.backends[start:] + self.backends[:start]


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
