"""One connection in the data core: its two ends, a :class:`Flow` per direction, the moves.

Theory of operation
-------------------
A :class:`Link` is what the data core (:mod:`l4proxy.core`) keeps of a connection once
set-up is done: the client's and the backend's sockets, each with the
``SSL.Connection`` bound to it when that side speaks TLS (termination, backend TLS, or
both), and one :class:`Flow` per direction. The functions here move one flow's bytes
when the core says its source is readable (:func:`read`) or its destination writable
(:func:`flush`); they never wait and never close anything: they raise :class:`Broken`
naming the side that failed, and the core ends the link.

Two ways to move bytes:

* *copy*: read into the core's one scratch buffer (``recv_into``, or pyOpenSSL's
  ``recv_into``, one record at a time, several records per read), then ``send`` (or
  ``SSL_write``, partial writes on). An idle flow holds no buffer; only what the
  destination refused is kept, as a copy. Every flow with a TLS side copies, and so
  does a plain flow carrying small messages: for those ``recv``/``send`` cost less
  than two ``splice`` calls and a pipe from the pool (measured with
  benchmarks/profile_proxy.py, 10 kept-alive connections: 28.9 against 30.7 µs of
  proxy CPU per request, the difference all system time).
* *splice*, plain socket to plain socket, for bulk: ``splice(2)`` from the source into
  a pooled pipe and from the pipe into the destination; the bytes never enter Python.
  A plain flow switches to it after a read of at least :data:`SPLICE_FROM` bytes and
  back to copying after one under :data:`COPY_BELOW` (HAProxy's ``splice-auto`` idea:
  splice what is big), so a connection that alternates bulk and chatter pays the
  cheaper way for each.

Either way a flow holds at most one chunk (a pipe, at most
:data:`~l4proxy.splice.PIPE_SIZE`; or at most :data:`COPY_SIZE` bytes): when the
destination takes only part of it, the flow keeps the rest, stops reading its source
and waits for the destination (:attr:`Flow.pending`). OpenSSL may want the other
readiness than the obvious one (a read that must write a KeyUpdate reply, a write that
must read first): :attr:`Flow.src_wait` and :attr:`Flow.dst_wait` say which, and the
core's interest masks follow them.

EOF (a FIN, a close_notify, or a TLS peer's plain FIN) passes on once what the flow
holds is out: ``shutdown(SHUT_WR)`` on a plain destination, close_notify on a TLS one
(waiting for writability if the socket is full, never for the peer's answer). The
direction that ends second sends nothing here: closing the link sends its FIN (and,
for TLS, one close_notify attempt), as the streams did.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
from typing import TYPE_CHECKING, Literal

from OpenSSL import SSL

from .record import data_phase_outcome

if TYPE_CHECKING:
    from collections.abc import Callable

    from .record import Counters, Outcome
    from .splice import Pipe, PipePool

#: Chunks moved per readiness of one source (full pipes, or full scratch buffers)
#: before other connections get a turn.
CHUNKS_PER_EVENT = 4
#: The copy flows' scratch buffer (one per core): the most one read takes, and so the
#: most a copy flow keeps when its destination is full (as the streams' copy loop).
COPY_SIZE = 262144
#: The most plaintext one TLS record carries: what one TLS read is offered.
RECORD_SIZE = 16384
#: A plain flow splices from its next read on after a read at least this large ...
SPLICE_FROM = 65536
#: ... and copies again after a splice read smaller than this.
COPY_BELOW = 16384

IN = select.EPOLLIN
OUT = select.EPOLLOUT
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0

# Flow.shut: the EOF to pass on to the destination.
OPEN, SHUTTING, SHUT = 0, 1, 2

Side = Literal["client", "backend"]


class Broken(Exception):
    """A side failed; raised by a move, caught by the core's dispatch."""

    def __init__(self, side: Side) -> None:
        self.side = side


