"""The :class:`Proxy`: listeners, accept loops, graceful drain and reload.

Task tree while serving (every connection lives in a nursery)::

    serve
    └── one task per listener config        (drain scope: its deadline is the drain timeout)
        └── handler nursery                 one task per connection (fast path: one per
            │                               direction; none while parked)
            ├── parking lot                 idle fast-path connections (parking.py)
            └── accept scope                cancelled by close(): stop accepting at once
                └── acceptor nursery        one accept loop per bound socket

``close()`` cancels the accept scopes, which closes the listening sockets (new
connections are refused), and gives each listener's handler nursery a deadline of now +
its drain timeout. ``serve`` returns when every handler has finished or been cut.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
from typing import TYPE_CHECKING

import attrs
import trio

from . import splice
from .accesslog import FileSink, LoggerSink
from .addresses import Address, TCPAddress, UnixAddress
from .admit import admit, refuse, report_suppressed
from .balancing import HealthBoard
from .connect import check_source_address
from .connection import Shared
from .errors import ConfigError, ListenError
from .listening import Listening, bind_all
from .metrics import Metrics, counts_reload
from .parking import ParkingLot
from .pipeline import serve
from .runtime import LiveCount, build_runtimes, carry_over
from .stats import BoundAddress, ListenerStats, PipeStats

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from typing import IO

    from .config import Config
    from .connect import Connector
    from .runtime import ListenerRuntime

LOGGER = logging.getLogger("l4proxy.server")

#: accept() errors that mean "out of a resource right now": back off, never die.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF_MIN = 0.005
ACCEPT_BACKOFF_MAX = 0.25
ACCEPT_RECOVERY_QUIET = 1.0
#: accept() errors that concern only the connection being accepted: take the next one.
ACCEPT_SKIP_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ECONNABORTED", "EPROTO", "EPERM", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN",
                 "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ETIMEDOUT", "ECONNRESET")
    if hasattr(errno, name)
)  # fmt: skip
#: Connections taken per wake-up of an accept loop before letting other tasks run.
ACCEPT_BATCH = 32


@attrs.define(eq=False)
class _Serving:
    """The cancel scopes of one listener config while ``serve`` runs."""

    name: str
    accept_scope: trio.CancelScope
    drain_scope: trio.CancelScope
    listeners: list[Listening]
    lot: ParkingLot | None = None


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
        self._serving: list[_Serving] = []
        self._is_serving = False
        self._draining = False
        self._shared = Shared(connect, ids or itertools.count(1), self._is_draining)
        self._shared.max_open = config.max_connections
        self._reloading = trio.Lock()
        self.metrics = Metrics(self, lambda: self._runtimes)  # reads runtimes per scrape

    @property
    def config(self) -> Config:
        """The configuration new connections use."""
        return self._config

    @property
    def draining(self) -> bool:
        """True once :meth:`close` was called."""
        return self._draining

    def stats(self) -> dict[str, ListenerStats]:
        """Open and parked connections per listener name, right now."""
        parked = {
            serving.name: serving.lot.parked_links for serving in self._serving if serving.lot
        }
        return {
            name: ListenerStats(live.value, parked.get(name, 0), self.worker)
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
        """Use ``config`` for every connection accepted from now on.

        Certificates, keys and CA files are read and the TLS contexts built in a worker
        thread; the switch happens on the trio thread, at once, so no connection sees
        half of it. Established connections keep the settings they started with.
        Listen addresses and access-log destinations are bound at start and cannot
        change here.

        Error handling:
            Raises :class:`~l4proxy.errors.ConfigError` (and changes nothing) if the new
            config adds, removes or renames listeners, or changes their ``listen`` or
            ``access_log``, or if a file cannot be used. Any other exception while
            building (a certificate the ``cryptography`` package cannot parse, say)
            propagates, and also changes nothing.
        """
        old = {listener.name: listener for listener in self._config.listeners}
        new = {listener.name: listener for listener in config.listeners}
        problems = []
        if old.keys() != new.keys():
            problems.append(
                f"listeners: names changed from {sorted(old)} to {sorted(new)}; restart to change listeners"
            )
        problems.extend(
            f"listeners[{index}].{key}: cannot change on reload; restart instead"
            for index, listener in enumerate(config.listeners)
            if listener.name in old
            for key in ("listen", "access_log")
            if getattr(old[listener.name], key) != getattr(listener, key)
        )
        problems.extend(_source_address_problems(config))
        if problems:
            raise ConfigError(problems, source="reload")
        async with self._reloading:  # one at a time: the last call's config wins
            runtimes = await trio.to_thread.run_sync(self._build_runtimes, config)
            for name, runtime in runtimes.items():  # balancing and health carry over
                if name in self._runtimes:
                    carry_over(runtime, self._runtimes[name])
            self._runtimes = runtimes  # the swap: on the trio thread, between connections
            self._config = config
            self._shared.max_open = config.max_connections
        LOGGER.info("configuration reloaded: %d listeners", len(config.listeners))

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
        try:
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
                    await self._serve_listeners(opened, task_status)
                    reporting.cancel_scope.cancel()
            finally:
                for _, listeners in opened:
                    for listening in listeners:
                        listening.close()
        finally:
            self._serving.clear()
            self._is_serving = False
            self._pipes.close()
            with trio.move_on_after(5) as cleanup:
                cleanup.shield = True
                for sink in self._all_file_sinks():
                    await sink.aclose()

    async def _serve_listeners(
        self,
        opened: list[tuple[str, list[Listening]]],
        task_status: trio.TaskStatus[list[BoundAddress]],
    ) -> None:
        """Run every listener's accept loops and connections until they have all ended."""
        async with trio.open_nursery() as nursery:
            bound: list[BoundAddress] = []
            for name, listeners in opened:
                serving = _Serving(name, trio.CancelScope(), trio.CancelScope(), listeners)
                self._serving.append(serving)
                bound.extend(BoundAddress(name, listening.address) for listening in listeners)
                nursery.start_soon(
                    self._run_listener, serving, listeners, name=f"l4proxy listener {name}"
                )
            for address in bound:
                LOGGER.info("listener %r: accepting on %s", address.listener, address)
            task_status.started(bound)
            if self._draining:
                self.close()

    def close(self, *, drain_timeout: float | None = None) -> None:
        """Stop accepting now and let established connections finish.

        Each listener's connections get its ``drain_timeout`` (or the one given here,
        e.g. ``0`` to cut them at once); then they are cancelled and logged as
        ``drained``. Safe to call more than once; a later call only shortens the
        deadline. Must be called from the trio thread.
        """
        self._draining = True
        now = trio.current_time()
        for serving in self._serving:
            serving.accept_scope.cancel()
            for listening in serving.listeners:  # refuse new connections from now on
                listening.close()
            seconds = (
                drain_timeout
                if drain_timeout is not None
                else self._runtimes[serving.name].config.drain_timeout
            )
            serving.drain_scope.deadline = min(serving.drain_scope.deadline, now + seconds)

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

    async def _run_listener(self, serving: _Serving, listeners: list[Listening]) -> None:
        with serving.drain_scope:
            async with trio.open_nursery() as handlers:
                lot = serving.lot = ParkingLot(handlers)  # idle connections, held without tasks
                handlers.start_soon(lot.run, name=f"l4proxy parking lot {serving.name}")
                with serving.accept_scope:
                    async with trio.open_nursery() as acceptors:
                        for listening in listeners:
                            acceptors.start_soon(self._accept_loop, listening, serving.name, lot)
                for listening in listeners:
                    listening.close()
                lot.stop_parking()
                live = self._live[serving.name].value
                if live:
                    LOGGER.info("listener %r: draining %d connections", serving.name, live)

    async def _accept_loop(self, listening: Listening, name: str, lot: ParkingLot) -> None:
        """Accept forever; out-of-descriptor errors back off instead of spinning or dying.

        Accepts in batches: after a wake-up, every waiting connection is taken before
        waiting again (with a checkpoint every :data:`ACCEPT_BATCH`, so a flood cannot
        starve the connections already running).

        An "episode" of capacity errors is logged once when it starts and once when it
        ends, i.e. when an accept succeeds after ACCEPT_RECOVERY_QUIET seconds without
        a failure, so a proxy flapping at its descriptor limit does not flood the log.
        """
        backoff = 0.0
        failures = 0
        last_failure = -math.inf
        accepted = 0
        listener, local = listening.sock, listening.address
        accept = listener.accept
        shared = self._shared
        while True:
            # The waits stay outside the except blocks (no exception kept alive).
            delay = 0.0
            skipped = False
            try:
                sock, peer = accept()
            except BlockingIOError:
                sock = None
            except OSError as exc:
                if listener.fileno() == -1:
                    return  # close() closed the socket
                if exc.errno in ACCEPT_SKIP_ERRNOS:  # it died in the backlog
                    sock, skipped = None, True
                elif exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                else:
                    if not failures:
                        LOGGER.error(
                            "listener %r: accept failed on %s: %s; backing off until it works again",
                            name, local, os.strerror(exc.errno or 0).lower(),
                        )  # fmt: skip
                    failures += 1
                    last_failure = trio.current_time()
                    backoff = min(max(backoff * 2, ACCEPT_BACKOFF_MIN), ACCEPT_BACKOFF_MAX)
                    sock, delay = None, backoff
            if skipped:  # take the next; still a turn of the batch, so a flood yields too
                accepted += 1
                if accepted >= ACCEPT_BATCH:
                    accepted = 0
                    await trio.lowlevel.checkpoint()
                continue
            if sock is None:
                accepted = 0
                if delay:
                    await trio.sleep(delay)
                    continue
                try:
                    await trio.lowlevel.wait_readable(listener)
                except trio.ClosedResourceError:
                    return  # close() closed the socket
                continue
            if failures and trio.current_time() - last_failure >= ACCEPT_RECOVERY_QUIET:
                LOGGER.warning(
                    "listener %r: accepting again on %s after %d failed accepts",
                    name, local, failures,
                )  # fmt: skip
                failures = 0
                backoff = 0.0
            runtime = self._runtimes[name]
            trusted = runtime.trusted_proxies
            if (
                runtime.admits_all
                or type(peer) is not tuple
                or (trusted is not None and trusted.permits(peer[0]))  # admitted after step 2
            ):
                # Positional arguments and no wrapper coroutine: one frame less per connection.
                lot.nursery.start_soon(
                    serve, sock, _peer_address(peer), local, runtime, shared, lot
                )
            else:  # 1. admit: before any read, task or TLS work
                refusal, key = admit(runtime, shared, peer[0])
                if refusal is None:
                    lot.nursery.start_soon(
                        serve, sock, _peer_address(peer), local, runtime, shared, lot, key
                    )
                else:
                    refuse(sock, _peer_address(peer), peer[0], local, runtime, shared, refusal)
            accepted += 1
            if accepted >= ACCEPT_BATCH:
                accepted = 0
                await trio.lowlevel.checkpoint()

    def _is_draining(self) -> bool:
        return self._draining


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


def _peer_address(peer: object) -> Address:
    """The client's address, from what ``accept`` returned."""
    if isinstance(peer, tuple):
        return TCPAddress(peer[0], peer[1])
    if isinstance(peer, bytes):
        peer = os.fsdecode(peer)
    return UnixAddress(peer if isinstance(peer, str) else "")
