"""Choosing a backend pool from what the ClientHello asked for (sans-IO).

Order (after Go tcpproxy's ordered routes, with nginx's name precedence): routes whose
SNI pattern matches the name exactly, then routes whose ``*.`` wildcard matches it (one
label only: ``*.example.com`` matches ``db.example.com``, not ``a.b.example.com`` nor
``example.com``), then the listener's default pool. Within each group a route that lists
ALPN protocols matches only if the client offered one of them; the first match wins.
Matching ignores case and a trailing dot (the parser already normalised the name).
"""

from __future__ import annotations

from typing import Generic, TypeVar

import attrs

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
        self._exact: dict[str, list[Route[P]]] = {}
        self._wildcard: dict[str, list[Route[P]]] = {}
        for names, alpn, pool in routes:
            encoded = tuple(protocol.encode() for protocol in alpn)
            for name in names:
                name = name.lower().removesuffix(".")
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], []).append(Route(name, pool, encoded))
                else:
                    self._exact.setdefault(name, []).append(Route(name, pool, encoded))
        self._default = Route("default", default) if default is not None else None

    def match(self, server_name: str | None, alpn: tuple[bytes, ...]) -> Route[P] | None:
        """The route for this SNI and offered ALPN list, or ``None`` (no route, no default)."""
        if server_name:
            name = server_name.lower().removesuffix(".")
            route = _first_offered(self._exact.get(name), alpn)
            if route is None and "." in name:
                route = _first_offered(self._wildcard.get(name.split(".", 1)[1]), alpn)
            if route is not None:
                return route
        return self._default


def _first_offered(
    candidates: list[Route[P]] | None, offered: tuple[bytes, ...]
) -> Route[P] | None:
    if not candidates:
        return None
    for route in candidates:
        if not route.alpn or any(protocol in offered for protocol in route.alpn):
            return route
    return None