class Flow:
    """One direction of a link: from ``src`` to ``dst``, and what is in flight."""

    __slots__ = (
        "can_splice",
        "data",
        "dst",
        "dst_side",
        "dst_sock",
        "dst_tls",
        "dst_wait",
        "eof",
        "pending",
        "pipe",
        "shut",
        "splices",
        "src",
        "src_side",
        "src_sock",
        "src_tls",
        "src_wait",
        "to_backend",
    )

    def __init__(
        self,
        src: socket.socket,
        dst: socket.socket,
        src_tls: SSL.Connection | None,
        dst_tls: SSL.Connection | None,
        to_backend: bool,
        pipes: bool,
    ) -> None:
        self.src_sock, self.dst_sock = src, dst
        self.src, self.dst = src.fileno(), dst.fileno()
        self.src_tls, self.dst_tls = src_tls, dst_tls
        self.to_backend = to_backend
        self.can_splice = pipes and src_tls is None and dst_tls is None
        self.splices = False  # copy until a read says bulk (see the module)
        self.src_side: Side = "client" if to_backend else "backend"
        self.dst_side: Side = "backend" if to_backend else "client"
        self.pipe: Pipe | None = None  # splice: holds ``pending`` bytes the destination refused
        self.data: memoryview | None = None  # copy: the bytes the destination refused
        self.pending = 0
        self.eof = False  # the source ended: read no more
        self.shut = OPEN
        self.src_wait = IN  # what the source's socket must be for the next read
        self.dst_wait = OUT  # what the destination's must be for the next write


class Link:
    """One connection in the core: its two ends, two flows and how it ended.

    ``pool`` is the splice pipe pool (``None``: copy every flow). ``on_done(link)`` is
    called once, after both sockets are closed: the owner judges :attr:`error` or
    :attr:`outcome` and writes the access line. It must not await.
    """

    __slots__ = (
        "backend",
        "backend_tls",
        "bmask",
        "broken",
        "client",
        "client_tls",
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
        pool: PipePool | None,
        idle_seconds: float,
        on_done: Callable[[Link], None],
        held: bool = False,
        client_tls: SSL.Connection | None = None,
        backend_tls: SSL.Connection | None = None,
    ) -> None:
        self.client, self.backend, self.pool = client, backend, pool
        self.client_tls, self.backend_tls = client_tls, backend_tls
        self.transfer, self.idle_seconds, self.on_done = transfer, idle_seconds, on_done
        #: The backend socket holds bytes sent with ``MSG_MORE`` (a PROXY header) for the
        #: first write to carry; pushed out if the client has sent nothing yet.
        self.held = held
        pipes = pool is not None
        self.up = Flow(client, backend, client_tls, backend_tls, True, pipes)
        self.down = Flow(backend, client, backend_tls, client_tls, False, pipes)
        self.cmask = self.bmask = IN
        self.seen = 0.0  # trio time bytes last moved (the idle timeout's clock)
        self.finished = 0  # flows whose source ended
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

    def say_goodbye(self) -> None:
        """Before the sockets close: one close_notify attempt on each TLS side that has
        not had one and did not fail (never waits; a full socket skips it)."""
        for flow in (self.up, self.down):
            tls = flow.dst_tls
            if tls is not None and flow.shut != SHUT and self.broken != flow.dst_side:
                with contextlib.suppress(SSL.Error):
                    tls.shutdown()


# -- moving bytes: called by the core on readiness --


def read(link: Link, flow: Flow, scratch: memoryview) -> None:
    """The source is readable: move what it has on, up to the chunk budget."""
    if flow.splices:
        _splice_read(link, flow)
    else:
        _copy_read(link, flow, scratch)


def flush(link: Link, flow: Flow, scratch: memoryview) -> None:
    """The destination is writable: write what the flow holds, pass an EOF on, and
    read on (the source was muted meanwhile, so bytes are likely waiting)."""
    if flow.pending:
        if flow.pipe is not None:
            _splice_flush(link, flow)
        else:
            data = flow.data
            assert data is not None
            sent = _send(link, flow, data)
            flow.pending -= sent
            flow.data = data[sent:] if flow.pending else None
        if flow.pending:
            return
    if flow.shut == SHUTTING:
        _shut(flow)
        if flow.shut == SHUTTING:
            return
    if not flow.eof:
        read(link, flow, scratch)


