"""The exception hierarchy.

Every error the library raises on purpose derives from :class:`L4ProxyError`, so an
embedding application can catch ours without catching everything. The split follows who
has to act: operators fix a :class:`ConfigError` or :class:`ListenError`; a peer or a
backend causes an :class:`UpstreamError` and costs one connection only.
"""

from __future__ import annotations


class L4ProxyError(Exception):
    """Root of every error l4proxy raises on purpose."""


class ConfigError(L4ProxyError):
    """The configuration is invalid.

    ``problems`` holds one line per problem, each naming the key path
    (``listeners[1].backends[0]: ...``). ``str()`` joins them with ``; `` so the
    whole error reads as one line, which is what the CLI prints before exiting 2.
    """

    def __init__(self, problems: list[str] | str, *, source: str | None = None) -> None:
        self.problems: tuple[str, ...] = (
            (problems,) if isinstance(problems, str) else tuple(problems)
        )
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(prefix + "; ".join(self.problems))


class ListenError(L4ProxyError):
    """A listening address could not be bound (port in use, permission, bad path)."""


class UpstreamError(L4ProxyError):
    """A backend misbehaved; costs the one client connection that used it."""


class UpstreamConnectError(UpstreamError):
    """No backend of the pool accepted the connection.

    ``attempts`` is ``((address, reason), ...)`` in the order they were tried; the
    access log records it so an operator sees why without turning on debug logs.
    """

    def __init__(self, attempts: tuple[tuple[str, str], ...]) -> None:
        self.attempts = attempts
        detail = ", ".join(f"{address}: {reason}" for address, reason in attempts)
        super().__init__(f"no backend accepted the connection ({detail})")


class ProtocolError(L4ProxyError):
    """A peer sent bytes that break the protocol; costs that one connection."""


class ClientHelloError(ProtocolError):
    """The first bytes of a TLS connection are not a well-formed ClientHello."""


class ProxyHeaderError(ProtocolError):
    """A peer that must open with a PROXY protocol header sent something else."""
