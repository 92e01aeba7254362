"""The zero-copy pump: socket → pipe → socket with ``splice(2)``, driven by trio.

Theory of operation
-------------------
When both sides are plain sockets, the bytes never need to enter Python: each direction
moves up to :data:`PIPE_SIZE` bytes from the source socket into a pipe and from the pipe
into the destination socket, both with ``os.splice`` (``SPLICE_F_MOVE |
SPLICE_F_NONBLOCK``), so the kernel moves page references instead of copying through
user space. Python only drives the loop: try the syscall, and on ``EAGAIN`` wait for the
socket with ``trio.lowlevel.wait_readable`` / ``wait_writable``.

Pipes are borrowed from a :class:`PipePool` only while data is in flight and returned
empty, so an idle connection holds no pipe (two descriptors fewer per connection and
direction). The pipe is the only buffer: at most :data:`PIPE_SIZE` bytes per direction,
whatever the peers do — the same bound as the generic pump's chunk.

Every behaviour of the generic pump holds and is tested against both: half-close (EOF
becomes ``shutdown(SHUT_WR)`` on the other socket, the other direction keeps flowing),
resets end both directions, the idle deadline moves with every chunk, byte counts are
exact, and cancellation is never swallowed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from typing import TYPE_CHECKING, Literal, Protocol

import attrs
import trio

if TYPE_CHECKING:
    from .pump import Outcome, Transfer


class SpliceSocket(Protocol):
    """What splicing needs of a socket: a standard-library or a trio socket."""

    def fileno(self) -> int: ...

    def shutdown(self, how: int, /) -> None: ...


#: Bytes moved per splice call, and the pipe's capacity (the most held in flight).
PIPE_SIZE = 256 * 1024
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0

AVAILABLE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")


class PipePool:
    """Empty pipes for splicing, reused across connections.

    Resource handling:
        Pipes come back only when empty (a pipe with bytes left in it is closed instead);
        at most ``keep`` idle pipes are kept open; :meth:`close` closes them all.
    """

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        self._idle: list[tuple[int, int]] = []
        self.in_use = 0  # pipes lent out right now: 0 whenever no bytes are in flight
        self.created = 0

    def acquire(self) -> tuple[int, int]:
        """An empty pipe. Raises ``OSError`` (e.g. ``EMFILE``) if a new one cannot be made."""
        if self._idle:
            self.in_use += 1
            return self._idle.pop()
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.in_use += 1
        self.created += 1
        with contextlib.suppress(OSError):  # keep the default (64 KiB) if the limit is lower
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        return read_end, write_end

    def release(self, pipe: tuple[int, int], *, empty: bool) -> None:
        self.in_use -= 1
        if empty and len(self._idle) < self.keep:
            self._idle.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        while self._idle:
            read_end, write_end = self._idle.pop()
            os.close(read_end)
            os.close(write_end)


class _Broken(Exception):
    def __init__(self, side: Literal["client", "backend"]) -> None:
        self.side = side


async def splice_pump(
    client: SpliceSocket,
    backend: SpliceSocket,
    transfer: Transfer,
    pool: PipePool,
    idle_seconds: float = 0.0,
) -> Outcome:
    """Move bytes both ways until both directions reached EOF, one side broke, or the
    link went idle; the same contract as :func:`l4proxy.pump.pump`.

    ``client`` and ``backend`` are connected, non-blocking sockets: the standard
    library's (the plain-TCP fast path) or trio's (``SocketStream.socket``).

    Resource handling:
        Closes neither socket; the caller must close both right after, which also sends
        the last FIN: the direction that ends second skips its ``shutdown``.
    """
    state = _State(transfer, pool, idle_seconds)
    if idle_seconds > 0:
        state.idle_scope = trio.CancelScope(deadline=trio.current_time() + idle_seconds)
        with state.idle_scope:
            await _both_ways(client, backend, state)
        if state.broken is None and state.idle_scope.cancelled_caught:
            return "idle_timeout"
    else:  # no deadline to keep: no scope to enter (per-connection cost)
        await _both_ways(client, backend, state)
    if state.broken is not None:
        return "error:client_reset" if state.broken == "client" else "error:backend_reset"
    return "ok"


async def _both_ways(client: SpliceSocket, backend: SpliceSocket, state: _State) -> None:
    async with trio.open_nursery() as nursery:
        state.both = nursery.cancel_scope
        # No closures: an idle connection keeps as few objects alive as possible.
        nursery.start_soon(_direction, backend, client, state, False)
        await _direction(client, backend, state, True)  # in this task: one task fewer


@attrs.define(slots=True, eq=False)
class _State:
    """What both directions of one connection share."""

    transfer: Transfer
    pool: PipePool
    idle_seconds: float
    idle_scope: trio.CancelScope | None = None
    both: trio.CancelScope | None = None
    broken: Literal["client", "backend"] | None = None
    finished: int = 0  # directions that reached EOF


async def _direction(src: SpliceSocket, dst: SpliceSocket, state: _State, to_backend: bool) -> None:
    src_fd, dst_fd = src.fileno(), dst.fileno()
    transfer, pool, idle_scope, idle_seconds = (
        state.transfer,
        state.pool,
        state.idle_scope,
        state.idle_seconds,
    )
    # Awaits stay outside ``except`` blocks: a task waiting inside one keeps the
    # exception and its traceback alive, ~0.5 KiB per idle direction.
    chunks_without_wait = 0
    try:
        while True:
            pipe = pool.acquire()
            try:
                in_pipe = os.splice(src_fd, pipe[1], PIPE_SIZE, flags=_FLAGS)
            except BlockingIOError:
                in_pipe = -1
            except OSError as exc:
                pool.release(pipe, empty=True)
                raise _Broken("client" if to_backend else "backend") from exc
            if in_pipe <= 0:
                pool.release(pipe, empty=True)  # never hold a pipe while waiting
                if in_pipe == 0:
                    break  # EOF
                chunks_without_wait = 0
                await trio.lowlevel.wait_readable(src_fd)
                continue
            try:
                while in_pipe:
                    try:
                        moved = os.splice(pipe[0], dst_fd, in_pipe, flags=_FLAGS)
                    except BlockingIOError:
                        moved = -1
                    except OSError as exc:
                        raise _Broken("backend" if to_backend else "client") from exc
                    if moved < 0:
                        chunks_without_wait = 0
                        await trio.lowlevel.wait_writable(dst_fd)
                        continue
                    in_pipe -= moved
                    if to_backend:
                        transfer.to_backend += moved
                    else:
                        transfer.to_client += moved
                    if idle_scope is not None:
                        idle_scope.deadline = trio.current_time() + idle_seconds
            finally:
                pool.release(pipe, empty=in_pipe == 0)
            chunks_without_wait += 1
            if chunks_without_wait > 1:  # a busy stream still lets others run
                chunks_without_wait = 0
                await trio.lowlevel.checkpoint()
        state.finished += 1
        if state.finished == 1:  # the other way is still open: pass the EOF on
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError as exc:
                raise _Broken("backend" if to_backend else "client") from exc
    except _Broken as failure:
        if state.broken is None:
            state.broken = failure.side
        assert state.both is not None
        state.both.cancel()
