"""The data core's own Python per event, without the network: a micro-benchmark.

Usage: ``.venv/bin/python benchmarks/core_event.py [--messages N]``

One core and one link over two Unix socket pairs, in one trio run: a 100-byte message
is written into the client's pair, the core's dispatch is called for that readiness
(it copies the message to the backend's pair), and the message is read out. The same
loop with the four syscalls alone (write, ``recv_into``, ``send``, read) is the
reference; the difference is what the core adds per event in Python (dispatch,
flows, counters, interest masks). Best of five rounds each. Wake-ups (trio's
``epoll_wait`` and re-arm) are not in it: ``profile_proxy.py --strace`` counts them.
"""

from __future__ import annotations

import argparse
import socket
import time

import trio

from l4proxy.core import Core, Link
from l4proxy.record import Transfer
from l4proxy.splice import PipePool

MESSAGE = b"x" * 100


def _best(rounds: int, messages: int, one: object) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(messages):
            one()  # type: ignore[operator]
        best = min(best, (time.perf_counter() - started) / messages * 1e6)
    return best


async def _measure(messages: int) -> tuple[float, float]:
    async with trio.open_nursery() as nursery:
        core = Core(nursery)
        client_app, client_proxy = socket.socketpair()
        backend_proxy, backend_app = socket.socketpair()
        for sock in (client_proxy, backend_proxy):
            sock.setblocking(False)
        link = Link(client_proxy, backend_proxy, Transfer(), PipePool(), 300.0, lambda _: None)
        if not core.add(link):
            raise SystemExit("the core refused the link")
        fd = client_proxy.fileno()
        buffer = memoryview(bytearray(262144))

        def through_core() -> None:
            client_app.send(MESSAGE)
            core._dispatch(link, fd, 1)  # EPOLLIN, as the core's poll reports it
            backend_app.recv(4096)

        def syscalls_alone() -> None:
            client_app.send(MESSAGE)
            got = client_proxy.recv_into(buffer)
            backend_proxy.send(buffer[:got])
            backend_app.recv(4096)

        core_us = _best(5, messages, through_core)
        base_us = _best(5, messages, syscalls_alone)
        nursery.cancel_scope.cancel()
    return core_us, base_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    args = parser.parse_args()
    if not 1_000 <= args.messages <= 5_000_000:
        parser.error("--messages must be 1,000-5,000,000")
    core_us, base_us = trio.run(_measure, args.messages)
    print(
        f"per event: through the core {core_us:.2f} µs, the syscalls alone {base_us:.2f} µs, "
        f"the core's Python {core_us - base_us:.2f} µs"
    )


if __name__ == "__main__":
    main()
