"""Pipes for zero-copy ``splice(2)``: the data core's plain-to-plain flows use them.

Theory of operation
-------------------
When both sides of a flow are plain sockets, the bytes never need to enter Python: the
data core (:mod:`l4proxy.links`) moves up to :data:`PIPE_SIZE` bytes from the source
socket into a pipe and from the pipe into the destination socket, both with
``os.splice`` (``SPLICE_F_MOVE | SPLICE_F_NONBLOCK``), so the kernel moves page
references instead of copying through user space.

Pipes are borrowed from a :class:`PipePool` only while data is in flight and returned
empty, so an idle connection holds no pipe (two descriptors fewer per connection and
direction). The pipe is the only buffer: at most :data:`PIPE_SIZE` bytes per direction,
whatever the peers do: the same bound as a copy flow's and the copy loop's chunk.
"""

from __future__ import annotations

import fcntl
import os

#: Bytes moved per splice call, and the pipe's capacity (the most held in flight).
PIPE_SIZE = 256 * 1024

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
