"""Eager start: a connection's set-up runs without a task of its own for as long as it can.

A plain connection's set-up never waits: on loopback and other local addresses the
kernel finishes a backend's TCP handshake inside ``connect``, so accepting, connecting
and handing both sockets to the data core all happen in one go. A TLS connection waits
only for its socket (the ClientHello, the client's half of the handshake), and a
connect to a remote backend for its socket to become writable. A trio task
per connection (spawn, one scheduler turn, exit: about 10 µs) and trio waits
(registration, wake-up, task switch) would be much of their Python cost. So the accept
loop *drives* the pipeline's coroutine itself (:func:`start`), and:

- a step that waits for a socket calls :func:`wait_socket`: the coroutine is parked
  in the listener's data core (its epoll and timers, :meth:`Host.park`), which drives
  it on (:func:`resume`) when the socket is ready or the deadline passed;
- a step that waits in any other way (trio streams, locks, sleeps, an embedder's
  connector) calls :func:`own_task` first: the coroutine moves into a task of its own
  and goes on there from where it stopped.

The one rule for the pipeline: **every step that may wait calls** :func:`wait_socket`
**or** :func:`own_task` **first, outside any cancel scope.** Driven here, the coroutine
belongs to no task of its own, so it must not touch trio's waiting machinery (a trio
wait registers the *current* task: the accept loop's, or the core's); both suspend it
with nothing of trio's held. In a task (the coroutine moved already, or
``handle_stream`` runs it in the caller's task), :func:`own_task` is a no-op and
:func:`wait_socket` a trio wait under a deadline. A wait without them is a programming
error (the tests run every step); should one slip through, the driver undoes the wait
and throws ``RuntimeError`` into the coroutine, so it costs that connection
(``error:internal``, logged with a traceback), never the accept loop or the core.

What runs here runs in the accept loop's (or the core's) task and context: nothing in
the set-up steps sets a context variable or looks at ``trio.lowlevel.current_task()``.
The accept loop counts each set-up against its batch (``ACCEPT_BATCH`` connections,
then a checkpoint), and the core each resumption against its events per wake-up, so
other tasks still run between batches.
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import types
from typing import TYPE_CHECKING, Protocol

import trio

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Coroutine, Generator

LOGGER = logging.getLogger("l4proxy.server")

#: What :func:`own_task` yields to the driver: "give me a task of my own".
_MOVE = object()
#: What :func:`_step` returns for a coroutine that has ended.
_ENDED = object()

#: ``inline``: whether a coroutine is being driven here right now, in this thread
#: (trio runs one task at a time per thread, and a driven run never nests another;
#: an embedding application may run trio in several threads).
_state = threading.local()

#: How many stray trio waits the driver undoes in one coroutine before closing it.
_STRAY_WAITS = 3


class TooSlow(Exception):
    """:func:`wait_socket`'s deadline passed."""


class Cut(BaseException):
    """Thrown into a parked coroutine whose host goes away (a drain's deadline, the
    core's failure): like ``Cancelled``, no step catches it, so the coroutine's
    cleanup runs and the connection is logged as the drain or cancellation it is."""


class SocketWait:
    """What :func:`wait_socket` yields to the driver: park me until ``fd`` is ready
    for ``events`` (``EPOLLIN`` or ``EPOLLOUT``) or ``deadline`` (trio's clock)."""

    __slots__ = ("closed", "coroutine", "deadline", "events", "fd")

    def __init__(self, fd: int, events: int, deadline: float) -> None:
        self.fd, self.events, self.deadline = fd, events, deadline
        self.coroutine: Coroutine[object, object, None] | None = None  # set when parked
        self.closed = False  # woken or ended: no longer the host's


class Host(Protocol):
    """Where driven coroutines live: the listener's data core."""

    @property
    def nursery(self) -> trio.Nursery:
        """Where a coroutine that calls :func:`own_task` gets its task."""

    def park(self, wait: SocketWait) -> bool:
        """Watch ``wait.fd`` and ``wait.deadline``; :func:`resume` ``wait.coroutine``
        once either comes (with ``True`` for the deadline). ``False``: cannot (the
        coroutine then waits in a task of its own)."""


def start(  # type: ignore[explicit-any]
    host: Host,
    async_fn: Callable[..., Coroutine[object, object, None]],
    *args: object,
) -> None:
    """Run ``async_fn(*args)`` here and now until it ends or waits (see the module).

    What it raises while driven here propagates to the caller, as a task's crash
    would propagate to its nursery.
    """
    _drive(host, async_fn(*args), None, async_fn)


def resume(host: Host, wait: SocketWait, timed_out: bool) -> None:
    """Drive a coroutine parked by :func:`wait_socket` on (the host calls this when
    its socket is ready, or with ``timed_out`` when its deadline passed)."""
    assert wait.coroutine is not None
    _drive(host, wait.coroutine, timed_out, None)


