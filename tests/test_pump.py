"""The generic copy loop (:func:`l4proxy.pump.pump`) over each kind of trio stream.

The data core moves the bytes of connections whose ends are sockets
(tests/test_core.py, and the proxy tests on every path); this loop is what an
embedder's own streams get. Each test drives it with the streams of one ``movers``
flavour:

- ``memory``: in-memory streams (no sockets, virtual time);
- ``tcp`` and ``unix``: ``trio.SocketStream`` pairs over real loopback TCP or Unix
  sockets.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from l4proxy.pump import CHUNK_SIZE, pump
from l4proxy.record import Outcome, Transfer

from .conftest import receive_all, receive_exactly
from .test_pipeline_cases import Counting

if TYPE_CHECKING:
    from collections.abc import Iterator

WAIT = 5  # seconds: the bound on each test's waits (virtual time with autojump_clock)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    return near, far


class BrokenOnReceive(trio.abc.HalfCloseableStream):
    """A stream whose peer reset the connection (the ``memory`` flavour's reset)."""

    def __init__(self) -> None:
        self.closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        raise trio.BrokenResourceError("connection reset by peer")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        raise trio.BrokenResourceError("broken pipe")

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


class Movers:
    """Makes the stream pairs of one flavour: ``(app end, proxy end)``; the proxy ends
    go to the pump, the test plays the peers on the app ends."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._sockets: list[socket.socket] = []

    def pair(self) -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
        if self.kind == "memory":
            return trio.testing.memory_stream_pair()
        app, proxy = self._sockets_pair()
        return self._stream(app), self._stream(proxy)

    def reset_by_peer(self) -> trio.abc.HalfCloseableStream:
        """A proxy end whose peer has reset the connection."""
        if self.kind == "memory":
            return BrokenOnReceive()
        app, proxy = self._sockets_pair()
        if self.kind == "tcp":  # close with SO_LINGER 0: RST instead of FIN
            app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:  # a Unix socket closed with unread data: its peer reads ECONNRESET
            proxy.send(b"unread")
        app.close()
        return self._stream(proxy)

    def _sockets_pair(self) -> tuple[socket.socket, socket.socket]:
        if self.kind == "tcp":
            return _tcp_pair()
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def _stream(self, sock: socket.socket) -> trio.SocketStream:
        self._sockets.append(sock)
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))

    def close(self) -> None:
        """After the test: whatever the test and the pump left open."""
        for sock in self._sockets:
            sock.close()


@pytest.fixture(params=["memory", "tcp", "unix"])
def movers(request: pytest.FixtureRequest) -> Iterator[Movers]:
    movers = Movers(request.param)
    try:
        yield movers
    finally:
        movers.close()


async def run_pump(
    nursery: trio.Nursery,
    movers: Movers,
    client: trio.abc.Stream,
    backend: trio.abc.Stream,
    **kwargs: float,
) -> tuple[Transfer, dict[str, Outcome]]:
    """Start the pump; return (transfer, a dict that receives the outcome)."""
    transfer = Transfer()
    result: dict[str, Outcome] = {}

    async def run() -> None:
        try:
            result["outcome"] = await pump(client, backend, transfer, **kwargs)
        finally:
            # The caller owns both streams and closes them (pump's contract); on the
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(backend)

    nursery.start_soon(run)
    return transfer, result


async def test_bytes_pass_unchanged_both_ways_and_are_counted(movers: Movers) -> None:
    client_app, client_proxy = movers.pair()
    backend_proxy, backend_app = movers.pair()
    payload = bytes(range(256)) * 1000
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            transfer, result = await run_pump(nursery, movers, client_proxy, backend_proxy)
            nursery.start_soon(client_app.send_all, payload)
            assert await receive_exactly(backend_app, len(payload)) == payload
            await backend_app.send_all(b"reply")
            assert await receive_exactly(client_app, 5) == b"reply"
            await client_app.send_eof()
            await backend_app.send_eof()
    assert result["outcome"] == "ok"
    assert (transfer.to_backend, transfer.to_client) == (len(payload), 5)


async def test_client_half_close_keeps_the_other_direction_flowing(movers: Movers) -> None:
    client_app, client_proxy = movers.pair()
    backend_proxy, backend_app = movers.pair()
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            transfer, result = await run_pump(nursery, movers, client_proxy, backend_proxy)
            await client_app.send_all(b"request")
            await client_app.send_eof()
            assert await receive_all(backend_app) == b"request"  # EOF reached the backend
            await trio.testing.wait_all_tasks_blocked()
            assert "outcome" not in result  # still pumping backend -> client
            for _ in range(3):
                await backend_app.send_all(b"late reply ")
            await backend_app.send_eof()
            assert await receive_all(client_app) == b"late reply " * 3
    assert result["outcome"] == "ok"
    assert (transfer.to_backend, transfer.to_client) == (7, 33)


async def test_backend_half_close_keeps_the_other_direction_flowing(movers: Movers) -> None:
    client_app, client_proxy = movers.pair()
    backend_proxy, backend_app = movers.pair()
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            transfer, result = await run_pump(nursery, movers, client_proxy, backend_proxy)
            await backend_app.send_all(b"banner")
            await backend_app.send_eof()
            assert await receive_all(client_app) == b"banner"
            await trio.testing.wait_all_tasks_blocked()
            assert "outcome" not in result  # still pumping client -> backend
            await client_app.send_all(b"still talking")
            assert await receive_exactly(backend_app, 13) == b"still talking"
            await client_app.send_eof()
            assert await receive_all(backend_app) == b""
    assert result["outcome"] == "ok"
    assert (transfer.to_backend, transfer.to_client) == (13, 6)


@pytest.mark.parametrize("side", ["client", "backend"])
async def test_a_reset_on_either_side_ends_both_directions(movers: Movers, side: str) -> None:
    healthy_app, healthy_proxy = movers.pair()
    broken = movers.reset_by_peer()
    client, backend = (broken, healthy_proxy) if side == "client" else (healthy_proxy, broken)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            _, result = await run_pump(nursery, movers, client, backend)
            # The healthy side is closed too (by the caller, or by the splice path itself),
            # though its peer never sent EOF.
            assert await receive_all(healthy_app) == b""
    assert result["outcome"] == f"error:{side}_reset"


async def test_idle_timeout_fires_only_without_traffic(
    movers: Movers, autojump_clock: trio.testing.MockClock
) -> None:
    client_app, client_proxy = movers.pair()
    backend_proxy, backend_app = movers.pair()
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            _, result = await run_pump(
                nursery, movers, client_proxy, backend_proxy, idle_seconds=10
            )
            start = trio.current_time()
            for index in range(6):  # traffic every 6 s, either way, keeps it alive past 30 s
                await trio.sleep(6)
                sender, receiver = (
                    (client_app, backend_app) if index % 2 else (backend_app, client_app)
                )
                await sender.send_all(b"x")
                await receive_exactly(receiver, 1)
            assert "outcome" not in result
            quiet_from = trio.current_time()
    assert result["outcome"] == "idle_timeout"
    assert trio.current_time() - quiet_from == pytest.approx(10, abs=0.01)
    assert quiet_from - start >= 36


class EndlessSource(trio.abc.HalfCloseableStream):
    """A backend that always has more data ready; counts what the proxy took."""

    def __init__(self) -> None:
        self.produced = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        size = max_bytes or CHUNK_SIZE
        self.produced += size
        return b"\0" * size

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def _flood(stream: trio.abc.SendStream) -> None:
    """Write to ``stream`` until cancelled: a backend that always has more to send."""
    block = b"\0" * 65536
    while True:
        await stream.send_all(block)


def _queued(sock: trio.socket.SocketType) -> int:
    """Bytes waiting in ``sock``'s receive queue."""
    return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4), "little")


