"""--workers N: a supervisor and N processes sharing each port with SO_REUSEPORT."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from l4proxy.config import Config
from l4proxy.workers import ConfigSource, WorkerSpec, supervise

from .conftest import echo, identify, receive_exactly, start_backend
from .proxyprocess import ProxyProcess


async def _round_trips(host: str, port: int, count: int) -> None:
    for index in range(count):
        async with await trio.open_tcp_stream(host, port) as client:
            payload = f"hello {index}".encode()
            await client.send_all(payload)
            assert await receive_exactly(client, len(payload)) == payload


def _worker_pids(proc: ProxyProcess) -> dict[int, int]:
    pids = {}
    for line in proc.stderr:
        match = re.search(r"worker (\d+) started \(pid (\d+)\)", line)
        if match:
            pids[int(match.group(1))] = int(match.group(2))
    return pids


def _connection_ids(proc: ProxyProcess) -> list[int]:
    return [int(m.group(1)) for line in proc.stderr if (m := re.search(r" id=(\d+) ", line))]


async def test_two_workers_share_the_port_and_drain_on_sigterm(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo)
    with trio.fail_after(30):
        async with ProxyProcess(
            nursery, ["-l", "127.0.0.1:0", "-b", backend, "--workers", "2"]
        ) as proc:
            await proc.wait_for("2 workers running")
            addresses = await proc.listening(count=2)
            assert len(set(addresses)) == 1  # both workers on the same reserved port
            host, port = addresses[0]
            await _round_trips(host, port, 40)
            await proc.wait_for("outcome=ok", count=40)
            # Worker 1 of 2 numbers its connections 1, 3, 5 ..., worker 2 2, 4, 6 ...:
            # unique in the shared log, and both parities mean both workers served.
            ids = _connection_ids(proc)
            assert len(ids) == 40
            assert len(set(ids)) == 40
            assert {i % 2 for i in ids} == {0, 1}
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0
            await proc.wait_for(r"\[worker 1\] l4proxy.cli: shut down cleanly")
            await proc.wait_for(r"\[worker 2\] l4proxy.cli: shut down cleanly")


async def test_a_dead_worker_is_restarted(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo)
    with trio.fail_after(30):
        async with ProxyProcess(
            nursery, ["-l", "127.0.0.1:0", "-b", backend, "--workers", "2"]
        ) as proc:
            await proc.wait_for("2 workers running")
            ((host, port), _) = await proc.listening(count=2)
            victim = _worker_pids(proc)[1]
            os.kill(victim, signal.SIGKILL)
            await proc.wait_for(rf"worker 1 \(pid {victim}\) exited with status -9; restarting")
            await proc.wait_for("worker 1 started", count=2)
            assert _worker_pids(proc)[1] != victim
            await _round_trips(host, port, 20)
            await proc.wait_for("outcome=ok", count=20)
            ids = _connection_ids(proc)
            assert len(set(ids)) == len(ids)  # the restarted worker starts past 2**32
            assert any(i > 2**32 for i in ids) or all(i % 2 == 0 for i in ids)
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0


async def test_sighup_reaches_every_worker(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Also: one listener on ``127.0.0.1:0`` twice gets two ports, each shared by the
    workers, and keeps both across the reload."""
    backend = await start_backend(nursery, echo)
    config = tmp_path / "l4proxy.toml"
    config.write_text(
        "workers = 2\n[[listeners]]\n"
        f'listen = ["127.0.0.1:0", "127.0.0.1:0"]\nbackends = ["{backend}"]\n'
    )
    with trio.fail_after(30):
        async with ProxyProcess(nursery, ["--config", str(config)]) as proc:
            await proc.wait_for("2 workers running")
            proc.signal(signal.SIGHUP)
            await proc.wait_for(r"\[worker \d\] l4proxy.server: configuration reloaded", count=2)
            ports = {port for _, port in await proc.listening(count=4)}
            assert len(ports) == 2
            for port in ports:
                await _round_trips("127.0.0.1", port, 4)
            proc.signal(signal.SIGINT)
            assert await proc.wait() == 0


