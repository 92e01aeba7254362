"""The event-driven data phase: a listener's connections in one epoll, moved in callbacks.

Theory of operation
-------------------
Once set-up is done, a connection whose two ends are sockets (plain or TLS) needs no
task: a :class:`Core` (one per listener, a task in the listener's handler nursery) keeps both
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

What moves the bytes is :mod:`l4proxy.links`: a :class:`~l4proxy.links.Link` per
connection, with one flow per direction that splices (plain to plain) or copies through
the core's one scratch buffer (either side TLS: pyOpenSSL on the non-blocking socket),
and that, when its destination is full, keeps the rest, stops reading its source and
waits for the destination. The interest masks change only then, so a request/response
exchange costs no ``epoll_ctl`` at all. The idle timeout is a lazy heap: an event that
moves bytes just stores its time on its link; an expired heap entry whose link moved since is pushed
again at its new deadline.

Work per wake-up is bounded (:data:`MAX_EVENTS` events, each a bounded number of
chunks), so accept loops, set-up tasks and timers keep running under load. A failure
handling one link ends that link only (logged); a failure of the core itself (its
epoll) ends its links, and the listener goes on with new connections on the copy
loop (:meth:`add` says no) — never the process.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import select

import trio

from .eager import SocketWait, end_parked, move_parked, resume
from .links import COPY_SIZE, SHUTTING, Broken, Link, flush, read
from .record import Ended, Outcome

__all__ = ["Core", "Link"]

LOGGER = logging.getLogger("l4proxy.core")

#: Events taken from the core's epoll per wake-up: bounded work between checkpoints.
MAX_EVENTS = 128
#: Idle-timer entries of ended links tolerated before the heap is rebuilt without them.
TIMERS_SLACK = 64

_IN = select.EPOLLIN
_GONE = select.EPOLLERR | select.EPOLLHUP
_UNWATCHED = -1  # a mask for a socket taken out of the epoll after a hang-up


class Core:
    """A listener's links and the task that moves their bytes (:meth:`run`).

    Args:
        nursery: the listener's handler nursery (where connection tasks run).
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.links: dict[int, Link] = {}  # by descriptor, both of each link
        #: Set-ups waiting for a socket (:func:`l4proxy.eager.wait_socket`), by descriptor.
        self.parked: dict[int, SocketWait] = {}
        self.draining = False
        self.failed = False  # the epoll failed: take no more links
        self._epoll = select.epoll()
        self._now = 0.0
        #: Idle deadlines of links (lazy) and deadlines of parked set-ups.
        self._timers: list[tuple[float, int, Link | SocketWait]] = []
        self._tokens = itertools.count()
        self._wake: trio.CancelScope | None = None
        #: The copy flows' one read buffer (they keep only what a destination refused).
        self._scratch = memoryview(bytearray(COPY_SIZE))

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
            moves its bytes on the copy loop. Later failures end this link only.
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
            self._add_timer(now + link.idle_seconds, link)
        self._dispatch(link, client, _IN)
        tls = link.backend_tls
        if tls is not None and not link.closed and tls.pending():  # decrypted in set-up
            self._dispatch(link, backend, _IN)
        return True

    def park(self, wait: SocketWait) -> bool:
        """Watch a set-up's socket for it (:class:`l4proxy.eager.Host`): resume it when
        the socket is ready or its deadline passed. ``False`` if the core cannot (it
        failed, or the descriptor is watched already): the set-up gets a task."""
        fd = wait.fd
        if self.failed or fd in self.parked or fd in self.links:
            return False
        try:
            self._epoll.register(fd, wait.events)
        except OSError:
            return False
        self.parked[fd] = wait
        if wait.deadline < math.inf:
            self._add_timer(wait.deadline, wait)
        return True

    def _add_timer(self, deadline: float, item: Link | SocketWait) -> None:
        timers = self._timers
        if len(timers) > 2 * (len(self.links) + len(self.parked)) + TIMERS_SLACK:
            self._timers = timers = [entry for entry in timers if not entry[2].closed]
            heapq.heapify(timers)
        heapq.heappush(timers, (deadline, next(self._tokens), item))
        wake = self._wake
        if wake is not None and deadline < wake.deadline:
            wake.deadline = deadline

    def _unpark(self, wait: SocketWait) -> None:
        del self.parked[wait.fd]
        wait.closed = True
        with contextlib.suppress(OSError):  # (the set-up's socket: it has not closed it)
            self._epoll.unregister(wait.fd)

    def _resume(self, wait: SocketWait, timed_out: bool) -> None:
        """Drive an unparked set-up on (it may hand its sockets over to this core, or
        park again); a failure costs it only."""
        try:
            resume(self, wait, timed_out)
        except Exception:  # never into the core's loop
            LOGGER.exception("a connection's set-up failed")

    def stop(self) -> None:
        """The listener drains: :meth:`run` returns once the last link has ended."""
        self.draining = True
        if not self.links and not self.parked and self._wake is not None:
            self._wake.cancel()

    async def run(self) -> None:
        """Move bytes until the listener drained and no link is left; see the module.

        Cancelled (the drain deadline), it cuts every parked set-up and link first.

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
            try:
                self._end_parked(cancelled=failure is None)
            finally:
                self._close_all(failure)

    def _end_parked(self, *, cancelled: bool) -> None:
        """The set-ups still parked: cut (the drain's deadline or a cancellation: each
        logged as drained or cancelled), or, when the core failed, moved into tasks
        of their own (woken once for nothing, they try again and wait in trio)."""
        for wait in list(self.parked.values()):
            self._unpark(wait)
            try:
                if cancelled:
                    end_parked(wait)
                else:
                    move_parked(self, wait)
            except Exception:
                LOGGER.exception("ending a connection's set-up failed")

    def _close_all(self, failure: Exception | None) -> None:
        try:
            for link in set(self.links.values()):
                if failure is not None and link.error is None:
                    link.error = Ended(Outcome.INTERNAL_ERROR, f"data core failed: {failure!r}")
                self._close(link)
        finally:
            self._epoll.close()

    async def _run(self) -> None:
        """One cancel scope per timer that fires, not per wake-up: entering a scope and
        registering its deadline is most of a wake-up's cost in trio. The scope's
        deadline follows the earliest idle timer; when it passes, the wait is
        cancelled, the timers run and a new scope starts."""
        links, parked = self.links, self.parked
        while not (self.draining and not links and not parked):
            timers = self._timers  # add() may rebuild it
            with trio.CancelScope(deadline=timers[0][0] if timers else math.inf) as wake:
                self._wake = wake
                while True:
                    await trio.lowlevel.wait_readable(self._epoll)
                    self._tick()
                    if self.draining and not links and not parked:
                        return
                    timers = self._timers
                    deadline = timers[0][0] if timers else math.inf
                    if deadline != wake.deadline:
                        wake.deadline = deadline
            self._wake = None
            self._tick()  # the deadline passed (or stop() woke it): the timers

    def _tick(self) -> None:
        """Dispatch what the epoll has ready (at most :data:`MAX_EVENTS`), then expire
        idle links whose timer is due."""
        links, dispatch, parked = self.links, self._dispatch, self.parked
        self._now = now = trio.current_time()
        ready: list[SocketWait] | None = None
        for fd, events in self._epoll.poll(0, MAX_EVENTS):
            link = links.get(fd)
            if link is not None:
                dispatch(link, fd, events)
            elif fd in parked:  # driven on after this batch: a set-up may take over a
                wait = parked[fd]  # descriptor that a later, stale event still names
                self._unpark(wait)
                if ready is None:
                    ready = []
                ready.append(wait)
            # else: ended by an earlier event of this batch
        if ready is not None:
            for wait in ready:
                self._resume(wait, False)
        while self._timers and self._timers[0][0] <= now:  # (park() may rebuild the heap)
            _, _, item = heapq.heappop(self._timers)
            if item.closed:
                continue
            if isinstance(item, SocketWait):
                self._unpark(item)
                self._resume(item, True)
                continue
            due = item.seen + item.idle_seconds
            if due > now:  # moved since: wait again from its last move
                heapq.heappush(self._timers, (due, next(self._tokens), item))
            else:
                item.idle_expired = True
                self._close(item)

    def _dispatch(self, link: Link, fd: int, events: int) -> None:
        """What ``events`` on ``fd`` mean for ``link``: read, write, or a hang-up."""
        try:
            transfer = link.transfer  # the idle clock moves with bytes, not with events
            moved = transfer.to_backend + transfer.to_client
            up, down = link.up, link.down
            if fd == up.src:  # the client's socket
                reading, writing = up, down
            else:
                reading, writing = down, up
            acted = False
            if events & (reading.src_wait | _GONE) and not (reading.eof or reading.pending):
                acted = True
                read(link, reading, self._scratch)
            if events & (writing.dst_wait | _GONE) and (
                writing.pending or writing.shut == SHUTTING
            ):
                acted = True
                flush(link, writing, self._scratch)
            if link.finished == 2 and not (up.pending or down.pending):
                self._close(link)  # its close sends the last FIN
                return
            if transfer.to_backend + transfer.to_client != moved:
                link.seen = self._now
            if not acted and events & _GONE:  # on a socket nobody reads or writes now
                if events & select.EPOLLERR:
                    raise Broken(reading.src_side)
                # A hang-up (a Unix socket's peer closed): reported while registered,
                # whatever the mask, so unregister; a later write to it fails for real.
                self._epoll.unregister(fd)
                if fd == up.src:
                    link.cmask = _UNWATCHED
                else:
                    link.bmask = _UNWATCHED
                return
            # Interest follows the flows: a source unless its flow holds bytes or ended;
            # a destination while its flow holds bytes or an EOF to pass on.
            cmask = (0 if up.eof or up.pending else up.src_wait) | (
                down.dst_wait if down.pending or down.shut == SHUTTING else 0
            )
            bmask = (0 if down.eof or down.pending else down.src_wait) | (
                up.dst_wait if up.pending or up.shut == SHUTTING else 0
            )
            if cmask != link.cmask:
                link.cmask = self._watch(up.src, cmask, link.cmask)
            if bmask != link.bmask:
                link.bmask = self._watch(down.src, bmask, link.bmask)
        except Broken as failure:
            if link.broken is None:
                link.broken = failure.side
            self._close(link)
        except Exception as exc:  # this link only, never the core
            if link.error is None:
                link.error = exc
            self._close(link)

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
            if flow.pipe is not None and link.pool is not None:
                link.pool.release(flow.pipe, empty=False)
                flow.pipe = None
            flow.data = None
        try:
            link.say_goodbye()
        finally:
            link.client.close()
            link.backend.close()
        try:
            link.on_done(link)
        except Exception:  # never into the core's loop
            LOGGER.exception("finishing a connection failed")
        if self.draining and not links and not self.parked and self._wake is not None:
            self._wake.cancel()
