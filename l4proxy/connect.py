"""Connecting to a backend: one attempt per backend, in the pool's order, with failover.

There is one failover loop, :func:`connect_with_failover`. Each attempt picks how to
connect:

* **A raw non-blocking socket** for a backend at an IP literal or a Unix socket path,
  when the proxy uses its default connector: one ``connect`` and, unless the kernel
  finished it inside that call (loopback), one wait for writability. No trio socket
  wrapper is made unless a later step needs a stream, so plain TCP can splice between
  the two raw sockets (docs/performance.md: half the CPU per connection of the stream
  path).
* **The connector** otherwise (:func:`dial_connector`): the default :func:`open_connection` for host names
  (resolution off the event loop, happy eyeballs), or the embedder's own (after Go
  tcpproxy's ``DialContext``).

Every failure of an attempt is an ``OSError`` (a timeout is ``TimeoutError``), so the
loop needs one ``except``.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attrs
import trio

from .addresses import Address, UnixAddress
from .eager import TooSlow, own_task, wait_socket
from .errors import UpstreamConnectError

if TYPE_CHECKING:
    from .balancing import BackendPool

#: Backends going down and up (passive and active health), one line per change.
HEALTH = logging.getLogger("l4proxy.health")

#: Connect failures that are this machine's, not the backend's: out of descriptors,
#: memory, buffers or local ports. They do not mark a backend down.
LOCAL_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}
)

#: How the proxy dials a backend; injectable, after Go tcpproxy's ``DialContext``.
Connector = Callable[[Address], Awaitable[trio.abc.Stream]]

#: What an attempt gives: a raw connected socket, or a stream from a connector.
Dialed = socket.socket | trio.abc.Stream


@attrs.frozen(slots=True, cache_hash=True)  # hashed 3 times per connection (pool counts)
class Target:
    """A backend as the dialer sees it, worked out once per pool (not per attempt).

    ``sockaddr`` is what a raw ``connect`` takes (an IP literal's ``(host, port)`` or a
    Unix path), or ``None`` for a host name, which only a connector can reach.
    """

    address: Address
    family: int = 0
    sockaddr: tuple[str, int] | str | None = None

    def __str__(self) -> str:
        return str(self.address)


def socket_address(address: Address) -> tuple[int, tuple[str, int] | str] | None:
    """The family and socket address to ``connect`` to, or ``None`` for a host name."""
    if isinstance(address, UnixAddress):
        return socket.AF_UNIX, address.path
    if address.host is None:
        return None
    try:
        version = ipaddress.ip_address(address.host).version
    except ValueError:
        return None
    return (socket.AF_INET if version == 4 else socket.AF_INET6), (address.host, address.port)


def target(address: Address) -> Target:
    found = socket_address(address)
    return Target(address) if found is None else Target(address, *found)


async def open_connection(address: Address, source: str | None = None) -> trio.abc.Stream:
    """The default connector, as a stream: TCP (names resolved off the event loop) or
    a Unix socket. The proxy itself reaches IP literals and Unix sockets with raw
    sockets (:func:`dial`) and calls this for host names. ``source``: the local
    address TCP connections are made from."""
    if isinstance(address, UnixAddress):
        return await trio.open_unix_socket(address.path)
    assert address.host is not None  # backends always have a host (config rule)
    return await trio.open_tcp_stream(address.host, address.port, local_address=source)


async def connect_with_failover(
    pool: BackendPool[Target],
    connect: Connector | None,
    *,
    attempt_seconds: float,
    source: str | None = None,
    client: int | None = None,
    skip: frozenset[Target] = frozenset(),
    report_success: bool = True,
) -> tuple[Dialed, Target]:
    """Connect to the first backend that accepts, trying each at most once.

    Args:
        pool: gives the order of this connection's attempts.
        client: the client's key, for pools balanced by ``source-hash``.
        skip: backends not to try (this connection tried them already).
        report_success: mark the backend that connected up; ``False`` when the caller
            does so only after a later step (backend TLS) worked too.
        connect: the embedder's connector, or ``None`` for the default.
        attempt_seconds: the most one attempt may take.
        source: the local address TCP connections are made from (``source_address``);
            an embedder's connector chooses its own.

    Returns:
        The connection (a raw non-blocking socket, ``TCP_NODELAY`` set on TCP, or a
        stream) and the backend it goes to.

    Error handling:
        A refusal, a resolution failure, a socket that cannot be made (``EMFILE``) or
        an attempt running out of time moves on to the next backend, and marks the
        one that failed down for its back-off (passive health, logged once per change
        on ``l4proxy.health``). When every backend failed, raises
        :class:`~l4proxy.errors.UpstreamConnectError` listing each and why; with no
        attempt at all when every backend was down already.
    """
    attempts: list[tuple[str, str]] = []
    now = trio.current_time() if pool.down else 0.0  # the clock only matters then
    for backend in pool.order(client, now):
        if backend in skip:
            continue
        try:
            dialed = await dial(backend, connect, attempt_seconds, source)
        except OSError as exc:
            reason = describe_os_error(exc)
            attempts.append((str(backend.address), reason))
            if exc.errno in LOCAL_ERRNOS:
                continue  # this machine's shortage, not the backend's fault
            backoff = pool.failed(backend, trio.current_time(), reason)
            if backoff is not None:
                HEALTH.warning(
                    "backend %s down: %s (left out for %gs)", backend.address, reason, backoff
                )
            continue
        if report_success and pool.down and pool.succeeded(backend):
            HEALTH.warning("backend %s up: connected", backend.address)
        return dialed, backend
    raise UpstreamConnectError(tuple(attempts))


async def dial(
    target: Target, connect: Connector | None, seconds: float, source: str | None = None
) -> Dialed:
    """One attempt, the cheapest way: a raw non-blocking socket for an IP address or
    a Unix path with the default connector, else through the connector. Raises
    ``OSError`` (``TimeoutError`` after ``seconds``)."""
    if connect is None and target.sockaddr is not None:
        return await _dial_socket(target, seconds, source)
    return await dial_connector(target, connect, seconds, source)


async def dial_connector(
    target: Target, connect: Connector | None, seconds: float, source: str | None = None
) -> Dialed:
    """One attempt through the connector (the default one for host names). Raises
    ``OSError`` (``TimeoutError`` after ``seconds``)."""
    await own_task()  # see eager.py
    with trio.move_on_after(seconds):
        if connect is not None:
            return await connect(target.address)
        return await open_connection(target.address, source)
    raise TimeoutError(f"timed out after {seconds:g}s")


#: Sockets are created non-blocking, so making one costs no extra syscall.
_NONBLOCKING_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
#: How often a connect to a Unix socket whose queue is full is tried again.
UNIX_RETRY_SECONDS = 0.01


async def _dial_socket(target: Target, seconds: float, source: str | None) -> socket.socket:
    """One attempt with a raw non-blocking socket (``TCP_NODELAY`` on TCP). Raises
    ``OSError`` (``TimeoutError`` after ``seconds``).

    On loopback and other local addresses the kernel finishes the handshake inside
    ``connect`` itself; one ``getpeername`` sees that and saves a wait (and a cancel
    scope). A Unix socket connects at once or fails at once, except when its
    listener's queue is full (``EAGAIN``): then it is tried again every 10 ms within
    the attempt's time, as a blocking ``connect`` would wait (the kernel has no "queue
    has room" event).
    """
    sockaddr = target.sockaddr
    assert sockaddr is not None
    sock = socket.socket(target.family, _NONBLOCKING_STREAM)
    try:
        if target.family == socket.AF_UNIX:
            failure = sock.connect_ex(sockaddr)
            if failure == errno.EAGAIN:
                await own_task()
                failure = -1
                with trio.move_on_after(seconds):
                    while (failure := sock.connect_ex(sockaddr)) == errno.EAGAIN:  # noqa: ASYNC110
                        await trio.sleep(UNIX_RETRY_SECONDS)
        else:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if source is not None:
                bind_source(sock, source)
            failure = sock.connect_ex(sockaddr)
            if failure == errno.EINPROGRESS:
                failure = 0 if _connected(sock) else -1
                if failure:  # in the data core when driven there (eager.py)
                    deadline = trio.current_time() + seconds
                    with contextlib.suppress(TooSlow):  # (failure stays -1: timed out)
                        await wait_socket(sock, writable=True, deadline=deadline)
                        failure = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except BaseException:
        sock.close()
        raise
    if failure:
        sock.close()
        if failure < 0 or failure == errno.EAGAIN:
            raise TimeoutError(f"timed out after {seconds:g}s")
        raise OSError(failure, os.strerror(failure))
    return sock


#: Linux's IP_BIND_ADDRESS_NO_PORT (not in Python 3.11's socket module): the port is
#: chosen at connect time, per destination, so binding a source address does not use
#: up ephemeral ports the way a bind to port 0 does.
_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def bind_source(sock: socket.socket, source: str) -> None:
    """Make ``sock``'s connections come from ``source`` (the kernel picks the port)."""
    with contextlib.suppress(OSError):  # an older kernel: a plain bind works too
        sock.setsockopt(socket.IPPROTO_IP, _BIND_ADDRESS_NO_PORT, 1)
    sock.bind((source, 0))


def check_source_address(source: str) -> None:
    """Raise ``OSError`` if ``source`` is not an address of this machine (start-up and
    reload check, so a typo fails once and clearly instead of every connection)."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((source, 0))


def _connected(sock: socket.socket) -> bool:
    """Whether a connect in progress already completed: on loopback and other local
    addresses the kernel finishes the handshake inside ``connect`` itself, and one
    ``getpeername`` saves a wait (and a cancel scope) per connection."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


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
