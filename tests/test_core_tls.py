"""TLS in the data core: terminated and re-encrypted connections move their bytes in
the listener's core (pyOpenSSL on the non-blocking sockets, in callbacks), with
half-close as close_notify <-> FIN, bounded buffering when a side is full, and the copy
loop when the core cannot take them. The proxy-level TLS suites run on the core and
on the copy loop too (the ``tls_path`` fixture)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import struct
import termios
import time
from typing import TYPE_CHECKING

import pytest
import trio

import l4proxy
from l4proxy.links import COPY_SIZE

from .conftest import (
    AccessWatcher,
    connect_to,
    receive_all,
    receive_exactly,
    start_backend,
    start_proxy,
)
from .test_core import _core, _held_backend, _inject, _slow_reader, _stats, _until_parked
from .test_pipeline_cases import BioTLS, Counting, open_tls, server_context, terminating

if TYPE_CHECKING:
    from .tlsfixtures import PKI

WAIT = 10


async def _receive_exactly_tls(tls: BioTLS, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await tls.receive_some()
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


async def test_a_terminated_connection_lives_in_the_core_and_half_closes_both_ways(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    backend, accepted = await _held_backend(nursery)
    proxy, bound = await start_proxy(nursery, [backend], tls=terminating(pki))
    big = bytes(range(256)) * 1200  # 300 KiB: several records, reads and writes
    with trio.fail_after(WAIT):
        transport = Counting(await connect_to(bound[0]))
        client = BioTLS(
            transport, pki.client_context(), server_side=False, server_hostname="a.example"
        )
        await client.do_handshake()
        server = await accepted.receive()
        await client.send_all(b"hello")
        assert await receive_exactly(server, 5) == b"hello"
        await _until_parked(proxy)  # in the core: no task for it
        await server.send_all(big)
        assert await _receive_exactly_tls(client, len(big)) == big
        await client.send_all(big)
        assert await receive_exactly(server, len(big)) == big
        await client.close_notify()  # the client's half-close ...
        assert await receive_all(server) == b""  # ... is the backend's FIN
        await server.send_all(b"late")  # and the other direction still flows
        await server.aclose()
        assert await client.receive_all() == b"late"  # then the backend's FIN: close_notify
        await transport.aclose()
        (record,) = await access.wait()
    assert (record.outcome, record.bytes_to_backend, record.bytes_to_client) == (
        "ok",
        5 + len(big),
        len(big) + 4,
    )
    assert _stats(proxy) == l4proxy.ListenerStats(open=0, parked=0)


async def test_a_full_tls_client_mutes_the_backend_until_it_reads(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    """The client's socket is full: the flow keeps the rest of one read (at most the
    scratch buffer's size, as a copy), stops reading the backend (EPOLLIN off) and
    watches the client; once the client reads, every byte arrives in order."""
    backend, accepted = await _held_backend(nursery)
    proxy, bound = await start_proxy(nursery, [backend], tls=terminating(pki))
    total = 2 * 1024 * 1024
    payload = bytes(range(256)) * (total // 256)
    with trio.fail_after(WAIT):
        core = await _core(proxy)
        client = trio.SSLStream(
            await _slow_reader(bound[0]), pki.client_context(), server_hostname="a.example"
        )
        await client.do_handshake()
        server = await accepted.receive()
        await _until_parked(proxy)
        nursery.start_soon(server.send_all, payload)
        (link,) = set(core.links.values())
        while not link.down.pending:  # noqa: ASYNC110 - polling the core's state
            await trio.sleep(0.01)
        await trio.sleep(0.1)  # had it kept reading, it would have moved on by now
        assert 0 < link.down.pending <= COPY_SIZE  # still held: nothing more was read
        assert link.down.data is not None
        assert not link.bmask & select.EPOLLIN  # the backend is muted ...
        assert link.cmask & select.EPOLLOUT  # ... until the client can take more
        received = bytearray()
        while len(received) < total:
            received += await client.receive_some(65536)
        assert received == payload
        assert link.down.pending == 0
        assert link.down.data is None  # nothing kept once it is out
        assert link.bmask & select.EPOLLIN  # reading again
        await server.aclose()
        assert await client.receive_some() == b""
        await trio.aclose_forcefully(client)
        (record,) = await access.wait()
    assert (record.outcome, record.bytes_to_client) == ("ok", total)


async def test_backend_tls_lives_in_the_core(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    async def tls_echo(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_context(pki.a), server_side=True)
        async with tls:
            await tls.do_handshake()
            while data := await tls.receive_some():
                await tls.send_all(data)

    backend = await start_backend(nursery, tls_echo)
    proxy, bound = await start_proxy(
        nursery, [backend], backend_tls=True, backend_ca=pki.ca_file, backend_sni="a.example"
    )
    big = b"r" * 200_000
    with trio.fail_after(WAIT):
        client = await connect_to(bound[0])
        await client.send_all(b"ping")
        assert await receive_exactly(client, 4) == b"ping"
        await _until_parked(proxy)
        await client.send_all(big)
        assert await receive_exactly(client, len(big)) == big
        await client.aclose()
        (record,) = await access.wait()
    assert (record.outcome, record.bytes_to_backend, record.bytes_to_client) == (
        "ok",
        4 + len(big),
        4 + len(big),
    )


async def test_a_tls_connection_the_core_cannot_take_runs_on_the_copy_loop(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    """The TLS stream's socket and session went to the core and came back: the copy
    loop carries on with the same session."""
    backend = await start_backend(nursery)
    proxy, bound = await start_proxy(nursery, [backend], tls=terminating(pki))
    with trio.fail_after(WAIT):
        epoll = await _inject(proxy)
        epoll.refuse = True
        client = await open_tls(bound[0], pki, "a.example")
        await client.send_all(b"over the loop")
        assert await receive_exactly(client, 13) == b"over the loop"
        # Refused twice: parking its handshake's wait (so the set-up took a task) and
        # taking its link (so the bytes took the copy loop).
        assert epoll.refused == 2
        assert _stats(proxy) == l4proxy.ListenerStats(open=1, parked=0)
        await client.aclose()
        (record,) = await access.wait()
    assert (record.outcome, record.bytes_to_backend, record.bytes_to_client) == ("ok", 13, 13)


async def test_idle_timeout_ends_a_tls_connection_in_the_core_with_close_notify(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    backend = await start_backend(nursery)
    proxy, bound = await start_proxy(nursery, [backend], tls=terminating(pki), idle_timeout=0.3)
    with trio.fail_after(WAIT):
        client = await open_tls(bound[0], pki, "a.example")
        await client.send_all(b"x")
        assert await receive_exactly(client, 1) == b"x"
        await _until_parked(proxy)
        try:
            assert await client.receive_some() == b""  # a close_notify, not a reset
        except trio.BrokenResourceError as exc:  # pragma: no cover - the failure's message
            raise AssertionError("the proxy did not send close_notify") from exc
        await trio.aclose_forcefully(client)
        (record,) = await access.wait()
    assert record.outcome == "idle_timeout"


async def _in_the_core(
    proxy: l4proxy.Proxy,
    bound: list[l4proxy.BoundAddress],
    accepted: trio.MemoryReceiveChannel[trio.SocketStream],
    pki: PKI,
) -> tuple[trio.SocketStream, BioTLS, trio.SocketStream]:
    """A terminated connection that moved one byte and is in the core: the client's
    socket stream, its TLS (over memory BIOs: the test writes the records itself) and
    the backend's end."""
    transport = await connect_to(bound[0])
    client = BioTLS(Counting(transport), pki.client_context(), server_side=False,
                    server_hostname="a.example")  # fmt: skip
    await client.do_handshake()
    server = await accepted.receive()
    await client.send_all(b"x")
    assert await receive_exactly(server, 1) == b"x"
    await _until_parked(proxy)
    return transport, client, server


