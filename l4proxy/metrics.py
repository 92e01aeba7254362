"""A proxy's Prometheus metrics (issue #11): the families, built at scrape time from the
proxy's own state, and the endpoint that serves them (docs/metrics.md).

Nothing here runs per connection. Connections are counted in plain per-listener
tallies (:mod:`l4proxy.tally`) by ``finish`` and the admit step; open and parked
counts come from :meth:`Proxy.stats`, backend health and open counts from the pools
(``runtime.pools``), certificate expiry from the TLS contexts built at start and on
reload. :meth:`Metrics.collect` turns them into ``prometheus_client`` families when a
scrape asks, on the trio thread, which is the only thread that changes any of it.

:class:`Metrics` is a ``prometheus_client`` collector, so an application embedding the
proxy can also register it in a registry of its own
(``registry.register(proxy.metrics)``) instead of, or besides, ``metrics = ADDR``.

Label sets are bounded: listeners, routes' pools and backends only as configured,
outcomes from the closed :class:`~l4proxy.record.Outcome` set, no per-client label.
"""

from __future__ import annotations

import enum
import functools
import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, TypeVar

import attrs
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ._version import __version__
from .addresses import TCPAddress
from .metricserver import EndpointServer
from .record import Outcome

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Iterator

    from .config import Config
    from .runtime import ListenerRuntime
    from .stats import ListenerStats
    from .tally import Histogram

__all__ = ["REFUSALS", "Metrics", "MetricsSource", "config_hash", "counts_reload"]

#: The admit step's refusals: ``l4proxy_rejections_total``'s reasons.
REFUSALS = (Outcome.DENIED, Outcome.LIMIT_TOTAL, Outcome.LIMIT_PER_IP, Outcome.RATE_LIMITED)


class MetricsSource(Protocol):
    """What the metrics read of a :class:`~l4proxy.Proxy` (besides its runtimes)."""

    @property
    def config(self) -> Config: ...

    @property
    def draining(self) -> bool: ...

    @property
    def worker(self) -> int | None: ...

    def stats(self) -> Mapping[str, ListenerStats]: ...


