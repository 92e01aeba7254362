"""The data core: raw connections held without tasks, moved by any event.

Real sockets through a real proxy: once set up, a connection between two raw sockets
is a link in the listener's data core (``ListenerStats.parked`` counts them); data,
EOF and resets from either side move it, and the idle timeout and drain apply. What
only fault injection can show (a core that cannot register a connection, or whose
epoll fails) reaches inside through :func:`_core`.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import select
import socket
import struct
from functools import partial

import pytest
import trio
import trio.lowlevel
import trio.testing

import l4proxy
from l4proxy import core as data_core
from l4proxy.core import Core, Link

from .conftest import (
    AccessWatcher,
    connect_to,
    receive_all,
    receive_exactly,
    serve_in,
    start_proxy,
)

WAIT = 10
SETTLE = 0.1  # a pause for what should not happen to have had its chance


async def _held_backend(
    nursery: trio.Nursery,
) -> tuple[str, trio.MemoryReceiveChannel[trio.SocketStream]]:
    """A backend whose accepted streams the test drives itself."""
    send, receive = trio.open_memory_channel[trio.SocketStream](100)

    async def hand_over(stream: trio.SocketStream) -> None:
        await send.send(stream)
        await trio.sleep_forever()  # the test owns and closes the stream

    listeners = await nursery.start(partial(trio.serve_tcp, hand_over, 0, host="127.0.0.1"))
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}", receive


def _stats(proxy: l4proxy.Proxy) -> l4proxy.ListenerStats:
    (stats,) = proxy.stats().values()
    return stats


async def _parked_connection(
    proxy: l4proxy.Proxy,
    bound: list[l4proxy.BoundAddress],
    accepted: trio.MemoryReceiveChannel[trio.SocketStream],
) -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connection through the proxy that moved one byte and is now in the core: the
    client's end and the backend's."""
    client = await connect_to(bound[0])
    server = await accepted.receive()
    await client.send_all(b"x")
    assert await receive_exactly(server, 1) == b"x"
    await _until_parked(proxy)
    return client, server


