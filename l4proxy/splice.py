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
from typing import TYPE_CHECKING, Literal

import attrs
import trio

if TYPE_CHECKING:
    from .pump import Transfer

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


async def splice_both_ways(
    client: trio.SocketStream,
    backend: trio.SocketStream,
    transfer: Transfer,
    pool: PipePool,
    idle_scope: trio.CancelScope,
    idle_seconds: float,
) -> Literal["client", "backend"] | None:
    """Move bytes both ways until both directions reached EOF or one side broke.

    Returns:
        ``None`` when both directions ended with EOF, else the side that failed.
    """
    async with trio.open_nursery() as nursery:
        state = _State(transfer, pool, idle_scope, idle_seconds, nursery.cancel_scope)
        # No closures: an idle connection keeps as few frames alive as possible.
        nursery.start_soon(_direction, backend, client, state, False)
        await _direction(client, backend, state, True)  # in this task: one task fewer
    return state.broken


@attrs.define(slots=True, eq=False)
class _State:
    """What both directions of one connection share."""

    transfer: Transfer
    pool: PipePool
    idle_scope: trio.CancelScope
    idle_seconds: float
    both: trio.CancelScope
    broken: Literal["client", "backend"] | None = None


async def _direction(
    src: trio.SocketStream, dst: trio.SocketStream, state: _State, to_backend: bool
) -> None:
    src_name: Literal["client", "backend"] = "client" if to_backend else "backend"
    dst_name: Literal["client", "backend"] = "backend" if to_backend else "client"
    src_fd, dst_fd = src.socket.fileno(), dst.socket.fileno()
    transfer, pool, idle_scope, idle_seconds = (
        state.transfer,
        state.pool,
        state.idle_scope,
        state.idle_seconds,
    )
    try:
        while True:
            pipe = pool.acquire()
            try:
                in_pipe = os.splice(src_fd, pipe[1], PIPE_SIZE, flags=_FLAGS)
            except BlockingIOError:
                pool.release(pipe, empty=True)  # never hold a pipe while waiting
                await trio.lowlevel.wait_readable(src.socket)
                continue
            except OSError as exc:
                pool.release(pipe, empty=True)
                raise _Broken(src_name) from exc
            if in_pipe == 0:
                pool.release(pipe, empty=True)
                break  # EOF
            try:
                while in_pipe:
                    try:
                        moved = os.splice(pipe[0], dst_fd, in_pipe, flags=_FLAGS)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(dst.socket)
                        continue
                    except OSError as exc:
                        raise _Broken(dst_name) from exc
                    in_pipe -= moved
                    if to_backend:
                        transfer.to_backend += moved
                    else:
                        transfer.to_client += moved
                    if idle_seconds:
                        idle_scope.deadline = trio.current_time() + idle_seconds
            finally:
                pool.release(pipe, empty=in_pipe == 0)
            await trio.lowlevel.checkpoint()  # fairness, and a cancellation point per chunk
        try:
            dst.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise _Broken(dst_name) from exc
        await trio.lowlevel.checkpoint()
    except _Broken as failure:
        if state.broken is None:
            state.broken = failure.side
        state.both.cancel()
