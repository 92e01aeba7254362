"""The configuration tree: frozen attrs classes, built and validated once at load time.

Two ways in, one set of rules:

* :meth:`Config.from_mapping` / :meth:`Config.load` read the TOML shape (or the CLI's
  flags, which the CLI turns into the same mapping) and collect *every* problem into a
  single :class:`~l4proxy.errors.ConfigError` whose lines name the key path, e.g.
  ``listeners[1].backends[0]: expected HOST:PORT, ...``.
* Building the classes in code (``ListenerConfig(name=..., listen=[":5432"], ...)``)
  runs the same converters and checks, raising ``ConfigError`` on the first problem.

The running proxy never re-parses strings: addresses are already
:class:`~l4proxy.addresses.TCPAddress` / :class:`~l4proxy.addresses.UnixAddress`.
"""

from __future__ import annotations

import difflib
import enum
import math
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import attrs
from cryptography import x509

from .addresses import HOSTNAME_LABEL, Address, Role, TCPAddress, UnixAddress, parse_address
from .errors import ConfigError

__all__ = [
    "CertKey",
    "Config",
    "ListenerConfig",
    "LogFormat",
    "LogLevel",
    "RouteConfig",
    "TLSConfig",
    "TLSVersion",
]

T = TypeVar("T")


class LogFormat(enum.StrEnum):
    """How access-log lines are written."""

    TEXT = "text"
    JSON = "json"


