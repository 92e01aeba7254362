"""Moving bytes between the client and the backend, both ways, until both are done.

Theory of operation
-------------------
Two named copy loops run in one nursery, one per direction. Each loop reads at most
:data:`CHUNK_SIZE` bytes, writes them all to the other side, and only then reads again:
that is the whole buffering, so a slow reader holds back a fast writer (backpressure)
and the proxy holds at most one chunk per direction, whatever the peers do.

Half-close (after Go tcpproxy): when one side sends EOF, the loop forwards it with
``send_eof()`` (``shutdown(SHUT_WR)`` on a socket) and ends; the opposite direction keeps
flowing until it ends too. A stream that cannot half-close (``trio.abc.Stream`` without
``send_eof``) is closed instead, which also ends the other direction.

A reset or any other failure on either side ends both directions: the caller closes both
streams, so a reset on one side reaches the other as a close.

The idle timeout is one shared :class:`trio.CancelScope`; each chunk moved pushes its
deadline forward.

:func:`pump` is the generic byte mover: the data core (:mod:`l4proxy.core`) moves the
bytes of every connection whose ends are sockets (TLS or not); this loop is for what it
cannot drive, an embedder's own streams (``handle_stream``, a custom ``connect=``) and
TLS over memory BIOs. Same contract, same tests.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import attrs
import trio

from .record import Outcome

if TYPE_CHECKING:
    from .record import Counters

#: Largest read per direction, and so the most bytes the proxy buffers per direction.
CHUNK_SIZE = 262144


@attrs.define(slots=True, eq=False)
class _Splice:
    idle_scope: trio.CancelScope
    idle_seconds: float
    transfer: Counters
    broken: Literal["client", "backend"] | None = None


async def pump(
    client: trio.abc.Stream,
    backend: trio.abc.Stream,
    transfer: Counters,
    *,
    idle_seconds: float = 0.0,
) -> Outcome:
    """Copy both ways until both directions ended, a side failed, or the link went idle.

    Args:
        client: the accepted connection.
        backend: the connection to the chosen backend.
        transfer: counters to update; read them even if this is cancelled.
        idle_seconds: close after this long without a byte either way; ``0`` is off.

    Returns:
        ``ok`` when both directions reached EOF, ``idle_timeout``, or
        ``error:client_reset`` / ``error:backend_reset`` when a side failed.

    Resource handling:
        Does not close either stream; the caller owns both and must close them, which
        is also how a failure on one side reaches the other.
    """
    deadline = trio.current_time() + idle_seconds if idle_seconds > 0 else math.inf
    state = _Splice(trio.CancelScope(deadline=deadline), idle_seconds, transfer)
    if idle_seconds > 0:
        with state.idle_scope:
            await _both_ways(client, backend, state)
    else:  # no deadline to keep: skip entering the scope (per-connection cost)
        await _both_ways(client, backend, state)
    if state.broken is not None:
        return Outcome.CLIENT_RESET if state.broken == "client" else Outcome.BACKEND_RESET
    if state.idle_scope.cancelled_caught:
        return Outcome.IDLE_TIMEOUT
    return Outcome.OK


async def _both_ways(client: trio.abc.Stream, backend: trio.abc.Stream, state: _Splice) -> None:
    async with trio.open_nursery() as nursery:
        # One task per connection fewer: this task copies client -> backend itself.
        nursery.start_soon(_backend_to_client, backend, client, state, nursery.cancel_scope)
        await _client_to_backend(client, backend, state, nursery.cancel_scope)


async def _client_to_backend(
    src: trio.abc.Stream, dst: trio.abc.Stream, splice: _Splice, both: trio.CancelScope
) -> None:
    await _copy(src, dst, splice, both, to_backend=True)


async def _backend_to_client(
    src: trio.abc.Stream, dst: trio.abc.Stream, splice: _Splice, both: trio.CancelScope
) -> None:
    await _copy(src, dst, splice, both, to_backend=False)


async def _copy(
    src: trio.abc.Stream,
    dst: trio.abc.Stream,
    splice: _Splice,
    both: trio.CancelScope,
    *,
    to_backend: bool,
) -> None:
    src_name: Literal["client", "backend"] = "client" if to_backend else "backend"
    dst_name: Literal["client", "backend"] = "backend" if to_backend else "client"
    transfer = splice.transfer
    idle_seconds = splice.idle_seconds
    idle_scope = splice.idle_scope
    failed: Literal["client", "backend"] = src_name
    try:
        while True:
            failed = src_name
            chunk = await src.receive_some(CHUNK_SIZE)
            if not chunk:
                break
            failed = dst_name
            await dst.send_all(chunk)
            if to_backend:
                transfer.to_backend += len(chunk)
            else:
                transfer.to_client += len(chunk)
            if idle_seconds:
                idle_scope.deadline = trio.current_time() + idle_seconds
        failed = dst_name
        if isinstance(dst, trio.abc.HalfCloseableStream):
            await dst.send_eof()
        else:
            # No half-close in this stream's model (e.g. TLS, trio#823): closing is the
            # only way to pass the EOF on, and it ends the other direction too.
            await trio.aclose_forcefully(dst)
            both.cancel()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        if splice.broken is None:
            splice.broken = failed
        both.cancel()
