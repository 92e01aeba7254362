"""``--workers N``: a small supervisor and N worker processes sharing each port.

Each worker is an ordinary l4proxy process (``python -m l4proxy.workers``) that binds
every TCP listener with ``SO_REUSEPORT``, so the kernel spreads new connections across
the workers and each uses a core. The supervisor:

* reserves a real port for every ``HOST:0`` listen address first (a bound, non-listening
  ``SO_REUSEPORT`` socket), so all workers share the same ephemeral port;
* starts the workers in their own process group and hands each its configuration on
  standard input (a pickle: parent and child are the same program), which it then
  keeps open as a lifeline: a worker whose supervisor is gone (even by SIGKILL) sees
  end-of-file and drains as on SIGTERM;
* waits until every worker reports it is listening; if one fails to start, it stops
  the others and exits with that worker's status (2 for a config error, 1 for a port
  in use), the same contract as a single process;
* on SIGHUP, loads and applies the configuration itself first (files read in a worker
  thread, the same checks as a worker's reload), then forwards SIGHUP to every worker;
  a reload that fails anywhere is one ERROR line and changes nothing. A restarted
  worker starts with the configuration applied last, not the one from start-up;
* restarts a worker that dies unexpectedly, backing off if it keeps dying;
* on SIGTERM/SIGINT signals every worker at once (drain; a second signal cuts), waits
  for the longest ``drain_timeout`` plus a margin and kills what is left; the same
  happens whenever the supervisor ends for another reason (cancelled, an error), so
  no worker outlives it;
* exits 0 once every worker has drained and exited;
* is the process a service manager knows: it alone sends systemd's notifications
  (:mod:`l4proxy.sdnotify`), and workers start without ``$NOTIFY_SOCKET``.

Unix-socket listeners cannot be shared this way (there is no ``SO_REUSEPORT`` for
them), so ``--workers`` refuses them, as it refuses ``:0`` (a port per address family).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio

from .addresses import TCPAddress, UnixAddress
from .config import Config, read_toml
from .errors import ConfigError
from .runner import command_level, configure_logging, failure_reason, follow_log_level, run_proxy
from .sdnotify import ENVIRONMENT_VARIABLE, Notifier
from .server import Proxy
from .watching import watch_config

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Mapping, Sequence

    from .addresses import Address

LOGGER = logging.getLogger("l4proxy.workers")

#: A worker that dies sooner than this after starting makes the next restart wait.
STABLE_SECONDS = 5.0
MAX_BACKOFF = 30.0
READY_TIMEOUT = 60.0
#: Stopping waits this long beyond the longest drain_timeout before it kills: time for a
#: worker to cut its connections, flush its access logs (bounded by 5 s) and exit.
STOP_MARGIN = 10.0
#: The spec on a worker's standard input: its length, then the pickle.
_LENGTH = struct.Struct("!Q")


@attrs.frozen
class ConfigSource:
    """How to build the configuration again on SIGHUP: a file plus flag overrides, or
    the flags' own mapping."""

    path: str | None
    mapping: Mapping[str, object]
    #: The ports the supervisor reserved for ``HOST:0`` (``None``: one process, or not
    #: reserved yet: addresses stay as written).
    pinned_ports: Mapping[tuple[str, str, int], int] | None = None

    def load(self) -> Config:
        if self.path is not None:
            config = Config.from_mapping(
                {**read_toml(self.path), **self.mapping},
                source=self.path,
                base_dir=Path(self.path).parent,
            )
        else:
            config = Config.from_mapping(self.mapping, source="command line")
        return config if self.pinned_ports is None else pin(config, self.pinned_ports)


@attrs.frozen
class WorkerSpec:
    """Everything a worker needs, sent to it on standard input."""

    index: int
    config: Config
    source: ConfigSource
    log_shift: int  # -v/-q: the level is the config's log_level moved this many steps
    spawn: int = 1  # 1 for the worker's first start, 2 for its first restart, ...
    stride: int = 0  # the worker count at the supervisor's start (0: the config's)

    def connection_ids(self) -> Iterator[int]:
        """This worker's connection ids, unique across the workers and across its own
        restarts: with N workers, worker w's k-th connection is ``k * N + w`` (workers
        1 and 2 of 2 count 1, 3, 5 ... and 2, 4, 6 ...); a restarted worker goes on
        from ``(spawn - 1) * 2**32 * N``, far past anything the previous one used."""
        workers = max(self.stride or self.config.workers, self.index)
        first = ((self.spawn - 1) << 32) * workers + self.index
        return itertools.count(first, workers)