async def _slow_reader(bound: l4proxy.BoundAddress) -> trio.SocketStream:
    """A client with a small receive buffer (16 KiB), so that the proxy's own buffering
    shows. Set before the connect: set on an established connection, Linux may stall
    on the shrunk window (persist-timer probes only)."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    await sock.connect((bound.host or "127.0.0.1", bound.port))
    return trio.SocketStream(sock)


async def _until_parked(proxy: l4proxy.Proxy, count: int = 1) -> None:
    while _stats(proxy).parked != count:  # noqa: ASYNC110 - polling a counter, no event to wait on
        await trio.sleep(0.01)


async def test_an_idle_connection_costs_no_task_and_data_either_way_moves(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    backend, accepted = await _held_backend(nursery)
    proxy, bound = await start_proxy(nursery, [backend])
    with trio.fail_after(WAIT):
        client, server = await _parked_connection(proxy, bound, accepted)
        assert _stats(proxy) == l4proxy.ListenerStats(open=1, parked=1)
        await server.send_all(b"pushed while parked")  # the backend speaks first
        assert await receive_exactly(client, 19) == b"pushed while parked"
        assert _stats(proxy).parked == 1  # still in the core: no task was made for it
        await client.send_all(b"x" * 300_000)  # more than a pipe: several chunks
        assert await receive_exactly(server, 300_000) == b"x" * 300_000
        await _until_parked(proxy)
        await client.send_eof()  # EOF wakes it too, and half-close still works
        assert await receive_all(server) == b""
        await server.send_all(b"late")
        await server.aclose()
        assert await receive_all(client) == b"late"
        await client.aclose()
        (record,) = await access.wait()
    assert (record.outcome, record.bytes_to_backend, record.bytes_to_client) == (
        "ok",
        1 + 300_000,
        19 + 4,
    )
    assert _stats(proxy) == l4proxy.ListenerStats(open=0, parked=0)


async def test_many_connections_in_the_core_each_keep_their_own_bytes(
    nursery: trio.Nursery,
) -> None:
    backend, accepted = await _held_backend(nursery)
    proxy, bound = await start_proxy(nursery, [backend])
    count = 100
    with trio.fail_after(WAIT):
        pairs = []
        for index in range(count):
            client = await connect_to(bound[0])
            await client.send_all(b"%03d" % index)
            server = await accepted.receive()
            pairs.append((client, server, await receive_exactly(server, 3)))
        await _until_parked(proxy, count)
        for client, server, name in reversed(pairs):
            await server.send_all(name)
            assert await receive_exactly(client, 3) == name
            await client.send_all(name[::-1])
            assert await receive_exactly(server, 3) == name[::-1]
        for client, server, _ in pairs:
            await client.aclose()
            await server.aclose()


async def test_the_idle_timeout_applies_in_the_core(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    backend, accepted = await _held_backend(nursery)
    idle = 1.0
    proxy, bound = await start_proxy(nursery, [backend], idle_timeout=idle)
    with trio.fail_after(WAIT):
        async with await connect_to(bound[0]) as client:
            server = await accepted.receive()
            start = trio.current_time()  # the last byte moves after this
            await client.send_all(b"x")
            await receive_exactly(server, 1)
            await _until_parked(proxy)
            assert await receive_all(client) == b""  # cut by the proxy
            assert await receive_all(server) == b""
            elapsed = trio.current_time() - start
            (record,) = await access.wait()
    assert record.outcome == "idle_timeout"
    assert idle <= elapsed < 3 * idle
    assert _stats(proxy) == l4proxy.ListenerStats(open=0, parked=0)


async def test_a_reset_ends_a_connection_in_the_core(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    backend, accepted = await _held_backend(nursery)
    proxy, bound = await start_proxy(nursery, [backend])
    with trio.fail_after(WAIT):
        client, server = await _parked_connection(proxy, bound, accepted)
        linger = struct.pack("ii", 1, 0)  # close() sends RST
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        await client.aclose()
        (record,) = await access.wait()
        with contextlib.suppress(trio.BrokenResourceError):  # a close or a reset: both end it
            assert await receive_all(server) == b""
        await server.aclose()
    assert record.outcome == "error:client_reset"


@pytest.mark.parametrize("drain_timeout", [0.0, 30.0])
async def test_drain_with_connections_in_the_core(
    drain_timeout: float, access: AccessWatcher
) -> None:
    """Cut at once with a zero drain timeout; else they still finish on their own."""
    async with trio.open_nursery() as nursery:
        backend, accepted = await _held_backend(nursery)
        config = l4proxy.Config(
            listeners=[
                l4proxy.ListenerConfig(
                    listen=["127.0.0.1:0"], backends=[backend], drain_timeout=drain_timeout
                )
            ]
        )
        proxy = l4proxy.Proxy(config)
        bound, served = await serve_in(nursery, proxy)
        with trio.fail_after(WAIT):
            client, server = await _parked_connection(proxy, bound, accepted)
            proxy.close()
            if drain_timeout:
                await trio.testing.wait_all_tasks_blocked(SETTLE)
                assert not served.is_set()  # a connection in the core is still one
                await server.send_all(b"bye")  # still proxied while draining
                assert await receive_exactly(client, 3) == b"bye"
                await client.aclose()
                await server.aclose()
                await served.wait()
                assert access.outcomes == ["ok"]
            else:
                await served.wait()
                assert await receive_all(client) == b""
                assert await receive_all(server) == b""
                await client.aclose()
                await server.aclose()
                assert access.outcomes == ["drained"]
        nursery.cancel_scope.cancel()


async def _core(proxy: l4proxy.Proxy) -> Core:
    """The listener's data core, for the tests that must reach inside it.

    No public API exposes the core (``Proxy.stats()`` answers how many connections are
    in it, which is what the other tests use). Two kinds of test need more: the idle
    timer heap's size, internal bookkeeping with no outside effect but memory, and
    fault injection into the core's epoll (a kernel refusing or failing), which cannot
    be caused from outside. They come here, and only they.
    """
    while not proxy._listeners.servings:
        await trio.lowlevel.checkpoint()
    (serving,) = proxy._listeners.servings.values()
    return serving.core


async def test_idle_timers_of_ended_connections_do_not_pile_up(
    nursery: trio.Nursery, access: AccessWatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each connection with an idle timeout puts a timer in the core's heap; those of
    ended connections are dropped once they outnumber the live ones, so no finished
    link (which holds its record) is kept alive."""
    monkeypatch.setattr(data_core, "TIMERS_SLACK", 2)
    backend, accepted = await _held_backend(nursery)
    proxy, bound = await start_proxy(nursery, [backend], idle_timeout=3600.0)
    with trio.fail_after(WAIT):
        core = await _core(proxy)
        first = None
        for count in range(1, 9):
            async with await connect_to(bound[0]) as client:
                server = await accepted.receive()
                async with server:
                    await client.send_all(b"k")
                    await receive_exactly(server, 1)
                    await _until_parked(proxy)
                    # The heap (private: see _core) stays within the rebuild threshold.
                    assert len(core._timers) <= 2 * len(core.links) + 2 + 1
            records = await access.wait(count)
            first = first or records[0]
    # Nothing keeps the first connection's link alive.
    gc.collect()
    assert not [ref for ref in gc.get_referrers(first) if isinstance(ref, Link)]


