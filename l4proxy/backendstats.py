"""A listener's backends as :meth:`Proxy.stats` reports them: its pools' state, read
at one moment into frozen :class:`~l4proxy.stats.BackendStats` values."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import trio

from .stats import BackendStats

if TYPE_CHECKING:
    from .runtime import ListenerRuntime

__all__ = ["backend_stats"]


def backend_stats(runtime: ListenerRuntime | None) -> tuple[BackendStats, ...]:
    """Every backend of ``runtime``'s pools (the default pool first, then the routes in
    configuration order), each distinct backend once per pool."""
    if runtime is None:
        return ()
    checked = runtime.config.health_check is not None
    pools = sorted(runtime.pools.items(), key=lambda item: item[0] != "default")
    offset: float | None = None  # Unix time minus trio's clock, read once if needed
    read_clock = False
    result = []
    for key, pool in pools:
        route = route_label(key)
        seen = set()
        for state in pool.states():
            if state.backend in seen:  # listed twice: one state, reported once
                continue
            seen.add(state.backend)
            down_since = None
            if state.down_until:
                if not read_clock:
                    offset, read_clock = _offset(), True
                down_since = None if offset is None else state.down_since + offset
            result.append(
                BackendStats(
                    address=state.backend.address,
                    route=route,
                    weight=state.weight,
                    backup=state.backup,
                    up=not state.down_until,
                    open=state.open,
                    checked=checked,
                    held=state.down_until == math.inf,
                    down_since=down_since,
                    reason=(state.reason or None) if state.down_until else None,
                )
            )
    return tuple(result)


def route_label(key: str) -> str:
    """A pool's name for people, from its key in ``ListenerRuntime.pools``
    (``default``, or ``sni=NAMES alpn=PROTOCOLS``): ``default``, ``a.example,b.example``
    or ``a.example alpn=h2``."""
    if not key.startswith("sni="):
        return key
    names, _, alpn = key.removeprefix("sni=").partition(" alpn=")
    return f"{names} alpn={alpn}" if alpn else names


def _offset() -> float | None:
    """Unix time minus trio's clock; ``None`` outside a trio run (stats read after it
    ended), where trio's marks cannot be placed in time."""
    try:
        return time.time() - trio.current_time()
    except RuntimeError:
        return None