def pin(config: Config, ports: Mapping[tuple[str, str, int], int]) -> Config:
    """``config`` with the reserved ports in place of ``HOST:0``, by listener name,
    host and which ``HOST:0`` of that host in the listener it is. Only port 0 is replaced: a reloaded file that names a real port there is a
    change of address.

    Error handling:
        Raises ``ConfigError`` for a ``HOST:0`` address no port was reserved for (a
        reload added it, or renamed its listener): each worker would bind a port of
        its own.
    """
    listeners = []
    for i, listener in enumerate(config.listeners):
        listen = []
        for j, address in enumerate(listener.listen):
            if isinstance(address, TCPAddress) and address.port == 0:
                port = ports.get(_port_key(listener.name, listener.listen, j))
                if port is None:
                    raise ConfigError(
                        f"listeners[{i}].listen[{j}]: {address} is new since the workers "
                        "started, and workers cannot share a port 0 reserved after start; "
                        "name a port (or restart)"
                    )
                address = TCPAddress(address.host, port)
            listen.append(address)
        listeners.append(attrs.evolve(listener, listen=tuple(listen)))
    return attrs.evolve(config, listeners=listeners)


def _port_key(name: str, listen: Sequence[Address], index: int) -> tuple[str, str, int]:
    """What a reserved port is found by: the listener's name, the host, and how many
    ``HOST:0`` of that host come before it in the listener (``listen`` may name one
    twice, for two ports)."""
    address = listen[index]
    assert isinstance(address, TCPAddress)
    host = address.host or ""
    before = sum(
        1
        for other in listen[:index]
        if isinstance(other, TCPAddress) and other.port == 0 and (other.host or "") == host
    )
    return (name, host, before)


def reserve_ports(
    config: Config,
) -> tuple[dict[tuple[str, str, int], int], list[socket.socket]]:
    """Pick the port every worker will share for each ``HOST:0`` address.

    Raises ``ConfigError`` for what workers cannot share: ``:0`` (it would be a
    different port per address family) and Unix sockets.
    """
    ports: dict[tuple[str, str, int], int] = {}
    holders: list[socket.socket] = []
    try:
        for i, listener in enumerate(config.listeners):
            for j, address in enumerate(listener.listen):
                where = f"listeners[{i}].listen[{j}]"
                if isinstance(address, UnixAddress):
                    raise ConfigError(
                        f"{where}: unix sockets cannot be shared by workers; use workers = 1"
                    )
                if address.port != 0:
                    continue
                if address.host is None:
                    raise ConfigError(
                        f"{where}: ':0' with workers needs a host (e.g. 127.0.0.1:0) or a port"
                    )
                family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
                holder = socket.socket(family, socket.SOCK_STREAM)
                holders.append(holder)
                holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                holder.bind((address.host, 0))
                ports[_port_key(listener.name, listener.listen, j)] = holder.getsockname()[1]
    except BaseException:
        for holder in holders:
            holder.close()
        raise
    return ports, holders


async def supervise(
    config: Config,
    source: ConfigSource,
    log_shift: int = 0,
    *,
    notifier: Notifier | None = None,
    watch: bool = False,
) -> int:
    """Run ``config.workers`` workers until they have all drained; return the exit status.

    The supervisor is the process a service manager knows: ``notifier`` hears
    ``READY=1`` once every worker listens, ``RELOADING=1``/``READY=1`` around a SIGHUP
    and ``STOPPING=1`` at the drain. Workers are started without ``$NOTIFY_SOCKET``.

    Error handling:
        Raises ``ConfigError`` if the workers cannot share the listen addresses or the
        configuration's files cannot be used (before any worker starts).
    """
    ports, holders = reserve_ports(config)
    try:
        source = attrs.evolve(source, pinned_ports=ports)
        # Never serves: its reload() is the workers' own test of a new configuration,
        # and its config what they run, so restarted workers get that.
        applied = Proxy(pin(config, ports))
        notifier = Notifier(None) if notifier is None else notifier
        return await _Supervisor(applied, source, log_shift, notifier, watch=watch).run()
    finally:
        for holder in holders:
            holder.close()


@attrs.define
class _Worker:
    """One worker process, its standard input (the lifeline) and whether it listens
    (before that it cannot take SIGHUP: its handler is not installed yet)."""

    process: trio.Process
    lifeline: trio.abc.SendStream
    ready: bool = False