async def test_a_reload_the_supervisor_refuses_reaches_no_worker(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The supervisor applies a reload first: one that fails there is one line and
    leaves every worker as it is (else restarted workers would run another config).
    Here: renaming a listener on ``HOST:0``, whose port was reserved under its name at
    the start (the workers cannot share a port reserved later)."""
    backend = await start_backend(nursery, echo)
    config = tmp_path / "l4proxy.toml"
    good = (
        'workers = 2\n[[listeners]]\nname = "svc"\n'
        f'listen = ["127.0.0.1:0"]\nbackends = ["{backend}"]\n'
    )
    config.write_text(good)
    with trio.fail_after(30):
        async with ProxyProcess(nursery, ["--config", str(config)]) as proc:
            await proc.wait_for("2 workers running")
            config.write_text(good.replace('"svc"', '"renamed"'))
            proc.signal(signal.SIGHUP)
            await proc.wait_for(
                r"ERROR l4proxy.workers: SIGHUP: reload failed, keeping the running configuration: "
                r".*listeners\[0\].listen\[0\]: 127.0.0.1:0 is new since the workers started"
            )
            config.write_text(good)
            proc.signal(signal.SIGHUP)
            await proc.wait_for(r"\[worker \d\] l4proxy.server: configuration reloaded", count=2)
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0
    assert len([line for line in proc.stderr if "reload failed" in line]) == 1


async def test_a_worker_that_cannot_start_stops_everything_with_its_status(
    nursery: trio.Nursery,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with trio.fail_after(30):
            args = ["-l", f"127.0.0.1:{port}", "-b", "127.0.0.1:1", "--workers", "2"]
            async with ProxyProcess(nursery, args) as proc:
                assert await proc.wait() == 1
                await proc.wait_for(f"l4proxy: error: cannot listen on 127.0.0.1:{port}")
    assert not [line for line in proc.stderr if "workers running" in line]


async def test_what_workers_cannot_share_is_a_usage_error(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        for listen, message in (
            (f"unix:{tmp_path / 'x.sock'}", "unix sockets cannot be shared by workers"),
            (":0", "':0' with workers needs a host"),
        ):
            async with ProxyProcess(
                nursery, ["-l", listen, "-b", "127.0.0.1:1", "--workers", "2"]
            ) as proc:
                assert await proc.wait() == 2
                await proc.wait_for(message)


async def test_a_restarted_worker_gets_the_reloaded_configuration(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    first = await start_backend(nursery, identify(b"first"))
    second = await start_backend(nursery, identify(b"secnd"))
    config = tmp_path / "l4proxy.toml"
    template = 'workers = 2\n[[listeners]]\nlisten = ["127.0.0.1:0"]\nbackends = ["{}"]\n'
    config.write_text(template.format(first))
    with trio.fail_after(30):
        async with ProxyProcess(nursery, ["--config", str(config)]) as proc:
            await proc.wait_for("2 workers running")
            ((host, port), _) = await proc.listening(count=2)
            config.write_text(template.format(second))
            proc.signal(signal.SIGHUP)
            await proc.wait_for(r"\[worker \d\] l4proxy.server: configuration reloaded", count=2)
            victim = _worker_pids(proc)[1]
            os.kill(victim, signal.SIGKILL)
            await proc.wait_for("worker 1 started", count=2)
            # Connections spread over both workers (SO_REUSEPORT): 20 reach the new one.
            for _ in range(20):
                assert await _greeting(host, port) == b"secnd\n"
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0


async def _greeting(host: str, port: int) -> bytes:
    async with await trio.open_tcp_stream(host, port) as client:
        return await receive_exactly(client, 6)


def _connections_of(pid: int, port: int) -> int:
    """How many established TCP connections to local ``port`` process ``pid`` holds."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01":  # TCP_ESTABLISHED
                inodes.add(fields[9])
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        count += link.startswith("socket:[") and link[8:-1] in inodes
    return count


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class _LogLines(logging.Handler):
    """The supervisor's log messages (it runs in this process), awaitable."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, pattern: str) -> re.Match[str]:
        while True:
            for message in self.messages:
                match = re.search(pattern, message)
                if match:
                    return match
            await self._changed.wait()


@pytest.fixture
def supervisor_log() -> Iterator[_LogLines]:
    handler = _LogLines()
    logger = logging.getLogger("l4proxy.workers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_a_cancelled_supervisor_stops_all_workers_at_once(
    nursery: trio.Nursery, supervisor_log: _LogLines
) -> None:
    """Every worker gets SIGTERM together: with a connection held open in each, the
    supervisor is gone after one drain period, not one per worker, and so are they."""
    drain = 4.0
    backend = await start_backend(nursery, echo)
    with socket.socket() as port_holder:  # what reserve_ports does for HOST:0
        port_holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        port_holder.bind(("127.0.0.1", 0))
        port = port_holder.getsockname()[1]
        mapping = {
            "workers": 2,
            "listeners": [
                {"listen": [f"127.0.0.1:{port}"], "backends": [backend], "drain_timeout": drain}
            ],
        }
        config = Config.from_mapping(mapping)
        pids: list[int] = []
        clients: list[trio.SocketStream] = []
        try:
            with trio.fail_after(30):
                scope = trio.CancelScope()
                stopped = trio.Event()

                async def run_supervisor() -> None:
                    with scope:
                        await supervise(config, ConfigSource(None, mapping))
                    stopped.set()

                nursery.start_soon(run_supervisor)
                await supervisor_log.wait_for("2 workers running")
                for index in (1, 2):
                    found = await supervisor_log.wait_for(rf"worker {index} started \(pid (\d+)\)")
                    pids.append(int(found[1]))
                while not all(_connections_of(pid, port) for pid in pids):
                    assert len(clients) < 60, "SO_REUSEPORT never picked one of the workers"
                    client = await trio.open_tcp_stream("127.0.0.1", port)
                    clients.append(client)
                    await client.send_all(b"x")
                    assert await receive_exactly(client, 1) == b"x"
                cancelled_at = trio.current_time()
                scope.cancel()
                await stopped.wait()
                took = trio.current_time() - cancelled_at
            assert drain - 0.5 < took < drain * 1.5, took
            assert not [pid for pid in pids if _is_running(pid)]
        finally:
            for client in clients:
                await client.aclose()
            for pid in pids:
                if _is_running(pid):
                    os.kill(pid, signal.SIGKILL)


async def test_workers_drain_and_exit_when_the_supervisor_is_killed(
    nursery: trio.Nursery,
) -> None:
    """SIGKILL leaves the supervisor no chance to stop them: the workers notice it is gone
    (their standard input ends) and drain as on SIGTERM, instead of running on orphaned."""
    backend = await start_backend(nursery, echo)
    pids: dict[int, int] = {}
    try:
        with trio.fail_after(30):
            async with ProxyProcess(
                nursery, ["-l", "127.0.0.1:0", "-b", backend, "--workers", "2"]
            ) as proc:
                await proc.wait_for("2 workers running")
                pids = _worker_pids(proc)
                assert proc.process is not None
                proc.process.kill()
                await proc.wait_for(r"\[worker 1\] l4proxy.cli: supervisor gone")
                await proc.wait_for(r"\[worker 1\] l4proxy.cli: shut down cleanly")
                await proc.wait_for(r"\[worker 2\] l4proxy.cli: shut down cleanly")
    finally:
        for pid in pids.values():
            if _is_running(pid):
                os.kill(pid, signal.SIGKILL)


def test_connection_ids_are_disjoint_across_workers_and_restarts() -> None:
    config = Config.from_mapping(
        {"workers": 3, "listeners": [{"listen": ["127.0.0.1:0"], "backends": ["a:1"]}]}
    )
    source = ConfigSource(None, {})

    def first(index: int, spawn: int, count: int = 1000) -> list[int]:
        ids = WorkerSpec(index, config, source, 0, spawn).connection_ids()
        return [next(ids) for _ in range(count)]

    assert first(1, 1, 3) == [1, 4, 7]
    assert first(3, 1, 3) == [3, 6, 9]
    runs = [first(index, spawn) for index in (1, 2, 3) for spawn in (1, 2, 3)]
    every = [i for run in runs for i in run]
    assert len(set(every)) == len(every)
