"""What a running :class:`~l4proxy.Proxy` reports about itself: the addresses it bound,
its connections and backends per listener, its splice pipes (plain frozen values, safe
to keep)."""

from __future__ import annotations

import attrs

from .addresses import Address, TCPAddress


@attrs.frozen
class BoundAddress:
    """A listening socket as bound: port 0 is resolved to the real port."""

    listener: str
    address: Address

    @property
    def host(self) -> str | None:
        return self.address.host if isinstance(self.address, TCPAddress) else None

    @property
    def port(self) -> int | None:
        return self.address.port if isinstance(self.address, TCPAddress) else None

    def __str__(self) -> str:
        return str(self.address)


@attrs.frozen(kw_only=True)
class BackendStats:
    """One backend of one of a listener's pools at one moment (see :meth:`Proxy.stats`).

    A backend in several pools (the default one and a route's) appears once per pool:
    each pool balances, counts and marks down on its own.

    Attributes:
        address: the backend's address as configured (a host name stays a name).
        route: its pool: ``"default"`` (the listener's ``backends``) or the route's SNI
            names, comma-separated (with `` alpn=...`` when the route has ALPN).
        weight, backup: as configured.
        up: taking new connections; ``False`` while marked down.
        open: connections open to it through this pool right now.
        checked: active health checks run for it (the listener has ``health_check``).
        held: down until health checks pass; ``False`` while down for a passive
            back-off, after which the next connection tries it again.
        down_since: while down, when it was marked down (Unix time, as ``time.time()``).
        reason: while down, the last failure that kept it down (``connection refused``,
            ``expected '+PONG', got '-ERR'``).
    """

    address: Address
    route: str
    weight: int = 1
    backup: bool = False
    up: bool = True
    open: int = 0
    checked: bool = False
    held: bool = False
    down_since: float | None = None
    reason: str | None = None


@attrs.frozen
class ListenerStats:
    """One listener's connections at one moment (see :meth:`Proxy.stats`)."""

    open: int  # accepted and not yet logged
    parked: int  # of those, idle both ways and held without tasks
    worker: int | None = None  # with --workers, the worker these are counted in
    #: Its backends, pool by pool in configuration order (default pool first). Not
    #: part of ``==``: two stats compare by their connection counts (as before the
    #: field was added); compare ``backends`` themselves to compare backends.
    backends: tuple[BackendStats, ...] = attrs.field(default=(), eq=False)


@attrs.frozen
class PipeStats:
    """The proxy's splice pipes at one moment (see :meth:`Proxy.pipe_stats`)."""

    in_use: int  # lent to connections moving bytes right now (idle ones hold none)
    created: int  # made since the proxy started (the pool keeps up to 64 for reuse)
