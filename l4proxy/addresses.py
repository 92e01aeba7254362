"""Socket addresses as the CLI and the config file spell them (sans-IO).

Forms: ``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` (listen only: every interface, IPv4 and
IPv6) and ``unix:/path``. Parsing happens once, at config load; the running proxy only
ever sees the frozen results, whose ``str()`` gives back the canonical spelling used in
logs.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

import attrs

Role = Literal["listen", "backend"]

HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")
_FORMS = "HOST:PORT, [IPV6]:PORT, :PORT or unix:/PATH"


@attrs.frozen
class TCPAddress:
    """A TCP endpoint. ``host`` is ``None`` for "every interface" (listeners only)."""

    host: str | None
    port: int

    def __str__(self) -> str:
        if self.host is None:
            return f":{self.port}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@attrs.frozen
class UnixAddress:
    """A Unix-domain stream socket path."""

    path: str

    def __str__(self) -> str:
        # A client of a Unix socket usually has no path of its own: "unix" alone.
        return f"unix:{self.path}" if self.path else "unix"


Address = TCPAddress | UnixAddress


def parse_address(text: str, *, role: Role) -> Address:
    """Parse one address, or raise ``ValueError`` with a message fit for a user.

    Example:
        >>> parse_address("[::1]:5432", role="backend")
        TCPAddress(host='::1', port=5432)
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a string like {_FORMS}, got {type(text).__name__}")
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError(f"empty unix socket path in {text!r}")
        if "\0" in path:
            raise ValueError(f"NUL byte in unix socket path {text!r}")
        return UnixAddress(path)
    host_part, sep, port_part = text.rpartition(":")
    if not sep:
        hint = f" (did you mean ':{text}'?)" if text.isdigit() and role == "listen" else ""
        raise ValueError(f"expected {_FORMS}, got {text!r}{hint}")
    port = _parse_port(port_part, text, role=role)
    if host_part.startswith("[") and host_part.endswith("]"):
        host = host_part[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {text!r} is not an IPv6 address") from None
        return TCPAddress(host, port)
    if not host_part:
        if role == "backend":
            raise ValueError(f"a backend needs a host, got {text!r}")
        return TCPAddress(None, port)
    if ":" in host_part:
        raise ValueError(f"IPv6 addresses need brackets, as in '[{host_part}]:{port_part}'")
    _check_hostname(host_part, text)
    return TCPAddress(host_part, port)


def _parse_port(port_part: str, text: str, *, role: Role) -> int:
    if not port_part.isascii() or not port_part.isdigit():
        raise ValueError(f"port must be a number, got {port_part!r} in {text!r}")
    port = int(port_part)
    lowest = 0 if role == "listen" else 1
    if not lowest <= port <= 65535:
        raise ValueError(f"port must be {lowest}-65535, got {port} in {text!r}")
    return port


def _check_hostname(host: str, text: str) -> None:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        pass
    else:
        return
    name = host.removesuffix(".")
    labels = name.split(".")
    if (
        len(name) > 253
        or not all(HOSTNAME_LABEL.match(label) for label in labels)
        or labels[-1].isdigit()  # RFC 3696 §2: a top-level label is never all digits
    ):
        raise ValueError(f"{host!r} in {text!r} is not a valid host name or IP address")
