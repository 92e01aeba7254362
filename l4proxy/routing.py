"""Choosing a backend pool from what the ClientHello asked for (sans-IO).

Order (after Go tcpproxy's ordered routes, with nginx's name precedence): routes whose
SNI pattern matches the name exactly, then routes whose ``*.`` wildcard matches it (one
label only: ``*.example.com`` matches ``db.example.com``, not ``a.b.example.com`` nor
``example.com``), then the listener's default pool. Within each group a route that lists
ALPN protocols matches only if the client offered one of them; the first match wins.
Matching ignores case and a trailing dot. The name rules are :mod:`l4proxy.names`'s,
which certificate selection shares; this module adds ALPN and the default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

import attrs

from .names import NameTable, normalize

if TYPE_CHECKING:
    from collections.abc import Sequence

P = TypeVar("P")


@attrs.frozen(eq=False)
class Route(Generic[P]):
    """A destination: ``pool`` is whatever the caller connects with (a BackendPool)."""

    name: str  # the SNI pattern that matched, or "default": for the access log
    pool: P
    alpn: tuple[bytes, ...] = ()


class Router(Generic[P]):
    """Built once per listener; :meth:`match` is a couple of dict lookups.

    Example:
        >>> router = Router([(("db.example.com",), (), "db-pool")], default="default-pool")
        >>> router.match("DB.example.com", ()).pool
        'db-pool'
    """

    def __init__(
        self,
        routes: list[tuple[tuple[str, ...], tuple[str, ...], P]],
        *,
        default: P | None = None,
    ) -> None:
        self._names: NameTable[Route[P]] = NameTable()
        for names, alpn, pool in routes:
            encoded = tuple(protocol.encode() for protocol in alpn)
            for name in names:
                self._names.add(name, Route(normalize(name), pool, encoded))
        self._default = Route("default", default) if default is not None else None

    def match(self, server_name: str | None, alpn: tuple[bytes, ...]) -> Route[P] | None:
        """The route for this SNI and offered ALPN list, or ``None`` (no route, no default)."""
        if server_name:
            exact, wildcard = self._names.lookup(server_name)
            route = _first_offered(exact, alpn) or _first_offered(wildcard, alpn)
            if route is not None:
                return route
        return self._default


def _first_offered(candidates: Sequence[Route[P]], offered: tuple[bytes, ...]) -> Route[P] | None:
    for route in candidates:
        if not route.alpn or any(protocol in offered for protocol in route.alpn):
            return route
    return None
