"""The ``l4proxy`` command: flags (one listener) or ``--config FILE`` (many) into a Config.

No proxy logic lives here: this module parses, builds a :class:`~l4proxy.config.Config`,
configures logging and calls ``trio.run``. Every usage or config error leaves as one
line on standard error and exit status 2; runtime failures (a port in use) exit 1.
"""

from __future__ import annotations

import logging
import logging.handlers
import math
import queue
import re
import signal
import sys
from typing import TYPE_CHECKING, NoReturn

import click
import trio

from ._version import __version__
from .addresses import Address, Role, parse_address
from .config import Config, LogLevel, read_toml
from .errors import ConfigError, ListenError
from .server import BoundAddress, Proxy

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

LOGGER = logging.getLogger("l4proxy.cli")

_LEVELS = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)
_LEVEL_INDEX = {LogLevel.DEBUG: 0, LogLevel.INFO: 1, LogLevel.WARNING: 2, LogLevel.ERROR: 3}

#: How config-file key paths read when the "file" was the command line.
_FLAG_FOR_PATH = (
    (re.compile(r"listeners\[0\]\.listen(\[\d+\])?"), "--listen"),
    (re.compile(r"listeners\[0\]\.backends(\[\d+\])?"), "--backend"),
)


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
    connect_timeout: float | None,
    idle_timeout: float | None,
    drain_timeout: float | None,
    access_log: str | None,
    log_format: str | None,
    verbose: int,
    quiet: int,
    config: str | None,
    check: bool,
) -> int:
    """A TCP layer-4 reverse proxy: accept on --listen, forward to --backend.

    \b
    Examples:
      l4proxy --listen :5432 --backend 10.0.0.5:5432 --backend 10.0.0.6:5432
      l4proxy --config l4proxy.toml
      l4proxy --config l4proxy.toml --check
    """
    overrides = {
        key: value
        for key, value in (
            ("connect_timeout", connect_timeout),
            ("idle_timeout", idle_timeout),
            ("drain_timeout", drain_timeout),
            ("access_log", access_log),
            ("log_format", log_format),
        )
        if value is not None
    }
    if config is not None:
        if listen or backend:
            raise click.UsageError(
                "--listen/--backend cannot be combined with --config; put them in a [[listeners]] table"
            )
        path = config

        def load() -> Config:
            return Config.from_mapping({**read_toml(path), **overrides}, source=path)

    else:
        if not listen and not backend:
            raise click.UsageError(
                "nothing to proxy: give --listen and --backend, or --config FILE (see --help)"
            )
        if not backend:
            raise click.UsageError("--backend is required with --listen")
        if not listen:
            raise click.UsageError("--listen is required with --backend")
        listener = {"listen": [str(a) for a in listen], "backends": [str(a) for a in backend]}

        def load() -> Config:
            return Config.from_mapping(
                {"listeners": [listener], **overrides}, source="command line"
            )

    loaded = _load_or_usage_error(load)
    if check:
        count = len(loaded.listeners)
        names = ", ".join(listener.name for listener in loaded.listeners)
        click.echo(
            f"{config or 'command line'}: ok ({count} listener{'s' * (count != 1)}: {names})"
        )
        return 0
    verbosity = _LEVEL_INDEX[loaded.log_level] - verbose + quiet
    writer = configure_logging(_LEVELS[max(0, min(len(_LEVELS) - 1, verbosity))])
    try:
        return trio.run(run_proxy, loaded, load if config is not None else None)
    finally:
        writer.stop()
        _report_dropped_access_lines()


def _load_or_usage_error(load: Callable[[], Config]) -> Config:
    try:
        return load()
    except ConfigError as exc:
        message = str(exc)
        if exc.source == "command line":
            message = "; ".join(_flag_names(problem) for problem in exc.problems)
        raise click.UsageError(message) from None


def _flag_names(problem: str) -> str:
    for pattern, flag in _FLAG_FOR_PATH:
        problem = pattern.sub(flag, problem)
    key = problem.partition(":")[0]
    if re.fullmatch(r"[a-z_]+", key):
        problem = "--" + key.replace("_", "-") + problem[len(key) :]
    return problem


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread; drops (and counts) instead of blocking."""

    dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


def _report_dropped_access_lines() -> None:
    for handler in logging.getLogger("l4proxy.access").handlers:
        if isinstance(handler, _DroppingQueueHandler) and handler.dropped:
            LOGGER.warning(
                "dropped %d access lines: standard error could not keep up", handler.dropped
            )


def configure_logging(level: int) -> logging.handlers.QueueListener:
    """Diagnostics to standard error; access lines (when not sent to a file) too, bare.

    Access lines pass through a bounded queue to a writer thread, so a slow standard
    error never stalls the event loop. Stop the returned listener to flush it.
    """
    diagnostics = logging.StreamHandler(sys.stderr)
    diagnostics.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package = logging.getLogger("l4proxy")
    package.handlers[:] = [diagnostics]
    package.setLevel(level)
    package.propagate = False
    access_output = logging.StreamHandler(sys.stderr)
    access_output.setFormatter(logging.Formatter("%(message)s"))
    access_queue: queue.Queue[logging.LogRecord] = queue.Queue(65536)
    access_logger = logging.getLogger("l4proxy.access")
    access_logger.handlers[:] = [_DroppingQueueHandler(access_queue)]
    access_logger.setLevel(logging.INFO)  # -q quiets diagnostics, not the access log
    access_logger.propagate = False
    writer = logging.handlers.QueueListener(access_queue, access_output)
    writer.start()
    return writer


async def run_proxy(
    config: Config,
    reload_config: Callable[[], Config] | None = None,
    *,
    on_ready: Callable[[list[BoundAddress]], None] | None = None,
) -> int:
    """Serve ``config`` until SIGTERM/SIGINT (drain) and return the exit status.

    SIGHUP calls ``reload_config`` and applies the result; a second SIGTERM/SIGINT cuts
    what is still draining. ``on_ready`` is called with the bound addresses.
    """
    proxy = Proxy(config)
    exit_code = 0
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        try:
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(_serve_then_stop, proxy, nursery.cancel_scope)
                nursery.start_soon(_handle_signals, signals, proxy, reload_config)
                if on_ready is not None:
                    on_ready(bound)
        except* ListenError as group:
            _print_error(group)
            exit_code = 1
        except* ConfigError as group:
            _print_error(group)
            exit_code = 2
    if exit_code == 0:
        LOGGER.info("shut down cleanly")
    return exit_code


def _print_error(group: BaseExceptionGroup[BaseException]) -> None:
    for exc in group.exceptions:
        click.echo(f"l4proxy: error: {exc}", err=True)


async def _serve_then_stop(
    proxy: Proxy,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[list[BoundAddress]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await proxy.serve(task_status=task_status)
    scope.cancel()


async def _handle_signals(
    signals: AsyncIterator[int], proxy: Proxy, reload_config: Callable[[], Config] | None
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            if reload_config is None:
                LOGGER.warning("%s: nothing to reload (no --config file)", name)
                continue
            try:
                proxy.reload(await trio.to_thread.run_sync(reload_config))
            except ConfigError as exc:
                LOGGER.error("%s: reload failed, keeping the running configuration: %s", name, exc)
        elif not proxy.draining:
            LOGGER.info(
                "%s: no longer accepting; draining established connections (signal again to stop now)",
                name,
            )
            proxy.close()
        else:
            LOGGER.warning("%s again: closing remaining connections now", name)
            proxy.close(drain_timeout=0)


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