class _Epoll:
    """The core's epoll, with faults to inject: registrations refused (as at
    ``fs.epoll.max_user_watches``) while :attr:`refuse` is set, and one failing
    ``poll()`` once :attr:`fail_poll` is set."""

    def __init__(self, real: select.epoll) -> None:
        self.real = real
        self.refuse = False
        self.refused = 0  # registrations refused so far
        self.fail_poll = False

    def fileno(self) -> int:
        return self.real.fileno()

    def register(self, fd: int, mask: int) -> None:
        if self.refuse:
            self.refused += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        self.real.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self.real.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        self.real.unregister(fd)

    def poll(self, timeout: float, maxevents: int = -1) -> list[tuple[int, int]]:
        if self.fail_poll:
            self.fail_poll = False
            raise OSError(errno.EBADF, "Bad file descriptor")
        return self.real.poll(timeout, maxevents)

    def close(self) -> None:
        self.real.close()


async def _inject(proxy: l4proxy.Proxy) -> _Epoll:
    """Put an :class:`_Epoll` in place of the listener's core's epoll (see :func:`_core`)."""
    core = await _core(proxy)
    epoll = _Epoll(core._epoll)
    core._epoll = epoll  # type: ignore[assignment]  # the same interface, faults added
    return epoll


async def test_a_connection_the_core_cannot_take_runs_on_the_tasks_path(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    backend, accepted = await _held_backend(nursery)
    proxy, bound = await start_proxy(nursery, [backend])
    with trio.fail_after(WAIT):
        epoll = await _inject(proxy)
        epoll.refuse = True
        client = await connect_to(bound[0])
        server = await accepted.receive()
        await client.send_all(b"x")
        await receive_exactly(server, 1)
        assert epoll.refused == 1
        assert _stats(proxy) == l4proxy.ListenerStats(open=1, parked=0)
        await client.send_all(b"still here")
        assert await receive_exactly(server, 10) == b"still here"
        await server.send_all(b"and back")
        assert await receive_exactly(client, 8) == b"and back"
        await client.aclose()
        await server.aclose()
        await access.wait(1)
        # The next connection, with an epoll that takes it: in the core.
        epoll.refuse = False
        client, server = await _parked_connection(proxy, bound, accepted)
        await client.aclose()
        await server.aclose()
        await access.wait(2)
    assert access.outcomes == ["ok", "ok"]
    assert _stats(proxy) == l4proxy.ListenerStats(open=0, parked=0)


async def test_a_failing_core_ends_its_connections_only(
    access: AccessWatcher, caplog: pytest.LogCaptureFixture
) -> None:
    """The core's own failure (its epoll's ``poll()`` raising) closes and logs the
    connections in it; the listener goes on accepting and serving (on the tasks' path),
    and ``serve`` returns normally after ``close()``."""
    async with trio.open_nursery() as nursery:
        backend, accepted = await _held_backend(nursery)
        config = l4proxy.Config(
            listeners=[l4proxy.ListenerConfig(listen=["127.0.0.1:0"], backends=[backend])]
        )
        proxy = l4proxy.Proxy(config)
        bound, served = await serve_in(nursery, proxy)
        with trio.fail_after(WAIT):
            epoll = await _inject(proxy)
            client, server = await _parked_connection(proxy, bound, accepted)
            epoll.fail_poll = True
            await client.send_all(b"wake")  # the core's epoll reports it; poll() fails
            assert await receive_all(server) == b""  # the proxy closed the backend side
            with contextlib.suppress(trio.BrokenResourceError):  # unread bytes: a reset
                assert await receive_all(client) == b""
            await client.aclose()
            await server.aclose()
            (cut,) = await access.wait(1)
            assert _stats(proxy) == l4proxy.ListenerStats(open=0, parked=0)
            # The listener still accepts and proxies.
            async with await connect_to(bound[0]) as client:
                async with await accepted.receive() as server:
                    await client.send_all(b"after")
                    assert await receive_exactly(server, 5) == b"after"
                    await server.send_all(b"fine")
                    assert await receive_exactly(client, 4) == b"fine"
            await access.wait(2)
            assert not served.is_set()
            proxy.close()
            await served.wait()  # returned, not raised (it would end this nursery)
        nursery.cancel_scope.cancel()
    assert not epoll.fail_poll  # the failure was injected, once
    assert (cut.bytes_to_backend, cut.bytes_to_client) == (1, 0)
    assert cut.outcome == "error:internal"  # what ended it, not "cancelled"
    assert cut.error is not None
    assert access.outcomes[1] == "ok"
    assert "the data core failed" in caplog.text


async def test_a_full_client_mutes_the_backend_until_it_reads(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    """A destination that takes only part of a pipe: the flow keeps that pipe (its only
    buffer), stops reading its source (``EPOLLIN`` off: the rest waits in the kernel,
    where TCP flow control slows the sender) and watches the destination; once the
    client reads, every byte arrives in order and the link reads again."""
    backend, accepted = await _held_backend(nursery)
    proxy, bound = await start_proxy(nursery, [backend])
    total = 8 * 1024 * 1024
    payload = bytes(range(256)) * (total // 256)
    with trio.fail_after(WAIT):
        core = await _core(proxy)
        client = await _slow_reader(bound[0])
        server = await accepted.receive()
        nursery.start_soon(server.send_all, payload)
        (link,) = set(core.links.values())
        while not link.down.pending:  # noqa: ASYNC110 - polling the core's state
            await trio.sleep(0.01)
        await trio.sleep(0.1)  # had it kept reading, it would have moved on by now
        assert link.down.pending  # still held: nothing more was read meanwhile
        assert not link.bmask & select.EPOLLIN  # the backend is muted ...
        assert link.cmask & select.EPOLLOUT  # ... until the client can take more
        assert proxy.pipe_stats().in_use == 1
        assert link.transfer.to_client < total
        received = bytearray()
        while len(received) < total:
            received += await client.receive_some(65536)
        assert received == payload
        assert link.down.pending == 0
        assert link.bmask & select.EPOLLIN  # reading again
        await server.aclose()
        assert await receive_all(client) == b""
        await client.aclose()
        (record,) = await access.wait()
    assert (record.outcome, record.bytes_to_client) == ("ok", total)
    assert proxy.pipe_stats().in_use == 0


async def test_small_messages_are_copied_and_bulk_is_spliced(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    """A plain flow copies small messages (recv/send: no pipe), switches to splice when
    a read brings bulk, and back to copying when messages are small again."""
    backend, accepted = await _held_backend(nursery)
    proxy, bound = await start_proxy(nursery, [backend])
    bulk = bytes(range(256)) * 16384  # 4 MiB
    with trio.fail_after(WAIT):
        core = await _core(proxy)
        client, server = await _parked_connection(proxy, bound, accepted)
        (link,) = set(core.links.values())
        for _ in range(10):
            await client.send_all(b"small")
            assert await receive_exactly(server, 5) == b"small"
        assert (proxy.pipe_stats().created, link.up.splices) == (0, False)
        nursery.start_soon(client.send_all, bulk)
        assert await receive_exactly(server, len(bulk)) == bulk
        assert proxy.pipe_stats().created > 0  # spliced
        await client.send_all(b"small")
        assert await receive_exactly(server, 5) == b"small"
        assert not link.up.splices  # copying again
        await client.aclose()
        await server.aclose()
        (record,) = await access.wait()
    assert (record.outcome, record.bytes_to_backend) == ("ok", 1 + 50 + len(bulk) + 5)
