"""Which backend to try next: pool state and the choice of backend (sans-IO).

A pool is plain synchronous state owned by the running proxy, not by the frozen config.
Connecting (sockets, timeouts, failover) is :mod:`l4proxy.connect`'s job; this module
only orders the candidates, so the later balancing methods (least connections,
weights, hashing on the client address, health) are changes here and nowhere else.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class BackendPool(Generic[T]):
    """Round-robin over a pool's backends.

    Each client connection takes :meth:`order`, the whole pool starting one further
    than the previous connection did, so failover tries every backend at most once.

    Example:
        >>> pool = BackendPool(("a", "b", "c"))
        >>> pool.order(), pool.order()
        (('a', 'b', 'c'), ('b', 'c', 'a'))
    """

    __slots__ = ("_cursor", "backends")

    def __init__(self, backends: tuple[T, ...]) -> None:
        if not backends:
            raise ValueError("a backend pool needs at least one backend")
        self.backends = backends
        self._cursor = 0

    def order(self) -> tuple[T, ...]:
        """The backends in the order this connection should try them."""
        start = self._cursor
        backends = self.backends
        self._cursor = (start + 1) % len(backends)
        return backends if start == 0 else backends[start:] + backends[:start]