def end_parked(wait: SocketWait) -> None:
    """Throw :class:`Cut` into a parked coroutine (its host is going away): its steps
    clean up and log, and it ends here."""
    coroutine = wait.coroutine
    assert coroutine is not None
    _state.inline = True
    try:
        coroutine.throw(Cut())
    except (StopIteration, Cut):
        return
    except Exception:
        LOGGER.exception("ending a connection in set-up failed")
        return
    finally:
        _state.inline = False
    coroutine.close()  # it tried to wait again: no more waiting here


def move_parked(host: Host, wait: SocketWait) -> None:
    """Give a parked coroutine a task of its own (its host can no longer watch for it):
    woken there for nothing, it tries its operation again and waits in trio."""
    assert wait.coroutine is not None
    _spawn(host, wait.coroutine, None)


def _spawn(  # type: ignore[explicit-any]
    host: Host, coroutine: Coroutine[object, object, None], name: Callable[..., object] | None
) -> None:
    """Go on in a task of ``host``'s nursery (named after the set-up's function)."""
    try:
        host.nursery.start_soon(
            _go_on, coroutine, name=name or getattr(coroutine, "__qualname__", None)
        )
    except BaseException:
        coroutine.close()
        raise


def _drive(  # type: ignore[explicit-any]
    host: Host,
    coroutine: Coroutine[object, object, None],
    value: object,
    async_fn: Callable[..., object] | None,
) -> None:
    yielded = _step(coroutine, value, None)
    strays = 0
    while yielded is not _ENDED and yielded is not _MOVE and type(yielded) is not SocketWait:
        strays += 1  # a trio wait without wait_socket() or own_task()
        name = getattr(coroutine, "__qualname__", "a set-up")
        error = RuntimeError(
            f"{name} waited on trio while driven without a task: a step that may "
            "wait must call eager.wait_socket() or eager.own_task() first"
        )
        _undo(yielded, error)
        if strays > _STRAY_WAITS:
            LOGGER.error("%s", error)
            coroutine.close()
            return
        yielded = _step(coroutine, None, error)
    if yielded is _ENDED:
        return
    if type(yielded) is SocketWait:
        yielded.coroutine = coroutine
        if host.park(yielded):
            return
        # No parking: a task of its own; woken spuriously, its loop tries again.
    _spawn(host, coroutine, async_fn)


def _step(
    coroutine: Coroutine[object, object, None], value: object, error: Exception | None
) -> object:
    """Drive ``coroutine`` here to its next yield (:data:`_ENDED` once it has ended),
    sending it ``value`` or throwing ``error`` into it."""
    _state.inline = True
    try:
        if error is None:
            return coroutine.send(value)
        return coroutine.throw(error)
    except StopIteration:
        return _ENDED
    finally:
        _state.inline = False


def _undo(trap: object, error: Exception) -> None:
    """Take back a trio wait made here: its abort function unregisters it (trio's
    waits for a socket, an event ...); a plain checkpoint left nothing to undo."""
    abort = getattr(trap, "abort_func", None)
    if abort is not None:

        def raise_error() -> None:
            raise error

        with contextlib.suppress(Exception):  # it raised the error given: undone all the same
            abort(raise_error)


@types.coroutine
def own_task() -> Generator[object, None, None]:
    """Before a step that may wait other than for a socket: the coroutine moves into
    a task of its own if it has none yet (see the module). A generator call otherwise."""
    if getattr(_state, "inline", False):
        yield _MOVE


@types.coroutine
def wait_socket(
    sock: socket.socket, *, writable: bool = False, deadline: float
) -> Generator[object, object, None]:
    """Wait until ``sock`` is readable (``writable``: writable), in the data core when
    driven there, else in trio. Raises :class:`TooSlow` at ``deadline`` (trio's clock).

    Readiness is a hint, as with any level-triggered wait: the caller tries its
    operation again and may be told to wait again."""
    if getattr(_state, "inline", False):
        events = select.EPOLLOUT if writable else select.EPOLLIN
        if (yield SocketWait(sock.fileno(), events, deadline)):
            raise TooSlow
        return
    with trio.move_on_at(deadline) as scope:  # noqa: ASYNC100 (yield from: a wait)
        wait = trio.lowlevel.wait_writable if writable else trio.lowlevel.wait_readable
        yield from wait(sock).__await__()
    if scope.cancelled_caught:
        raise TooSlow


async def _go_on(coroutine: Coroutine[object, object, None]) -> None:
    await _delegate(coroutine)


@types.coroutine
def _delegate(coroutine: Coroutine[object, object, None]) -> Generator[object, object, None]:
    """Resume ``coroutine`` (suspended in :func:`own_task` or :func:`wait_socket`) in
    this task: ``yield from`` sends it ``None`` first, then passes trio's traps and
    answers (and throws) through."""
    yield from coroutine
