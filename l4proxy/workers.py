"""``--workers N``: a small supervisor and N worker processes sharing each port.

Each worker is an ordinary l4proxy process (``python -m l4proxy.workers``) that binds
every TCP listener with ``SO_REUSEPORT``, so the kernel spreads new connections across
the workers and each uses a core. The supervisor:

* reserves a real port for every ``HOST:0`` listen address first (a bound, non-listening
  ``SO_REUSEPORT`` socket), so all workers share the same ephemeral port;
* starts the workers in their own process group and hands each its configuration on
  standard input (a pickle: parent and child are the same program);
* waits until every worker reports it is listening; if one fails to start, it stops
  the others and exits with that worker's status (2 for a config error, 1 for a port
  in use), the same contract as a single process;
* forwards SIGTERM/SIGINT (drain; a second one cuts) and SIGHUP (reload) to every
  worker; restarts a worker that dies unexpectedly, backing off if it keeps dying;
* exits 0 once every worker has drained and exited.

Unix-socket listeners cannot be shared this way (there is no ``SO_REUSEPORT`` for
them), so ``--workers`` refuses them, as it refuses ``:0`` (a port per address family).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio

from .addresses import TCPAddress, UnixAddress
from .config import Config, read_toml
from .errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

LOGGER = logging.getLogger("l4proxy.workers")

#: A worker that dies sooner than this after starting makes the next restart wait.
STABLE_SECONDS = 5.0
MAX_BACKOFF = 30.0
READY_TIMEOUT = 60.0


@attrs.frozen
class ConfigSource:
    """How to build the configuration again on SIGHUP: a file plus flag overrides, or
    the flags' own mapping."""

    path: str | None
    mapping: Mapping[str, object]
    pinned_ports: Mapping[tuple[int, int], int] = attrs.field(factory=dict)

    def load(self) -> Config:
        if self.path is not None:
            config = Config.from_mapping(
                {**read_toml(self.path), **self.mapping},
                source=self.path,
                base_dir=Path(self.path).parent,
            )
        else:
            config = Config.from_mapping(self.mapping, source="command line")
        return pin(config, self.pinned_ports)


@attrs.frozen
class WorkerSpec:
    """Everything a worker needs, sent to it on standard input."""

    index: int
    config: Config
    source: ConfigSource
    log_level: int


def pin(config: Config, ports: Mapping[tuple[int, int], int]) -> Config:
    """``config`` with the reserved ports in place of ``HOST:0``."""
    if not ports:
        return config
    listeners = []
    for i, listener in enumerate(config.listeners):
        listen = tuple(
            TCPAddress(address.host, ports[(i, j)])
            if (i, j) in ports and isinstance(address, TCPAddress)
            else address
            for j, address in enumerate(listener.listen)
        )
        listeners.append(attrs.evolve(listener, listen=listen))
    return attrs.evolve(config, listeners=listeners)


def reserve_ports(config: Config) -> tuple[dict[tuple[int, int], int], list[socket.socket]]:
    """Pick the port every worker will share for each ``HOST:0`` address.

    Raises ``ConfigError`` for what workers cannot share: ``:0`` (it would be a
    different port per address family) and Unix sockets.
    """
    ports: dict[tuple[int, int], int] = {}
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
                ports[(i, j)] = holder.getsockname()[1]
    except BaseException:
        for holder in holders:
            holder.close()
        raise
    return ports, holders


async def supervise(config: Config, source: ConfigSource, log_level: int) -> int:
    """Run ``config.workers`` workers until they have all drained; return the exit status."""
    ports, holders = reserve_ports(config)
    try:
        source = attrs.evolve(source, pinned_ports=ports)
        pinned = pin(config, ports)
        supervisor = _Supervisor(pinned, source, log_level)
        return await supervisor.run()
    finally:
        for holder in holders:
            holder.close()


