"""Bulk throughput through l4proxy versus a direct connection, in one invocation.

Usage: ``.venv/bin/python benchmarks/bulk.py [--mib 512] [--rounds 3]``

A sink backend (a separate process, blocking sockets, ``recv_into`` a reused buffer)
counts bytes until EOF and acknowledges; a client sends ``--mib`` MiB. The same transfer
runs direct and through ``l4proxy`` (the real command, in its own process), alternating,
``--rounds`` times. With two or more cores the proxy is pinned to core 0 and the client
and sink to core 1. Prints each rate and the median ratio proxy/direct. Loopback only.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import socket
import statistics
import subprocess
import sys
import time

CHUNK = 1 << 20


def _pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {core})


def _sink(listener: socket.socket) -> None:
    _pin(1)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    while True:
        conn, _ = listener.accept()
        with conn:
            total = 0
            while count := conn.recv_into(view):
                total += count
            conn.sendall(str(total).encode())


def _transfer(port: int, size: int) -> float:
    payload = memoryview(os.urandom(CHUNK))
    with socket.create_connection(("127.0.0.1", port)) as conn:
        start = time.perf_counter()
        for _ in range(size // CHUNK):
            conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        acknowledged = int(conn.recv(64))
        elapsed = time.perf_counter() - start
    if acknowledged != size:
        raise SystemExit(f"sink received {acknowledged} bytes, expected {size}")
    return size / elapsed


def _start_proxy(backend_port: int) -> tuple[subprocess.Popen[str], int]:
    proxy = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "l4proxy",
            "-l",
            "127.0.0.1:0",
            "-b",
            f"127.0.0.1:{backend_port}",
            "-q",
            "-v",
        ],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: _pin(0),
    )
    assert proxy.stderr is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proxy.stderr.readline()
        match = re.search(r"accepting on 127\.0\.0\.1:(\d+)", line)
        if match:
            return proxy, int(match.group(1))
        if not line and proxy.poll() is not None:
            break
    proxy.kill()
    raise SystemExit("l4proxy did not start")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=512, help="MiB per transfer (default 512)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    args = parser.parse_args()
    size = args.mib * CHUNK
    _pin(1)
    listener = socket.create_server(("127.0.0.1", 0))
    sink = multiprocessing.Process(target=_sink, args=(listener,), daemon=True)
    sink.start()
    backend_port = listener.getsockname()[1]
    proxy, proxy_port = _start_proxy(backend_port)
    direct_rates, proxy_rates = [], []
    try:
        for round_number in range(1, args.rounds + 1):
            direct_rates.append(_transfer(backend_port, size))
            proxy_rates.append(_transfer(proxy_port, size))
            print(
                f"round {round_number}: direct {direct_rates[-1] * 8 / 1e9:6.2f} Gbit/s   "
                f"l4proxy {proxy_rates[-1] * 8 / 1e9:6.2f} Gbit/s",
                flush=True,
            )
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
        sink.terminate()
    direct, proxied = statistics.median(direct_rates), statistics.median(proxy_rates)
    print(
        f"median of {args.rounds} x {args.mib} MiB: direct {direct * 8 / 1e9:.2f} Gbit/s, "
        f"l4proxy {proxied * 8 / 1e9:.2f} Gbit/s, ratio l4proxy/direct {proxied / direct:.2f}"
    )


if __name__ == "__main__":
    main()
