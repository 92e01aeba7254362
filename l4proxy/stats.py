"""What a running :class:`~l4proxy.Proxy` reports about itself: the addresses it bound,
its connections per listener, its splice pipes (plain frozen values, safe to keep)."""

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


@attrs.frozen
class ListenerStats:
    """One listener's connections at one moment (see :meth:`Proxy.stats`)."""

    open: int  # accepted and not yet logged
    parked: int  # of those, idle both ways and held without tasks
    worker: int | None = None  # with --workers, the worker these are counted in


@attrs.frozen
class PipeStats:
    """The proxy's splice pipes at one moment (see :meth:`Proxy.pipe_stats`)."""

    in_use: int  # lent to connections moving bytes right now (idle ones hold none)
    created: int  # made since the proxy started (the pool keeps up to 64 for reuse)