async def test_a_slow_reader_bounds_what_the_proxy_buffers(movers: Movers) -> None:
    """Whatever the backend has ready, the proxy holds at most one chunk of it that the
    client has not taken yet, and reads no more."""
    held: list[int] = []
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            if movers.kind == "memory":
                client_app, client_proxy = trio.testing.lockstep_stream_pair()  # no buffering
                source = EndlessSource()
                backend_proxy: trio.abc.Stream = source
                bound = CHUNK_SIZE

                def taken() -> int:
                    return source.produced

                def more_waiting() -> bool:
                    return True  # endless
            else:
                client_app, client_proxy = movers.pair()
                backend_socket, backend_app = movers.pair()
                assert isinstance(client_app, trio.SocketStream)
                assert isinstance(client_proxy, trio.SocketStream)
                assert isinstance(backend_socket, trio.SocketStream)
                # Little kernel buffering towards the client, so the proxy's own shows.
                client_proxy.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
                client_app.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
                counting = Counting(backend_socket)
                backend_proxy = counting
                bound = CHUNK_SIZE

                def taken() -> int:
                    return counting.received

                def more_waiting() -> bool:
                    return _queued(backend_socket.socket) > 0

                nursery.start_soon(_flood, backend_app)  # far more than a chunk, ready at once
                await trio.testing.wait_all_tasks_blocked()
            transfer, _ = await run_pump(nursery, movers, client_proxy, backend_proxy)
            for _ in range(20):  # read slowly, a little at a time
                await trio.testing.wait_all_tasks_blocked()
                held.append(taken() - transfer.to_client)
                await client_app.receive_some(1000)
            await trio.testing.wait_all_tasks_blocked()
            held.append(taken() - transfer.to_client)
            assert more_waiting()  # the backend has more, and the proxy does not take it
            nursery.cancel_scope.cancel()
    # It did read ahead, but never more than one chunk.
    assert 0 < max(held) <= bound


async def test_counters_survive_cancellation(movers: Movers) -> None:
    client_app, client_proxy = movers.pair()
    backend_proxy, backend_app = movers.pair()
    transfer = Transfer()
    with trio.fail_after(WAIT):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: pump(client_proxy, backend_proxy, transfer))
                await client_app.send_all(b"12345")
                await receive_exactly(backend_app, 5)
                await backend_app.send_all(b"123")
                await receive_exactly(client_app, 3)
                scope.cancel()
    assert (transfer.to_backend, transfer.to_client) == (5, 3)
    assert scope.cancelled_caught
