"""The ``health_check`` key: active health checks of a listener's backends (issue #11).

In TOML a number of seconds (the interval) or a table::

    health_check = 2
    health_check = { interval = 2, timeout = 1, rise = 2, fall = 3,
                     send = "PING\\r\\n", expect = "+PONG" }

On the command line ``--health-check SECONDS``. A listener's routes are checked with
its setting; at the top level it is every listener's default. What a check does and
how its results count: :mod:`l4proxy.healthcheck`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import attrs

from .configkeys import Kind, MappingReader, check_kinds, key
from .configkinds import Seconds, WholeNumber, duration_problem
from .errors import ConfigError

__all__ = ["MAX_EXPECT", "MAX_SEND", "MIN_INTERVAL", "HealthCheck", "HealthCheckKind"]

#: The shortest interval: a check per backend every 10 ms is already a load test.
MIN_INTERVAL = 0.01
#: The most bytes a check sends, and the most it reads to compare with ``expect``.
MAX_SEND = 4096
MAX_EXPECT = 1024
#: The most consecutive checks ``rise`` and ``fall`` may ask for.
MAX_COUNT = 100


@attrs.frozen
class _CheckBytes(Kind):
    """A non-empty string of at most ``limit`` bytes in UTF-8 (TOML escapes such as
    ``\\r\\n`` give any control character)."""

    limit: int

    @property
    def expects(self) -> str:  # type: ignore[override]  # a property in place of a class constant
        return f"a non-empty string of at most {self.limit} bytes"

    def check(self, value: object) -> str | None:
        if isinstance(value, str) and value and len(value.encode()) <= self.limit:
            return None
        return f"expected {self.expects}, got {value!r}"


def _interval(_instance: object, _attribute: attrs.Attribute[float], value: float) -> None:
    """Beyond :class:`Seconds` (whose check runs next): finite, and not a busy loop."""
    if isinstance(value, int | float) and not MIN_INTERVAL <= value < math.inf:
        raise ConfigError(
            f"interval: expected a finite number of seconds >= {MIN_INTERVAL:g}, got {value!r}"
        )


@attrs.frozen(kw_only=True, field_transformer=check_kinds)
class HealthCheck:
    """Active health checks of a listener's backends.

    Every ``interval`` seconds (spread with jitter) each backend gets a check: a
    connect (from ``source_address`` if set), a PROXY header if the listener sends one
    (v2 ``LOCAL``, v1 ``UNKNOWN``: "a health check"), the TLS handshake if the listener
    has ``backend_tls``, then ``send`` and ``expect``. ``fall`` failed checks in a row
    mark a backend down until ``rise`` passed checks in a row mark it up.

    Attributes:
        interval: seconds between two checks of one backend.
        timeout: seconds one check may take, all of it; ``None``: the smaller of the
            listener's ``connect_timeout`` and ``interval`` (:meth:`seconds`).
        rise: passed checks in a row that mark a down backend up.
        fall: failed checks in a row that mark an up backend down.
        send: bytes to send once connected (UTF-8), e.g. ``"PING\\r\\n"``.
        expect: the check passes only if the reply starts with these bytes (UTF-8),
            e.g. ``"+PONG"``; with no ``send``, what the backend says first.
    """

    interval: float = attrs.field(
        validator=_interval, metadata=key(Seconds(positive=True), required=True)
    )
    timeout: float | None = attrs.field(default=None, metadata=key(Seconds(positive=True)))
    rise: int = attrs.field(default=2, metadata=key(WholeNumber(1, MAX_COUNT)))
    fall: int = attrs.field(default=3, metadata=key(WholeNumber(1, MAX_COUNT)))
    send: str | None = attrs.field(default=None, metadata=key(_CheckBytes(MAX_SEND)))
    expect: str | None = attrs.field(default=None, metadata=key(_CheckBytes(MAX_EXPECT)))

    def seconds(self, connect_timeout: float) -> float:
        """The time one check may take: ``timeout``, or the smaller of the listener's
        connect timeout and the interval."""
        return self.timeout if self.timeout is not None else min(connect_timeout, self.interval)


def to_health_check(value: HealthCheck | float | Mapping[str, object]) -> HealthCheck:
    """The ``health_check`` key given in code: a :class:`HealthCheck`, a number of
    seconds (the interval) or a mapping of its keys."""
    if isinstance(value, HealthCheck):
        return value
    if isinstance(value, Mapping):
        return _prefixed(lambda: HealthCheck(**value))  # type: ignore[arg-type]  # each key checked by its kind
    problem = duration_problem(value, positive=True)
    if problem:
        raise ConfigError(f"health_check: expected {HealthCheckKind.expects}, got {value!r}")
    return _prefixed(lambda: HealthCheck(interval=float(value)))


def _prefixed(build: Callable[[], HealthCheck]) -> HealthCheck:
    """``build()``, its problems named under ``health_check``."""
    try:
        return build()
    except ConfigError as exc:
        raise ConfigError([f"health_check.{problem}" for problem in exc.problems]) from None
    except TypeError as exc:  # an unknown key given in code
        raise ConfigError(f"health_check: {exc}") from None


@attrs.frozen
class HealthCheckKind(Kind):
    """A number of seconds (the interval) or a ``{ interval, timeout, rise, fall, send,
    expect }`` table."""

    expects = "a number of seconds or a table {interval, timeout, rise, fall, send, expect}"

    def read(self, reader: MappingReader, value: object, path: str) -> object:
        if isinstance(value, Mapping):
            return reader.table(HealthCheck, value, path)
        if duration_problem(value, positive=True):
            reader.problem(path, f"expected {self.expects}, got {value!r}")
            return None
        assert isinstance(value, int | float)
        if not MIN_INTERVAL <= value < math.inf:
            reader.problem(
                path, f"expected a finite number of seconds >= {MIN_INTERVAL:g}, got {value!r}"
            )
            return None
        return HealthCheck(interval=float(value))

    def check(self, value: object) -> str | None:
        if isinstance(value, HealthCheck):
            return None
        return f"expected {self.expects}, got {value!r}"

    @property
    def table(self) -> type[attrs.AttrsInstance]:
        return HealthCheck
