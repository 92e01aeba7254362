"""One listener's configuration: where it accepts, where it forwards, TLS and limits.

Frozen attrs classes whose fields are config keys (see :mod:`l4proxy.configkeys`):
their metadata says how each is read from a ``[[listeners]]`` table, checked in code,
inherited from the top level and set by a flag. :mod:`l4proxy.config` puts them
together into the whole :class:`~l4proxy.config.Config`, and re-exports them.
"""

from __future__ import annotations

import enum
import ipaddress
from typing import TYPE_CHECKING

import attrs
from cryptography import x509

from .addresses import Address, Role, TCPAddress, UnixAddress, parse_address
from .backends import Backend, Backends, to_backends
from .balancing import Balance
from .configkeys import check_kinds, key
from .configkinds import (
    Addresses,
    Choice,
    File,
    Flag,
    IPAddress,
    Networks,
    Seconds,
    ServerName,
    Strings,
    Table,
    Tables,
    Text,
    WholeNumber,
    enum_value,
    server_name_problem,
)
from .errors import ConfigError
from .healthconfig import HealthCheck, HealthCheckKind, to_health_check

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from .protocols.dialogue import Preamble

__all__ = [
    "CertKey",
    "ListenerConfig",
    "LogFormat",
    "PreambleName",
    "RouteConfig",
    "TLSConfig",
    "TLSVersion",
]


class ProxyProtocol(enum.StrEnum):
    """The PROXY protocol version sent to backends."""

    V1 = "v1"
    V2 = "v2"


class LogFormat(enum.StrEnum):
    """How access-log lines are written."""

    TEXT = "text"
    JSON = "json"


class PreambleName(enum.StrEnum):
    """The built-in preambles: a cleartext dialogue before TLS (docs/databases-and-mail.md)."""

    POSTGRES = "postgres"
    SMTP = "smtp"
    IMAP = "imap"
    POP3 = "pop3"


@attrs.frozen
class PreambleKind(Choice):
    """A built-in preamble's name; in code also a ``Preamble`` object of the embedder's
    (:mod:`l4proxy.protocols.dialogue`): anything callable with a ``name``."""

    choices: type[enum.StrEnum] = PreambleName

    def check(self, value: object) -> str | None:
        if isinstance(value, str):
            if value in PreambleName.__members__.values():
                return None
            return f"expected {self.expects}, got {value!r}"
        if callable(value) and isinstance(getattr(value, "name", None), str):
            return None
        return f"expected {self.expects} or a Preamble object, got {type(value).__name__}"


def _preamble(value: object) -> object:
    return PreambleName(value) if isinstance(value, str) and value in set(PreambleName) else value


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


def _proxy_protocol(value: ProxyProtocol | str | None) -> ProxyProtocol | None:
    return (
        None
        if value is None
        else enum_value("proxy_protocol", ProxyProtocol, value, "'v1' or 'v2'")
    )


def _balance(value: Balance | str) -> Balance:
    return enum_value("balance", Balance, value)


def _log_format(value: LogFormat | str) -> LogFormat:
    return enum_value("log_format", LogFormat, value, "'text' or 'json'")


def _non_empty(
    _instance: object, attribute: attrs.Attribute[tuple[Address, ...]], value: tuple[Address, ...]
) -> None:
    if not value:
        raise ConfigError(f"{attribute.name}: needs at least one address")


class TLSVersion(enum.StrEnum):
    """Lowest TLS version accepted; TLS 1.0/1.1 and SSLv3 are always refused."""

    TLS1_2 = "1.2"
    TLS1_3 = "1.3"


def _tls_version_text(value: object) -> object:
    """TOML reads ``min_version = 1.3`` as a float."""
    return f"{value:.1f}" if isinstance(value, float) else value


def _tls_version(value: TLSVersion | str | float) -> TLSVersion:
    try:
        return TLSVersion(str(_tls_version_text(value)))
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


@attrs.frozen(kw_only=True, field_transformer=check_kinds)
class CertKey:
    """A certificate (chain) file and its private key file (``None``: the key is in ``cert``)."""

    cert: str = attrs.field(metadata=key(File(), flag="--tls-cert", required=True))
    key: str | None = attrs.field(default=None, metadata=key(File(), flag="--tls-key"))


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


@attrs.frozen(kw_only=True, field_transformer=check_kinds)
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

    certs: tuple[CertKey, ...] = attrs.field(
        converter=_cert_keys,
        metadata=key(
            Tables(
                CertKey,
                expects="a list of {cert, key} tables",
                wrong="expected a non-empty list of {{cert, key}} tables",
                item_wrong='expected a table like {cert = "a.pem", key = "a.key"}',
            ),
            required=True,
        ),
    )
    client_ca: str | None = attrs.field(default=None, metadata=key(File(), flag="--client-ca"))
    allow_subjects: tuple[str, ...] = attrs.field(
        default=(), converter=_strings, metadata=key(Strings())
    )
    allow_sans: tuple[str, ...] = attrs.field(
        default=(), converter=_strings, metadata=key(Strings())
    )
    alpn: tuple[str, ...] = attrs.field(
        default=(), converter=_strings, metadata=key(Strings(), flag="--alpn")
    )
    min_version: TLSVersion = attrs.field(
        default=TLSVersion.TLS1_2,
        converter=_tls_version,
        metadata=key(
            Choice(TLSVersion, message="'1.2' or '1.3'", parse=_tls_version_text),
            flag="--tls-min-version",
        ),
    )

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


