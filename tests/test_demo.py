"""README's first command: the built-in demo runs, alternates backends and stops cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys

import trio

from .conftest import receive_all


async def test_demo_serves_both_backends_and_stops_on_ctrl_c(nursery: trio.Nursery) -> None:
    with trio.fail_after(20):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "l4proxy.demo", "--port", "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert process.stderr is not None
        output = b""
        while b"Ctrl-C drains and stops" not in output:
            chunk = await process.stderr.receive_some()
            assert chunk, output.decode()
            output += chunk
        line = next(
            text for text in output.decode().splitlines() if "l4proxy demo: listening on" in text
        )
        host, _, port = line.split("listening on ")[1].split(",")[0].rpartition(":")
        replies = []
        for _ in range(2):
            async with await trio.open_tcp_stream(host, int(port)) as client:
                await client.send_all(b"ping\n")
                await client.send_eof()
                replies.append(await receive_all(client))
        assert sorted(r.splitlines()[1] for r in replies) == [
            b"backend-a: ping",
            b"backend-b: ping",
        ]
        process.send_signal(signal.SIGINT)
        assert await process.wait() == 0