def _splice_read(link: Link, flow: Flow) -> None:
    pool, src = link.pool, flow.src
    assert pool is not None
    for _ in range(CHUNKS_PER_EVENT):
        pipe = pool.acquire()
        try:
            in_pipe = os.splice(src, pipe[1], pipe[2], flags=_FLAGS)
        except BlockingIOError:
            pool.release(pipe, empty=True)
            if link.held and flow.to_backend:
                _push(link)
            return
        except OSError as exc:
            pool.release(pipe, empty=True)
            raise Broken(flow.src_side) from exc
        if in_pipe == 0:
            pool.release(pipe, empty=True)
            _end(link, flow)
            return
        _splice_write(link, flow, pipe, in_pipe)
        if in_pipe < COPY_BELOW:
            flow.splices = False  # small messages again: copy the next ones
        if flow.pending or in_pipe < pipe[2]:
            return  # the destination is full, or the source (almost surely) empty


def _splice_write(link: Link, flow: Flow, pipe: Pipe, in_pipe: int) -> None:
    pool = link.pool
    assert pool is not None
    try:
        moved = os.splice(pipe[0], flow.dst, in_pipe, flags=_FLAGS)
    except BlockingIOError:
        moved = 0
    except OSError as exc:
        pool.release(pipe, empty=False)
        raise Broken(flow.dst_side) from exc
    if moved:
        _count(link, flow, moved)
    if moved < in_pipe:  # keep the rest; read no more until it is out
        flow.pipe, flow.pending = pipe, in_pipe - moved
    else:
        pool.release(pipe, empty=True)


def _splice_flush(link: Link, flow: Flow) -> None:
    pipe, pool = flow.pipe, link.pool
    assert pipe is not None
    assert pool is not None
    try:
        moved = os.splice(pipe[0], flow.dst, flow.pending, flags=_FLAGS)
    except BlockingIOError:
        return
    except OSError as exc:
        raise Broken(flow.dst_side) from exc
    _count(link, flow, moved)
    flow.pending -= moved
    if not flow.pending:
        flow.pipe = None
        pool.release(pipe, empty=True)


def _copy_read(link: Link, flow: Flow, scratch: memoryview) -> None:
    tls = flow.src_tls
    for _ in range(CHUNKS_PER_EVENT):
        if tls is None:
            try:
                filled = flow.src_sock.recv_into(scratch)
            except BlockingIOError:
                filled = -1
            except OSError as exc:
                raise Broken(flow.src_side) from exc
            ended = filled == 0
            if filled >= SPLICE_FROM and flow.can_splice:
                flow.splices = True  # bulk: splice from the next read on
        else:
            filled, ended, failure = _tls_read(flow, tls, scratch)
            if failure is not None:
                if filled > 0:  # what came before the failure goes on first, as it can
                    _send(link, flow, scratch[:filled])
                raise Broken(flow.src_side) from failure
        if filled > 0:
            sent = _send(link, flow, scratch[:filled])
            if sent < filled:  # keep a copy of the rest; read no more until it is out
                flow.data = memoryview(bytes(scratch[sent:filled]))
                flow.pending = filled - sent
        if ended:
            _end(link, flow)
            return
        if filled <= 0:  # the source is empty
            if link.held and flow.to_backend:
                _push(link)
            return
        if flow.pending or flow.splices:
            return  # the destination is full, or bulk: splice from the next read on
        if filled < len(scratch) - (0 if tls is None else RECORD_SIZE - 1):
            return  # not a full buffer: the source is (almost surely) empty


