"""l4proxy: a protocol-agnostic TCP layer-4 reverse proxy built on trio.

The public API is what this module exports; everything else is internal.
"""

from ._version import __version__
from .accesslog import AccessRecord
from .addresses import Address, TCPAddress, UnixAddress, parse_address
from .backends import Connector
from .config import Config, ListenerConfig, LogFormat, LogLevel
from .errors import (
    ConfigError,
    L4ProxyError,
    ListenError,
    UpstreamConnectError,
    UpstreamError,
)
from .server import BoundAddress, Proxy

__all__ = [
    "AccessRecord",
    "Address",
    "BoundAddress",
    "Config",
    "ConfigError",
    "Connector",
    "L4ProxyError",
    "ListenError",
    "ListenerConfig",
    "LogFormat",
    "LogLevel",
    "Proxy",
    "TCPAddress",
    "UnixAddress",
    "UpstreamConnectError",
    "UpstreamError",
    "__version__",
    "parse_address",
]
