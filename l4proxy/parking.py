"""Idle fast-path connections, held without tasks.

Theory of operation
-------------------
A spliced connection normally costs two trio tasks, each parked in ``wait_readable``
with its chain of coroutine frames: ~8.5 KiB of RSS per connection, 2.6 times what
HAProxy needs. Many real connections are idle nearly all the time (pooled
database connections, kept-alive clients), so a listener has one :class:`ParkingLot`:
a task of its own, in the listener's nursery, with one ``epoll`` instance of its own.

- A :class:`~l4proxy.splice.SpliceLink` whose *both* directions wait to read tells the
  lot (:meth:`ParkingLot.both_reading`); a dict insert, nothing more.
- Every :data:`PARK_AFTER` seconds, while such links exist, the lot sweeps them: a link
  that has waited since before the previous sweep (so for at least ``PARK_AFTER``) is
  parked: the lot wakes both directions with ``notify_closing`` (which also takes the
  sockets out of trio's epoll), both tasks return, and the lot puts the two sockets in
  its own epoll. What stays is the link, its access-line record and two sockets:
  about 1.5 KiB of RSS.
- When either socket becomes readable (data, EOF, a reset), the lot takes both out of
  its epoll and spawns the two directions again; they go on exactly where they were
  (byte counts, idle deadline, half-close state).
- The idle timeout of a parked link is kept by the lot (a heap of deadlines); on drain
  the lot parks nothing more and returns once nothing is parked; when its nursery is
  cancelled it closes every parked link, which is logged like any cut connection.

So a connection is always owned by a task in the listener's nursery: its own two while
active, the lot's while parked.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import select
from typing import Protocol

import trio

from .record import Ended, Outcome

LOGGER = logging.getLogger("l4proxy.parking")


class _Socket(Protocol):
    def fileno(self) -> int: ...


class SpliceLink(Protocol):
    """What the lot needs of a link (:class:`l4proxy.splice.SpliceLink` is one); a
    protocol, so this module does not import the splice module that uses it."""

    @property
    def client(self) -> _Socket: ...

    @property
    def backend(self) -> _Socket: ...

    lot: ParkingLot | None
    park_token: int
    idle_seconds: float
    idle_deadline: float
    error: Exception | None

    def request_park(self) -> None: ...

    def resume(self, nursery: trio.Nursery) -> None: ...

    def expire(self) -> None: ...

    def cut(self) -> None: ...


#: Seconds a link must have waited (both ways) before it is parked: between this and
#: twice this, as sweeps run this often while links wait.
PARK_AFTER = 0.1
#: Stale idle deadlines (of links woken since) tolerated before the heap is rebuilt.
DEADLINES_SLACK = 64


class ParkingLot:
    """Holds idle links of one listener; :meth:`run` is its task.

    Args:
        nursery: where parked links' directions are spawned again (the listener's).
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        #: links whose both directions wait to read -> the sweep generation they began in
        self.waiting: dict[SpliceLink, int] = {}
        self.parked: dict[int, SpliceLink] = {}  # by descriptor, both of each link
        self.draining = False
        self._epoll = select.epoll()
        self._generation = 0
        self._sweep_at = math.inf
        self._deadlines: list[tuple[float, int, SpliceLink]] = []  # idle timeouts, lazy
        self._tokens = itertools.count()
        self._wake: trio.CancelScope | None = None
        self._closing = False

    @property
    def parked_links(self) -> int:
        """How many links are parked (each has two descriptors in :attr:`parked`)."""
        return len(self.parked) // 2

    def both_reading(self, link: SpliceLink) -> None:
        """``link`` waits to read both ways from now on (until it reads again)."""
        if self.draining:
            return  # parks nothing more
        self.waiting[link] = self._generation
        if self._sweep_at == math.inf:
            self._sweep_at = trio.current_time() + PARK_AFTER
            if self._wake is not None:
                self._wake.deadline = min(self._wake.deadline, self._sweep_at)

    def not_both_reading(self, link: SpliceLink) -> None:
        """One of ``link``'s directions stopped waiting to read."""
        self.waiting.pop(link, None)

    def stop_parking(self) -> None:
        """The listener drains: park nothing more; :meth:`run` returns once empty."""
        self.draining = True
        if self._wake is not None:
            self._wake.cancel()

    def park(self, link: SpliceLink) -> None:
        """Hold ``link``, whose directions have both returned, until it has work.

        Error handling:
            If the lot cannot take it (closing, or ``epoll_ctl`` fails, e.g. at
            ``fs.epoll.max_user_watches``), the link runs on unparked; after a failed
            ``epoll_ctl`` it is never asked to park again.
        """
        if self._closing:
            link.resume(self.nursery)
            return
        client, backend = link.client.fileno(), link.backend.fileno()
        try:
            self._epoll.register(client, select.EPOLLIN)
            try:
                self._epoll.register(backend, select.EPOLLIN)
            except OSError:
                self._epoll.unregister(client)
                raise
        except OSError:
            link.lot = None  # not again: each try costs two wake-ups and two new tasks
            link.resume(self.nursery)
            return
        self.parked[client] = self.parked[backend] = link
        if link.idle_seconds > 0:
            link.park_token = next(self._tokens)
            heapq.heappush(self._deadlines, (link.idle_deadline, link.park_token, link))
            if len(self._deadlines) > 2 * self.parked_links + DEADLINES_SLACK:
                self._compact_deadlines()
            if self._wake is not None:
                self._wake.deadline = min(self._wake.deadline, link.idle_deadline)

    def _compact_deadlines(self) -> None:
        """Drop the entries of links no longer parked (woken or finished since): the
        heap stays proportional to what is parked and holds no finished link."""
        self._deadlines = [entry for entry in self._deadlines if entry[2].park_token == entry[1]]
        heapq.heapify(self._deadlines)

    async def run(self) -> None:
        """Unpark links with work, park idle ones, expire idle timeouts; see the module.

        Returns when the listener drains and nothing is parked. Cancelled, it closes
        every parked link first (each is logged as cut).

        Error handling:
            This task lives in the listener's nursery, so nothing may escape it: a
            failure handling one link ends that link (logged), and a failure of the lot
            itself (its epoll) ends the links parked in it, after which the listener
            parks nothing more and goes on serving.
        """
        failure: Exception | None = None
        try:
            await self._run()
        except Exception as exc:
            LOGGER.exception("the parking lot failed; its parked connections are closed")
            failure = exc
        finally:
            self._closing = True
            for link in set(self.parked.values()):
                if failure is not None and link.error is None:
                    # What ended it (the traceback is above, once), not "cancelled".
                    link.error = Ended(Outcome.INTERNAL_ERROR, f"parking lot failed: {failure!r}")
                self._end(link, cut=True)
            self._epoll.close()

    async def _run(self) -> None:
        while not (self.draining and not self.parked):
            wake_at = self._sweep_at
            if self._deadlines:
                wake_at = min(wake_at, self._deadlines[0][0])
            with trio.CancelScope(deadline=wake_at) as self._wake:
                await trio.lowlevel.wait_readable(self._epoll)
            self._wake = None
            for fd, _ in self._epoll.poll(0):
                link = self.parked.get(fd)
                if link is not None:  # else: its other socket already woke it
                    self._end(link, cut=False)
            now = trio.current_time()
            if now >= self._sweep_at:
                self._sweep(now)
            while self._deadlines and self._deadlines[0][0] <= now:
                _, token, link = heapq.heappop(self._deadlines)
                if link.park_token == token and link.client.fileno() in self.parked:
                    self._end(link, cut=True, expired=True)

    def _end(self, link: SpliceLink, *, cut: bool, expired: bool = False) -> None:
        """Take ``link`` out of the lot and resume it, or cut it (``expired``: its idle
        timeout passed). A failure costs this link only."""
        try:
            self._unpark(link)
            if not cut:
                link.resume(self.nursery)
            elif expired:
                link.expire()
            else:
                link.cut()
        except Exception as exc:
            LOGGER.exception("a parked connection failed; closing it")
            if link.error is None:
                link.error = Ended(Outcome.INTERNAL_ERROR, f"parking failed: {exc!r}")
            if not cut:
                link.cut()

    def _sweep(self, now: float) -> None:
        if self.draining:  # nothing is parked any more: no reason to look again
            self.waiting.clear()
            self._sweep_at = math.inf
            return
        generation = self._generation
        self._generation += 1
        for link, since in list(self.waiting.items()):
            if since < generation:  # waiting since before the previous sweep
                del self.waiting[link]
                try:
                    link.request_park()
                except Exception:  # it runs on unparked, and is not asked again
                    LOGGER.exception("asking a connection to park failed")
                    link.lot = None
        self._sweep_at = now + PARK_AFTER if self.waiting else math.inf

    def _unpark(self, link: SpliceLink) -> None:
        link.park_token = -1
        for sock in (link.client, link.backend):
            fd = sock.fileno()
            if self.parked.pop(fd, None) is not None:
                with contextlib.suppress(OSError):  # not registered any more: nothing to undo
                    self._epoll.unregister(fd)