def _tls_read(
    flow: Flow, tls: SSL.Connection, scratch: memoryview
) -> tuple[int, bool, SSL.Error | None]:
    """Decrypt records into ``scratch`` until OpenSSL wants more from the socket, a
    record comes short or the buffer cannot take another whole record: (bytes, whether
    the source ended, the error that broke it: the bytes before it are still passed
    on, as the copy loop did, record by record).

    A short record (a small message) almost always leaves the socket empty, so the
    read that would only raise ``WantReadError`` (a syscall and an exception) is
    skipped: if more is there, the level-triggered epoll says so. OpenSSL holds nothing
    back meanwhile: it reads one record at a time and a read is offered a whole one."""
    filled = 0
    room = len(scratch) - RECORD_SIZE
    while True:
        try:
            got = tls.recv_into(scratch[filled:], RECORD_SIZE)
        except SSL.WantReadError:
            flow.src_wait = IN
            return filled, False, None
        except SSL.WantWriteError:  # e.g. a KeyUpdate's reply: wait until it can go
            flow.src_wait = OUT
            return filled, False, None
        except SSL.ZeroReturnError:  # close_notify (or a plain EOF: IGNORE_UNEXPECTED_EOF)
            return filled, True, None
        except SSL.SysCallError as exc:
            if exc.args and exc.args[0] == -1:  # EOF without close_notify
                return filled, True, None
            return filled, False, exc
        except SSL.Error as exc:
            return filled, False, exc
        filled += got
        if got < RECORD_SIZE or filled > room:
            flow.src_wait = IN
            return filled, False, None


def _send(link: Link, flow: Flow, data: memoryview) -> int:
    """Write what the destination takes now; count it."""
    tls = flow.dst_tls
    if tls is not None:
        sent = _send_tls(link, flow, tls, data)
    else:
        try:
            sent = flow.dst_sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise Broken(flow.dst_side) from exc
    if flow.to_backend:  # _count, written out: once per write
        link.transfer.to_backend += sent
    else:
        link.transfer.to_client += sent
    return sent


def _send_tls(link: Link, flow: Flow, tls: SSL.Connection, data: memoryview) -> int:
    """``SSL_write`` until all is out or the socket is full. With partial writes on
    (pyOpenSSL's default) one call writes one record (16 KiB), so one call per chunk
    would hold the rest and wait a wake-up per record."""
    flow.dst_wait = OUT
    sent, size = 0, len(data)
    while sent < size:
        try:
            sent += tls.send(data[sent:] if sent else data)
        except SSL.WantWriteError:
            break
        except SSL.WantReadError:  # OpenSSL must read first: wait for that
            flow.dst_wait = IN
            break
        except SSL.Error as exc:
            _count(link, flow, sent)  # what went out before the failure
            raise Broken(flow.dst_side) from exc
    return sent


def _count(link: Link, flow: Flow, moved: int) -> None:
    if flow.to_backend:
        link.transfer.to_backend += moved
    else:
        link.transfer.to_client += moved


def _end(link: Link, flow: Flow) -> None:
    """The source ended: pass the EOF on once the flow's bytes are out, unless this is
    the second direction to end (closing the link sends that one)."""
    flow.eof = True
    link.finished += 1
    if link.finished < 2:
        flow.shut = SHUTTING
        if not flow.pending:
            _shut(flow)


def _shut(flow: Flow) -> None:
    """FIN, or close_notify; on a full TLS socket, again once it is writable."""
    tls = flow.dst_tls
    try:
        if tls is None:
            flow.dst_sock.shutdown(socket.SHUT_WR)
        else:
            flow.dst_wait = OUT
            tls.shutdown()  # written; the peer's close_notify is not awaited
    except SSL.WantWriteError:
        return
    except SSL.WantReadError:
        pass  # written: what OpenSSL wants to read is the peer's answer
    except (OSError, SSL.Error) as exc:
        raise Broken(flow.dst_side) from exc
    flow.shut = SHUT


def _push(link: Link) -> None:
    try:
        link.push_held()
    except OSError as exc:
        raise Broken("backend") from exc