class _Supervisor:
    def __init__(
        self,
        applied: Proxy,
        source: ConfigSource,
        log_shift: int,
        notifier: Notifier,
        *,
        watch: bool = False,
    ) -> None:
        #: ``--watch-config``: the supervisor watches (and reloads as on SIGHUP), not
        #: the workers.
        self.watch = watch
        self.applied = applied
        self.notifier = notifier
        self.source = source
        self.log_shift = log_shift
        self.workers: dict[int, _Worker] = {}
        self.spawns: dict[int, int] = {}  # starts of each worker so far
        #: The id stride, fixed at start: a reload changing ``workers`` must not make a
        #: restarted worker's ids interleave with those of workers still running.
        self.stride = applied.config.workers
        self.stopping = trio.Event()  # set by SIGTERM/SIGINT, or when the supervisor ends
        self.reloading = trio.Lock()

    async def run(self) -> int:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            try:
                failed = await self._start_all()
                if failed is not None:
                    return failed
                LOGGER.info("%d workers running", len(self.workers))
                self.notifier.ready(f"{len(self.workers)} workers running")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._handle_signals, signals, nursery)
                    if self.watch and self.source.path is not None:
                        nursery.start_soon(
                            watch_config,
                            self.source.path,
                            lambda: self.applied.config,
                            self._reload,
                        )
                    async with trio.open_nursery() as watchers:
                        for index in self.workers:
                            watchers.start_soon(self._watch, index)
                    nursery.cancel_scope.cancel()  # every worker has drained and exited
                return 0
            finally:
                # Whatever ended the supervisor, leave no worker behind (they are in their
                # own process group, so nothing else would stop them).
                with trio.CancelScope(shield=True):
                    await self._stop_all(signals)

    async def _start_all(self) -> int | None:
        """Start every worker; if one cannot start, return its status (``run`` stops
        the others)."""
        failures: list[int] = []

        async def start(index: int) -> None:
            if await self._start(index) is None:
                failures.append(self._status(index))

        async with trio.open_nursery() as nursery:
            for index in range(self.applied.config.workers):
                nursery.start_soon(start, index)
        return failures[0] if failures else None

    async def _start(self, index: int) -> trio.Process | None:
        """Start worker ``index``; return it once it listens, or ``None`` if it died."""
        ready_read, ready_write = os.pipe()
        try:
            try:
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "l4proxy.workers", str(ready_write)],
                    stdin=subprocess.PIPE,
                    pass_fds=(ready_write,),
                    process_group=0,  # terminal signals reach the supervisor only
                    env=_worker_environment(),
                )
            finally:
                os.close(ready_write)
        except OSError as exc:
            os.close(ready_read)
            LOGGER.error("worker %d could not be started: %s", index + 1, exc)
            return None
        assert process.stdin is not None
        config = self.applied.config
        worker = self.workers[index] = _Worker(process, process.stdin)
        self.spawns[index] = spawn = self.spawns.get(index, 0) + 1
        spec = pickle.dumps(
            WorkerSpec(index + 1, config, self.source, self.log_shift, spawn, self.stride)
        )
        # If it died already, the readiness pipe says so below. Standard input stays
        # open: it is the worker's lifeline (see _worker_main).
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await process.stdin.send_all(_LENGTH.pack(len(spec)) + spec)
        async with trio.lowlevel.FdStream(ready_read) as ready:
            with trio.move_on_after(READY_TIMEOUT):
                if await ready.receive_some(1):  # b"" when the worker died first
                    LOGGER.info("worker %d started (pid %d)", index + 1, process.pid)
                    worker.ready = True
                    if self.applied.config is not config:  # a reload while it started
                        process.send_signal(signal.SIGHUP)
                    return process
        await self._stop([worker])
        return None

    async def _watch(self, index: int) -> None:
        """Wait for the worker; unless stopping, restart it (backing off if it keeps dying)."""
        backoff = 0.0
        while True:
            started = trio.current_time()
            process = self.workers[index].process
            status = await process.wait()
            await self.workers[index].lifeline.aclose()
            if self.stopping.is_set():
                return
            LOGGER.error(
                "worker %d (pid %d) exited with status %d; restarting",
                index + 1,
                process.pid,
                status,
            )
            died_young = trio.current_time() - started < STABLE_SECONDS
            backoff = min(max(backoff * 2, 1.0), MAX_BACKOFF) if died_young else 0.0
            restarted = None
            while restarted is None:
                await trio.sleep(backoff)
                if self.stopping.is_set():
                    return
                restarted = await self._start(index)
                backoff = min(max(backoff * 2, 1.0), MAX_BACKOFF)
            if self.stopping.is_set():  # SIGTERM arrived while it was starting: it missed it
                await self._stop([self.workers[index]])
                return

    async def _handle_signals(self, signals: AsyncIterator[int], nursery: trio.Nursery) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                nursery.start_soon(self._reload, name)
            elif not self.stopping.is_set():
                self.stopping.set()
                LOGGER.info("%s: draining %d workers", name, len(self.workers))
                self.notifier.stopping(f"draining {len(self.workers)} workers")
                nursery.start_soon(self._stop, list(self.workers.values()), signum)
            else:  # again: the workers cut what is still draining
                self._signal_all(signum)

    async def _reload(self, name: str) -> None:
        """Apply the configuration here first, so restarted workers get it; then have
        every worker reload (each reads the files again, as a single process does)."""
        if self.stopping.is_set():
            return  # draining: a watched change or a late SIGHUP changes nothing now
        async with self.reloading:  # one at a time, in the order the signals came
            self.notifier.reloading()
            try:
                config = await trio.to_thread.run_sync(self.source.load)
                await self.applied.reload(config)
                follow_log_level(config, self.log_shift)
            except Exception as exc:  # whatever failed, every worker keeps its configuration
                LOGGER.error(
                    "%s: reload failed, keeping the running configuration: %s",
                    name,
                    failure_reason(exc),
                )
                self.notifier.ready(
                    f"reload failed, running configuration kept: {failure_reason(exc)}"
                )
                return
            for worker in self.workers.values():
                if worker.ready and worker.process.returncode is None:
                    worker.process.send_signal(signal.SIGHUP)
            # Each worker now reads the files and applies them as a single process does.
            self.notifier.ready(f"reloaded; {len(self.workers)} workers running")

    def _signal_all(self, signum: int) -> None:
        for worker in self.workers.values():
            if worker.ready and worker.process.returncode is None:
                worker.process.send_signal(signum)

    async def _stop_all(self, signals: AsyncIterator[int]) -> None:
        """Stop every worker still running; a SIGTERM/SIGINT meanwhile cuts their drain."""
        self.stopping.set()
        self.notifier.stopping(f"stopping {len(self.workers)} workers")
        async with trio.open_nursery() as nursery:

            async def cut_on_signal() -> None:
                async for signum in signals:
                    if signum != signal.SIGHUP:
                        self._signal_all(signum)

            nursery.start_soon(cut_on_signal)
            await self._stop(list(self.workers.values()))
            nursery.cancel_scope.cancel()

    async def _stop(self, workers: list[_Worker], signum: int = signal.SIGTERM) -> None:
        """Signal ``workers`` all at once, wait for their drain (the longest
        ``drain_timeout`` plus :data:`STOP_MARGIN`), then kill what is left."""
        running = [worker.process for worker in workers if worker.process.returncode is None]
        for process in running:
            process.send_signal(signum)
        drain = max(listener.drain_timeout for listener in self.applied.config.listeners)
        with trio.move_on_after(drain + STOP_MARGIN):
            async with trio.open_nursery() as nursery:
                for process in running:
                    nursery.start_soon(process.wait)
        for process in running:
            if process.returncode is None:
                LOGGER.error(
                    "worker (pid %d) did not stop after its drain; killing it", process.pid
                )
                process.kill()
                await process.wait()
        for worker in workers:
            await worker.lifeline.aclose()

    def _status(self, index: int) -> int:
        worker = self.workers.get(index)
        code = worker.process.returncode if worker is not None else None
        return code if code is not None and code > 0 else 1


