"""README's first command: the built-in demo runs, alternates backends, routes its TLS
listener by SNI (checked with Python's ``ssl`` and with the very ``openssl s_client``
lines it prints) and stops cleanly."""

from __future__ import annotations

import re
import shlex
import signal
import ssl
import subprocess
import sys

import pytest
import trio

from .conftest import receive_all
from .realservers import require_binary


async def _read_until(stream: trio.abc.ReceiveStream, marker: bytes, so_far: bytes = b"") -> bytes:
    """Bytes from ``stream`` until ``marker`` is among them (bounded by the caller's deadline)."""
    data = so_far
    while marker not in data:
        chunk = await stream.receive_some()
        assert chunk, data.decode(errors="replace")
        data += chunk
    return data


async def _tls_greeting(address: str, ca_file: str, server_name: str | None) -> bytes:
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=ca_file)
    if server_name is None:
        context.check_hostname = False  # no SNI at all
    stream = trio.SSLStream(
        await trio.open_tcp_stream(host, int(port)), context, server_hostname=server_name
    )
    async with stream:
        await stream.do_handshake()
        return await _read_until(stream, b"\n")


async def _openssl(command: str, expected: bytes) -> None:
    """Run one printed ``openssl s_client`` line as typed: read the backend's
    greeting, send a line, read its answer, end the input."""
    argv = shlex.split(command.split("#")[0])
    assert argv[0] == "openssl"
    argv[0] = require_binary("openssl")
    process = await trio.lowlevel.open_process(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdin is not None
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        output = await _read_until(process.stdout, b"hello from " + expected)
        await process.stdin.send_all(b"ping\n")
        await _read_until(process.stdout, expected + b": ping\n", output)
        await process.stdin.aclose()
        errors = await receive_all(process.stderr)
        assert await process.wait() == 0, errors
        assert b"Verification: OK" in errors  # the printed -CAfile verifies the chain
    finally:
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(5) as cleanup:
                cleanup.shield = True
                await process.wait()
        await process.stdout.aclose()
        await process.stderr.aclose()


async def test_demo_serves_both_backends_and_stops_on_ctrl_c(nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "l4proxy.demo",
                "--port",
                "0",
                "--tls-port",
                "0",
                "--metrics-port",
                "0",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert process.stderr is not None
        try:
            output = await _read_until(process.stderr, b"Ctrl-C drains and stops")
            text = output.decode()
            line = next(line for line in text.splitlines() if "l4proxy demo: listening on" in line)
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

            # The TLS listener: each name reaches its own backend, every time.
            commands = [line.strip() for line in text.splitlines() if "openssl s_client" in line]
            assert len(commands) == 2
            routes = {}
            for command in commands:
                match = re.search(
                    r"-connect (\S+) -servername (\S+) -CAfile (\S+) .*# to (backend-\w)", command
                )
                assert match, command
                address, server_name, ca_file, backend = match.groups()
                routes[server_name] = backend
                for _ in range(2):
                    greeting = await _tls_greeting(address, ca_file, server_name)
                    assert greeting.startswith(f"hello from {backend};".encode())
                await _openssl(command, backend.encode())
            assert routes == {"a.l4proxy.test": "backend-a", "b.l4proxy.test": "backend-b"}
            # No default pool: without SNI the handshake is refused (unrecognized_name).
            with pytest.raises(trio.BrokenResourceError):
                await _tls_greeting(address, ca_file, None)

            # The printed metrics URL answers, and counts what went through.
            (url,) = re.findall(r"metrics \(and /healthz, /readyz\) at http://(\S+)/metrics", text)
            metrics_host, _, metrics_port = url.rpartition(":")
            async with await trio.open_tcp_stream(metrics_host, int(metrics_port)) as client:
                await client.send_all(b"GET /metrics HTTP/1.1\r\nHost: demo\r\n\r\n")
                answer = await receive_all(client)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b'l4proxy_connections_accepted_total{listener="demo"} 2.0' in answer
            assert f"curl -s http://{url}/metrics" in text

            process.send_signal(signal.SIGINT)
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                with trio.move_on_after(5) as cleanup:
                    cleanup.shield = True
                    await process.wait()
        assert not await trio.Path(ca_file).exists()  # the throwaway CA went with the demo
