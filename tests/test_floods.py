"""Floods (issue #10): one address opening connections as fast as it can, and slowloris
clients, must not take the service from other clients. The proxy runs as its own
process (the real command) and the flood comes from another, so the clients measured
here share the machine with them as they would in production, not the proxy's loop.

Every loop is bounded in count and time. Latency under a flood is printed, not
asserted: speed is for benchmarks, and here the flooder, the proxy and the measured
client share the machine's two cores.
"""

from __future__ import annotations

import statistics
import sys
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio

from .conftest import identify, read_line, start_backend
from .proxyprocess import ProxyProcess

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from .tlsfixtures import PKI

#: The flooder, in a process of its own: connects from 127.0.0.222 as fast as it can,
#: holding up to 50 connections (so it stays past its per-IP limit of 5). An address of
#: its own: its tens of thousands of connections leave that many ports of it in
#: TIME_WAIT for a minute, which other tests must not trip over.
FLOODER = """
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
held, attempts, deadline = [], 0, time.monotonic() + seconds
while time.monotonic() < deadline and attempts < 200_000:
    attempts += 1
    sock = socket.socket()
    sock.bind(("127.0.0.222", 0))
    try:
        sock.connect(("127.0.0.1", port))
    except OSError:
        sock.close()
        continue
    held.append(sock)
    if len(held) > 50:
        held.pop(0).close()
print(attempts)
"""


@pytest.fixture
async def edge_proxy(nursery: trio.Nursery, pki: PKI) -> AsyncIterator[tuple[ProxyProcess, int]]:
    """The real command: a TLS listener, 5 connections per client, a 2 s handshake."""
    backend = await start_backend(nursery, identify(b"hi"))
    args = ["-l", "127.0.0.1:0", "-b", backend, "--tls-cert", pki.a.combined,
            "--max-connections-per-ip", "5", "--handshake-timeout", "2",
            "--access-log", "/dev/null"]  # fmt: skip
    async with ProxyProcess(nursery, args) as proc:
        with trio.fail_after(15):
            ((_, port),) = await proc.listening()
        yield proc, port


async def _requests(port: int, count: int, source: str, pki: PKI) -> list[float]:
    """``count`` TLS connections one after another: seconds from connect to first byte."""
    context = pki.client_context()
    times = []
    for _ in range(count):
        start = trio.current_time()
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
            tls = trio.SSLStream(stream, context, server_hostname="a.example")
            async with tls:
                assert await read_line(tls) == b"hi\n"
        times.append(trio.current_time() - start)
    return times


def _p99(times: list[float]) -> float:
    return statistics.quantiles(times, n=100)[98]


@pytest.mark.slow
async def test_a_flood_from_one_address_does_not_starve_another(
    edge_proxy: tuple[ProxyProcess, int], pki: PKI
) -> None:
    """Every request of the other client succeeds while one address floods, and the
    flood is refused (limit_per_ip). Latency under flood is a benchmark's to measure:
    on a 2-core machine the flooder, the proxy and this client share the cores."""
    proc, port = edge_proxy
    quiet = await _requests(port, 100, "127.0.0.3", pki)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(trio.run_process, [sys.executable, "-c", FLOODER, str(port), "3"])
        )
        await trio.sleep(0.5)  # the flood is under way
        loud = await _requests(port, 100, "127.0.0.3", pki)  # each must succeed
    with trio.fail_after(5):
        await proc.wait_for(r"suppressed \d+ limit_per_ip from 127\.0\.0\.222")
    print(f"p99 connect to first byte: {_p99(quiet) * 1e3:.1f} ms quiet, "
          f"{_p99(loud) * 1e3:.1f} ms under flood")  # fmt: skip
    assert len(loud) == 100


@pytest.mark.slow
async def test_slowloris_clients_are_cut_at_the_handshake_timeout(
    edge_proxy: tuple[ProxyProcess, int], pki: PKI
) -> None:
    """500 connections that send one byte and stall (from 100 addresses, within the
    per-client limit): the others keep being served meanwhile, and each stalled one is
    closed by the proxy at the 2 s handshake timeout."""
    _, port = edge_proxy
    stalled = []
    try:
        for index in range(500):
            source = f"127.0.{1 + index // 100}.{10 + index % 100 // 5}"
            stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
            await stream.send_all(b"\x16")  # the first byte of a ClientHello, then nothing
            stalled.append(stream)
        started = trio.current_time()
        served = await _requests(port, 50, "127.0.0.3", pki)
        assert len(served) == 50
        with trio.fail_after(10):
            for stream in stalled:
                assert await stream.receive_some() == b""  # closed by the proxy
        assert trio.current_time() - started < 2 + 5
    finally:
        for stream in stalled:
            await stream.aclose()