class LogLevel(enum.StrEnum):
    """Threshold of the diagnostic log (not the access log)."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def _to_addresses(
    values: Iterable[Address | str] | Address | str, role: Role
) -> tuple[Address, ...]:
    if isinstance(values, str | TCPAddress | UnixAddress):
        values = [values]
    result: list[Address] = []
    for value in values:
        if isinstance(value, TCPAddress | UnixAddress):
            result.append(value)
            continue
        try:
            result.append(parse_address(value, role=role))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{role}: {exc}") from None
    return tuple(result)


def _listen_addresses(values: Iterable[Address | str] | Address | str) -> tuple[Address, ...]:
    return _to_addresses(values, "listen")


def _backend_addresses(values: Iterable[Address | str] | Address | str) -> tuple[Address, ...]:
    return _to_addresses(values, "backend")


def _listener_tuple(values: Iterable[ListenerConfig]) -> tuple[ListenerConfig, ...]:
    return tuple(values)


def _duration(*, positive: bool = False) -> Callable[[object, attrs.Attribute[float], float], None]:
    def check(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
        problem = _duration_problem(value, positive=positive)
        if problem:
            raise ConfigError(f"{attribute.name}: {problem}")

    return check


def _duration_problem(value: object, *, positive: bool) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"expected a number of seconds, got {value!r}"
    if math.isnan(value) or value < 0 or (positive and value == 0):
        return f"expected a number of seconds {'> 0' if positive else '>= 0'}, got {value!r}"
    return None


def _log_format(value: LogFormat | str) -> LogFormat:
    try:
        return LogFormat(value)
    except ValueError:
        raise ConfigError(f"log_format: expected 'text' or 'json', got {value!r}") from None


def _log_level(value: LogLevel | str) -> LogLevel:
    try:
        return LogLevel(value)
    except ValueError:
        choices = ", ".join(repr(str(level)) for level in LogLevel)
        raise ConfigError(f"log_level: expected one of {choices}, got {value!r}") from None


def _non_empty(
    _instance: object, attribute: attrs.Attribute[tuple[Address, ...]], value: tuple[Address, ...]
) -> None:
    if not value:
        raise ConfigError(f"{attribute.name}: needs at least one address")


def _access_log(
    _instance: object, _attribute: attrs.Attribute[str | None], value: str | None
) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"access_log: expected a file path or '-', got {value!r}")


class TLSVersion(enum.StrEnum):
    """Lowest TLS version accepted; TLS 1.0/1.1 and SSLv3 are always refused."""

    TLS1_2 = "1.2"
    TLS1_3 = "1.3"


def _tls_version(value: TLSVersion | str | float) -> TLSVersion:
    text = f"{value:.1f}" if isinstance(value, float) else value
    try:
        return TLSVersion(text)
    except ValueError:
        raise ConfigError(f"min_version: expected '1.2' or '1.3', got {value!r}") from None


def _strings(values: Iterable[str] | str) -> tuple[str, ...]:
    return (values,) if isinstance(values, str) else tuple(values)


def _server_names(values: Iterable[str] | str) -> tuple[str, ...]:
    """SNI patterns: exact names or ``*.`` plus a domain; lower-cased, trailing dot dropped."""
    names = []
    for value in _strings(values):
        name = value.lower().removesuffix(".") if isinstance(value, str) else value
        problem = server_name_problem(name)
        if problem:
            raise ConfigError(f"sni: {problem}")
        names.append(name)
    if not names:
        raise ConfigError("sni: needs at least one name")
    return tuple(names)


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


@attrs.frozen(kw_only=True)
class CertKey:
    """A certificate (chain) file and its private key file (``None``: the key is in ``cert``)."""

    cert: str
    key: str | None = None


def _cert_keys(values: Iterable[CertKey | Mapping[str, str] | str]) -> tuple[CertKey, ...]:
    result = []
    for value in values:
        if isinstance(value, CertKey):
            result.append(value)
        elif isinstance(value, str):
            result.append(CertKey(cert=value))
        else:
            result.append(CertKey(**value))
    if not result:
        raise ConfigError("certs: needs at least one {cert, key} pair")
    return tuple(result)


@attrs.frozen(kw_only=True)
class TLSConfig:
    """TLS termination for a listener.

    Attributes:
        certs: certificates to serve; chosen by SNI against each certificate's DNS
            names (exact, then ``*.`` wildcard); the first is served for no or unknown SNI.
        client_ca: require client certificates chaining to this CA file (mTLS).
        allow_subjects: with ``client_ca``, accept only these subjects (RFC 4514
            strings such as ``CN=alice,O=Example``); empty accepts any.
        allow_sans: with ``client_ca``, accept only certificates with one of these
            subject alternative names (DNS names, e-mail addresses, URIs); empty accepts any.
        alpn: protocols to offer, in preference order.
        min_version: ``1.2`` (default) or ``1.3``.
    """

    certs: tuple[CertKey, ...] = attrs.field(converter=_cert_keys)
    client_ca: str | None = None
    allow_subjects: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    allow_sans: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    alpn: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    min_version: TLSVersion = attrs.field(default=TLSVersion.TLS1_2, converter=_tls_version)

    def __attrs_post_init__(self) -> None:
        if (self.allow_subjects or self.allow_sans) and not self.client_ca:
            raise ConfigError("allow_subjects/allow_sans need client_ca")
        for index, subject in enumerate(self.allow_subjects):
            try:
                x509.Name.from_rfc4514_string(subject)
            except ValueError:
                raise ConfigError(
                    f"allow_subjects[{index}]: {subject!r} is not an RFC 4514 name like 'CN=alice,O=Example'"
                ) from None
        for protocol in self.alpn:
            if not protocol or len(protocol.encode()) > 255:
                raise ConfigError(f"alpn: bad protocol name {protocol!r}")


@attrs.frozen(kw_only=True)
class RouteConfig:
    """Connections whose SNI matches ``sni`` (and, if given, offer one of ``alpn``) go
    to ``backends``. Exact names beat ``*.`` wildcards, which beat the listener's
    default pool; among equals, the first route listed wins."""

    sni: tuple[str, ...] = attrs.field(converter=_server_names)
    backends: tuple[Address, ...] = attrs.field(converter=_backend_addresses, validator=_non_empty)
    alpn: tuple[str, ...] = attrs.field(default=(), converter=_strings)


def _routes(values: Iterable[RouteConfig]) -> tuple[RouteConfig, ...]:
    return tuple(values)


@attrs.frozen(kw_only=True)
class ListenerConfig:
    """One listener: where to accept, which pool to forward to, and its limits.

    Attributes:
        name: appears in the access log; defaults to the first listen address.
        listen: addresses to accept on; ``:PORT`` binds every interface (IPv4 and IPv6).
        backends: the pool, tried round-robin; each at most once per client connection.
        connect_timeout: seconds allowed per backend connect attempt.
        idle_timeout: seconds without a byte in either direction before both sides are
            closed; ``0`` turns it off.
        drain_timeout: on shutdown, seconds established connections may keep running.
        access_log: file path, ``-`` for standard output, or ``None`` for the
            ``l4proxy.access`` logger.
        log_format: ``text`` (logfmt-style) or ``json`` (one object per line).
        tls: terminate TLS with these certificates (see :class:`TLSConfig`).
        passthrough: read the ClientHello (SNI, ALPN) to route, but do not terminate.
        routes: SNI (and ALPN) routes to other pools; needs ``tls`` or ``passthrough``.
        handshake_timeout: seconds for the ClientHello and the TLS handshake.
        backend_tls: re-encrypt to the backends and verify their certificates.
        backend_ca: CA file to verify backends with (default: the system store).
        backend_sni: server name to send to and verify at backends (default: the
            backend's host name).
        splice: move plain TCP bytes with zero-copy ``splice(2)`` (Linux) instead of
            through Python; on by default, off only to compare or to work around a kernel.
    """

    listen: tuple[Address, ...] = attrs.field(converter=_listen_addresses, validator=_non_empty)
    backends: tuple[Address, ...] = attrs.field(default=(), converter=_backend_addresses)
    name: str = attrs.field()
    tls: TLSConfig | None = None
    passthrough: bool = False
    routes: tuple[RouteConfig, ...] = attrs.field(default=(), converter=_routes)
    handshake_timeout: float = attrs.field(default=10.0, validator=_duration(positive=True))
    backend_tls: bool = False
    backend_ca: str | None = None
    backend_sni: str | None = None
    splice: bool = True
    connect_timeout: float = attrs.field(default=5.0, validator=_duration(positive=True))
    idle_timeout: float = attrs.field(default=0.0, validator=_duration())
    drain_timeout: float = attrs.field(default=30.0, validator=_duration())
    access_log: str | None = attrs.field(default=None, validator=_access_log)
    log_format: LogFormat = attrs.field(default=LogFormat.TEXT, converter=_log_format)

    def __attrs_post_init__(self) -> None:
        problems = []
        if not self.backends and not self.routes:
            problems.append("backends: needs at least one address (or [[listeners.routes]])")
        if self.passthrough and self.tls is not None:
            problems.append("passthrough: cannot be combined with tls (terminating)")
        if self.passthrough and self.backend_tls:
            problems.append(
                "backend_tls: cannot be combined with passthrough (the client's TLS goes to the backend as is)"
            )
        if self.routes and self.tls is None and not self.passthrough:
            problems.append(
                "routes: need tls (to terminate) or passthrough = true (to read the SNI)"
            )
        if not self.backend_tls:
            problems.extend(
                f"{key}: needs backend_tls = true"
                for key in ("backend_ca", "backend_sni")
                if getattr(self, key)
            )
        if self.backend_sni is not None:
            problem = server_name_problem(self.backend_sni)
            if problem or self.backend_sni.startswith("*"):
                problems.append(f"backend_sni: {problem or 'must be a host name, not a wildcard'}")
        seen: dict[tuple[str, tuple[str, ...]], int] = {}
        for index, route in enumerate(self.routes):
            for name in route.sni:
                key = (name, route.alpn)
                if key in seen:
                    problems.append(
                        f"routes[{index}].sni: {name!r} already routed by routes[{seen[key]}]"
                    )
                seen.setdefault(key, index)
        if problems:
            raise ConfigError(problems)

    @property
    def inspects_tls(self) -> bool:
        """Whether the listener reads a ClientHello (terminating or passthrough)."""
        return self.tls is not None or self.passthrough

    @name.default
    def _name_default(self) -> str:
        return str(self.listen[0]) if self.listen else "listener"

    @name.validator
    def _check_name(self, _attribute: attrs.Attribute[str], value: str) -> None:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"name: expected a non-empty string, got {value!r}")


@attrs.frozen(kw_only=True)
class Config:
    """The whole proxy: its listeners and process-wide settings.

    Example:
        >>> config = Config(listeners=[ListenerConfig(listen=["127.0.0.1:0"],
        ...                                           backends=["127.0.0.1:6379"])])
        >>> config.listeners[0].name
        '127.0.0.1:0'
    """

    listeners: tuple[ListenerConfig, ...] = attrs.field(converter=_listener_tuple)
    log_level: LogLevel = attrs.field(default=LogLevel.INFO, converter=_log_level)
    workers: int = attrs.field(default=1)

    @workers.validator
    def _check_workers(self, _attribute: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
            raise ConfigError(f"workers: expected a whole number from 1 to 256, got {value!r}")

    def __attrs_post_init__(self) -> None:
        problems = _cross_check(self.listeners)
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
        problems: list[str] = []
        config = _MappingReader(problems, base_dir).config(data)
        if problems or config is None:
            raise ConfigError(problems, source=source)
        return config


def read_toml(path: str | Path) -> dict[str, object]:
    """Read a TOML file into a mapping, or raise ``ConfigError`` naming the file."""
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file: {exc.strerror or exc}", source=str(path)
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", source=str(path)) from exc


_LISTENER_SETTINGS = (
    "connect_timeout",
    "idle_timeout",
    "drain_timeout",
    "handshake_timeout",
    "access_log",
    "log_format",
    "backend_tls",
    "backend_ca",
    "backend_sni",
    "splice",
)
_TOP_LEVEL_KEYS = ("listeners", "log_level", "workers", *_LISTENER_SETTINGS)
_LISTENER_KEYS = ("name", "listen", "backends", "tls", "passthrough", "routes", *_LISTENER_SETTINGS)
_TLS_KEYS = ("certs", "client_ca", "allow_subjects", "allow_sans", "alpn", "min_version")
_ROUTE_KEYS = ("sni", "alpn", "backends")
#: Settings that name files: relative paths in a config file are relative to the file.
_FILE_SETTINGS = ("access_log", "backend_ca")


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


class _MappingReader:
    """Turns the TOML shape into config classes, appending problems instead of raising."""

    def __init__(self, problems: list[str], base_dir: str | Path | None = None) -> None:
        self.problems = problems
        self.base_dir = Path(base_dir) if base_dir is not None else None

    def config(self, data: object) -> Config | None:
        if not isinstance(data, Mapping):
            self.problems.append(f"expected a table at the top level, got {type(data).__name__}")
            return None
        self._reject_unknown(data, _TOP_LEVEL_KEYS, "")
        for key in ("listen", "backends", "name"):
            if key in data:
                self.problems.append(f"{key}: belongs in a [[listeners]] table")
        defaults: dict[str, object] = {}
        for key in _LISTENER_SETTINGS:
            if key in data:
                value = self._setting(key, data[key], key)
                if value is not None:
                    defaults[key] = value
        log_level = self._enum(LogLevel, data.get("log_level", LogLevel.INFO), "log_level")
        workers = data.get("workers", 1)
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 256:
            self.problems.append(f"workers: expected a whole number from 1 to 256, got {workers!r}")
            workers = 1
        raw_listeners = data.get("listeners")
        if raw_listeners is None:
            self.problems.append("listeners: at least one [[listeners]] table is required")
            return None
        if not isinstance(raw_listeners, list):
            self.problems.append(
                f"listeners: expected an array of tables, got {_kind(raw_listeners)}"
            )
            return None
        listeners = [
            self.listener(item, f"listeners[{i}]", defaults) for i, item in enumerate(raw_listeners)
        ]
        _name_unnamed_duplicates(
            listeners, [isinstance(item, Mapping) and "name" in item for item in raw_listeners]
        )
        self.problems.extend(_cross_check(listeners))
        if self.problems:
            return None
        complete = tuple(listener for listener in listeners if listener is not None)
        return Config(listeners=complete, log_level=log_level or LogLevel.INFO, workers=workers)

    def listener(
        self, data: object, path: str, defaults: Mapping[str, object]
    ) -> ListenerConfig | None:
        if not isinstance(data, Mapping):
            self.problems.append(f"{path}: expected a table, got {_kind(data)}")
            return None
        before = len(self.problems)
        self._reject_unknown(data, _LISTENER_KEYS, path + ".")
        kwargs: dict[str, object] = dict(defaults)
        for key in _LISTENER_SETTINGS:
            if key in data:
                value = self._setting(key, data[key], f"{path}.{key}")
                if value is not None:
                    kwargs[key] = value
        if "name" in data:
            name = data["name"]
            if isinstance(name, str) and name.strip():
                kwargs["name"] = name
            else:
                self.problems.append(f"{path}.name: expected a non-empty string, got {name!r}")
        kwargs["listen"] = self._addresses(data.get("listen"), f"{path}.listen", "listen")
        if "backends" in data or "routes" not in data:
            kwargs["backends"] = self._addresses(
                data.get("backends"), f"{path}.backends", "backend"
            )
        if "passthrough" in data:
            kwargs["passthrough"] = self._bool(data["passthrough"], f"{path}.passthrough")
        if "tls" in data:
            kwargs["tls"] = self._tls(data["tls"], f"{path}.tls")
        if "routes" in data:
            kwargs["routes"] = self._routes(data["routes"], f"{path}.routes")
        if len(self.problems) > before:
            return None
        try:
            return ListenerConfig(**kwargs)  # type: ignore[arg-type]  # values were checked above
        except ConfigError as exc:  # cross-field rules of ListenerConfig
            self.problems.extend(f"{path}.{problem}" for problem in exc.problems)
            return None

    def _tls(self, data: object, path: str) -> TLSConfig | None:
        if not isinstance(data, Mapping):
            self.problems.append(f"{path}: expected a table, got {_kind(data)}")
            return None
        before = len(self.problems)
        self._reject_unknown(data, _TLS_KEYS, path + ".")
        kwargs: dict[str, object] = {}
        certs = data.get("certs")
        if certs is None:
            self.problems.append(f"{path}.certs: required (a list of {{cert, key}} tables)")
        elif not isinstance(certs, list) or not certs:
            self.problems.append(f"{path}.certs: expected a non-empty list of {{cert, key}} tables")
        else:
            pairs = []
            for index, item in enumerate(certs):
                item_path = f"{path}.certs[{index}]"
                if not isinstance(item, Mapping):
                    self.problems.append(
                        f'{item_path}: expected a table like {{cert = "a.pem", key = "a.key"}}'
                    )
                    continue
                self._reject_unknown(item, ("cert", "key"), item_path + ".")
                cert = self._file(item.get("cert"), f"{item_path}.cert", required=True)
                key = self._file(item.get("key"), f"{item_path}.key")
                if cert is not None:
                    pairs.append(CertKey(cert=cert, key=key))
            kwargs["certs"] = pairs
        if "client_ca" in data:
            kwargs["client_ca"] = self._file(data["client_ca"], f"{path}.client_ca", required=True)
        for key in ("allow_subjects", "allow_sans", "alpn"):
            if key in data:
                kwargs[key] = self._string_list(data[key], f"{path}.{key}")
        if "min_version" in data:
            value = data["min_version"]
            if isinstance(value, str | float) and not isinstance(value, bool):
                kwargs["min_version"] = value
            else:
                self.problems.append(f"{path}.min_version: expected '1.2' or '1.3', got {value!r}")
        if len(self.problems) > before:
            return None
        try:
            return TLSConfig(**kwargs)  # type: ignore[arg-type]  # values were checked above
        except ConfigError as exc:
            self.problems.extend(f"{path}.{problem}" for problem in exc.problems)
            return None

    def _routes(self, data: object, path: str) -> list[RouteConfig]:
        if not isinstance(data, list) or not data:
            self.problems.append(
                f"{path}: expected a non-empty array of [[listeners.routes]] tables"
            )
            return []
        routes = []
        for index, item in enumerate(data):
            item_path = f"{path}[{index}]"
            if not isinstance(item, Mapping):
                self.problems.append(f"{item_path}: expected a table, got {_kind(item)}")
                continue
            before = len(self.problems)
            self._reject_unknown(item, _ROUTE_KEYS, item_path + ".")
            sni = self._string_list(item.get("sni"), f"{item_path}.sni", required=True)
            alpn = self._string_list(item.get("alpn", []), f"{item_path}.alpn")
            backends = self._addresses(item.get("backends"), f"{item_path}.backends", "backend")
            if len(self.problems) > before:
                continue
            try:
                routes.append(RouteConfig(sni=sni, alpn=alpn, backends=backends))
            except ConfigError as exc:
                self.problems.extend(f"{item_path}.{problem}" for problem in exc.problems)
        return routes

    def _string_list(self, value: object, path: str, *, required: bool = False) -> list[str]:
        if value is None and required:
            self.problems.append(f"{path}: required (a list of strings)")
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self.problems.append(f"{path}: expected a list of strings, got {value!r}")
            return []
        return value

    def _bool(self, value: object, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.problems.append(f"{path}: expected true or false, got {value!r}")
            return None
        return value

    def _file(self, value: object, path: str, *, required: bool = False) -> str | None:
        if value is None:
            if required:
                self.problems.append(f"{path}: required (a file path)")
            return None
        if not isinstance(value, str) or not value:
            self.problems.append(f"{path}: expected a file path, got {value!r}")
            return None
        if self.base_dir is not None and value != "-":
            return str(self.base_dir / value)  # absolute paths stay as they are
        return value

    def _addresses(self, value: object, path: str, role: Role) -> tuple[Address, ...]:
        if value is None:
            self.problems.append(f"{path}: required (a list of addresses)")
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            self.problems.append(f"{path}: expected a list of addresses, got {_kind(value)}")
            return ()
        if not value:
            self.problems.append(f"{path}: needs at least one address")
            return ()
        result: list[Address] = []
        for index, item in enumerate(value):
            try:
                if not isinstance(item, str):
                    raise ValueError(f"expected an address string, got {_kind(item)}")
                result.append(parse_address(item, role=role))
            except ValueError as exc:
                self.problems.append(f"{path}[{index}]: {exc}")
        return tuple(result)

    def _setting(self, key: str, value: object, path: str) -> object | None:
        if key.endswith("_timeout"):
            problem = _duration_problem(
                value, positive=key in ("connect_timeout", "handshake_timeout")
            )
            if problem:
                self.problems.append(f"{path}: {problem}")
                return None
            return float(value)  # type: ignore[arg-type]  # checked by _duration_problem
        if key == "log_format":
            return self._enum(LogFormat, value, path)
        if key == "access_log":
            if not isinstance(value, str) or not value:
                self.problems.append(f"{path}: expected a file path or '-', got {value!r}")
                return None
            return self._file(value, path)
        if key in ("backend_tls", "splice"):
            return self._bool(value, path)
        if key == "backend_ca":
            return self._file(value, path, required=True)
        if key == "backend_sni":
            problem = server_name_problem(value)
            if problem:
                self.problems.append(f"{path}: {problem}")
                return None
            return value
        raise AssertionError(key)  # pragma: no cover

    def _enum(self, kind: type[T], value: object, path: str) -> T | None:
        try:
            return kind(value)  # type: ignore[call-arg]  # kind is a StrEnum subclass
        except ValueError:
            choices = ", ".join(repr(str(member)) for member in kind)  # type: ignore[attr-defined]  # enum classes iterate
            self.problems.append(f"{path}: expected one of {choices}, got {value!r}")
            return None

    def _reject_unknown(
        self, data: Mapping[str, object], allowed: tuple[str, ...], prefix: str
    ) -> None:
        for key in data:
            if key in allowed or (prefix == "" and key in ("listen", "backends", "name")):
                continue
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.problems.append(f"{prefix}{key}: unknown key{hint}")


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


def _kind(value: object) -> str:
    """A TOML-ish name for a value's type, for error messages."""
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)
