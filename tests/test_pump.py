"""The byte pump against in-memory streams: no sockets, virtual time.

Each test drives :func:`l4proxy.pump.pump`, the one entry point every pump path sits behind.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from l4proxy.pump import CHUNK_SIZE, pump
from l4proxy.record import Transfer

from .conftest import receive_all, receive_exactly


async def run_pump(
    nursery: trio.Nursery, client: trio.abc.Stream, backend: trio.abc.Stream, **kwargs: float
):
    """Start the pump; return (transfer, a dict that receives the outcome)."""
    transfer = Transfer()
    result: dict[str, str] = {}

    async def run() -> None:
        result["outcome"] = await pump(client, backend, transfer, **kwargs)

    nursery.start_soon(run)
    return transfer, result


async def test_bytes_pass_unchanged_both_ways_and_are_counted() -> None:
    client_app, client_proxy = trio.testing.memory_stream_pair()
    backend_proxy, backend_app = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        transfer, result = await run_pump(nursery, client_proxy, backend_proxy)
        payload = bytes(range(256)) * 1000
        await client_app.send_all(payload)
        assert await receive_exactly(backend_app, len(payload)) == payload
        await backend_app.send_all(b"reply")
        assert await receive_exactly(client_app, 5) == b"reply"
        await client_app.send_eof()
        await backend_app.send_eof()
    assert result["outcome"] == "ok"
    assert (transfer.to_backend, transfer.to_client) == (len(payload), 5)


async def test_client_half_close_keeps_the_other_direction_flowing() -> None:
    client_app, client_proxy = trio.testing.memory_stream_pair()
    backend_proxy, backend_app = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        _, result = await run_pump(nursery, client_proxy, backend_proxy)
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


async def test_backend_half_close_keeps_the_other_direction_flowing() -> None:
    client_app, client_proxy = trio.testing.memory_stream_pair()
    backend_proxy, backend_app = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        _, result = await run_pump(nursery, client_proxy, backend_proxy)
        await backend_app.send_all(b"banner")
        await backend_app.send_eof()
        assert await receive_all(client_app) == b"banner"
        await client_app.send_all(b"still talking")
        assert await receive_exactly(backend_app, 13) == b"still talking"
        await client_app.send_eof()
    assert result["outcome"] == "ok"


class BrokenOnReceive(trio.abc.HalfCloseableStream):
    """A stream whose peer reset the connection."""

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


@pytest.mark.parametrize("side", ["client", "backend"])
async def test_a_reset_on_either_side_ends_both_directions(side: str) -> None:
    _, healthy_proxy = trio.testing.memory_stream_pair()
    broken = BrokenOnReceive()
    client, backend = (broken, healthy_proxy) if side == "client" else (healthy_proxy, broken)
    with trio.fail_after(5):
        outcome = await pump(client, backend, Transfer())
    assert outcome == f"error:{side}_reset"


async def test_idle_timeout_fires_only_without_traffic(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client_app, client_proxy = trio.testing.memory_stream_pair()
    backend_proxy, backend_app = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        _, result = await run_pump(nursery, client_proxy, backend_proxy, idle_seconds=10)
        start = trio.current_time()
        for _ in range(5):  # traffic every 6 s keeps it alive past 30 s
            await trio.sleep(6)
            await client_app.send_all(b"x")
            await receive_exactly(backend_app, 1)
        assert "outcome" not in result
        quiet_from = trio.current_time()
    assert result["outcome"] == "idle_timeout"
    assert trio.current_time() - quiet_from == pytest.approx(10, abs=0.01)
    assert quiet_from - start >= 30


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


async def test_a_slow_reader_bounds_what_the_proxy_buffers() -> None:
    client_app, client_proxy = trio.testing.lockstep_stream_pair()  # no buffering at all
    source = EndlessSource()
    async with trio.open_nursery() as nursery:
        transfer, _ = await run_pump(nursery, client_proxy, source)
        for _ in range(20):  # read slowly, a little at a time
            await trio.testing.wait_all_tasks_blocked()
            assert source.produced - transfer.to_client <= CHUNK_SIZE
            await client_app.receive_some(1000)
        await trio.testing.wait_all_tasks_blocked()
        assert source.produced - transfer.to_client <= CHUNK_SIZE
        assert source.produced >= CHUNK_SIZE
        nursery.cancel_scope.cancel()


async def test_counters_survive_cancellation() -> None:
    client_app, client_proxy = trio.testing.memory_stream_pair()
    backend_proxy, backend_app = trio.testing.memory_stream_pair()
    transfer = Transfer()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client_proxy, backend_proxy, transfer)
            await client_app.send_all(b"12345")
            await receive_exactly(backend_app, 5)
            scope.cancel()
    assert transfer.to_backend == 5
