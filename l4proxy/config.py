"""The configuration tree, built and validated once at load time: :class:`Config`
(the top level), the listener classes it holds (:mod:`l4proxy.listenerconfig`,
re-exported here) and reading the whole file.

Two ways in, one set of rules:

* :meth:`Config.from_mapping` / :meth:`Config.load` read the TOML shape (or the CLI's
  flags, which the CLI turns into the same mapping) and collect *every* problem into a
  single :class:`~l4proxy.errors.ConfigError` whose lines name the key path, e.g.
  ``listeners[1].backends[0]: expected HOST:PORT, ...``.
* Building the classes in code (``ListenerConfig(name=..., listen=[":5432"], ...)``)
  runs the same converters and checks, raising ``ConfigError`` on the first problem.

The running proxy never re-parses strings: addresses are already
:class:`~l4proxy.addresses.TCPAddress` / :class:`~l4proxy.addresses.UnixAddress`.

Adding a setting:
    Every key is an attrs field whose metadata (:func:`~l4proxy.configkeys.key`)
    says what it accepts, its command-line flag and whether it is also a top-level
    default. A per-listener setting is one field of :class:`ListenerConfig`::

        linger: float = attrs.field(
            default=0.0, metadata=key(Seconds(), flag="--linger", inherit=True)
        )

    plus its ``@click.option("--linger", ...)`` in :mod:`l4proxy.cli`. Reading it from
    the file (with key-path messages), checking it in code, the top-level default, the
    flag's place in the configuration and the flag's name in error messages all come
    from that field (see :mod:`l4proxy.configkeys`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import attrs

from .addresses import Address, TCPAddress
from .configkeys import Key, MappingReader, check_kinds, flag_along, key, keys_of, read_toml
from .configkinds import (
    Choice,
    Endpoint,
    Tables,
    WholeNumber,
    endpoint_value,
    enum_value,
    server_name_problem,
)
from .errors import ConfigError
from .listenerconfig import (
    CertKey,
    ListenerConfig,
    LogFormat,
    PreambleName,
    RouteConfig,
    TLSConfig,
    TLSVersion,
)

__all__ = [
    "CertKey",
    "Config",
    "ListenerConfig",
    "LogFormat",
    "LogLevel",
    "PreambleName",
    "RouteConfig",
    "TLSConfig",
    "TLSVersion",
    "flag_for",
    "read_toml",
    "server_name_problem",
    "top_level_keys",
]


class LogLevel(enum.StrEnum):
    """Threshold of the diagnostic log (not the access log)."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def _listener_tuple(values: Iterable[ListenerConfig]) -> tuple[ListenerConfig, ...]:
    return tuple(values)


def _log_level(value: LogLevel | str) -> LogLevel:
    return enum_value("log_level", LogLevel, value)


def _metrics(value: TCPAddress | str | None) -> TCPAddress | None:
    return None if value is None else endpoint_value("metrics", value)


