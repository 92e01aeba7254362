"""l4proxy: a protocol-agnostic TCP layer-4 reverse proxy built on trio.

The public API is what this module exports; everything else is internal.
"""

from ._version import __version__
from .addresses import Address, TCPAddress, UnixAddress, parse_address
from .backends import Backend
from .balancing import Balance
from .config import (
    CertKey,
    Config,
    ListenerConfig,
    LogFormat,
    LogLevel,
    PreambleName,
    RouteConfig,
    TLSConfig,
    TLSVersion,
)
from .connect import Connector
from .errors import (
    ClientHelloError,
    ConfigError,
    L4ProxyError,
    ListenError,
    ProtocolError,
    UpstreamConnectError,
    UpstreamError,
)
from .healthconfig import HealthCheck
from .protocols.dialogue import Dialogue, DialogueSettings, Preamble
from .record import AccessRecord, ConnectionRecord, Outcome
from .server import Proxy
from .stats import BackendStats, BoundAddress, ListenerStats, PipeStats

__all__ = [
    "AccessRecord",
    "Address",
    "Backend",
    "BackendStats",
    "Balance",
    "BoundAddress",
    "CertKey",
    "ClientHelloError",
    "Config",
    "ConfigError",
    "ConnectionRecord",
    "Connector",
    "Dialogue",
    "DialogueSettings",
    "HealthCheck",
    "L4ProxyError",
    "ListenError",
    "ListenerConfig",
    "ListenerStats",
    "LogFormat",
    "LogLevel",
    "Outcome",
    "PipeStats",
    "Preamble",
    "PreambleName",
    "ProtocolError",
    "Proxy",
    "RouteConfig",
    "TCPAddress",
    "TLSConfig",
    "TLSVersion",
    "UnixAddress",
    "UpstreamConnectError",
    "UpstreamError",
    "__version__",
    "parse_address",
]
