"""Random traffic through the real ``l4proxy`` command, every byte and access line checked.

Usage: ``.venv/bin/python benchmarks/stress.py [--seconds S] [--clients N] [--tls]
[-- L4PROXY-ARGS...]`` (for example ``-- --idle-timeout 0.3``).

With ``--tls`` the proxy terminates TLS (a throwaway certificate from ``trustme``) and
the clients speak TLS through it to the same plain echo backend; a clean ending is then
the client's close_notify and close (``trio.SSLStream`` cannot half-close).

N clients (default 200) open connection after connection for S seconds (default 20)
through one l4proxy to an echo backend, both on 127.0.0.1. Each connection sends 1 to 5
messages of random sizes (1 byte to 300 KB) and checks the echo, pauses now and then
(long enough for the proxy to park the connection), and ends with a half-close (the
echo's EOF must follow) or, one time in seven, a reset. At the end it checks that the
proxy is still running, that every accepted connection has exactly one access line,
that the outcomes match what the clients did, and that the proxy holds no more
descriptors than before (its pipe pool aside). With extra l4proxy arguments (such as
an idle timeout shorter than the pauses, which cuts connections mid-exchange) only the
proxy's side is checked: alive, one line per connection, descriptors. Exit status 1 if
any check fails.

Not part of ``make test`` (it takes its time and both cores): run it by hand after
changing the fast path, the data core or the pump.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import socket
import ssl
import struct
import sys
import tempfile
from functools import partial
from pathlib import Path

import trio
import trustme
from _servers import venv_binary

#: Message sizes: within one pipe chunk, across several, and tiny ones.
SIZES = (1, 100, 5000, 70_000, 300_000)
PAUSES = (0.05, 0.25, 0.5)  # 0.25 and 0.5 let the proxy park the connection


async def _echo(stream: trio.SocketStream) -> None:
    try:
        async with stream:
            async for data in stream:
                await stream.send_all(data)
            await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _exchange(stream: trio.abc.Stream, payload: bytes) -> bool:
    """Send ``payload`` while reading it back; whether the echo matched."""
    got = bytearray()

    async def read() -> None:
        while len(got) < len(payload):
            chunk = await stream.receive_some(1 << 20)
            if not chunk:
                return
            got.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await stream.send_all(payload)
    return got == payload


async def _one_connection(port: int, rng: random.Random, tls: ssl.SSLContext | None) -> str:
    """One client connection; what happened: ok, reset, cut (the proxy ended it) or
    mismatch (wrong bytes: a bug)."""
    happened = "cut"
    try:
        happened = await _talk(port, rng, tls)
    except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    return happened


async def _talk(port: int, rng: random.Random, tls: ssl.SSLContext | None) -> str:
    sock_stream = await trio.open_tcp_stream("127.0.0.1", port)
    stream: trio.abc.Stream = sock_stream
    if tls is not None:
        stream = trio.SSLStream(sock_stream, tls, server_hostname="stress.example")
    async with stream:
        for _ in range(rng.randint(1, 5)):
            payload = os.urandom(rng.choice(SIZES))
            if not await _exchange(stream, payload):
                return "mismatch"
            if rng.random() < 0.3:
                await trio.sleep(rng.choice(PAUSES))
        if rng.random() < 1 / 7:
            linger = struct.pack("ii", 1, 0)  # close() sends RST
            sock_stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            await trio.aclose_forcefully(stream)  # TLS too: no close_notify first
            return "reset"
        if tls is not None:
            return "ok"  # closing sends close_notify
        await sock_stream.send_eof()
        return "ok" if await stream.receive_some(1) == b"" else "mismatch"


async def _client(
    port: int,
    seed: int,
    seconds: float,
    tally: collections.Counter[str],
    tls: ssl.SSLContext | None,
) -> None:
    rng = random.Random(seed)
    deadline = trio.current_time() + seconds
    while trio.current_time() < deadline:
        tally[await _one_connection(port, rng, tls)] += 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def run(
    seconds: float, clients: int, extra: list[str], workdir: Path, tls: bool = False
) -> list[str]:
    """Run the stress; return the problems found."""
    problems: list[str] = []
    client_tls: ssl.SSLContext | None = None
    if tls:
        authority = trustme.CA()
        leaf = authority.issue_cert("stress.example")
        leaf.private_key_and_cert_chain_pem.write_to_path(str(workdir / "cert.pem"))
        client_tls = ssl.create_default_context()
        authority.configure_trust(client_tls)
        extra = ["--tls-cert", str(workdir / "cert.pem"), *extra]
    tally: collections.Counter[str] = collections.Counter()
    access = workdir / "access.log"
    port = _free_port()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
        backend = listeners[0].socket.getsockname()[1]
        argv = [venv_binary("l4proxy"), "-l", f"127.0.0.1:{port}", "-b", f"127.0.0.1:{backend}",
                "--access-log", str(access), *extra]  # fmt: skip
        with (workdir / "proxy.err").open("wb") as errors:
            proxy = await trio.lowlevel.open_process(argv, stderr=errors)
        try:
            with trio.fail_after(10):
                while True:  # until it listens
                    try:
                        await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                        break
                    except OSError:
                        await trio.sleep(0.05)
            await trio.sleep(0.5)
            fds_before = len(os.listdir(f"/proc/{proxy.pid}/fd"))
            with trio.fail_after(seconds + 60):
                async with trio.open_nursery() as load:
                    for seed in range(clients):
                        load.start_soon(_client, port, seed, seconds, tally, client_tls)
            await trio.sleep(1.0)  # lines of the last connections
            if proxy.poll() is not None:
                problems.append(f"the proxy exited with {proxy.returncode}")
            else:
                fds_after = len(os.listdir(f"/proc/{proxy.pid}/fd"))
                if fds_after > fds_before + 2 * 64:  # the pipe pool keeps up to 64 pipes
                    problems.append(f"descriptors {fds_before} -> {fds_after}")
        finally:
            if proxy.poll() is None:
                proxy.terminate()
            with trio.move_on_after(20):
                await proxy.wait()
            if proxy.poll() is None:
                proxy.kill()
                await proxy.wait()
        nursery.cancel_scope.cancel()
    lines = access.read_text().splitlines()
    outcomes = collections.Counter(
        part.partition("=")[2]
        for line in lines
        for part in line.split()
        if part.startswith("outcome=")
    )
    ids = [int(part[3:]) for line in lines for part in line.split() if part.startswith("id=")]
    print(f"clients saw: {dict(tally)}")
    print(f"access log: {len(lines)} lines, outcomes {dict(outcomes)}")
    accepted = sum(tally.values()) + 1  # +1: the probe that waited for the listener
    if sorted(ids) != list(range(1, len(ids) + 1)) or len(ids) != accepted:
        problems.append(f"{accepted} connections but {len(ids)} access lines (ids not 1..n)")
    if len(extra) == (2 if tls else 0):  # extra settings (an idle timeout) may cut anywhere
        if tally["mismatch"]:
            problems.append(f"{tally['mismatch']} connections got wrong bytes back")
        if outcomes["ok"] < tally["ok"]:
            problems.append(f"{tally['ok']} clean connections, {outcomes['ok']} logged ok")
        if tally["cut"]:
            problems.append(f"{tally['cut']} connections cut by the proxy")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--tls", action="store_true", help="the proxy terminates TLS")
    parser.add_argument("l4proxy_args", nargs="*", help="extra l4proxy arguments, after --")
    args = parser.parse_args()
    if not 1 <= args.seconds <= 600 or not 1 <= args.clients <= 2000:
        parser.error("--seconds must be 1-600 and --clients 1-2000")
    with tempfile.TemporaryDirectory() as tmp:
        problems = trio.run(run, args.seconds, args.clients, args.l4proxy_args, Path(tmp), args.tls)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print("ok" if not problems else "FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
