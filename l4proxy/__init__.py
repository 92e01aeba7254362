"""l4proxy: a protocol-agnostic TCP layer-4 reverse proxy built on trio.

The public API is what this module exports; everything else is internal.
"""

from ._version import __version__
from .accesslog import AccessRecord
from .addresses import Address, TCPAddress, UnixAddress, parse_address
from .backends import Connector
from .config import (
    CertKey,
    Config,
    ListenerConfig,
    LogFormat,
    LogLevel,
    RouteConfig,
    TLSConfig,
    TLSVersion,
)
from .errors import (
    ClientHelloError,
    ConfigError,
    L4ProxyError,
    ListenError,
    ProtocolError,
    UpstreamConnectError,
    UpstreamError,
)
from .server import BoundAddress, ListenerStats, Proxy

__all__ = [
    "AccessRecord",
    "Address",
    "BoundAddress",
    "CertKey",
    "ClientHelloError",
    "Config",
    "ConfigError",
    "Connector",
    "L4ProxyError",
    "ListenError",
    "ListenerConfig",
    "ListenerStats",
    "LogFormat",
    "LogLevel",
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
