"""A backend as configured: its address, its weight and whether it is a backup.

In TOML a pool's ``backends`` list takes address strings and tables, mixed::

    backends = ["10.0.0.5:5432", { address = "10.0.0.6:5432", weight = 3 },
                { address = "10.0.0.9:5432", backup = true }]

In code, :class:`Backend` objects, address strings or :class:`~l4proxy.Address`
objects. Either way the config holds a tuple of :class:`Backend`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from .addresses import Address, TCPAddress, UnixAddress, parse_address
from .configkeys import Kind, MappingReader, check_kinds, key, kind_name
from .configkinds import Flag, WholeNumber, address_list
from .errors import ConfigError

__all__ = ["MAX_WEIGHT", "Backend", "Backends", "to_backends"]

#: The largest weight: enough for any ratio, small enough that the smooth weighted
#: round-robin's running scores stay small integers.
MAX_WEIGHT = 1000


@attrs.frozen
class _OneAddress(Kind):
    """One backend address string."""

    expects = "an address string"

    def read(self, reader: MappingReader, value: object, path: str) -> object:
        if not isinstance(value, str):
            reader.problem(path, f"expected an address string, got {kind_name(value)}")
            return None
        try:
            return parse_address(value, role="backend")
        except ValueError as exc:
            reader.problem(path, str(exc))
            return None


def _address(value: Address | str) -> Address:
    if isinstance(value, TCPAddress | UnixAddress):
        return value
    try:
        return parse_address(value, role="backend")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"backend: {exc}") from None


@attrs.frozen(field_transformer=check_kinds)
class Backend:
    """One backend of a pool.

    Attributes:
        address: where to connect (``HOST:PORT``, ``[IPV6]:PORT`` or ``unix:/PATH``).
        weight: its share of new connections next to the others' (1 to 1000).
        backup: take connections only when no primary backend of the pool does.
    """

    address: Address = attrs.field(converter=_address, metadata=key(_OneAddress(), required=True))
    weight: int = attrs.field(default=1, metadata=key(WholeNumber(1, MAX_WEIGHT)))
    backup: bool = attrs.field(default=False, metadata=key(Flag()))

    def __str__(self) -> str:
        return str(self.address)


def to_backends(
    values: Iterable[Backend | Address | str | Mapping[str, object]] | Backend | Address | str,
) -> tuple[Backend, ...]:
    """A pool's backends from what code may give: :class:`Backend` objects, addresses
    (strings or objects) and ``{"address": ..., "weight": ...}`` mappings, mixed."""
    if isinstance(values, str | TCPAddress | UnixAddress | Backend):
        values = [values]
    result = []
    for value in values:
        if isinstance(value, Backend):
            result.append(value)
        elif isinstance(value, Mapping):
            result.append(_from_mapping(value))
        else:
            result.append(Backend(value))
    return tuple(result)


def _from_mapping(value: Mapping[str, object]) -> Backend:
    reader = MappingReader()
    backend = reader.table(Backend, value, "backend")
    if backend is None:
        raise ConfigError(reader.problems)
    return backend


@attrs.frozen
class Backends(Kind):
    """A non-empty list of backends: address strings and ``{ address, weight, backup }``
    tables, mixed (one string is a one-element list)."""

    expects = "a list of addresses"

    def read(self, reader: MappingReader, value: object, path: str) -> object:
        value = address_list(reader, value, path, tables=True)
        if value is None:
            return None
        result: list[Backend] = []
        for index, item in enumerate(value):
            where = f"{path}[{index}]"
            if isinstance(item, dict):
                backend = reader.table(Backend, item, where)
                if backend is not None:
                    result.append(backend)
                continue
            if not isinstance(item, str):
                reader.problem(
                    where, f"expected an address string or a table, got {kind_name(item)}"
                )
                continue
            try:
                result.append(Backend(parse_address(item, role="backend")))
            except ValueError as exc:
                reader.problem(where, str(exc))
        return tuple(result)
