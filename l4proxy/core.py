"""The event-driven data phase: a listener's raw connections in one epoll, moved in callbacks.

Theory of operation
-------------------
Once set-up is done, a connection between two raw sockets needs no task: a
:class:`Core` (one per listener, a task in the listener's handler nursery) keeps both
sockets registered, level-triggered, in an ``epoll`` of its own for as long as the
connection lives, waits for that epoll's descriptor through trio
(``trio.lowlevel.wait_readable``), and on each wake-up moves bytes for every ready
connection in plain calls — HAProxy's model, inside trio. Compared with a task per
direction this saves, per message, the re-arming of trio's one-shot registration (two
``epoll_ctl``), a task switch each way and the coroutine frames; an idle connection
costs its :class:`Link`, its record and two sockets, and no wake-up at all.

Why one per listener: drain and cancellation stay the listener's. The core lives in the
listener's handler nursery, under its drain scope: when the drain deadline passes, the
core is cancelled with the connection tasks still in set-up, and cuts its links (each
logged as ``drained``); when the listener drains without a deadline, the core returns
once its last link ended.

Moving bytes (one :class:`Flow` per direction): ``splice(2)`` from the source socket
into a pipe and from the pipe into the destination, as many as :data:`CHUNKS_PER_EVENT`
full pipes per readiness (then the next connection gets its turn; level-triggered
epoll reports the rest at the next poll). Pipes come from the listener's
:class:`~l4proxy.splice.PipePool` and are held only while bytes are in flight. When
the destination takes only part of a pipe, the flow keeps the pipe (its bytes are the
direction's only buffer, at most :data:`~l4proxy.splice.PIPE_SIZE`), stops reading its
source and waits for the destination to be writable: the interest masks change only
then, so a request/response exchange costs no ``epoll_ctl`` at all.

EOF becomes ``shutdown(SHUT_WR)`` on the other socket, except for the direction that
ends second: the close that follows sends that FIN. A failing ``splice`` (or an error
or hang-up reported on a socket no flow is using) is a reset of that side and ends the
link. The idle timeout is a lazy heap: a message only stores the wake-up's time on its
link; an expired heap entry whose link moved since is pushed again at its new deadline.

Work per wake-up is bounded (:data:`MAX_EVENTS` events, each a bounded number of
chunks), so accept loops, set-up tasks and timers keep running under load. A failure
handling one link ends that link only (logged); a failure of the core itself (its
epoll) ends its links, and the listener goes on with new connections on the tasks'
path (:meth:`add` says no) — never the process.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import select
import socket
from typing import TYPE_CHECKING, Literal

import trio

from .record import Ended, Outcome, data_phase_outcome

if TYPE_CHECKING:
    from collections.abc import Callable

    from .record import Counters
    from .splice import Pipe, PipePool

LOGGER = logging.getLogger("l4proxy.core")

#: Events taken from the core's epoll per wake-up: bounded work between checkpoints.
MAX_EVENTS = 128
#: Full pipes moved per readiness of one socket before other connections get a turn.
CHUNKS_PER_EVENT = 4
#: Idle-timer entries of ended links tolerated before the heap is rebuilt without them.
TIMERS_SLACK = 64

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_GONE = select.EPOLLERR | select.EPOLLHUP
_UNWATCHED = -1  # a mask for a socket taken out of the epoll after a hang-up
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0

Side = Literal["client", "backend"]


class _Broken(Exception):
    """A side failed; raised inside a flow, caught by the core's dispatch."""

    def __init__(self, side: Side) -> None:
        self.side = side


class Flow:
    """One direction of a link: from ``src`` to ``dst``, and what is in flight."""

    __slots__ = ("dst", "dst_side", "eof", "pending", "pipe", "src", "src_side", "to_backend")

    def __init__(self, src: socket.socket, dst: socket.socket, to_backend: bool) -> None:
        self.src, self.dst = src.fileno(), dst.fileno()
        self.to_backend = to_backend
        self.src_side: Side = "client" if to_backend else "backend"
        self.dst_side: Side = "backend" if to_backend else "client"
        self.pipe: Pipe | None = None  # holds ``pending`` bytes the destination refused
        self.pending = 0
        self.eof = False


