"""Bulk throughput through l4proxy versus a direct connection, in one invocation.

Usage: ``.venv/bin/python benchmarks/bulk.py [--mib 512] [--rounds 3]``

Three paths, alternating round by round: direct to the sink, through a plain l4proxy
listener, and through a TLS-terminating listener (the client encrypts with Python's
``ssl``: TLS 1.3, AES-128-GCM, an ECDSA P-256 certificate from ``trustme``). The client
sends an 8-byte length, then the payload from a reused 1 MiB buffer; the sink (its own
process, ``recv_into`` a reused buffer) acknowledges once it has it all. l4proxy runs as
the real command in its own process. With two or more cores the proxy is pinned to core
0 and the client and sink to core 1. Prints each rate and the medians; loopback only.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

import trustme

CHUNK = 1 << 20


def _pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {core})


def _sink(listener: socket.socket) -> None:
    _pin(1)
    buffer = memoryview(bytearray(CHUNK))
    while True:
        conn, _ = listener.accept()
        with conn:
            expected = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "big")
            total = 0
            while total < expected:
                count = conn.recv_into(buffer)
                if not count:
                    break
                total += count
            conn.sendall(total.to_bytes(8, "big"))


def _transfer(port: int, size: int, tls: ssl.SSLContext | None) -> float:
    payload = memoryview(os.urandom(CHUNK))
    raw = socket.create_connection(("127.0.0.1", port))
    conn = tls.wrap_socket(raw, server_hostname="bench.example") if tls is not None else raw
    with conn:
        start = time.perf_counter()
        conn.sendall(size.to_bytes(8, "big"))
        for _ in range(size // CHUNK):
            conn.sendall(payload)
        acknowledged = int.from_bytes(conn.recv(8), "big")
        elapsed = time.perf_counter() - start
    if acknowledged != size:
        raise SystemExit(f"sink received {acknowledged} bytes, expected {size}")
    return size / elapsed


def _start_proxy(backend_port: int, *extra: str) -> tuple[subprocess.Popen[str], int]:
    command = [
        sys.executable,
        "-m",
        "l4proxy",
        "-l",
        "127.0.0.1:0",
        "-b",
        f"127.0.0.1:{backend_port}",
        "-q",
        "-v",
    ]
    proxy = subprocess.Popen(
        [*command, *extra], stderr=subprocess.PIPE, text=True, preexec_fn=lambda: _pin(0)
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
    workdir = tempfile.mkdtemp(prefix="l4proxy-bench-")
    ca = trustme.CA()
    cert_file = os.path.join(workdir, "bench.pem")
    ca.issue_cert("bench.example").private_key_and_cert_chain_pem.write_to_path(cert_file)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)

    listener = socket.create_server(("127.0.0.1", 0))
    sink = multiprocessing.Process(target=_sink, args=(listener,), daemon=True)
    sink.start()
    backend_port = listener.getsockname()[1]
    plain, plain_port = _start_proxy(backend_port)
    terminating, tls_port = _start_proxy(backend_port, "--tls-cert", cert_file)
    paths = {
        "direct": (backend_port, None),
        "l4proxy": (plain_port, None),
        "l4proxy+tls": (tls_port, client_tls),
    }
    rates: dict[str, list[float]] = {name: [] for name in paths}
    try:
        for round_number in range(1, args.rounds + 1):
            for name, (port, tls) in paths.items():
                rates[name].append(_transfer(port, size, tls))
            print(
                f"round {round_number}: "
                + "   ".join(
                    f"{name} {values[-1] * 8 / 1e9:6.2f} Gbit/s" for name, values in rates.items()
                ),
                flush=True,
            )
    finally:
        for proxy in (plain, terminating):
            proxy.terminate()
            proxy.wait(timeout=10)
        sink.terminate()
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"median of {args.rounds} x {args.mib} MiB: "
        + ", ".join(f"{name} {rate * 8 / 1e9:.2f} Gbit/s" for name, rate in medians.items())
    )
    print(
        f"ratios: l4proxy/direct {medians['l4proxy'] / medians['direct']:.2f}, "
        f"l4proxy+tls/l4proxy {medians['l4proxy+tls'] / medians['l4proxy']:.2f}"
    )


if __name__ == "__main__":
    main()