@attrs.frozen(kw_only=True, field_transformer=check_kinds)
class Config:
    """The whole proxy: its listeners and process-wide settings.

    Example:
        >>> config = Config(listeners=[ListenerConfig(listen=["127.0.0.1:0"],
        ...                                           backends=["127.0.0.1:6379"])])
        >>> config.listeners[0].name
        '127.0.0.1:0'
    """

    # The top-level keys, next to the listener keys with inherit=True.
    listeners: tuple[ListenerConfig, ...] = attrs.field(
        converter=_listener_tuple,
        metadata=key(
            Tables(
                ListenerConfig,
                allow_empty=True,  # refused by _cross_check, with its own message
                required_message="at least one [[listeners]] table is required",
            ),
            required=True,
        ),
    )
    log_level: LogLevel = attrs.field(
        default=LogLevel.INFO, converter=_log_level, metadata=key(Choice(LogLevel))
    )
    workers: int = attrs.field(default=1, metadata=key(WholeNumber(1, 256), flag="--workers"))
    #: The whole process's most open connections (each listener may have its own too).
    max_connections: int | None = attrs.field(
        default=None, metadata=key(WholeNumber(1, 10**9), flag="--max-connections")
    )
    #: Where to serve /metrics, /healthz and /readyz (docs/metrics.md); with workers,
    #: worker w on this port + w - 1.
    metrics: TCPAddress | None = attrs.field(
        default=None, converter=_metrics, metadata=key(Endpoint(), flag="--metrics")
    )

    def __attrs_post_init__(self) -> None:
        problems = _cross_check(self.listeners)
        if self.metrics is not None and self.metrics.port + self.workers - 1 > 65535:
            problems.append(
                f"metrics: port {self.metrics.port} leaves no port for each of the "
                f"{self.workers} workers (they serve on {self.metrics.port} to "
                f"{self.metrics.port + self.workers - 1})"
            )
        if problems:
            raise ConfigError(problems)

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read and validate a TOML file. Raises ``ConfigError`` naming the file."""
        return cls.from_mapping(read_toml(path), source=str(path), base_dir=Path(path).parent)

    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, object],
        *,
        source: str | None = None,
        base_dir: str | Path | None = None,
    ) -> Config:
        """Build from the TOML shape, reporting every problem at once with its key path.

        Relative file paths (certificates, keys, CA files, access logs) are taken
        relative to ``base_dir`` when given (``load`` passes the file's directory).
        """
        reader = MappingReader(base_dir)
        config = _read_config(reader, data)
        if reader.problems or config is None:
            raise ConfigError(reader.problems, source=source)
        return config


#: Keys that name a listener: at the top level they are a misplaced listener, not a typo.
_LISTENER_ONLY = ("listen", "backends", "name")


def top_level_keys() -> dict[str, Key]:
    """The keys of the top level: the config's own and the listeners' defaults."""
    inherited = {name: spec for name, spec in keys_of(ListenerConfig).items() if spec.inherit}
    return {**keys_of(Config), **inherited}


def flag_for(path: str) -> str | None:
    """The command-line flag for a key path of the command line's configuration (its
    one listener and top-level settings), or ``None`` if no flag sets it.

    Example:
        >>> flag_for("listeners[0].tls.certs[1].key"), flag_for("idle_timeout")
        ('--tls-key', '--idle-timeout')
    """
    names = [re.sub(r"\[\d+\]$", "", name) for name in path.split(".")]
    top = top_level_keys().get(names[0])
    if top is not None and len(names) == 1:
        return top.flag
    return flag_along(Config, names)


def _read_config(reader: MappingReader, data: object) -> Config | None:
    """The whole file: top-level keys, then each listener on top of the defaults."""
    if not isinstance(data, Mapping):
        reader.problem("", f"expected a table at the top level, got {type(data).__name__}")
        return None
    keys = top_level_keys()
    reader.reject_unknown({k: v for k, v in data.items() if k not in _LISTENER_ONLY}, keys, "")
    for name in _LISTENER_ONLY:
        if name in data:
            reader.problem(name, "belongs in a [[listeners]] table")
    defaults = reader.values({n: spec for n, spec in keys.items() if spec.inherit}, data, "")
    own = keys_of(Config)
    listeners_kind = own.pop("listeners").kind
    settings = reader.values(own, data, "")
    assert isinstance(listeners_kind, Tables)
    raw = data.get("listeners")
    read = listeners_kind.read_each(reader, raw, "listeners", defaults)
    if read is None:
        return None
    listeners = [item if isinstance(item, ListenerConfig) else None for item in read]
    assert isinstance(raw, list)
    _name_unnamed_duplicates(
        listeners, [isinstance(item, Mapping) and "name" in item for item in raw]
    )
    reader.problems.extend(_cross_check(listeners))
    if reader.problems:
        return None
    complete = tuple(listener for listener in listeners if listener is not None)
    try:
        return Config(listeners=complete, **settings)  # type: ignore[arg-type]  # read by their kinds
    except ConfigError as exc:  # rules across top-level keys (metrics and workers)
        reader.problems.extend(exc.problems)
        return None


def _cross_check(listeners: Sequence[ListenerConfig | None]) -> list[str]:
    """Rules that span listeners: unique names, no two listeners on one address.

    ``None`` stands for a listener that already failed its own checks, so the indexes
    in the messages stay those of the file while the others are still checked.
    """
    problems: list[str] = []
    if not listeners:
        problems.append("listeners: at least one listener is required")
    names: dict[str, int] = {}
    bound: dict[Address, str] = {}
    wildcard_ports: dict[int, str] = {}
    for index, listener in enumerate(listeners):
        if listener is None:
            continue
        if listener.name in names:
            problems.append(
                f"listeners[{index}].name: duplicate name {listener.name!r} (also listeners[{names[listener.name]}])"
            )
        names.setdefault(listener.name, index)
        for position, address in enumerate(listener.listen):
            path = f"listeners[{index}].listen[{position}]"
            if isinstance(address, TCPAddress) and address.port == 0:
                continue  # every port-0 bind gets its own ephemeral port
            clash = bound.get(address)
            if clash is None and isinstance(address, TCPAddress):
                # ":PORT" takes the port on every interface, so it clashes with any host.
                if address.host is None:
                    clash = next(
                        (
                            p
                            for a, p in bound.items()
                            if isinstance(a, TCPAddress) and a.port == address.port
                        ),
                        None,
                    )
                else:
                    clash = wildcard_ports.get(address.port)
            if clash is not None:
                problems.append(f"{path}: duplicate listen address {str(address)!r} (also {clash})")
                continue
            bound[address] = path
            if isinstance(address, TCPAddress) and address.host is None:
                wildcard_ports[address.port] = path
    return problems


def _name_unnamed_duplicates(listeners: list[ListenerConfig | None], named: list[bool]) -> None:
    """Unnamed listeners default to their first listen address; ``127.0.0.1:0`` twice is
    legitimate (two ephemeral ports), so later ones get ``#INDEX`` appended."""
    seen: set[str] = set()
    for index, listener in enumerate(listeners):
        if listener is None:
            continue
        if not named[index] and listener.name in seen:
            listener = listeners[index] = attrs.evolve(listener, name=f"{listener.name}#{index}")
        seen.add(listener.name)
