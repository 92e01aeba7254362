"""The connection record: everything one connection's steps learn, in one object.

Each connection gets one :class:`ConnectionRecord` when it is accepted. The set-up
steps fill it in as they run (the SNI, the route, the backend, the TLS parameters), the
byte movers count into it, and at the end it *is* the access-log record: the sink
formats it (in a writer thread) without a copy. Routing, ``Proxy.stats()``, the access
log and the later steps (limits, PROXY headers, metrics) all read this one record, so a
new fact about a connection is one more field here, not one more argument.

Addresses are address objects (:class:`~l4proxy.addresses.TCPAddress`,
:class:`~l4proxy.addresses.UnixAddress`), never strings; outcomes are an enum whose
values are what the access log prints. Sans-IO: nothing here does I/O.
"""

from __future__ import annotations

import enum
from typing import Literal, Protocol

import attrs

from .addresses import Address  # noqa: TC001 - attrs resolves field types at run time


class Outcome(enum.StrEnum):
    """How a connection ended: the closed set the access log's ``outcome`` takes.

    A ``StrEnum``, so ``record.outcome == "ok"`` holds and the value is what is printed.
    """

    OK = "ok"
    IDLE_TIMEOUT = "idle_timeout"
    DRAINED = "drained"
    CANCELLED = "cancelled"
    CONNECT_FAILED = "connect_failed"
    BAD_CLIENT_HELLO = "bad_client_hello"
    NO_ROUTE = "no_route"
    NO_BACKEND = "no_backend"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    TLS_HANDSHAKE_FAILED = "tls_handshake_failed"
    CLIENT_CERT_REJECTED = "client_cert_rejected"
    BACKEND_TLS_FAILED = "backend_tls_failed"
    #: The client broke a cleartext preamble (issue #9): bytes pipelined after
    #: SSLRequest or STARTTLS, an over-long line, garbage, TLS without the ALPN asked.
    BAD_PREAMBLE = "bad_preamble"
    #: A client went on without TLS where TLS is required (PostgreSQL's cleartext startup).
    TLS_REQUIRED = "tls_required"
    #: The client ended the preamble itself (QUIT, LOGOUT, or closed) before any backend.
    QUIT = "quit"
    #: A PostgreSQL cancel request sent on to the backend of the session it names.
    CANCEL_FORWARDED = "cancel_forwarded"
    #: A cancel request naming no live session: dropped without reply, as PostgreSQL does.
    CANCEL_UNKNOWN = "cancel_unknown"
    #: The backend's side of a preamble failed (a refusing greeting, an unexpected reply).
    BACKEND_PREAMBLE_FAILED = "backend_preamble_failed"
    #: Turned away by the admit step (issue #10), before any byte was read.
    DENIED = "denied"
    #: A trusted peer (accept_proxy_protocol) did not open with a valid PROXY header.
    BAD_PROXY_HEADER = "bad_proxy_header"
    #: Refused by the admit step: the listener (or the process) has its most connections open.
    LIMIT_TOTAL = "limit_total"
    #: Refused by the admit step: this client has its most connections open.
    LIMIT_PER_IP = "limit_per_ip"
    #: Refused by the admit step: this client opened connections faster than its rate.
    RATE_LIMITED = "rate_limited"
    CLIENT_RESET = "error:client_reset"
    BACKEND_RESET = "error:backend_reset"
    RESET = "error:reset"
    #: Out of descriptors or memory (``EMFILE``, ``ENFILE``, ``ENOMEM``, ``ENOBUFS``).
    OUT_OF_RESOURCES = "error:resources"
    #: Any other ``OSError``; ``error`` names the errno.
    OS_ERROR = "error:os"
    PROXY_ERROR = "error:proxy"
    INTERNAL_ERROR = "error:internal"


@attrs.define(slots=True, eq=False)
class ConnectionRecord:
    """One connection, from accept to its access line.

    Attributes:
        id: connection number, from 1 per :class:`~l4proxy.Proxy`.
        listener: the listener's name.
        client: the peer's address as accepted (``None`` when unknown, e.g. a stream
            handed to ``handle_stream`` without one).
        local: the address the client connected to (the listening address).
        proxied_client: the client address a trusted PROXY header gave (issue #10).
        time: wall-clock time of the accept, seconds since the epoch.
        started: ``trio.current_time()`` at the accept.
        duration: seconds from accept to the end, set when the connection ends.
        sni: the server name from the ClientHello, normalised.
        alpn: the protocol agreed when terminating, else those offered (comma-separated).
        route: the name of the route taken (the SNI pattern that matched, or
            ``default``).
        backend: the backend it was forwarded to.
        tls_version, cipher: of the client's TLS session, when terminated.
        client_subject: the verified client certificate's subject (mTLS).
        to_backend, to_client: bytes passed on each way (counted as they move, so
            they are right even after a cancellation).
        connect_seconds: how long the connect step took (failover included), once a
            backend accepted; for the metrics' latency histogram.
        handshake_seconds: how long the TLS handshake with the client took, once it
            succeeded (terminating listeners only); for the metrics.
        outcome: how it ended; ``None`` while running.
        error: detail for the outcome.
    """

    id: int
    listener: str
    client: Address | None
    local: Address | None = None
    proxied_client: Address | None = None
    time: float = 0.0
    started: float = 0.0
    duration: float = 0.0
    sni: str | None = None
    alpn: str | None = None
    route: str | None = None
    backend: Address | None = None
    tls_version: str | None = None
    cipher: str | None = None
    client_subject: str | None = None
    to_backend: int = 0
    to_client: int = 0
    connect_seconds: float | None = None
    handshake_seconds: float | None = None
    outcome: Outcome | None = None
    error: str | None = None

    def fail(self, outcome: Outcome, error: str | None = None) -> None:
        self.outcome, self.error = outcome, error

    @property
    def bytes_to_backend(self) -> int:
        """The access log's name for :attr:`to_backend`."""
        return self.to_backend

    @property
    def bytes_to_client(self) -> int:
        """The access log's name for :attr:`to_client`."""
        return self.to_client


def data_phase_outcome(
    broken: Literal["client", "backend"] | None, idle_expired: bool, finished: int
) -> Outcome | None:
    """How a byte mover's data phase ended: a side broke, it went idle, or both
    directions reached EOF; ``None`` when it was cut (drain, cancellation)."""
    if broken is not None:
        return Outcome.CLIENT_RESET if broken == "client" else Outcome.BACKEND_RESET
    if idle_expired:
        return Outcome.IDLE_TIMEOUT
    return Outcome.OK if finished == 2 else None


class Ended(Exception):
    """A set-up step ended the connection; ``outcome`` and ``error`` say why."""

    def __init__(self, outcome: Outcome, error: str | None = None) -> None:
        super().__init__(outcome, error)
        self.outcome = outcome
        self.error = error


#: The access log's record is the connection record (the name of earlier releases).
AccessRecord = ConnectionRecord


class Counters(Protocol):
    """What a byte mover counts into: a :class:`ConnectionRecord` or a :class:`Transfer`."""

    to_backend: int
    to_client: int


@attrs.define(slots=True)
class Transfer:
    """Byte counters alone, for a byte mover used outside a connection (tests,
    benchmarks); anything with ``to_backend`` / ``to_client`` works."""

    to_backend: int = 0
    to_client: int = 0