class Metrics:
    """One proxy's metrics: its families, reload counts and ``/metrics`` endpoint.

    Attributes:
        reloads: reloads so far, by result (``success``, ``failure``).
    """

    def __init__(
        self, proxy: MetricsSource, runtimes: Callable[[], Mapping[str, ListenerRuntime]]
    ) -> None:
        self._proxy = proxy
        self._runtimes = runtimes
        self.reloads = {"success": 0, "failure": 0}
        self._server = EndpointServer(self)
        self._hashed: tuple[Config | None, float] = (None, 0.0)

    def count_reload(self, *, ok: bool) -> None:
        """Count a reload. ``Proxy.reload`` counts its own (:func:`counts_reload`); the
        command reports a configuration file that failed before reaching it."""
        self.reloads["success" if ok else "failure"] += 1

    # ------------------------------------------------------------------ the endpoint

    @property
    def addresses(self) -> tuple[TCPAddress, ...]:
        """Where the endpoint listens while ``serve`` runs (port 0 resolved; ``:PORT``
        gives one per address family); empty otherwise."""
        return self._server.addresses

    def _address(self) -> TCPAddress | None:
        """The configured address; with ``--workers``, worker ``w``'s is port + ``w - 1``."""
        address = self._proxy.config.metrics
        worker = self._proxy.worker
        if address is not None and worker is not None and address.port:
            address = TCPAddress(address.host, address.port + worker - 1)
        return address

    async def bind(self) -> None:
        """Bind the configured endpoint, if any (``Proxy.serve``, before it reports
        itself started).

        Error handling:
            Raises :class:`~l4proxy.errors.ListenError` naming the address.
        """
        await self._server.bind(self._address())

    async def serve(self) -> None:
        """Answer scrapes until cancelled, on what :meth:`bind` bound and, after a
        reload that changed ``metrics``, on the new address."""
        await self._server.run()

    async def reconfigured(self) -> None:
        """After a reload: move the endpoint if ``metrics`` changed (bind the new
        address, then close the old; a failure to bind is logged and the old stays)."""
        await self._server.move(self._address())

    def ready(self) -> bool:
        """``/readyz``: the endpoint only runs while the listeners are bound, so ready
        is "not draining"."""
        return not self._proxy.draining

    def exposition(self) -> tuple[bytes, str]:
        """The ``/metrics`` body, in the Prometheus text format, and its content type."""
        return generate_latest(self), CONTENT_TYPE_LATEST

    # ------------------------------------------------------------------ the families

    def collect(self) -> Iterator[Metric]:
        """Every family, from the proxy's state right now (``prometheus_client``'s
        collector interface)."""
        proxy = self._proxy
        runtimes = self._runtimes()
        stats = proxy.stats()
        worker = () if proxy.worker is None else (str(proxy.worker),)
        labels = Labels(("worker",) if worker else (), worker)

        info = labels.gauge("l4proxy_build_info", "Always 1; the version is a label.", "version")
        info.add(labels.of(__version__), 1)
        yield info.family
        yield from self._connections(runtimes, stats, labels)
        yield from self._latencies(runtimes, labels)
        yield from self._backends(runtimes, labels)
        yield from self._process(runtimes, labels)

    def _connections(
        self,
        runtimes: Mapping[str, ListenerRuntime],
        stats: Mapping[str, ListenerStats],
        labels: Labels,
    ) -> Iterator[Metric]:
        accepted = labels.counter(
            "l4proxy_connections_accepted",
            "Connections accepted, refused ones included (= closed + open).",
            "listener",
        )
        closed = labels.counter(
            "l4proxy_connections_closed",
            "Connections ended, by outcome (the access log's); 'ok' always present.",
            "listener",
            "outcome",
        )
        rejected = labels.counter(
            "l4proxy_rejections",
            "Connections the admit step refused, by reason (also counted in closed).",
            "listener",
            "reason",
        )
        open_ = labels.gauge("l4proxy_connections_open", "Connections open now.", "listener")
        parked = labels.gauge(
            "l4proxy_connections_parked",
            "Open connections idle both ways, held without tasks.",
            "listener",
        )
        forwarded = labels.counter(
            "l4proxy_forwarded_bytes",
            "Bytes forwarded by ended connections, by direction (to_backend, to_client).",
            "listener",
            "direction",
        )
        for name, runtime in runtimes.items():
            tally = runtime.live.tally
            now = stats.get(name)
            open_count = now.open if now is not None else runtime.live.value
            accepted.add(labels.of(name), tally.ended + open_count)
            counts = {Outcome.OK: 0, **tally.closed}
            for outcome, count in sorted(counts.items()):
                closed.add(labels.of(name, outcome.value), count)
            for outcome in REFUSALS:
                rejected.add(labels.of(name, outcome.value), tally.closed.get(outcome, 0))
            open_.add(labels.of(name), open_count)
            parked.add(labels.of(name), now.parked if now is not None else 0)
            forwarded.add(labels.of(name, "to_backend"), tally.to_backend)
            forwarded.add(labels.of(name, "to_client"), tally.to_client)
        yield from (accepted.family, closed.family, rejected.family)
        yield from (open_.family, parked.family, forwarded.family)

    def _latencies(
        self, runtimes: Mapping[str, ListenerRuntime], labels: Labels
    ) -> Iterator[Metric]:
        connect = HistogramMetricFamily(
            "l4proxy_connect_duration_seconds",
            "Seconds the backend connect step took (failover included), connections that connected.",
            labels=[*labels.names, "listener"],
        )
        handshake = HistogramMetricFamily(
            "l4proxy_tls_handshake_duration_seconds",
            "Seconds the TLS handshake with the client took (terminating listeners, handshakes that succeeded).",
            labels=[*labels.names, "listener"],
        )
        for name, runtime in runtimes.items():
            tally = runtime.live.tally
            _add_histogram(connect, labels.of(name), tally.connect)
            if runtime.server_tls is not None:
                _add_histogram(handshake, labels.of(name), tally.handshake)
        yield connect
        yield handshake

    def _backends(
        self, runtimes: Mapping[str, ListenerRuntime], labels: Labels
    ) -> Iterator[Metric]:
        up = labels.gauge(
            "l4proxy_backend_up",
            "1 while the backend is up, 0 while health checks or failed connects mark it down.",
            "listener",
            "pool",
            "backend",
        )
        open_ = labels.gauge(
            "l4proxy_backend_open_connections",
            "Connections open to the backend through this process's pool.",
            "listener",
            "pool",
            "backend",
        )
        for name, runtime in runtimes.items():
            for key, pool in runtime.pools.items():
                seen = set()
                for target in pool.backends:
                    backend = str(target.address)
                    if backend in seen:  # listed twice: one state, one series
                        continue
                    seen.add(backend)
                    values = labels.of(name, pool_label(key), backend)
                    up.add(values, 1 if pool.is_up(target) else 0)
                    open_.add(values, pool.open_connections(target))
        yield up.family
        yield open_.family

    def _process(self, runtimes: Mapping[str, ListenerRuntime], labels: Labels) -> Iterator[Metric]:
        reloads = labels.counter(
            "l4proxy_reloads", "Reloads (SIGHUP, Proxy.reload), by result.", "result"
        )
        for result, count in self.reloads.items():
            reloads.add(labels.of(result), count)
        yield reloads.family
        config = self._proxy.config
        if self._hashed[0] is not config:
            self._hashed = (config, config_hash(config))
        digest = labels.gauge(
            "l4proxy_config_hash",
            "Hash of the configuration in use (48 bits of its SHA-256): changes when a reload changes it.",
        )
        digest.add(labels.of(), self._hashed[1])
        yield digest.family
        expiry = labels.gauge(
            "l4proxy_tls_certificate_expiry_timestamp_seconds",
            "When each served certificate (its leaf) expires, in seconds since the epoch.",
            "listener",
            "certificate",
        )
        for name, runtime in runtimes.items():
            if runtime.server_tls is not None:
                for path, not_after in dict(runtime.server_tls.expiries).items():
                    expiry.add(labels.of(name, path), not_after)
        yield expiry.family