def _worker_environment() -> dict[str, str]:
    """The supervisor's environment less ``$NOTIFY_SOCKET``: only the main process may
    notify systemd (with ``NotifyAccess=main`` it drops other senders' messages)."""
    return {key: value for key, value in os.environ.items() if key != ENVIRONMENT_VARIABLE}


def _read_spec(fd: int) -> WorkerSpec:
    """The spec the supervisor wrote on ``fd``: exactly its length, nothing after it."""

    def read_exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = os.read(fd, size - len(data))
            if not chunk:
                raise SystemExit(1)  # the supervisor died before it sent everything
            data += chunk
        return data

    (size,) = _LENGTH.unpack(read_exactly(_LENGTH.size))
    # Unpickled as l4proxy.workers.WorkerSpec, not this __main__ module's class.
    spec: WorkerSpec = pickle.loads(read_exactly(size))
    return spec


def _worker_main(argv: list[str]) -> None:
    """Entry point of a worker process: read the spec, serve, exit with the status."""
    ready_fd = int(argv[1])
    spec = _read_spec(sys.stdin.fileno())
    configure_logging(command_level(spec.config, spec.log_shift), prefix=f"[worker {spec.index}] ")
    try:
        proxy = Proxy(
            spec.config,
            reuse_port=True,
            access_stream=sys.stderr,
            worker=spec.index,
            ids=spec.connection_ids(),
        )
    except ConfigError as exc:
        print(f"l4proxy: error: {exc}", file=sys.stderr)
        sys.exit(2)

    def ready(_bound: object) -> None:
        os.write(ready_fd, b"R")
        os.close(ready_fd)

    async def main() -> int:
        # End-of-file on standard input: the supervisor is gone (even by SIGKILL).
        lifeline = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        return await run_proxy(
            proxy, spec.source.load, on_ready=ready, lifeline=lifeline, log_shift=spec.log_shift
        )

    sys.exit(trio.run(main))


if __name__ == "__main__":
    _worker_main(sys.argv)
