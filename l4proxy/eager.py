"""Eager start: a connection's set-up runs in the accept loop until its first wait.

A plain connection's set-up never waits: on loopback and other local addresses the
kernel finishes a backend's TCP handshake inside ``connect``, so accepting, connecting
and handing both sockets to the data core all happen in one go. A trio task per
connection (spawn, one scheduler turn, exit: about 10 µs) would then be pure overhead,
the largest single cost per new connection after the kernel's. So the accept loop
*drives* the pipeline's coroutine itself (:func:`start`); only when a step is about to
wait does the coroutine move into a task of its own, and go on there from where it
stopped.

The one rule for the pipeline: **every step that may wait calls** :func:`own_task`
**first, outside any cancel scope.** Running inline, the coroutine belongs to no task
of its own, so it must not touch trio's waiting machinery (a trio wait registers the
*current* task, here the accept loop's); :func:`own_task` suspends it before that
happens, with nothing of trio's held, and :func:`start` gives it its task. In a task
(the coroutine moved already, or ``handle_stream`` runs it in the caller's task),
:func:`own_task` is a no-op. A wait without it is a programming error (the tests run
every step inline); should one slip through, :func:`start` undoes the wait and throws
``RuntimeError`` into the coroutine, so it costs that connection (``error:internal``,
logged with a traceback), never the accept loop.

What runs inline runs in the accept loop's task and context: nothing in the set-up
steps sets a context variable or looks at ``trio.lowlevel.current_task()``. The accept
loop counts each set-up against its batch (``ACCEPT_BATCH`` connections, then a
checkpoint), so other tasks still run between batches.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Generator

    import trio

LOGGER = logging.getLogger("l4proxy.server")

#: What :func:`own_task` yields to :func:`start`: "give me a task of my own".
_MOVE = object()
#: What :func:`_step` returns for a coroutine that has ended.
_ENDED = object()

#: ``inline``: whether :func:`start` is driving a coroutine right now, in this thread
#: (trio runs one task at a time per thread, and an inline run never nests another;
#: an embedding application may run trio in several threads).
_state = threading.local()

#: How many stray trio waits :func:`start` undoes in one coroutine before closing it.
_STRAY_WAITS = 3


def start(  # type: ignore[explicit-any]
    nursery: trio.Nursery,
    async_fn: Callable[..., Coroutine[object, object, None]],
    *args: object,
) -> None:
    """Run ``async_fn(*args)`` here and now until it ends or calls :func:`own_task`;
    in the second case it goes on in a new task of ``nursery``.

    What it raises while inline propagates to the caller, as a task's crash would
    propagate to its nursery.
    """
    coroutine = async_fn(*args)
    yielded = _step(coroutine, None)
    strays = 0
    while yielded is not _ENDED and yielded is not _MOVE:  # a wait without own_task()
        strays += 1
        error = RuntimeError(
            f"{async_fn.__qualname__} waited on trio while running inline in the accept "
            "loop: a step that may wait must call eager.own_task() first"
        )
        _undo(yielded, error)
        if strays > _STRAY_WAITS:
            LOGGER.error("%s", error)
            coroutine.close()
            return
        yielded = _step(coroutine, error)
    if yielded is _ENDED:
        return
    try:
        nursery.start_soon(_go_on, coroutine, name=async_fn)
    except BaseException:
        coroutine.close()
        raise


def _step(coroutine: Coroutine[object, object, None], error: Exception | None) -> object:
    """Drive ``coroutine`` inline to its next yield (:data:`_ENDED` once it has
    ended), throwing ``error`` into it if given."""
    _state.inline = True
    try:
        if error is None:
            return coroutine.send(None)
        return coroutine.throw(error)
    except StopIteration:
        return _ENDED
    finally:
        _state.inline = False


def _undo(trap: object, error: Exception) -> None:
    """Take back a trio wait made inline: its abort function unregisters it (trio's
    waits for a socket, an event ...); a plain checkpoint left nothing to undo."""
    abort = getattr(trap, "abort_func", None)
    if abort is not None:

        def raise_error() -> None:
            raise error

        with contextlib.suppress(Exception):  # it raised the error given: undone all the same
            abort(raise_error)


@types.coroutine
def own_task() -> Generator[object, None, None]:
    """Before a step that may wait: the coroutine moves into a task of its own if it
    has none yet (see the module's docstring). Costs a generator call otherwise."""
    if getattr(_state, "inline", False):
        yield _MOVE


async def _go_on(coroutine: Coroutine[object, object, None]) -> None:
    await _delegate(coroutine)


@types.coroutine
def _delegate(coroutine: Coroutine[object, object, None]) -> Generator[object, object, None]:
    """Resume ``coroutine`` (suspended in :func:`own_task`) in this task: ``yield from``
    sends it ``None`` first, then passes trio's traps and answers (and throws) through."""
    yield from coroutine
