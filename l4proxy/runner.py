"""Running one proxy process until it is told to stop: logging, signals, reload.

Shared by the ``l4proxy`` command (:mod:`l4proxy.cli`), each ``--workers`` worker
(:mod:`l4proxy.workers`) and the demo, so none of them imports another.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import TYPE_CHECKING

import click
import trio

from .config import LogLevel
from .errors import ConfigError, ListenError
from .sdnotify import Notifier
from .watching import watch_config

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from .config import Config
    from .server import Proxy
    from .stats import BoundAddress

LOGGER = logging.getLogger("l4proxy.cli")

_LEVELS = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)  # LogLevel's order


def command_level(config: Config, shift: int = 0) -> int:
    """The command's logging level: the config's ``log_level`` moved ``shift`` steps
    (each ``-q`` is +1, each ``-v`` -1), within DEBUG..ERROR."""
    steps = list(LogLevel).index(config.log_level) + shift
    return _LEVELS[max(0, min(len(_LEVELS) - 1, steps))]


def follow_log_level(config: Config, shift: int | None) -> None:
    """After a reload: the command's diagnostics take the new ``log_level`` (still
    moved by ``-v``/``-q``). ``None``: logging is not the config's (the demo)."""
    if shift is not None:
        logging.getLogger("l4proxy").setLevel(command_level(config, shift))


def configure_logging(level: int, *, prefix: str = "") -> None:
    """Diagnostics to standard error at ``level``.

    Access lines do not pass through here: the command gives the proxy standard error
    as its access stream, written by the same bounded writer thread as access-log
    files (see :class:`~l4proxy.accesslog.FileSink`), so a slow standard error never
    stalls the event loop.
    """
    diagnostics = logging.StreamHandler(sys.stderr)
    diagnostics.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")
    )
    package = logging.getLogger("l4proxy")
    package.handlers[:] = [diagnostics]
    package.setLevel(level)
    package.propagate = False


async def run_proxy(
    proxy: Proxy,
    reload_config: Callable[[], Config] | None = None,
    *,
    on_ready: Callable[[list[BoundAddress]], None] | None = None,
    lifeline: trio.abc.ReceiveStream | None = None,
    watch: str | None = None,
    notifier: Notifier | None = None,
    log_shift: int | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT (drain) and return the exit status.

    SIGHUP calls ``reload_config`` and applies the result (re-reading certificates),
    off the event loop; a second SIGTERM/SIGINT cuts what is still draining.
    ``on_ready`` is called with the bound addresses. End-of-file on ``lifeline`` (a
    worker's standard input, held open by its supervisor) drains as SIGTERM does.
    With ``watch`` (the config file's path, ``--watch-config``), a change of that file
    or of a file it names reloads as SIGHUP does.
    ``notifier`` tells a service manager (systemd's ``$NOTIFY_SOCKET``) when the
    listeners are bound, when a reload starts and ends, and when the drain starts.
    ``log_shift`` (the ``-v``/``-q`` steps) makes a reload apply ``log_level`` too.

    Error handling:
        A reload that fails in any way (a ``ConfigError``, a certificate
        ``cryptography`` cannot parse, a file that vanished) is logged as one ERROR
        line and the running configuration stays; it never ends the process.
    """
    exit_code = 0
    notifier = Notifier(None) if notifier is None else notifier
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        try:
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(_serve_then_stop, proxy, nursery.cancel_scope)
                nursery.start_soon(
                    _handle_signals, signals, proxy, reload_config, notifier, log_shift
                )
                if lifeline is not None:
                    nursery.start_soon(_drain_when_closed, lifeline, proxy)
                if watch is not None and reload_config is not None:
                    load = reload_config

                    async def reload(why: str) -> None:
                        if not proxy.draining:
                            notifier.reloading()
                            await reload_now(proxy, load, why, notifier, log_shift)

                    nursery.start_soon(watch_config, watch, lambda: proxy.config, reload)
                if on_ready is not None:
                    on_ready(bound)
                notifier.ready(f"accepting on {len(bound)} addresses")
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


async def _drain_when_closed(lifeline: trio.abc.ReceiveStream, proxy: Proxy) -> None:
    """Drain once ``lifeline`` ends: the other end's process is gone."""
    async with lifeline:
        try:
            while await lifeline.receive_some():
                pass  # nothing is sent on it; only its end counts
        except trio.BrokenResourceError:
            pass
    if not proxy.draining:
        proxy.close()
        LOGGER.warning("supervisor gone: no longer accepting; draining established connections")


async def _handle_signals(
    signals: AsyncIterator[int],
    proxy: Proxy,
    reload_config: Callable[[], Config] | None,
    notifier: Notifier,
    log_shift: int | None,
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            # systemd's notify-reload waits for RELOADING=1, then READY=1, after every
            # SIGHUP it sends, whatever the reload does.
            notifier.reloading()
            if reload_config is None:
                LOGGER.warning("%s: nothing to reload (no --config file)", name)
                notifier.ready("nothing to reload (no --config file)")
                continue
            await reload_now(proxy, reload_config, name, notifier, log_shift)
        elif not proxy.draining:
            proxy.close()  # listening sockets are closed when this returns
            open_now = sum(stats.open for stats in proxy.stats().values())
            notifier.stopping(f"draining {open_now} connections")
            LOGGER.info(
                "%s: no longer accepting; draining established connections (signal again to stop now)",
                name,
            )
        else:
            LOGGER.warning("%s again: closing remaining connections now", name)
            proxy.close(drain_timeout=0)


async def reload_now(
    proxy: Proxy,
    reload_config: Callable[[], Config],
    why: str,
    notifier: Notifier,
    log_shift: int | None = None,
) -> None:
    """Load the configuration again and apply it: what SIGHUP and ``--watch-config``
    do. ``why`` starts the ERROR line of a failure, which keeps the running config.
    systemd hears ``RELOADING=1`` first (the SIGHUP path sends it itself, before this)
    and ``READY=1`` after, whatever happened."""
    config = None
    try:
        # Files are read off the event loop; the swap happens on it, at once.
        config = await trio.to_thread.run_sync(reload_config)
        await proxy.reload(config)
    except Exception as exc:  # whatever failed, the running configuration stays
        if config is None:  # the file failed; proxy.reload counts its own failures
            proxy.metrics.count_reload(ok=False)
        LOGGER.error(
            "%s: reload failed, keeping the running configuration: %s", why, failure_reason(exc)
        )
        notifier.ready(f"reload failed, running configuration kept: {failure_reason(exc)}")
    else:
        follow_log_level(config, log_shift)
        notifier.ready("reloaded")


def failure_reason(exc: Exception) -> str:
    """One line saying why loading or applying a configuration failed: a
    ``ConfigError``'s own message (it names the file and key), otherwise the exception's
    type and message (``ValueError: error parsing asn1 value: ...``)."""
    reason = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
    return " ".join(reason.split())
