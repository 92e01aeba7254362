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
:func:`own_task` is a no-op. A wait without it is a programming error, and
:func:`start` says so loudly rather than let a trio wait run on the wrong task.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Generator

    import trio

#: What :func:`own_task` yields to :func:`start`: "give me a task of my own".
_MOVE = object()

#: Whether a coroutine is being driven inline by :func:`start` right now. One flag
#: suffices: trio runs one task at a time, and an inline run never nests another.
_inline = False


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
    global _inline
    coroutine = async_fn(*args)
    _inline = True
    try:
        yielded = coroutine.send(None)
    except StopIteration:
        return
    finally:
        _inline = False
    if yielded is not _MOVE:
        coroutine.close()
        raise RuntimeError(
            f"{async_fn.__qualname__} waited on trio while running inline in the accept "
            "loop: a step that may wait must call eager.own_task() first"
        )
    nursery.start_soon(_go_on, coroutine)


@types.coroutine
def own_task() -> Generator[object, None, None]:
    """Before a step that may wait: the coroutine moves into a task of its own if it
    has none yet (see the module's docstring). Costs a generator call otherwise."""
    if _inline:
        yield _MOVE


async def _go_on(coroutine: Coroutine[object, object, None]) -> None:
    await _delegate(coroutine)


@types.coroutine
def _delegate(coroutine: Coroutine[object, object, None]) -> Generator[object, object, None]:
    """Resume ``coroutine`` (suspended in :func:`own_task`) in this task: ``yield from``
    sends it ``None`` first, then passes trio's traps and answers (and throws) through."""
    yield from coroutine
