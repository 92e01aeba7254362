"""The ``l4proxy`` command: flags (one listener) or ``--config FILE`` (many) into a Config.

No proxy logic lives here: this module parses, builds a :class:`~l4proxy.config.Config`,
configures logging and calls ``trio.run``. Every usage or config error leaves as one
line on standard error and exit status 2; runtime failures (a port in use) exit 1.
"""

from __future__ import annotations

import math
import os
import re
import sys
from functools import partial
from typing import TYPE_CHECKING, NoReturn, TypeVar

import click
import trio

from ._version import __version__
from .addresses import Address, Role, parse_address
from .config import flag_for, server_name_problem, top_level_keys
from .configkinds import File
from .errors import ConfigError
from .runner import command_level, configure_logging, run_proxy
from .sdnotify import Notifier
from .server import Proxy
from .workers import ConfigSource, supervise

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

__all__ = ["cli", "main"]

T = TypeVar("T")


#: A key path of the flags' one listener, anywhere in a message.
_LISTENER_PATH = re.compile(r"listeners\[0\](?:\.\w+(?:\[\d+\])?)+")


class AddressType(click.ParamType[Address, str]):
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` (listen only) or ``unix:/path``."""

    name = "address"

    def __init__(self, role: Role) -> None:
        self.role: Role = role

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> Address:
        try:
            return parse_address(str(value), role=self.role)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class RouteType(click.ParamType[tuple[str, Address], str]):
    """``NAME=ADDR``: an SNI name (exact or ``*.domain``) and a backend address."""

    name = "route"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, Address]:
        if isinstance(value, tuple):
            return value
        name, sep, address = str(value).partition("=")
        if not sep:
            self.fail(
                f"expected NAME=ADDR, e.g. db.example.com=10.0.0.5:5432, got {value!r}", param, ctx
            )
        name = name.lower().removesuffix(".")
        problem = server_name_problem(name)
        if problem:
            self.fail(problem, param, ctx)
        try:
            return name, parse_address(address, role="backend")
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class SecondsType(click.ParamType[float, str]):
    """A duration in seconds: a non-negative number (positive when ``positive``)."""

    name = "seconds"

    def __init__(self, *, positive: bool = False) -> None:
        self.positive = positive

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            seconds = float(str(value))
        except ValueError:
            self.fail(f"expected a number of seconds, got {value!r}", param, ctx)
        if math.isnan(seconds) or seconds < 0 or (self.positive and seconds == 0):
            self.fail(
                f"expected a number of seconds {'> 0' if self.positive else '>= 0'}, got {value!r}",
                param,
                ctx,
            )
        return seconds


@click.command(
    context_settings={"auto_envvar_prefix": "L4PROXY", "help_option_names": ["-h", "--help"]},
    epilog="Exit status: 0 after a clean shutdown, 1 on a runtime failure, 2 on a usage or config error.",
)
@click.option(
    "-l",
    "--listen",
    "listen",
    multiple=True,
    type=AddressType("listen"),
    metavar="ADDR",
    help="Accept on ADDR: HOST:PORT, [V6]:PORT, :PORT (every interface) or unix:/PATH. Repeatable.",
)
@click.option(
    "-b",
    "--backend",
    multiple=True,
    type=AddressType("backend"),
    metavar="ADDR",
    help="Forward to ADDR: HOST:PORT, [V6]:PORT or unix:/PATH. Repeat to build a round-robin pool.",
)
@click.option(
    "--connect-timeout",
    type=SecondsType(positive=True),
    metavar="S",
    help="Seconds per backend connect attempt.  [default: 5]",
)
@click.option(
    "--idle-timeout",
    type=SecondsType(),
    metavar="S",
    help="Close both sides after S seconds with no bytes either way; 0 is off.  [default: 0]",
)
@click.option(
    "--drain-timeout",
    type=SecondsType(),
    metavar="S",
    help="On SIGTERM/SIGINT, seconds established connections may finish.  [default: 30]",
)
@click.option(
    "--allow",
    multiple=True,
    metavar="CIDR",
    help="Let in only clients from CIDR (IPv4 or IPv6; repeatable); others are closed at once.",
)
@click.option(
    "--deny",
    multiple=True,
    metavar="CIDR",
    help="Close connections from CIDR at once, before any read (repeatable; wins over --allow).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1),
    metavar="N",
    help="Most connections open at once, whole process; past it a new one is closed at once.",
)
@click.option(
    "--max-connections-per-ip",
    type=click.IntRange(1),
    metavar="N",
    help="Most connections open at once from one client address (IPv6: per /64).",
)
@click.option(
    "--rate-per-ip",
    type=click.IntRange(1),
    metavar="N",
    help="Most new connections per second from one client address (bursts of N).",
)
@click.option(
    "--per-ip-ipv6-prefix",
    type=click.IntRange(1, 128),
    metavar="BITS",
    help="IPv6 clients sharing this many leading bits count as one client.  [default: 64]",
)
@click.option(
    "--accept-proxy-protocol",
    multiple=True,
    metavar="CIDR",
    help="Peers in CIDR (a load balancer) must open with a PROXY header (v1 or v2), whose "
    "source then stands for the client. Repeatable.",
)
@click.option(
    "--proxy-protocol",
    type=click.Choice(["v1", "v2"]),
    help="Start every backend connection with a PROXY protocol header of this version.",
)
@click.option(
    "--balance",
    type=click.Choice(["round-robin", "least-conn", "random", "source-hash"]),
    help="How a backend is picked: in turn, the fewest open connections, the less loaded "
    "of two at random, or by the client's address.  [default: round-robin]",
)
@click.option(
    "--health-check",
    type=SecondsType(positive=True),
    metavar="S",
    help="Check every backend every S seconds (TCP connect, and the TLS handshake with "
    "--backend-tls): 3 failures mark it down, 2 passes up again.  [default: off]",
)
@click.option(
    "--source-address",
    metavar="ADDR",
    help="Make backend connections from this local IP address (the kernel picks the port).",
)
@click.option(
    "--access-log",
    metavar="PATH|-",
    help="Write one line per connection to PATH, or standard output for '-'.  [default: standard error]",
)
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), help="Access-log format.  [default: text]"
)
@click.option("-v", "--verbose", count=True, help="More diagnostic logging (repeatable).")
@click.option("-q", "--quiet", count=True, help="Less diagnostic logging (repeatable).")
@click.option(
    "-c",
    "--config",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Read listeners and settings from a TOML file.",
)
@click.option(
    "--tls-cert",
    multiple=True,
    metavar="CERT",
    help="Terminate TLS with this certificate (chain) PEM; repeat for more names. The first is "
    "the default for no or unknown SNI.",
)
@click.option(
    "--tls-key",
    multiple=True,
    metavar="KEY",
    help="Private key for the --tls-cert in the same position; omit when each CERT holds its key.",
)
@click.option(
    "--route",
    multiple=True,
    type=RouteType(),
    metavar="NAME=ADDR",
    help="Send SNI NAME (exact, or *.domain) to ADDR; repeat a NAME to build its pool. "
    "Unmatched names use --backend.",
)
@click.option(
    "--alpn",
    multiple=True,
    metavar="PROTO",
    help="ALPN protocol to offer when terminating; repeatable.",
)
@click.option(
    "--passthrough",
    is_flag=True,
    help="Route on the ClientHello's SNI without terminating; the client talks TLS to the backend.",
)
@click.option(
    "--preamble",
    type=click.Choice(["postgres", "smtp", "imap", "pop3"]),
    help="Speak this protocol's cleartext start (PostgreSQL SSLRequest, SMTP/IMAP/POP3 "
    "STARTTLS) before terminating TLS; needs --tls-cert.",
)
@click.option(
    "--allow-plaintext",
    is_flag=True,
    help="With --preamble postgres: forward a client that starts without TLS instead of refusing it.",
)
@click.option(
    "--client-ca", metavar="CA", help="Require client certificates chaining to CA (mTLS)."
)
@click.option(
    "--backend-tls", is_flag=True, help="Re-encrypt to the backends and verify their certificates."
)
@click.option(
    "--backend-ca", metavar="CA", help="Verify backends against CA.  [default: the system store]"
)
@click.option(
    "--backend-sni",
    metavar="NAME",
    help="Name sent to and verified at backends.  [default: backend host]",
)
@click.option(
    "--tls-min-version",
    type=click.Choice(["1.2", "1.3"]),
    help="Oldest TLS version accepted; 1.0/1.1 are always refused.  [default: 1.2]",
)
@click.option(
    "--handshake-timeout",
    type=SecondsType(positive=True),
    metavar="S",
    help="Seconds for the ClientHello and TLS handshake (also in passthrough).  [default: 10]",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    metavar="N",
    help="Worker processes sharing each port (SO_REUSEPORT) under a supervisor.  [default: 1]",
)
@click.option(
    "--watch-config",
    is_flag=True,
    help="Reload when the --config file, or a certificate, key or CA file it names, changes.",
)
@click.option(
    "--metrics",
    metavar="ADDR",
    help="Serve Prometheus /metrics, /healthz and /readyz over HTTP on ADDR (HOST:PORT; "
    "with --workers, worker N on PORT + N - 1).",
)
@click.option("--check", is_flag=True, help="Validate the configuration, print a summary and exit.")
@click.version_option(
    __version__,
    "--version",
    prog_name="l4proxy",
    message="%(prog)s %(version)s",
    allow_from_autoenv=False,
)
def cli(
    listen: tuple[Address, ...],
    backend: tuple[Address, ...],
    verbose: int,
    quiet: int,
    config: str | None,
    tls_cert: tuple[str, ...],
    tls_key: tuple[str, ...],
    route: tuple[tuple[str, Address], ...],
    alpn: tuple[str, ...],
    passthrough: bool,
    preamble: str | None,
    allow_plaintext: bool,
    client_ca: str | None,
    tls_min_version: str | None,
    watch_config: bool,
    check: bool,
    **settings_flags: object,  # the flags of top-level keys (--idle-timeout ...): _settings
) -> int:
    """A TCP/TLS layer-4 reverse proxy: accept on --listen, forward to --backend.

    \b
    Examples:
      l4proxy --listen :5432 --backend 10.0.0.5:5432 --backend 10.0.0.6:5432
      l4proxy --listen :443 --tls-cert site.pem --tls-key site.key --backend 127.0.0.1:8080
      l4proxy --listen :443 --passthrough --route db.example.com=10.0.0.5:5432
      l4proxy --config l4proxy.toml --check
    """
    settings = _settings(settings_flags)
    listener_flags = {
        "--listen": listen,
        "--backend": backend,
        "--tls-cert": tls_cert,
        "--tls-key": tls_key,
        "--route": route,
        "--alpn": alpn,
        "--passthrough": passthrough,
        "--preamble": preamble,
        "--allow-plaintext": allow_plaintext,
        "--client-ca": client_ca,
        "--tls-min-version": tls_min_version,
    }
    if watch_config and config is None:
        raise click.UsageError("--watch-config needs --config (it watches that file)")
    if config is not None:
        given = [flag for flag, value in listener_flags.items() if value]
        if given:
            raise click.UsageError(
                f"{'/'.join(given)} cannot be combined with --config; put them in a [[listeners]] table"
            )
        source = ConfigSource(config, settings)

    else:
        listener = _listener_from_flags(
            listen, backend, tls_cert, tls_key, route, alpn, passthrough, client_ca, tls_min_version
        )
        if preamble:
            listener["preamble"] = preamble
        if allow_plaintext:
            listener["allow_plaintext"] = True

        source = ConfigSource(None, {"listeners": [listener], **settings})
    load = source.load

    flags = config is None
    loaded = _or_usage_error(load, flags=flags)
    log_shift = quiet - verbose
    level = command_level(loaded, log_shift)
    configure_logging(level)
    # Reads certificates and keys now, so bad files exit 2 before anything binds.
    proxy = _or_usage_error(lambda: Proxy(loaded, access_stream=sys.stderr), flags=flags)
    if check:
        count = len(loaded.listeners)
        names = ", ".join(listener.name for listener in loaded.listeners)
        click.echo(
            f"{config or 'command line'}: ok ({count} listener{'s' * (count != 1)}: {names})"
        )
        return 0
    notifier = Notifier.from_environment()  # systemd's Type=notify(-reload); see sdnotify.py
    if loaded.workers > 1:
        return _or_usage_error(
            lambda: trio.run(
                partial(supervise, loaded, source, log_shift, notifier=notifier, watch=watch_config)
            ),
            flags=flags,
        )
    return trio.run(
        partial(
            run_proxy,
            proxy,
            load,
            notifier=notifier,
            watch=config if watch_config else None,
            log_shift=log_shift,
        )
    )


def _settings(flags: Mapping[str, object]) -> dict[str, object]:
    """The top-level keys the settings flags give (those with a ``flag`` in the key
    table), as the file would: ``--idle-timeout 5`` is ``idle_timeout = 5``.

    Flag paths are relative to the working directory, even next to --config (whose own
    relative paths are relative to the file), so file keys are made absolute here.
    """
    settings = {}
    for name, spec in top_level_keys().items():
        if spec.flag is None:
            continue
        value = flags.get(spec.flag.removeprefix("--").replace("-", "_"))
        if value is None or value is False or value == ():  # not given (an absent on/off
            continue  # flag is False, an absent repeatable one empty)
        if isinstance(spec.kind, File) and isinstance(value, str) and value not in ("", "-"):
            value = os.path.abspath(value)  # "" stays, to be refused as the file key would be
        settings[name] = value
    return settings


def _listener_from_flags(
    listen: tuple[Address, ...],
    backend: tuple[Address, ...],
    tls_cert: tuple[str, ...],
    tls_key: tuple[str, ...],
    route: tuple[tuple[str, Address], ...],
    alpn: tuple[str, ...],
    passthrough: bool,
    client_ca: str | None,
    tls_min_version: str | None,
) -> dict[str, object]:
    """The one listener the flags describe, in the config file's shape."""
    if not listen and not backend and not route:
        raise click.UsageError(
            "nothing to proxy: give --listen and --backend, or --config FILE (see --help)"
        )
    if not listen:
        raise click.UsageError("--listen is required with --backend/--route")
    if not backend and not route:
        raise click.UsageError("--backend is required with --listen")
    listener: dict[str, object] = {"listen": [str(a) for a in listen]}
    if backend:
        listener["backends"] = [str(a) for a in backend]
    if route:
        pools: dict[str, list[str]] = {}
        for name, address in route:
            pools.setdefault(name, []).append(str(address))
        listener["routes"] = [{"sni": [name], "backends": pool} for name, pool in pools.items()]
    if passthrough:
        listener["passthrough"] = True
    if tls_key and len(tls_key) != len(tls_cert):
        raise click.UsageError(
            f"got {len(tls_cert)} --tls-cert and {len(tls_key)} --tls-key: give one --tls-key per "
            "--tls-cert, or none when each CERT holds its key"
        )
    tls: dict[str, object] = {}
    if tls_cert:
        tls["certs"] = [
            {"cert": cert, **({"key": tls_key[i]} if tls_key else {})}
            for i, cert in enumerate(tls_cert)
        ]
    if alpn:
        tls["alpn"] = list(alpn)
    if client_ca:
        tls["client_ca"] = client_ca
    if tls_min_version:
        tls["min_version"] = tls_min_version
    if tls and "certs" not in tls:
        needing = [
            flag
            for flag, value in (
                ("--alpn", alpn),
                ("--client-ca", client_ca),
                ("--tls-min-version", tls_min_version),
            )
            if value
        ]
        raise click.UsageError(f"{'/'.join(needing)} need --tls-cert (TLS termination)")
    if tls:
        listener["tls"] = tls
    return listener


def _or_usage_error(build: Callable[[], T], *, flags: bool) -> T:
    """Run ``build``; a ``ConfigError`` becomes a one-line usage error (exit 2), naming
    flags instead of key paths when the configuration came from flags."""
    try:
        return build()
    except ConfigError as exc:
        message = str(exc)
        if flags:
            message = "; ".join(_flag_names(problem) for problem in exc.problems)
        raise click.UsageError(message) from None


def _flag_names(problem: str) -> str:
    """``problem`` with the flags for its key paths: ``listeners[0].tls.certs[0].cert:
    ...`` reads ``--tls-cert: ...``, ``idle_timeout: ...`` reads ``--idle-timeout: ...``.
    A path that no flag sets loses its ``listeners[0].`` only."""
    problem = _LISTENER_PATH.sub(
        lambda match: flag_for(match[0]) or match[0].removeprefix("listeners[0]."), problem
    )
    key, colon, rest = problem.partition(":")
    flag = flag_for(key) if colon and re.fullmatch(r"[a-z_]+", key) else None
    return f"{flag}{colon}{rest}" if flag else problem


def main(args: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point: one-line errors, documented exit statuses."""
    try:
        code = cli.main(args=args, prog_name="l4proxy", standalone_mode=False)
    except click.ClickException as exc:
        click.echo(f"l4proxy: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