@attrs.frozen(kw_only=True, field_transformer=check_kinds)
class RouteConfig:
    """Connections whose SNI matches ``sni`` (and, if given, offer one of ``alpn``) go
    to ``backends``. Exact names beat ``*.`` wildcards, which beat the listener's
    default pool; among equals, the first route listed wins."""

    sni: tuple[str, ...] = attrs.field(
        converter=_server_names, metadata=key(Strings(), required=True)
    )
    backends: tuple[Backend, ...] = attrs.field(
        converter=to_backends, validator=_non_empty, metadata=key(Backends(), required=True)
    )
    alpn: tuple[str, ...] = attrs.field(default=(), converter=_strings, metadata=key(Strings()))
    balance: Balance | None = attrs.field(
        default=None, converter=attrs.converters.optional(_balance), metadata=key(Choice(Balance))
    )


def _routes(values: Iterable[RouteConfig]) -> tuple[RouteConfig, ...]:
    return tuple(values)


@attrs.frozen(kw_only=True, field_transformer=check_kinds)
class ListenerConfig:
    """One listener: where to accept, which pool to forward to, and its limits.

    Attributes:
        name: appears in the access log; defaults to the first listen address.
        listen: addresses to accept on; ``:PORT`` binds every interface (IPv4 and IPv6).
        backends: the pool, each tried at most once per client connection, the first
            as ``balance`` picks it.
        balance: ``round-robin``, ``least-conn``, ``random`` (two choices) or
            ``source-hash`` (:mod:`l4proxy.balancing`); a route may set its own.
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
        preamble: the cleartext dialogue clients speak before TLS (``postgres``,
            ``smtp``, ``imap``, ``pop3``, or in code a ``Preamble`` object); needs ``tls``.
        allow_plaintext: with ``preamble = "postgres"``: a client that starts without
            TLS is forwarded in cleartext instead of refused.
        allow, deny: client networks (CIDRs) let in or turned away before any byte is
            read; deny wins; without ``allow`` everything not denied is let in.
        max_connections: this listener's most open connections; more are closed at once.
        max_connections_per_ip: one client's most open connections (IPv6 clients are
            grouped by ``per_ip_ipv6_prefix`` bits).
        rate_per_ip: one client's most new connections per second (burst: as many).
        accept_proxy_protocol: peers (CIDRs) that must open with a PROXY header, whose
            source then stands for the client everywhere.
        proxy_protocol: ``v1`` or ``v2``: a PROXY header starts every backend connection.
        source_address: the local address backend connections are made from (the port
            is the kernel's), so backends can let in the proxy alone.
        health_check: active health checks of every backend of the listener and its
            routes (:class:`~l4proxy.healthconfig.HealthCheck`; a number of seconds is
            the interval); ``None``: passive health only.
    """

    # The keys of a [[listeners]] table. With inherit=True, also top-level defaults.
    listen: tuple[Address, ...] = attrs.field(
        converter=_listen_addresses,
        validator=_non_empty,
        metadata=key(Addresses("listen"), flag="--listen", required=True),
    )
    backends: tuple[Backend, ...] = attrs.field(
        default=(),
        converter=to_backends,
        metadata=key(Backends(), flag="--backend", required=True, unless="routes"),
    )
    name: str = attrs.field(metadata=key(Text()))
    tls: TLSConfig | None = attrs.field(default=None, metadata=key(Table(TLSConfig)))
    passthrough: bool = attrs.field(default=False, metadata=key(Flag(), flag="--passthrough"))
    preamble: PreambleName | Preamble | None = attrs.field(
        default=None, converter=_preamble, metadata=key(PreambleKind(), flag="--preamble")
    )
    allow_plaintext: bool = attrs.field(
        default=False, metadata=key(Flag(), flag="--allow-plaintext")
    )
    routes: tuple[RouteConfig, ...] = attrs.field(
        default=(),
        converter=_routes,
        metadata=key(
            Tables(RouteConfig, wrong="expected a non-empty array of [[listeners.routes]] tables"),
            flag="--route",
        ),
    )
    handshake_timeout: float = attrs.field(
        default=10.0,
        metadata=key(Seconds(positive=True), flag="--handshake-timeout", inherit=True),
    )
    backend_tls: bool = attrs.field(
        default=False, metadata=key(Flag(), flag="--backend-tls", inherit=True)
    )
    backend_ca: str | None = attrs.field(
        default=None, metadata=key(File(), flag="--backend-ca", inherit=True)
    )
    backend_sni: str | None = attrs.field(
        default=None, metadata=key(ServerName(), flag="--backend-sni", inherit=True)
    )
    splice: bool = attrs.field(default=True, metadata=key(Flag(), inherit=True))
    connect_timeout: float = attrs.field(
        default=5.0, metadata=key(Seconds(positive=True), flag="--connect-timeout", inherit=True)
    )
    idle_timeout: float = attrs.field(
        default=0.0, metadata=key(Seconds(), flag="--idle-timeout", inherit=True)
    )
    drain_timeout: float = attrs.field(
        default=30.0, metadata=key(Seconds(), flag="--drain-timeout", inherit=True)
    )
    access_log: str | None = attrs.field(
        default=None, metadata=key(File(dash=True), flag="--access-log", inherit=True)
    )
    allow: tuple[str, ...] = attrs.field(
        default=(), converter=_strings, metadata=key(Networks(), flag="--allow", inherit=True)
    )
    deny: tuple[str, ...] = attrs.field(
        default=(), converter=_strings, metadata=key(Networks(), flag="--deny", inherit=True)
    )
    max_connections: int | None = attrs.field(default=None, metadata=key(WholeNumber(1, 10**9)))
    max_connections_per_ip: int | None = attrs.field(
        default=None,
        metadata=key(WholeNumber(1, 10**9), flag="--max-connections-per-ip", inherit=True),
    )
    rate_per_ip: int | None = attrs.field(
        default=None, metadata=key(WholeNumber(1, 10**9), flag="--rate-per-ip", inherit=True)
    )
    accept_proxy_protocol: tuple[str, ...] = attrs.field(
        default=(),
        converter=_strings,
        metadata=key(Networks(), flag="--accept-proxy-protocol", inherit=True),
    )
    proxy_protocol: ProxyProtocol | None = attrs.field(
        default=None,
        converter=_proxy_protocol,
        metadata=key(Choice(ProxyProtocol), flag="--proxy-protocol", inherit=True),
    )
    balance: Balance = attrs.field(
        default=Balance.ROUND_ROBIN,
        converter=_balance,
        metadata=key(Choice(Balance), flag="--balance", inherit=True),
    )
    source_address: str | None = attrs.field(
        default=None, metadata=key(IPAddress(), flag="--source-address", inherit=True)
    )
    per_ip_ipv6_prefix: int = attrs.field(
        default=64, metadata=key(WholeNumber(1, 128), flag="--per-ip-ipv6-prefix", inherit=True)
    )
    log_format: LogFormat = attrs.field(
        default=LogFormat.TEXT,
        converter=_log_format,
        metadata=key(Choice(LogFormat), flag="--log-format", inherit=True),
    )
    health_check: HealthCheck | None = attrs.field(
        default=None,
        converter=attrs.converters.optional(to_health_check),
        metadata=key(HealthCheckKind(), flag="--health-check", inherit=True),
    )

    def _source_address_problems(self) -> list[str]:
        """A source address of one family cannot reach IP-literal backends of the other."""
        if self.source_address is None:
            return []
        version = ipaddress.ip_address(self.source_address).version
        pools = [self.backends, *(route.backends for route in self.routes)]
        for address in (backend.address for pool in pools for backend in pool):
            host = getattr(address, "host", None)
            try:
                other = ipaddress.ip_address(host).version if host else version
            except ValueError:
                continue  # a host name: resolved per connect, where its family can match
            if other != version:
                return [
                    f"source_address: IPv{version} address {self.source_address} cannot "
                    f"reach backend {address} (IPv{other})"
                ]
        return []

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
        problems.extend(self._preamble_problems())
        problems.extend(self._source_address_problems())
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
        if self.backend_tls and self.backend_sni is None:
            pools = [self.backends, *(route.backends for route in self.routes)]
            unix = next(
                (b for pool in pools for b in pool if isinstance(b.address, UnixAddress)), None
            )
            if unix is not None:
                problems.append(
                    f"backend_sni: needed with backend_tls for {unix} (no host name to verify)"
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

    def _preamble_problems(self) -> list[str]:
        if self.preamble is None:
            return ["allow_plaintext: needs a preamble (postgres)"] if self.allow_plaintext else []
        name = str(self.preamble) if isinstance(self.preamble, str) else self.preamble.name
        problems = []
        if self.tls is None:
            problems.append(
                f"preamble: {name!r} needs certificates (tls.certs, --tls-cert) to terminate"
                " the TLS it starts"
            )
        if self.passthrough:
            problems.append("preamble: cannot be combined with passthrough")
        postgres = self.preamble is PreambleName.POSTGRES
        if self.allow_plaintext and isinstance(self.preamble, PreambleName) and not postgres:
            problems.append(f"allow_plaintext: only with preamble 'postgres', not {name!r}")
        return problems

    @property
    def inspects_tls(self) -> bool:
        """Whether the listener reads a ClientHello (terminating or passthrough)."""
        return self.tls is not None or self.passthrough

    @name.default
    def _name_default(self) -> str:
        return str(self.listen[0]) if self.listen else "listener"
