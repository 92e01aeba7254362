"""Per-listener counts for the metrics, kept in plain Python on the hot path (sans-IO).

A connection is counted once, when it ends: :func:`~l4proxy.connection.finish` (the one
place an access line is written) hands its :class:`~l4proxy.record.ConnectionRecord` to
:meth:`Tally.add`, and the admit step's refusals, which get no record unless logged,
are counted by :meth:`Tally.refused`. That is a dict update, a few additions and at most
two ``bisect`` calls per connection: no ``prometheus_client`` object, lock or label
lookup is touched per connection (issue #11: metrics on cost at most 5% of the
connection rate). :mod:`l4proxy.metrics` turns the tallies into metric families at
scrape time.

A listener's tally lives in its :class:`~l4proxy.runtime.LiveCount`, so it is kept
across reloads as the open-connection count is.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .record import ConnectionRecord, Outcome

__all__ = ["LATENCY_BUCKETS", "Histogram", "Tally"]

#: Upper bounds (seconds) of the latency histograms' buckets, ``+Inf`` implied. Finer
#: than Prometheus's defaults at the low end: a connect on a LAN takes well under 5 ms.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Histogram:
    """Observations counted into fixed buckets.

    ``counts[i]`` holds the observations ``<= bounds[i]`` and ``> bounds[i - 1]`` (not
    cumulative: one increment per observation); the last entry is those above every
    bound. :meth:`cumulative` gives Prometheus's ``le`` form.

    Example:
        >>> h = Histogram((0.1, 1.0))
        >>> for seconds in (0.05, 0.1, 0.5, 3.0):
        ...     h.observe(seconds)
        >>> h.cumulative(), h.count, h.sum
        ([2, 3, 4], 4, 3.65)
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[int]:
        """Observations ``<=`` each bound, then the total (the ``+Inf`` bucket)."""
        total, result = 0, []
        for count in self.counts:
            total += count
            result.append(total)
        return result


class Tally:
    """What one listener's ended connections add up to.

    Attributes:
        closed: connections ended, by outcome (refused ones included, under the
            refusal's outcome); only outcomes that occurred have an entry.
        to_backend, to_client: bytes forwarded each way by ended connections.
        connect: seconds the connect step took (failover included), for connections
            that reached a backend.
        handshake: seconds the TLS handshake with the client took, for connections
            whose listener terminates TLS and whose handshake succeeded.
    """

    __slots__ = ("closed", "connect", "handshake", "to_backend", "to_client")

    def __init__(self) -> None:
        self.closed: dict[Outcome, int] = {}
        self.to_backend = 0
        self.to_client = 0
        self.connect = Histogram()
        self.handshake = Histogram()

    def add(self, record: ConnectionRecord) -> None:
        """Count a connection that ended (its outcome is set)."""
        closed, outcome = self.closed, record.outcome
        assert outcome is not None
        closed[outcome] = closed.get(outcome, 0) + 1
        self.to_backend += record.to_backend
        self.to_client += record.to_client
        if record.connect_seconds is not None:
            self.connect.observe(record.connect_seconds)
        if record.handshake_seconds is not None:
            self.handshake.observe(record.handshake_seconds)

    def refused(self, outcome: Outcome) -> None:
        """Count a connection the admit step closed in the accept loop (no record)."""
        self.closed[outcome] = self.closed.get(outcome, 0) + 1

    @property
    def ended(self) -> int:
        """Every connection ended so far, whatever its outcome."""
        return sum(self.closed.values())
