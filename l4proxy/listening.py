"""Listening sockets: binding every address of every listener (all or nothing), and
closing them again.

The sockets are plain non-blocking ``socket.socket`` objects: the accept loops
(``server.py``) call ``accept()`` on them directly, in batches.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from typing import TYPE_CHECKING

import trio

from .addresses import Address, TCPAddress, UnixAddress
from .errors import ListenError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from .config import ListenerConfig

#: Listen backlog; the kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 0xFFFF


class Listening:
    """One bound, listening socket, and for a Unix socket the file this process made.

    Attributes:
        sock: the non-blocking listening socket.
        address: the bound address (port 0 resolved to the real port).
        configured: the ``listen`` address it was bound for (a reload that keeps that
            address keeps this socket).
        occurrence: how many equal addresses come before that one in its listener's
            ``listen`` (``HOST:0`` twice is two ports).
        unix_file: ``(path, st_dev, st_ino)`` of the socket file created by this bind,
            so that closing removes that file and never one another process has bound
            at the same path since.
    """

    __slots__ = ("address", "configured", "occurrence", "sock", "unix_file")

    def __init__(
        self,
        sock: socket.socket,
        unix_file: tuple[str, int, int] | None = None,
        configured: Address | None = None,
        occurrence: int = 0,
    ) -> None:
        self.sock = sock
        self.unix_file = unix_file
        self.address = _bound_address(sock)
        self.configured = configured if configured is not None else self.address
        self.occurrence = occurrence

    def close(self) -> None:
        """Close now, synchronously: it runs in ``finally`` blocks while cancelled, where
        any checkpoint would raise before the remaining listeners were closed. An accept
        loop waiting on it wakes with ``ClosedResourceError`` and returns. A Unix
        socket's file is removed if it is still the one this bind created."""
        if self.sock.fileno() == -1:
            return
        ours = False
        if self.unix_file is not None:
            path, device, inode = self.unix_file
            self.unix_file = None
            # Compared while the socket still holds its inode, so that number cannot
            # have been given to a file someone else made since.
            try:
                now = os.lstat(path)
                ours = (now.st_dev, now.st_ino) == (device, inode)
            except OSError:
                pass  # already gone
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()
        if ours:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _bound_address(sock: socket.socket) -> Address:
    sockname = sock.getsockname()
    if isinstance(sockname, tuple):
        return TCPAddress(sockname[0], sockname[1])
    return UnixAddress(sockname if isinstance(sockname, str) else os.fsdecode(sockname))


async def bind_all(
    listeners: Iterable[ListenerConfig], *, reuse_port: bool = False
) -> list[tuple[str, list[Listening]]]:
    """Bind every address of every listener, or none: on failure, close what was bound.

    Error handling:
        Raises :class:`~l4proxy.errors.ListenError` naming the address and listener.
    """
    opened: list[tuple[str, list[Listening]]] = []
    try:
        for config in listeners:
            bound: list[Listening] = []
            opened.append((config.name, bound))
            for address, occurrence in zip(config.listen, occurrences(config.listen), strict=True):
                bound.extend(
                    await bind_address(
                        address, config.name, reuse_port=reuse_port, occurrence=occurrence
                    )
                )
    except BaseException:
        for _, bound in opened:
            for listening in bound:
                listening.close()
        raise
    return opened


def occurrences(listen: Sequence[Address]) -> list[int]:
    """For each address, how many equal ones come before it in ``listen``."""
    seen: dict[Address, int] = {}
    found = []
    for address in listen:
        found.append(seen.get(address, 0))
        seen[address] = found[-1] + 1
    return found


async def bind_address(
    address: Address, listener: str, *, reuse_port: bool = False, occurrence: int = 0
) -> list[Listening]:
    """The listening sockets for one ``listen`` address (a host name may give several).

    Error handling:
        Raises :class:`~l4proxy.errors.ListenError` naming the address and listener.
    """
    try:
        if isinstance(address, TCPAddress):
            socks = await _bind_tcp(address, reuse_port=reuse_port)
            return [Listening(sock, configured=address, occurrence=occurrence) for sock in socks]
        return [await _bind_unix(address)]
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ListenError(
            f"cannot listen on {address} (listener {listener!r}): {reason.lower()}"
        ) from exc


async def _bind_tcp(address: TCPAddress, *, reuse_port: bool) -> list[socket.socket]:
    """Like ``trio.open_tcp_listeners`` (every address the host resolves to; no host is
    every interface, IPv4 and IPv6), with plain non-blocking sockets for the accept
    loop, and ``SO_REUSEPORT`` when asked so several worker processes bind the same
    address and the kernel spreads new connections across them."""
    infos = await trio.socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[socket.socket] = []
    unsupported: list[OSError] = []
    try:
        for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, kind | socket.SOCK_NONBLOCK, proto)
            except OSError as exc:
                if exc.errno != errno.EAFNOSUPPORT:
                    raise
                unsupported.append(exc)
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                sock.listen(LISTEN_BACKLOG)
            except BaseException:
                sock.close()
                raise
            listeners.append(sock)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    if unsupported and not listeners:
        raise unsupported[0]
    return listeners


async def _bind_unix(address: UnixAddress) -> Listening:
    """Bind a Unix socket, replacing a stale socket file nobody listens on."""
    path = address.path
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        if await _unix_socket_in_use(path):
            raise OSError(errno.EADDRINUSE, "address already in use")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.bind(path)
        created = os.lstat(path)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return Listening(sock, (path, created.st_dev, created.st_ino), configured=address)


async def _unix_socket_in_use(path: str) -> bool:
    try:
        stream = await trio.open_unix_socket(path)
    except OSError:
        return False
    await stream.aclose()
    return True