class Link:
    """One connection in the core: its two sockets, two flows and how it ended.

    ``on_done(link)`` is called once, after both sockets are closed: the owner judges
    :attr:`error` or :attr:`outcome` and writes the access line. It must not await.
    """

    __slots__ = (
        "backend",
        "bmask",
        "broken",
        "client",
        "closed",
        "cmask",
        "down",
        "error",
        "finished",
        "held",
        "idle_expired",
        "idle_seconds",
        "on_done",
        "pool",
        "seen",
        "transfer",
        "up",
    )

    def __init__(
        self,
        client: socket.socket,
        backend: socket.socket,
        transfer: Counters,
        pool: PipePool,
        idle_seconds: float,
        on_done: Callable[[Link], None],
        held: bool = False,
    ) -> None:
        self.client, self.backend, self.pool = client, backend, pool
        self.transfer, self.idle_seconds, self.on_done = transfer, idle_seconds, on_done
        #: The backend socket holds bytes sent with ``MSG_MORE`` (a PROXY header) for the
        #: first splice to carry; pushed out if the client has sent nothing yet.
        self.held = held
        self.up = Flow(client, backend, True)
        self.down = Flow(backend, client, False)
        self.cmask = self.bmask = _IN
        self.seen = 0.0  # trio time bytes last moved (the idle timeout's clock)
        self.finished = 0  # flows that reached EOF
        self.closed = False
        self.idle_expired = False
        self.broken: Side | None = None
        self.error: Exception | None = None  # something unexpected ended it

    @property
    def outcome(self) -> Outcome | None:
        """How it ended; ``None`` when it was cut (drain, cancellation)."""
        return data_phase_outcome(self.broken, self.idle_expired, self.finished)

    def push_held(self) -> None:
        """Send what the backend socket holds (``MSG_MORE``): setting ``TCP_NODELAY``
        pushes pending data out (tcp(7)), even when it is set already. Raises
        ``OSError`` as ``setsockopt`` does."""
        self.held = False
        self.backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Core:
    """A listener's links and the task that moves their bytes (:meth:`run`).

    Args:
        nursery: the listener's handler nursery (where connection tasks run).
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.links: dict[int, Link] = {}  # by descriptor, both of each link
        self.draining = False
        self.failed = False  # the epoll failed: take no more links
        self._epoll = select.epoll()
        self._now = 0.0
        self._timers: list[tuple[float, int, Link]] = []  # idle deadlines, lazy
        self._tokens = itertools.count()
        self._wake: trio.CancelScope | None = None

    @property
    def link_count(self) -> int:
        """Connections in the core now (each has two descriptors in :attr:`links`)."""
        return len(self.links) // 2

    def add(self, link: Link) -> bool:
        """Take ``link`` over: its sockets are the core's from now on (closed by it).

        Moves what the client sent already, so a request that came with the connection
        does not wait for the next wake-up.

        Error handling:
            ``False`` when the core cannot take it (it failed, or ``epoll_ctl`` refused,
            e.g. at ``fs.epoll.max_user_watches``): the caller keeps the connection and
            moves its bytes on the tasks' path. Later failures end this link only.
        """
        client, backend = link.up.src, link.down.src
        self._now = now = trio.current_time()
        link.seen = now
        if self.failed:
            return False
        try:
            self._epoll.register(client, _IN)
            try:
                self._epoll.register(backend, _IN)
            except OSError:
                self._epoll.unregister(client)
                raise
        except OSError:
            return False
        self.links[client] = self.links[backend] = link
        if link.idle_seconds > 0:
            deadline = now + link.idle_seconds
            timers = self._timers
            if len(timers) > 2 * len(self.links) + TIMERS_SLACK:  # (two fds per link)
                self._timers = timers = [entry for entry in timers if not entry[2].closed]
                heapq.heapify(timers)
            heapq.heappush(timers, (deadline, next(self._tokens), link))
            wake = self._wake
            if wake is not None and deadline < wake.deadline:
                wake.deadline = deadline
        self._dispatch(link, client, _IN)
        return True

    def stop(self) -> None:
        """The listener drains: :meth:`run` returns once the last link has ended."""
        self.draining = True
        if not self.links and self._wake is not None:
            self._wake.cancel()

    async def run(self) -> None:
        """Move bytes until the listener drained and no link is left; see the module.

        Cancelled (the drain deadline), it cuts every link first.

        Error handling:
            This task lives in the listener's nursery, so nothing may escape it but
            ``Cancelled``: a failure of the core itself ends its links (logged once).
        """
        failure: Exception | None = None
        try:
            await self._run()
        except Exception as exc:
            LOGGER.exception("the data core failed; its connections are closed")
            failure = exc
        finally:
            self.failed = True
            for link in set(self.links.values()):
                if failure is not None and link.error is None:
                    link.error = Ended(Outcome.INTERNAL_ERROR, f"data core failed: {failure!r}")
                self._close(link)
            self._epoll.close()

    async def _run(self) -> None:
        links = self.links
        dispatch = self._dispatch
        while not (self.draining and not links):
            timers = self._timers  # add() may rebuild it
            with trio.CancelScope(deadline=timers[0][0] if timers else math.inf) as self._wake:
                await trio.lowlevel.wait_readable(self._epoll)
            self._wake = None
            self._now = now = trio.current_time()
            for fd, events in self._epoll.poll(0, MAX_EVENTS):
                link = links.get(fd)
                if link is not None:  # else: ended by an earlier event of this batch
                    dispatch(link, fd, events)
            while timers and timers[0][0] <= now:
                _, _, link = heapq.heappop(timers)
                if link.closed:
                    continue
                due = link.seen + link.idle_seconds
                if due > now:  # moved since: wait again from its last move
                    heapq.heappush(timers, (due, next(self._tokens), link))
                else:
                    link.idle_expired = True
                    self._close(link)

    def _dispatch(self, link: Link, fd: int, events: int) -> None:
        """What ``events`` on ``fd`` mean for ``link``: read, write, or a hang-up."""
        try:
            up, down = link.up, link.down
            if fd == up.src:  # the client's socket
                reading, writing = up, down
            else:
                reading, writing = down, up
            acted = False
            if events & (_IN | _GONE) and not (reading.eof or reading.pending):
                acted = True
                self._read(link, reading)
            if events & (_OUT | _GONE) and writing.pending and not link.closed:
                acted = True
                self._flush(link, writing)
            if link.closed:
                return
            if not acted and events & _GONE:  # on a socket nobody reads or writes now
                if events & select.EPOLLERR:
                    raise _Broken(reading.src_side)
                # A hang-up (a Unix socket's peer closed): reported while registered,
                # whatever the mask, so unregister; a later write to it fails for real.
                self._epoll.unregister(fd)
                if fd == up.src:
                    link.cmask = _UNWATCHED
                else:
                    link.bmask = _UNWATCHED
                return
            self._update(link)
        except _Broken as failure:
            if link.broken is None:
                link.broken = failure.side
            self._close(link)
        except Exception as exc:  # this link only, never the core
            if link.error is None:
                link.error = exc
            self._close(link)

    def _read(self, link: Link, flow: Flow) -> None:
        """Splice what the source has on to the destination, up to the chunk budget."""
        pool, src = link.pool, flow.src
        for _ in range(CHUNKS_PER_EVENT):
            pipe = pool.acquire()
            try:
                in_pipe = os.splice(src, pipe[1], pipe[2], flags=_FLAGS)
            except BlockingIOError:
                pool.release(pipe, empty=True)
                if link.held and flow.to_backend:
                    try:
                        link.push_held()
                    except OSError as exc:
                        raise _Broken("backend") from exc
                return
            except OSError as exc:
                pool.release(pipe, empty=True)
                raise _Broken(flow.src_side) from exc
            if in_pipe == 0:
                pool.release(pipe, empty=True)
                self._eof(link, flow)
                return
            self._write(link, flow, pipe, in_pipe)
            if flow.pending or in_pipe < pipe[2]:
                return  # the destination is full, or the source (almost surely) empty

    def _write(self, link: Link, flow: Flow, pipe: Pipe, in_pipe: int) -> None:
        try:
            moved = os.splice(pipe[0], flow.dst, in_pipe, flags=_FLAGS)
        except BlockingIOError:
            moved = 0
        except OSError as exc:
            link.pool.release(pipe, empty=False)
            raise _Broken(flow.dst_side) from exc
        if moved:
            self._moved(link, flow, moved)
        if moved < in_pipe:  # keep the rest; read no more until it is out
            flow.pipe, flow.pending = pipe, in_pipe - moved
        else:
            link.pool.release(pipe, empty=True)

    def _flush(self, link: Link, flow: Flow) -> None:
        """The destination became writable: send what the flow holds, then read on."""
        pipe = flow.pipe
        assert pipe is not None
        try:
            moved = os.splice(pipe[0], flow.dst, flow.pending, flags=_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            raise _Broken(flow.dst_side) from exc
        self._moved(link, flow, moved)
        flow.pending -= moved
        if flow.pending:
            return
        flow.pipe = None
        link.pool.release(pipe, empty=True)
        self._read(link, flow)  # muted meanwhile: bytes are likely waiting

    def _moved(self, link: Link, flow: Flow, moved: int) -> None:
        if flow.to_backend:
            link.transfer.to_backend += moved
        else:
            link.transfer.to_client += moved
        link.seen = self._now

    def _eof(self, link: Link, flow: Flow) -> None:
        flow.eof = True
        link.finished += 1
        if link.finished == 2:
            self._close(link)  # its close sends the last FIN
            return
        try:
            (link.backend if flow.to_backend else link.client).shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise _Broken(flow.dst_side) from exc

    def _update(self, link: Link) -> None:
        """Interest follows the flows: read a source unless its flow holds bytes or saw
        EOF; watch a destination for writability while its flow holds bytes."""
        up, down = link.up, link.down
        cmask = (0 if up.eof or up.pending else _IN) | (_OUT if down.pending else 0)
        if cmask != link.cmask:
            link.cmask = self._watch(up.src, cmask, link.cmask)
        bmask = (0 if down.eof or down.pending else _IN) | (_OUT if up.pending else 0)
        if bmask != link.bmask:
            link.bmask = self._watch(down.src, bmask, link.bmask)

    def _watch(self, fd: int, mask: int, was: int) -> int:
        if was != _UNWATCHED:
            self._epoll.modify(fd, mask)
        elif mask:  # a flow needs it again: its hang-up will show in the flow's I/O
            self._epoll.register(fd, mask)
        else:
            return _UNWATCHED
        return mask

    def _close(self, link: Link) -> None:
        """End ``link``: close both sockets (which takes them out of the epoll), give
        back its pipes and hand it to its owner. Idempotent."""
        if link.closed:
            return
        link.closed = True
        links = self.links
        if links.get(link.up.src) is link:
            del links[link.up.src], links[link.down.src]
        for flow in (link.up, link.down):
            if flow.pipe is not None:
                link.pool.release(flow.pipe, empty=False)
                flow.pipe = None
        link.client.close()
        link.backend.close()
        try:
            link.on_done(link)
        except Exception:  # never into the core's loop
            LOGGER.exception("finishing a connection failed")
        if self.draining and not links and self._wake is not None:
            self._wake.cancel()
