"""Memory BIOs or the socket itself: which way should pyOpenSSL move TLS bytes?

Usage: ``.venv/bin/python benchmarks/tls_transport.py [--mib 256] [--rounds 3]``

A Python ``ssl`` client (its own process, core 1) sends ``--mib`` MiB over TLS 1.3
(AES-128-GCM, ECDSA P-256) to a trio server on core 0 that decrypts and discards it,
three ways, alternating:

* ``bio``: l4proxy's :class:`~l4proxy.tls.TLSStream` (memory BIOs over a trio
  ``SocketStream``), read with ``receive_some`` (a new ``bytes`` per record);
* ``bio+into``: the same stream, but decrypting with ``recv_into`` a reused buffer;
* ``socket``: an ``SSL.Connection`` bound to the socket itself, driven with
  ``trio.lowlevel.wait_readable``, ``recv_into`` a reused buffer.

Prints MB/s per way and the ratios; loopback only.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import ssl
import statistics
import tempfile
import time

import trio
import trustme
from OpenSSL import SSL

from l4proxy.config import TLSConfig
from l4proxy.tls import TLSStream, build_server_tls

CHUNK = 1 << 20


def _pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {core})


def _client(port: int, size: int, ca_pem: bytes, rounds: int) -> None:
    _pin(1)
    context = ssl.create_default_context(cadata=ca_pem.decode())
    payload = memoryview(os.urandom(CHUNK))
    for _ in range(rounds):
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            context.wrap_socket(raw, server_hostname="bench.example") as conn,
        ):
            for _ in range(size // CHUNK):
                conn.sendall(payload)
            conn.recv(1)  # the server's "done"


async def _serve_bio(stream: trio.SocketStream, server_tls: object, size: int, into: bool) -> None:
    tls = TLSStream(stream, server_tls.connection("bench.example"))  # type: ignore[attr-defined]
    await tls.do_handshake()
    received = 0
    buffer = bytearray(65536)
    while received < size:
        if into:
            try:
                count = tls.connection.recv_into(buffer)
            except SSL.WantReadError:
                await tls._feed()
                continue
            received += count
        else:
            received += len(await tls.receive_some(65536))
    await tls.send_all(b"!")
    await tls.aclose()


async def _serve_socket(stream: trio.SocketStream, context: SSL.Context, size: int) -> None:
    sock = stream.socket
    connection = SSL.Connection(context, socket.socket(fileno=os.dup(sock.fileno())))
    connection.set_accept_state()
    while True:
        try:
            connection.do_handshake()
            break
        except SSL.WantReadError:
            await trio.lowlevel.wait_readable(sock)
        except SSL.WantWriteError:
            await trio.lowlevel.wait_writable(sock)
    received = 0
    buffer = bytearray(65536)
    while received < size:
        try:
            received += connection.recv_into(buffer)
        except SSL.WantReadError:
            await trio.lowlevel.wait_readable(sock)
    connection.sendall(b"!")
    connection.shutdown()
    await stream.aclose()


async def _measure(
    way: str, size: int, server_tls: object, rounds: int, ca_pem: bytes
) -> list[float]:
    rates: list[float] = []
    done = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        start = time.perf_counter()
        if way == "socket":
            await _serve_socket(stream, server_tls.default, size)  # type: ignore[attr-defined]
        else:
            await _serve_bio(stream, server_tls, size, into=way == "bio+into")
        rates.append(size / (time.perf_counter() - start))
        if len(rates) == rounds:
            done.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handler, 0)
        port = listeners[0].socket.getsockname()[1]
        client = multiprocessing.Process(target=_client, args=(port, size, ca_pem, rounds))
        client.start()
        await done.wait()
        nursery.cancel_scope.cancel()
    client.join(10)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    _pin(0)
    ca = trustme.CA()
    workdir = tempfile.mkdtemp(prefix="l4proxy-tls-bench-")
    cert = os.path.join(workdir, "bench.pem")
    ca.issue_cert("bench.example").private_key_and_cert_chain_pem.write_to_path(cert)
    server_tls = build_server_tls(TLSConfig(certs=[cert]), session_id=b"bench", key_path="tls")
    size = args.mib * CHUNK
    results: dict[str, list[float]] = {"bio": [], "bio+into": [], "socket": []}
    for _ in range(args.rounds):
        for way, rates in results.items():
            rates.extend(trio.run(_measure, way, size, server_tls, 1, ca.cert_pem.bytes()))
    medians = {way: statistics.median(rates) for way, rates in results.items()}
    for way, rate in medians.items():
        print(
            f"{way:9s} {rate / 1e6:8.1f} MB/s  ({rate * 8 / 1e9:.2f} Gbit/s)  ratio to bio {rate / medians['bio']:.2f}"
        )


if __name__ == "__main__":
    main()