def _unsent(fd: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * 4))[0])


@pytest.mark.parametrize("size", [3 * 16384, 2 * 16384 + 1000], ids=["whole-records", "short-last"])
async def test_records_that_came_before_a_reset_still_reach_the_backend(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, size: int
) -> None:
    """Records and then a reset, all in the socket before the core reads: the records
    it decrypted before the read that failed are passed on, then the link ends as a
    client reset (as the copy loop did, record by record)."""
    backend, accepted = await _held_backend(nursery)
    proxy, bound = await start_proxy(nursery, [backend], tls=terminating(pki))
    with trio.fail_after(WAIT):
        transport, client, server = await _in_the_core(proxy, bound, accepted, pki)
        client.tls.write(b"r" * size)
        records = client.outgoing.read()
        sock = transport.socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        # No checkpoint from here to the reset: the proxy cannot read in between.
        assert os.write(sock.fileno(), records) == len(records)
        deadline = time.monotonic() + 2
        while _unsent(sock.fileno()) and time.monotonic() < deadline:
            pass  # loopback delivers at once unless a window is closed: a bounded spin
        assert not _unsent(sock.fileno())  # all in the proxy's queue: a reset loses none
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
        received = 0
        with contextlib.suppress(trio.BrokenResourceError):
            while data := await server.receive_some(1 << 20):
                received += len(data)
        (record,) = await access.wait()
    assert received == size
    assert (record.outcome, record.bytes_to_backend) == ("error:client_reset", 1 + size)


async def test_a_trickle_of_one_tls_record_does_not_keep_a_link_alive(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    """One byte of a record every 0.2 s wakes the core but moves no plaintext: the idle
    clock (0.5 s) runs on, as the copy loop's does."""
    backend, accepted = await _held_backend(nursery)
    proxy, bound = await start_proxy(nursery, [backend], tls=terminating(pki), idle_timeout=0.5)
    with trio.fail_after(WAIT):
        transport, client, _server = await _in_the_core(proxy, bound, accepted, pki)
        client.tls.write(b"y" * 100)
        record_bytes = client.outgoing.read()
        started = trio.current_time()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            for index in range(len(record_bytes) - 1):  # never the last byte
                if access.records or trio.current_time() - started > 3:
                    break
                await transport.send_all(record_bytes[index : index + 1])
                await trio.sleep(0.2)
        (record,) = await access.wait()
        ended_after = trio.current_time() - started
        await trio.aclose_forcefully(transport)
    assert record.outcome == "idle_timeout"
    assert ended_after < 2.0  # 0.5 s idle (+ a 0.2 s step and slack), not the trickle's 3 s