class _Supervisor:
    def __init__(self, config: Config, source: ConfigSource, log_level: int) -> None:
        self.config = config
        self.source = source
        self.log_level = log_level
        self.processes: dict[int, trio.Process] = {}
        self.stopping = False

    async def run(self) -> int:
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
                failed = await self._start_all()
                if failed is not None:
                    return failed
                LOGGER.info("%d workers running", len(self.processes))
                async with trio.open_nursery() as nursery:
                    forwarder = trio.CancelScope()
                    nursery.start_soon(self._forward_signals, signals, forwarder)
                    async with trio.open_nursery() as watchers:
                        for index, process in self.processes.items():
                            watchers.start_soon(self._watch, index, process)
                    forwarder.cancel()  # every worker has drained and exited
            return 0
        finally:
            # Whatever ended the supervisor, leave no worker behind (they are in their
            # own process group, so nothing else would stop them).
            with trio.CancelScope(shield=True), trio.move_on_after(20):
                for process in self.processes.values():
                    await self._stop(process)

    async def _start_all(self) -> int | None:
        """Start every worker; if one cannot start, stop the rest and return its status."""
        failures: list[int] = []

        async def start(index: int) -> None:
            if await self._start(index) is None:
                failures.append(self._status(index))

        async with trio.open_nursery() as nursery:
            for index in range(self.config.workers):
                nursery.start_soon(start, index)
        if not failures:
            return None
        self.stopping = True
        for process in self.processes.values():
            await self._stop(process)
        return failures[0]

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
                )
            finally:
                os.close(ready_write)
        except OSError as exc:
            os.close(ready_read)
            LOGGER.error("worker %d could not be started: %s", index + 1, exc)
            return None
        self.processes[index] = process
        assert process.stdin is not None
        spec = WorkerSpec(
            index=index + 1, config=self.config, source=self.source, log_level=self.log_level
        )
        try:
            async with process.stdin:
                await process.stdin.send_all(pickle.dumps(spec))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # it died already; the readiness pipe says so below
        async with trio.lowlevel.FdStream(ready_read) as ready:
            with trio.move_on_after(READY_TIMEOUT):
                if await ready.receive_some(1):  # b"" when the worker died first
                    LOGGER.info("worker %d started (pid %d)", index + 1, process.pid)
                    return process
        await self._stop(process)
        return None

    async def _watch(self, index: int, process: trio.Process) -> None:
        """Wait for the worker; unless stopping, restart it (backing off if it keeps dying)."""
        backoff = 0.0
        while True:
            started = trio.current_time()
            status = await process.wait()
            if self.stopping:
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
                if self._draining():
                    return
                restarted = await self._start(index)
                backoff = min(max(backoff * 2, 1.0), MAX_BACKOFF)
            if self._draining():  # SIGTERM arrived while it was starting: it missed it
                await self._stop(restarted)
                return
            process = restarted

    def _draining(self) -> bool:
        return self.stopping

    async def _forward_signals(self, signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
        with scope:
            async for signum in signals:
                if signum in (signal.SIGINT, signal.SIGTERM) and not self.stopping:
                    self.stopping = True
                    LOGGER.info(
                        "%s: draining %d workers", signal.Signals(signum).name, len(self.processes)
                    )
                for process in self.processes.values():
                    if process.returncode is None:
                        process.send_signal(signum)

    def _status(self, index: int) -> int:
        process = self.processes.get(index)
        code = process.returncode if process is not None else None
        return code if code is not None and code > 0 else 1

    async def _stop(self, process: trio.Process) -> None:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


def _worker_main(argv: list[str]) -> None:
    """Entry point of a worker process: read the spec, serve, exit with the status."""
    from .runner import configure_logging, run_proxy
    from .server import Proxy

    ready_fd = int(argv[1])
    spec: WorkerSpec = pickle.loads(sys.stdin.buffer.read())
    configure_logging(spec.log_level, prefix=f"[worker {spec.index}] ")
    try:
        proxy = Proxy(spec.config, reuse_port=True, access_stream=sys.stderr)
    except ConfigError as exc:
        print(f"l4proxy: error: {exc}", file=sys.stderr)
        sys.exit(2)

    def ready(_bound: object) -> None:
        os.write(ready_fd, b"R")
        os.close(ready_fd)

    sys.exit(trio.run(partial(run_proxy, proxy, spec.source.load, on_ready=ready)))


if __name__ == "__main__":
    _worker_main(sys.argv)
