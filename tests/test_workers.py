"""--workers N: a supervisor and N processes sharing each port with SO_REUSEPORT."""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path

import trio

from .conftest import echo, receive_exactly, start_backend
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
            # Each worker numbers its own connections: two "id=1" lines mean both served.
            assert len([line for line in proc.stderr if " id=1 " in line]) == 2
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
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0


async def test_sighup_reaches_every_worker(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery, echo)
    config = tmp_path / "l4proxy.toml"
    config.write_text(
        f'workers = 2\n[[listeners]]\nlisten = ["127.0.0.1:0"]\nbackends = ["{backend}"]\n'
    )
    with trio.fail_after(30):
        async with ProxyProcess(nursery, ["--config", str(config)]) as proc:
            await proc.wait_for("2 workers running")
            proc.signal(signal.SIGHUP)
            await proc.wait_for("configuration reloaded", count=2)
            ((host, port), _) = await proc.listening(count=2)
            await _round_trips(host, port, 4)
            proc.signal(signal.SIGINT)
            assert await proc.wait() == 0


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
