"""The zero-copy pump: socket → pipe → socket with ``splice(2)``, driven by trio.

Theory of operation
-------------------
When both sides are plain sockets, the bytes never need to enter Python: each direction
moves up to :data:`PIPE_SIZE` bytes from the source socket into a pipe and from the pipe
into the destination socket, both with ``os.splice`` (``SPLICE_F_MOVE |
SPLICE_F_NONBLOCK``), so the kernel moves page references instead of copying through
user space. Python only drives the loop: try the syscall, and on ``EAGAIN`` (or after a
read shorter than the pipe) wait for the socket with ``trio.lowlevel.wait_readable`` /
``wait_writable``.

Pipes are borrowed from a :class:`PipePool` only while data is in flight and returned
empty, so an idle connection holds no pipe (two descriptors fewer per connection and
direction). The pipe is the only buffer: at most :data:`PIPE_SIZE` bytes per direction,
whatever the peers do — the same bound as the generic pump's chunk.

A :class:`SpliceLink` is one connection between two trio streams' sockets (the raw
fast path runs in the data core, :mod:`l4proxy.core`, instead): its two directions run
as two tasks of :func:`splice_pump`, each calling :meth:`SpliceLink.run`. A direction
that fails, or whose idle deadline passes, *closes both sockets* (``notify_closing``
first), which wakes the other direction wherever it waits, and every wait is followed
by a look at the link's ``closed`` flag, so a direction never touches a descriptor
number after the close (it may already belong to another connection).

Every behaviour of the generic pump holds and is tested against both: half-close (EOF
becomes ``shutdown(SHUT_WR)`` on the other socket, the other direction keeps flowing),
resets end both directions, the idle deadline moves with every chunk, byte counts are
exact, and cancellation is never swallowed.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import socket
from typing import TYPE_CHECKING, Literal, Protocol

import trio

from .record import data_phase_outcome

if TYPE_CHECKING:
    from collections.abc import Callable

    from .record import Counters, Outcome


class SpliceSocket(Protocol):
    """What splicing needs of a socket: a standard-library or a trio socket."""

    def fileno(self) -> int: ...

    def shutdown(self, how: int, /) -> None: ...

    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...

    def close(self) -> None: ...


LOGGER = logging.getLogger("l4proxy.splice")

#: Bytes moved per splice call, and the pipe's capacity (the most held in flight).
PIPE_SIZE = 256 * 1024
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0

AVAILABLE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")


#: A pipe from the pool: read end, write end, capacity (``PIPE_SIZE`` unless the
#: kernel refused to grow it).
Pipe = tuple[int, int, int]


class PipePool:
    """Empty pipes for splicing, reused across connections.

    Resource handling:
        Pipes come back only when empty (a pipe with bytes left in it is closed instead);
        at most ``keep`` idle pipes are kept open; :meth:`close` closes them all.
    """

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        self._idle: list[Pipe] = []
        self.in_use = 0  # pipes lent out right now: 0 whenever no bytes are in flight
        self.created = 0

    def acquire(self) -> Pipe:
        """An empty pipe: read end, write end, capacity in bytes.

        Raises ``OSError`` (e.g. ``EMFILE``) if a new one cannot be made.
        """
        if self._idle:
            self.in_use += 1
            return self._idle.pop()
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.in_use += 1
        self.created += 1
        try:
            size = fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # over fs.pipe-user-pages-soft: the kernel keeps a smaller one
            size = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
        return read_end, write_end, size

    def release(self, pipe: Pipe, *, empty: bool) -> None:
        self.in_use -= 1
        if empty and len(self._idle) < self.keep:
            self._idle.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        while self._idle:
            read_end, write_end, _ = self._idle.pop()
            os.close(read_end)
            os.close(write_end)


class _Broken(Exception):
    def __init__(self, side: Literal["client", "backend"]) -> None:
        self.side = side


async def splice_pump(
    client: SpliceSocket,
    backend: SpliceSocket,
    transfer: Counters,
    pool: PipePool,
    idle_seconds: float = 0.0,
) -> Outcome:
    """Move bytes both ways until both directions reached EOF, one side broke, or the
    link went idle; the same contract as :func:`l4proxy.pump.pump`.

    ``client`` and ``backend`` are connected, non-blocking sockets (here trio's, from
    ``SocketStream.socket``).

    Resource handling:
        Closes both sockets when a side failed or the link went idle (which is how the
        other direction is stopped); otherwise the caller closes them, which also sends
        the last FIN: the direction that ends second skips its ``shutdown``.
    """
    link = SpliceLink(client, backend, transfer, pool, idle_seconds)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.run, False)
        await link.run(True)
    if link.error is not None:
        raise link.error
    outcome = link.outcome
    assert outcome is not None  # both directions ran to their end
    return outcome


class SpliceLink:
    """Both directions of one spliced connection, and how they ended.

    Two tasks each call :meth:`run` (one per direction); the one that finishes second
    calls ``on_done(link)``, also when they were cancelled, so the owner can close the
    sockets and log the connection without a nursery of its own. ``on_done`` runs in a
    ``finally`` block: it must not await.
    """

    __slots__ = (
        "_on_done",
        "backend",
        "broken",
        "cancelled",
        "client",
        "closed",
        "error",
        "finished",
        "idle_deadline",
        "idle_expired",
        "idle_scopes",
        "idle_seconds",
        "pool",
        "running",
        "transfer",
    )

    def __init__(
        self,
        client: SpliceSocket,
        backend: SpliceSocket,
        transfer: Counters,
        pool: PipePool,
        idle_seconds: float = 0.0,
        on_done: Callable[[SpliceLink], None] | None = None,
    ) -> None:
        self.client, self.backend = client, backend
        self.transfer, self.pool, self.idle_seconds = transfer, pool, idle_seconds
        self._on_done = on_done
        self.idle_scopes: list[trio.CancelScope] = []
        self.idle_deadline = trio.current_time() + idle_seconds if idle_seconds > 0 else math.inf
        self.running = 2  # directions not yet returned
        self.finished = 0  # directions that reached EOF
        self.closed = False
        self.cancelled = False
        self.idle_expired = False
        self.broken: Literal["client", "backend"] | None = None
        self.error: Exception | None = None  # something unexpected ended it

    @property
    def outcome(self) -> Outcome | None:
        """How it ended; ``None`` while running or when cancelled."""
        return data_phase_outcome(self.broken, self.idle_expired, self.finished)

    def close(self) -> None:
        """Close both sockets, waking a direction that waits on either."""
        self.closed = True
        for sock in (self.client, self.backend):
            if sock.fileno() != -1:
                trio.lowlevel.notify_closing(sock)
                sock.close()

    async def run(self, to_backend: bool) -> None:
        """Move one direction until EOF, failure, idleness or cancellation.

        Error handling:
            Failures of either side end both directions and show in :attr:`outcome`;
            anything unexpected is kept in :attr:`error` (never raised: this may run
            in the listener's nursery, where it would end the listener). ``Cancelled``
            propagates.
        """
        scope = None
        try:
            if self.idle_seconds > 0:
                scope = trio.CancelScope(deadline=self.idle_deadline)
                self.idle_scopes.append(scope)
                with scope:
                    await self._move(to_backend)
                if scope.cancelled_caught:
                    self.idle_expired = True
                    self.close()
            else:  # no deadline to keep: no scope to enter (per-connection cost)
                await self._move(to_backend)
        except _Broken as failure:
            if self.broken is None and not self.closed:
                self.broken = failure.side
            self.close()
        except Exception as exc:
            if self.error is None:
                self.error = exc
            self.close()
        except BaseException:
            self.cancelled = True  # Cancelled: noted, and never swallowed
            raise
        finally:
            if scope is not None:
                self.idle_scopes.remove(scope)
            self.running -= 1
            if not self.running:
                self._done()

    def _done(self) -> None:
        if self._on_done is not None:
            try:
                self._on_done(self)
            except Exception:  # never into the listener's nursery
                LOGGER.exception("finishing a connection failed")

    async def _move(self, to_backend: bool) -> None:
        """The loop of one direction: splice in, splice out, wait; EOF passed on.

        After every wait it looks at ``closed`` (the other direction closed the
        sockets: the descriptor numbers may already be someone else's). Waits stay outside ``except`` blocks: a task waiting in
        one keeps the exception and its traceback alive, ~0.5 KiB per idle direction.
        A read shorter than the pipe has almost always emptied the socket, so the next
        read waits first instead of paying a syscall for EAGAIN (request/response
        traffic); if bytes are left (small segments can fill the pipe's slots first),
        trio's level-triggered wait returns at once: never a lost wake-up. Full reads go
        straight on, with a checkpoint every second chunk.
        """
        src, dst = (self.client, self.backend) if to_backend else (self.backend, self.client)
        src_side: Literal["client", "backend"] = "client" if to_backend else "backend"
        dst_side: Literal["client", "backend"] = "backend" if to_backend else "client"
        src_fd, dst_fd, pool = src.fileno(), dst.fileno(), self.pool
        wait_first = False
        chunks_without_wait = 0
        while True:
            if wait_first:
                chunks_without_wait = 0
                try:
                    await trio.lowlevel.wait_readable(src_fd)
                except trio.ClosedResourceError:
                    return  # closed by the other direction
                if self.closed:
                    return
            pipe = pool.acquire()
            in_pipe = _splice_in(src_fd, pipe, pool, src_side)
            if in_pipe <= 0:
                if in_pipe == 0:
                    break  # EOF
                wait_first = True
                continue
            wait_first = in_pipe < pipe[2]  # short of the real capacity, not the wish
            try:
                while in_pipe:
                    try:
                        moved = os.splice(pipe[0], dst_fd, in_pipe, flags=_FLAGS)
                    except BlockingIOError:
                        moved = -1
                    except OSError as exc:
                        raise _Broken(dst_side) from exc
                    if moved < 0:
                        chunks_without_wait = 0
                        try:
                            await trio.lowlevel.wait_writable(dst_fd)
                        except trio.ClosedResourceError:
                            return
                        if self.closed:
                            return
                        continue
                    in_pipe -= moved
                    self._moved(moved, to_backend)
            finally:
                pool.release(pipe, empty=in_pipe == 0)
            if not wait_first:
                chunks_without_wait += 1
                if chunks_without_wait > 1:  # a busy stream still lets others run
                    chunks_without_wait = 0
                    await trio.lowlevel.checkpoint()
                    if self.closed:
                        return
        self.finished += 1
        if self.finished == 1:  # the other way is still open: pass the EOF on
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError as exc:
                raise _Broken(dst_side) from exc

    def _moved(self, moved: int, to_backend: bool) -> None:
        """Count bytes that reached their destination and push the idle deadline."""
        if to_backend:
            self.transfer.to_backend += moved
        else:
            self.transfer.to_client += moved
        if self.idle_scopes:
            deadline = self.idle_deadline = trio.current_time() + self.idle_seconds
            for scope in self.idle_scopes:
                scope.deadline = deadline


def _splice_in(src_fd: int, pipe: Pipe, pool: PipePool, side: Literal["client", "backend"]) -> int:
    """Splice what ``src_fd`` has into ``pipe``: bytes moved, 0 at EOF, -1 for EAGAIN.

    When nothing was moved the pipe goes back to the pool (never held while waiting).
    Raises ``_Broken(side)`` on an error of the source.
    """
    try:
        in_pipe = os.splice(src_fd, pipe[1], pipe[2], flags=_FLAGS)
    except BlockingIOError:
        in_pipe = -1
    except OSError as exc:
        pool.release(pipe, empty=True)
        raise _Broken(side) from exc
    if in_pipe <= 0:
        pool.release(pipe, empty=True)
    return in_pipe