@attrs.frozen
class Labels:
    """The labels every family starts with (``worker``, with ``--workers``)."""

    names: tuple[str, ...]
    values: tuple[str, ...]

    def of(self, *values: str) -> list[str]:
        return [*self.values, *values]

    def counter(self, name: str, documentation: str, *labels: str) -> _Family:
        return _Family(CounterMetricFamily(name, documentation, labels=[*self.names, *labels]))

    def gauge(self, name: str, documentation: str, *labels: str) -> _Family:
        return _Family(GaugeMetricFamily(name, documentation, labels=[*self.names, *labels]))


@attrs.frozen
class _Family:
    family: CounterMetricFamily | GaugeMetricFamily

    def add(self, labels: list[str], value: float) -> None:
        self.family.add_metric(labels, value)


def _add_histogram(family: HistogramMetricFamily, labels: list[str], histogram: Histogram) -> None:
    counts = histogram.cumulative()
    buckets = [
        (_le(bound), float(count))
        for bound, count in zip(histogram.bounds, counts[:-1], strict=True)
    ]
    buckets.append(("+Inf", float(counts[-1])))
    family.add_metric(labels, buckets, histogram.sum)


def _le(bound: float) -> str:
    return repr(float(bound))


def pool_label(key: str) -> str:
    """A pool's ``pool`` label from its key in ``runtime.pools``: ``default`` (the
    listener's ``backends``), else the route's ``sni`` names, comma-separated, with
    ``alpn=...`` after a space when the route has an ALPN list."""
    return key.removeprefix("sni=").removesuffix(" alpn=")


def config_hash(config: Config) -> float:
    """48 bits of the SHA-256 of a canonical form of ``config``, as a float (exact:
    under 2**53). The same configuration hashes the same in every process and worker
    (sets are sorted; objects given in code count by their type's name)."""
    digest = hashlib.sha256(repr(_canonical(config)).encode()).digest()
    return float(int.from_bytes(digest[:6], "big"))


def _canonical(value: object) -> object:
    kind = type(value)
    if attrs.has(kind):
        fields = attrs.fields(kind)
        return (
            type(value).__name__,
            tuple((f.name, _canonical(getattr(value, f.name))) for f in fields),
        )
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, str | bool | bytes):
        return value
    if isinstance(value, int | float):
        return float(value)  # 5 in code is 5.0 from the file
    if isinstance(value, list | tuple):
        return tuple(_canonical(item) for item in value)
    if isinstance(value, set | frozenset):
        return tuple(sorted(repr(_canonical(item)) for item in value))
    if isinstance(value, Mapping):
        return tuple(sorted((repr(_canonical(k)), repr(_canonical(v))) for k, v in value.items()))
    return type(value).__qualname__  # an embedder's object: its repr may hold an address


class _Reloading(Protocol):
    @property
    def metrics(self) -> Metrics: ...


S = TypeVar("S", bound=_Reloading)
C = TypeVar("C")


def counts_reload(
    reload: Callable[[S, C], Awaitable[None]],
) -> Callable[[S, C], Coroutine[object, object, None]]:
    """Decorates ``Proxy.reload``: counts each call in ``l4proxy_reloads_total`` as a
    success or, when it raises (anything but cancellation), a failure."""

    @functools.wraps(reload)
    async def counted(self: S, config: C) -> None:
        try:
            await reload(self, config)
        except Exception:
            self.metrics.count_reload(ok=False)
            raise
        self.metrics.count_reload(ok=True)

    return counted
