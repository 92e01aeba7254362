"""The :class:`Proxy`: the embedding API over a config's listeners, reloads and drain.

The live listeners and their accept loops are :mod:`l4proxy.listenerset`'s (its
docstring draws the task tree); one connection's steps are :mod:`l4proxy.pipeline`'s.
``close()`` stops every accept loop, which closes the listening sockets (new
connections are refused), and gives each listener's connections a deadline of now +
its drain timeout. ``serve`` returns when every connection has finished or been cut.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

import trio

from . import splice
from .accesslog import FileSink, LoggerSink
from .admit import report_suppressed
from .backendstats import backend_stats
from .balancing import HealthBoard
from .connect import check_source_address
from .connection import Shared
from .errors import ConfigError, ListenError
from .healthcheck import HealthChecker
from .listenerset import ListenerSet
from .listening import bind_all
from .metrics import Metrics, counts_reload
from .pipeline import serve
from .runtime import LiveCount, build_runtimes, carry_over
from .stats import BoundAddress, ListenerStats, PipeStats

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from typing import IO

    from .addresses import Address
    from .config import Config
    from .connect import Connector
    from .listening import Listening
    from .runtime import ListenerRuntime

LOGGER = logging.getLogger("l4proxy.server")


class Proxy:
    """A layer-4 proxy for one :class:`~l4proxy.config.Config`.

    Creating one reads the certificate, key and CA files the config names (raising
    ``ConfigError`` naming them) but opens no socket. Run it like ``trio.serve_tcp``::

        proxy = l4proxy.Proxy(l4proxy.Config.load("l4proxy.toml"))
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(proxy.serve)   # list[BoundAddress]
            ...
            proxy.close()                              # stop accepting, drain, return

    Args:
        config: the listeners and their settings.
        connect: how to dial a backend; defaults to TCP / Unix sockets.
        reuse_port: bind TCP listeners with ``SO_REUSEPORT`` so several processes can
            share each port (what ``--workers`` does).
        access_stream: where listeners without ``access_log`` write access lines (the
            command passes standard error), through the same writer thread as files;
            by default they go to the ``l4proxy.access`` logger.
        worker: which worker of several this proxy is (``--workers``), for
            :meth:`stats`; ``None`` for a proxy on its own.
        ids: the connection ids to number connections with (default 1, 2, 3 ...);
            proxies writing to one log pass disjoint ones (the workers do).

    Attributes:
        metrics: its Prometheus metrics (:class:`~l4proxy.metrics.Metrics`), served
            by ``serve`` when the config has ``metrics``; a collector to register too.
    """

    def __init__(
        self,
        config: Config,
        *,
        connect: Connector | None = None,
        reuse_port: bool = False,
        access_stream: IO[str] | None = None,
        worker: int | None = None,
        ids: Iterator[int] | None = None,
    ) -> None:
        self._config = config
        self.worker = worker
        self._reuse_port = reuse_port
        self._file_sinks: dict[str, FileSink] = {}
        self._pipes = splice.PipePool()
        self._default_sink: LoggerSink | FileSink = (
            LoggerSink()
            if access_stream is None
            else FileSink(getattr(access_stream, "name", "<stream>"), stream=access_stream)
        )
        self._live: dict[str, LiveCount] = {}
        self._board = HealthBoard()  # backends down, over every pool of this proxy
        self._runtimes = self._build_runtimes(config)
        self._adopt(self._runtimes)
        self._is_serving = False
        self._draining = False
        self._shared = Shared(connect, ids or itertools.count(1), self._is_draining)
        self._listeners = ListenerSet(
            self._shared,
            self._live,
            reuse_port=reuse_port,
            configured=lambda name: name in self._runtimes,
        )
        self._shared.max_open = config.max_connections
        self._reloading = trio.Lock()
        self._health = HealthChecker(lambda: self._runtimes, connect)  # active health checks
        self.metrics = Metrics(self, lambda: self._runtimes)  # reads runtimes per scrape

    @property
    def config(self) -> Config:
        """The configuration new connections use."""
        return self._config

    @property
    def draining(self) -> bool:
        """True once :meth:`close` was called."""
        return self._draining

    @property
    def addresses(self) -> list[BoundAddress]:
        """The sockets accepting right now (what ``serve`` started with, as changed by
        reloads since); empty once :meth:`close` was called or before ``serve``."""
        return self._listeners.addresses()

    def stats(self) -> dict[str, ListenerStats]:
        """Open and parked connections, and the backends, per listener name, right now."""
        parked = self._listeners.parked()
        return {
            name: ListenerStats(
                live.value,
                parked.get(name, 0),
                self.worker,
                backends=backend_stats(self._runtimes.get(name)),
            )
            for name, live in self._live.items()
        }

    def pipe_stats(self) -> PipeStats:
        """The splice pipe pool shared by every listener, right now."""
        return PipeStats(self._pipes.in_use, self._pipes.created)

    def _build_runtimes(self, config: Config) -> Mapping[str, ListenerRuntime]:
        """Runtimes for ``config``; touches no state of the running proxy, so it may
        run in a worker thread (see :meth:`reload`)."""
        return build_runtimes(
            config,
            default_sink=self._default_sink,
            file_sinks=self._file_sinks,
            live=self._live,
            pipes=self._pipes if splice.AVAILABLE else None,
            board=self._board,
        )

    def _adopt(self, runtimes: Mapping[str, ListenerRuntime]) -> None:
        """Keep the sinks and live counts of freshly built runtimes (``__init__`` only)."""
        for runtime in runtimes.values():
            self._live.setdefault(runtime.config.name, runtime.live)
            if isinstance(runtime.access_log, FileSink) and runtime.config.access_log:
                self._file_sinks.setdefault(runtime.config.access_log, runtime.access_log)

    @counts_reload
    async def reload(self, config: Config) -> None:
        """Use ``config`` from now on: every setting, listeners included.

        Certificates, keys and CA files are read and the TLS contexts built in a worker
        thread; the switch happens on the trio thread, at once, so no connection sees
        half of it. Established connections keep the settings, route and backend they
        started with; balancing state and backend health carry over for the backends
        that remain.

        While serving: an address the new config still listens on keeps its socket
        (even when its listener is renamed, or the address moves to another listener),
        so no connection is refused during a reload; new addresses are bound; listeners
        that are gone stop accepting and drain (their ``drain_timeout``). A new
        ``access_log`` file is opened before the switch.

        Error handling:
            Raises :class:`~l4proxy.errors.ConfigError` (and changes nothing) if a file
            cannot be used (a certificate, an access log) or a ``source_address`` is not
            this machine's. Any other exception while building (a certificate the
            ``cryptography`` package cannot parse, say) propagates and also changes
            nothing. An address that cannot be bound (in use) is logged as an ERROR and
            the rest of the configuration applies.
        """
        problems = _source_address_problems(config)
        if problems:
            raise ConfigError(problems, source="reload")
        async with self._reloading:  # one at a time: the last call's config wins
            runtimes = await trio.to_thread.run_sync(self._build_runtimes, config)
            opened = await self._open_new_sinks(runtimes)
            try:
                plan = await self._listeners.prepare(runtimes)
            except BaseException:  # cancelled (a slow name lookup, say): nothing changes
                with trio.CancelScope(shield=True):
                    for sink in opened:
                        await sink.aclose()
                raise
            # The swap: on the trio thread, no checkpoint from here to the end.
            for name, runtime in runtimes.items():  # balancing and health carry over
                if name in self._runtimes:
                    carry_over(runtime, self._runtimes[name])
            for name, old in self._runtimes.items():
                if name not in runtimes:
                    for pool in old.pools.values():
                        pool.retire()
            self._runtimes = runtimes
            self._config = config
            self._shared.max_open = config.max_connections
            for runtime in runtimes.values():  # serve opens them if not serving yet
                if isinstance(runtime.access_log, FileSink) and runtime.config.access_log:
                    self._file_sinks.setdefault(runtime.config.access_log, runtime.access_log)
            for name, runtime in runtimes.items():
                self._live.setdefault(name, runtime.live)
            self._listeners.commit(plan, runtimes)
            self._listeners.forget_removed()
            self._health.reconfigured()  # check the new pools
            await self.metrics.reconfigured()  # after the switch: it never fails a reload
        LOGGER.info("configuration reloaded: %d listeners", len(config.listeners))

    async def _open_new_sinks(self, runtimes: Mapping[str, ListenerRuntime]) -> list[FileSink]:
        """Open the access-log files a reload adds (before its switch); on a failure,
        close those again and raise ``ConfigError``."""
        opened: list[FileSink] = []
        if not self._is_serving:
            return opened  # serve opens them
        for runtime in runtimes.values():
            sink = runtime.access_log
            if isinstance(sink, FileSink) and not sink.is_open and sink not in opened:
                try:
                    await sink.open()
                except OSError as exc:
                    for done in opened:
                        await done.aclose()
                    raise ConfigError(
                        f"access_log: cannot open {sink.path!r}: {exc.strerror or exc}",
                        source="reload",
                    ) from exc
                opened.append(sink)
        return opened

    async def serve(
        self, *, task_status: trio.TaskStatus[list[BoundAddress]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind every listener, report the bound addresses, accept until :meth:`close`.

        Returns after :meth:`close` once every connection finished or was cut at its
        listener's drain timeout. Cancelling it stops everything at once.

        Error handling:
            Raises :class:`~l4proxy.errors.ListenError` before ``task_status.started``
            if any address cannot be bound (nothing stays bound), and
            :class:`~l4proxy.errors.ConfigError` if an access log cannot be opened.
        """
        if self._is_serving:
            raise RuntimeError("this Proxy is already serving")
        self._is_serving = True
        locked = False
        try:
            # A reload waits until the listeners serve: then it applies to them.
            await self._reloading.acquire()
            locked = True
            await self._open_access_logs()
            problems = _source_address_problems(self._config)
            if problems:
                raise ListenError(problems[0])
            opened = await bind_all(self._config.listeners, reuse_port=self._reuse_port)
            try:
                await self.metrics.bind()  # the metrics endpoint, if configured
                async with trio.open_nursery() as reporting:
                    reporting.start_soon(report_suppressed, self._shared)
                    reporting.start_soon(self.metrics.serve)
                    reporting.start_soon(self._health.run, name="l4proxy health checks")
                    bound = await reporting.start(
                        self._serve_listeners, opened, reporting.cancel_scope
                    )
                    self._reloading.release()
                    locked = False
                    task_status.started(bound)
            finally:
                for _, listeners in opened:
                    for listening in listeners:
                        listening.close()
        finally:
            if locked:
                self._reloading.release()
            self._is_serving = False
            self._pipes.close()
            with trio.move_on_after(5) as cleanup:
                cleanup.shield = True
                for sink in self._all_file_sinks():
                    await sink.aclose()

    async def _serve_listeners(
        self,
        opened: list[tuple[str, list[Listening]]],
        reporting: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[list[BoundAddress]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until every listener has drained; then end the reporting tasks."""
        await self._listeners.run(opened, self._runtimes, task_status)
        reporting.cancel()

    def close(self, *, drain_timeout: float | None = None) -> None:
        """Stop accepting now and let established connections finish.

        Each listener's connections get its ``drain_timeout`` (or the one given here,
        e.g. ``0`` to cut them at once); then they are cancelled and logged as
        ``drained``. Safe to call more than once; a later call only shortens the
        deadline. Must be called from the trio thread.
        """
        self._draining = True
        self._listeners.close(drain_timeout)

    async def handle_stream(
        self,
        stream: trio.abc.Stream,
        *,
        listener: str,
        client: Address | None = None,
        local: Address | None = None,
    ) -> None:
        """Proxy a connection the host application accepted itself.

        Runs the same steps as a connection the proxy accepted (TLS included) with the
        named listener's backends, timeouts and access log; returns when the
        connection is over. ``client`` is the peer's address and ``local`` the address
        it connected to, as address objects (:class:`~l4proxy.TCPAddress`,
        :class:`~l4proxy.UnixAddress`); the access log writes ``-`` for a missing client.

        Resource handling:
            Closes ``stream`` before returning, whatever happened.
        """
        runtime = self._runtimes.get(listener)
        if runtime is None:
            await trio.aclose_forcefully(stream)
            raise ValueError(f"no listener named {listener!r}; have {sorted(self._runtimes)}")
        if isinstance(runtime.access_log, FileSink) and not runtime.access_log.is_open:
            try:
                await runtime.access_log.open()
            except OSError as exc:
                await trio.aclose_forcefully(stream)
                raise ConfigError(
                    f"access_log: cannot open {runtime.access_log.path!r}: {exc.strerror or exc}"
                ) from exc
        await serve(stream, client, local, runtime, self._shared, None)

    async def aclose(self) -> None:
        """Flush and close access-log files opened by :meth:`handle_stream`.

        Only needed when the application calls ``handle_stream`` without ``serve``
        (which closes them itself when it returns).
        """
        self._pipes.close()
        for sink in self._all_file_sinks():
            await sink.aclose()

    def _all_file_sinks(self) -> list[FileSink]:
        sinks = list(self._file_sinks.values())
        if isinstance(self._default_sink, FileSink):
            sinks.append(self._default_sink)
        return sinks

    async def _open_access_logs(self) -> None:
        for sink in self._all_file_sinks():
            try:
                await sink.open()
            except OSError as exc:
                raise ConfigError(
                    f"access_log: cannot open {sink.path!r}: {exc.strerror or exc}"
                ) from exc

    def _is_draining(self, listener: str) -> bool:
        """Whether a connection of ``listener`` cancelled now was cut by a drain: the
        proxy's (``close()``) or its listener's (a reload removed it)."""
        return self._draining or listener not in self._runtimes


def _source_address_problems(config: Config) -> list[str]:
    """A ``source_address`` this machine does not have fails once, here, not on every
    connect: at start-up as a listen failure does, on reload as a bad config."""
    problems = []
    for listener in config.listeners:
        if listener.source_address is not None:
            try:
                check_source_address(listener.source_address)
            except OSError as exc:
                reason = (exc.strerror or str(exc)).lower()
                problems.append(
                    f"cannot make backend connections from {listener.source_address} "
                    f"(listener {listener.name!r}, source_address): {reason}"
                )
    return problems
