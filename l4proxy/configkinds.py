"""The kinds of config values: what a key accepts, in the file and in code.

Each kind reads a TOML value for :class:`~l4proxy.configkeys.MappingReader`
(reporting problems with the key path) and may check a value given in code; a field
names its kind in its :func:`~l4proxy.configkeys.key` metadata. A new kind is a
small frozen class here: ``check`` (used for the file and for code) and ``convert``,
or its own ``read`` for what only the file needs.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TypeVar

import attrs

from .addresses import HOSTNAME_LABEL, Address, Role, TCPAddress, parse_address
from .configkeys import Kind, kind_name
from .errors import ConfigError

if TYPE_CHECKING:
    import enum

    from .configkeys import MappingReader

__all__ = [
    "Addresses",
    "Choice",
    "Endpoint",
    "File",
    "Flag",
    "IPAddress",
    "Networks",
    "Seconds",
    "ServerName",
    "Strings",
    "Table",
    "Tables",
    "Text",
    "WholeNumber",
    "address_list",
    "duration_problem",
    "endpoint_value",
    "enum_value",
    "network_problem",
    "server_name_problem",
]


E = TypeVar("E", bound="enum.StrEnum")


@attrs.frozen
class Seconds(Kind):
    """A duration: a number >= 0 (> 0 when ``positive``); ``inf`` is no limit."""

    positive: bool = False
    expects = "a number of seconds"

    def check(self, value: object) -> str | None:
        return duration_problem(value, positive=self.positive)

    def convert(self, reader: MappingReader, value: object) -> object:
        return float(value)  # type: ignore[arg-type]  # check() made sure it is a number


@attrs.frozen
class Flag(Kind):
    """``true`` or ``false``."""

    expects = "true or false"

    def check(self, value: object) -> str | None:
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"


@attrs.frozen
class Text(Kind):
    """A non-empty string."""

    expects = "a non-empty string"

    def check(self, value: object) -> str | None:
        if isinstance(value, str) and value.strip():
            return None
        return f"expected a non-empty string, got {value!r}"


@attrs.frozen
class File(Kind):
    """A file path; in a config file, relative to the file's directory. With ``dash``,
    ``-`` (standard output) is accepted too and stays as it is."""

    dash: bool = False

    @property
    def expects(self) -> str:  # type: ignore[override]  # a property in place of a class constant
        return "a file path or '-'" if self.dash else "a file path"

    def check(self, value: object) -> str | None:
        if isinstance(value, str) and value:
            return None
        return f"expected {self.expects}, got {value!r}"

    def convert(self, reader: MappingReader, value: object) -> object:
        return reader.resolve(value)  # type: ignore[arg-type]  # check() made sure it is a str


@attrs.frozen
class ServerName(Kind):
    """A host name such as ``db.example.com`` (see :func:`server_name_problem`)."""

    expects = "a host name"

    def read(self, reader: MappingReader, value: object, path: str) -> object:
        problem = server_name_problem(value)
        if problem:
            reader.problem(path, problem)
        return value


@attrs.frozen
class WholeNumber(Kind):
    """An integer from ``low`` to ``high`` (not a boolean)."""

    low: int
    high: int

    @property
    def expects(self) -> str:  # type: ignore[override]  # a property in place of a class constant
        return f"a whole number from {self.low} to {self.high}"

    def check(self, value: object) -> str | None:
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and self.low <= value <= self.high
        ):
            return None
        return f"expected {self.expects}, got {value!r}"


@attrs.frozen
class Choice(Kind):
    """One of an enumeration's values. ``parse`` turns other TOML values into one (the
    float ``1.3`` into ``"1.3"``); ``message`` replaces ``one of 'a', 'b'`` in
    ``expected one of 'a', 'b', got ...``."""

    choices: type[enum.StrEnum]
    message: str | None = None
    parse: Callable[[object], object] | None = None

    @property
    def expects(self) -> str:  # type: ignore[override]  # a property in place of a class constant
        return self.message or "one of " + ", ".join(repr(str(member)) for member in self.choices)

    def read(self, reader: MappingReader, value: object, path: str) -> object:
        try:
            return self.choices(self.parse(value) if self.parse else value)  # type: ignore[arg-type]  # a bad value raises ValueError
        except (TypeError, ValueError):
            reader.problem(path, f"expected {self.expects}, got {value!r}")
            return None


def enum_value(key: str, choices: type[E], value: E | str, expects: str | None = None) -> E:
    """An enumeration key's value given in code, as its member; else a ``ConfigError``
    such as ``balance: expected one of 'a', 'b', got 'c'`` (``expects`` replaces
    ``one of ...``). The named converters of the config classes call this."""
    try:
        return choices(value)
    except ValueError:
        wanted = expects or Choice(choices).expects
        raise ConfigError(f"{key}: expected {wanted}, got {value!r}") from None


@attrs.frozen
class Strings(Kind):
    """A list of strings; a single string is a one-element list."""

    expects = "a list of strings"

    def read(self, reader: MappingReader, value: object, path: str) -> object:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            reader.problem(path, f"expected a list of strings, got {value!r}")
            return None
        return value


@attrs.frozen
class Networks(Kind):
    """A list of IP networks in CIDR notation (``10.0.0.0/8``, ``2001:db8::/32``) or bare
    addresses (one host); a single string is a one-element list. Host bits set
    (``10.1.2.3/8``) are a mistake worth saying, not something to round silently."""

    expects = "a list of CIDRs"

    def check(self, value: object) -> str | None:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            return f"expected a list of CIDRs, got {kind_name(value)}"
        for item in items:
            problem = network_problem(item)
            if problem:
                return problem
        return None

    def convert(self, reader: MappingReader, value: object) -> object:
        return (value,) if isinstance(value, str) else tuple(value)  # type: ignore[arg-type]  # check() made sure


@attrs.frozen
class IPAddress(Kind):
    """One IPv4 or IPv6 address (no port, no name)."""

    expects = "an IP address"

    def check(self, value: object) -> str | None:
        if not isinstance(value, str):
            return f"expected an IP address string, got {kind_name(value)}"
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return f"expected an IP address, got {value!r}"
        return None


def network_problem(value: object) -> str | None:
    """Why ``value`` is not a CIDR or an IP address, or ``None``."""
    if not isinstance(value, str):
        return f"expected a CIDR string, got {kind_name(value)}"
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        return f"bad CIDR {value!r}: {exc}"
    return None


@attrs.frozen
class Addresses(Kind):
    """A non-empty list of address strings (one string is a one-element list), each
    parsed for ``role`` (``listen`` or ``backend``)."""

    role: Role
    expects = "a list of addresses"

    def read(self, reader: MappingReader, value: object, path: str) -> object:
        value = address_list(reader, value, path)
        if value is None:
            return None
        result: list[Address] = []
        for index, item in enumerate(value):
            try:
                if not isinstance(item, str):
                    raise ValueError(f"expected an address string, got {kind_name(item)}")
                result.append(parse_address(item, role=self.role))
            except ValueError as exc:
                reader.problem(f"{path}[{index}]", str(exc))
        return tuple(result)


@attrs.frozen
class Endpoint(Kind):
    """One TCP address to serve on: ``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (every
    interface); not a Unix socket (what scrapes it, Prometheus, speaks TCP)."""

    expects = "an address HOST:PORT"

    def check(self, value: object) -> str | None:
        if isinstance(value, TCPAddress):
            return None
        if not isinstance(value, str):
            return f"expected an address string HOST:PORT, got {kind_name(value)}"
        try:
            address = parse_address(value, role="listen")
        except ValueError as exc:
            reason = str(exc)
            return reason if "unix:" not in reason else f"expected HOST:PORT, got {value!r}"
        if not isinstance(address, TCPAddress):
            return f"expected HOST:PORT, [IPV6]:PORT or :PORT (a TCP address), got {value!r}"
        return None

    def convert(self, reader: MappingReader, value: object) -> object:
        return endpoint_value("", value)


def endpoint_value(key: str, value: object) -> TCPAddress:
    """An :class:`Endpoint` key's value as the config class keeps it, from a string or
    an address given in code; raises ``ConfigError`` naming ``key``."""
    if isinstance(value, TCPAddress):
        return value
    problem = Endpoint().check(value)
    if problem:
        raise ConfigError(f"{key}: {problem}")
    address = parse_address(str(value), role="listen")
    assert isinstance(address, TCPAddress)
    return address


def address_list(
    reader: MappingReader, value: object, path: str, *, tables: bool = False
) -> list[object] | None:
    """A list of addresses as the file gives it: one string (or, with ``tables``, one
    table) is a one-element list; anything else but a non-empty list is a problem."""
    if isinstance(value, str) or (tables and isinstance(value, dict)):
        value = [value]
    if not isinstance(value, list):
        reader.problem(path, f"expected a list of addresses, got {kind_name(value)}")
        return None
    if not value:
        reader.problem(path, "needs at least one address")
        return None
    return value


@attrs.frozen
class Table(Kind):
    """A nested table, read as the config class ``cls``."""

    cls: type[attrs.AttrsInstance]
    expects = "a table"

    def read(self, reader: MappingReader, value: object, path: str) -> object:
        return reader.table(self.cls, value, path)

    @property
    def table(self) -> type[attrs.AttrsInstance]:
        return self.cls


@attrs.frozen
class Tables(Kind):
    """An array of tables, each read as ``cls``.

    ``wrong`` is the problem for a value that is not a list (``{got}`` is replaced by
    its TOML type) or, unless ``allow_empty``, an empty one; ``item_wrong`` replaces
    ``expected a table, got ...`` for an item that is not a table.
    """

    cls: type[attrs.AttrsInstance]
    expects: str = "an array of tables"
    wrong: str = "expected an array of tables, got {got}"
    item_wrong: str | None = None
    allow_empty: bool = False
    required_message: str | None = None

    @property
    def missing(self) -> str:
        return self.required_message or super().missing

    @property
    def table(self) -> type[attrs.AttrsInstance]:
        return self.cls

    def read(self, reader: MappingReader, value: object, path: str) -> object:
        items = self.read_each(reader, value, path)
        return [item for item in items or () if item is not None]

    def read_each(
        self,
        reader: MappingReader,
        value: object,
        path: str,
        inherited: Mapping[str, object] | None = None,
    ) -> list[attrs.AttrsInstance | None] | None:
        """Every item, ``None`` for one that had problems (so indexes stay those of the
        file); ``None`` if ``value`` is not a usable array."""
        if value is None:
            reader.problem(path, self.missing)
            return None
        if not isinstance(value, list) or not (value or self.allow_empty):
            reader.problem(path, self.wrong.format(got=kind_name(value)))
            return None
        items: list[attrs.AttrsInstance | None] = []
        for index, item in enumerate(value):
            where = f"{path}[{index}]"
            if self.item_wrong and not isinstance(item, Mapping):
                reader.problem(where, self.item_wrong)
                items.append(None)
            else:
                items.append(reader.table(self.cls, item, where, inherited))
        return items


def duration_problem(value: object, *, positive: bool) -> str | None:
    """Why ``value`` is not a number of seconds (>= 0, or > 0), or ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"expected a number of seconds, got {value!r}"
    if math.isnan(value) or value < 0 or (positive and value == 0):
        return f"expected a number of seconds {'> 0' if positive else '>= 0'}, got {value!r}"
    return None


def server_name_problem(name: object) -> str | None:
    """Why ``name`` is not a usable SNI pattern, or ``None`` if it is."""
    if not isinstance(name, str) or not name:
        return f"expected a host name like 'db.example.com' or '*.example.com', got {name!r}"
    labels = name.split(".")
    if labels[0] == "*":
        labels = labels[1:]
        if len(labels) < 2:
            return f"a wildcard needs a domain of two or more labels, got {name!r}"
    if not all(HOSTNAME_LABEL.match(label) for label in labels):
        return f"{name!r} is not a valid host name (wildcards only as a whole first label: '*.example.com')"
    return None
