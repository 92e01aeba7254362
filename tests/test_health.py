"""Passive health (issue #11): a backend whose connect fails is left out for a back-off
and taken back when a later connect works; a pool with every backend down fails
connections at once with ``no_backend`` and one log line. Real sockets, a backend
that dies and comes back."""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

import trio

from .conftest import identify, read_line, start_proxy

if TYPE_CHECKING:
    import pytest

    from .conftest import AccessWatcher


async def _name(port: int | None) -> bytes:
    assert port is not None
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        with trio.fail_after(5):
            return (await read_line(stream)).strip()


async def test_a_backend_that_dies_is_left_out_and_taken_back_when_it_returns(
    nursery: trio.Nursery, access: AccessWatcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="l4proxy.health")
    a = await nursery.start(partial(trio.serve_tcp, identify(b"a"), 0, host="127.0.0.1"))
    b_scope = trio.CancelScope()

    async def serve_b(port: int, task_status: trio.TaskStatus[list[trio.SocketListener]]) -> None:
        with b_scope:
            await trio.serve_tcp(identify(b"b"), port, host="127.0.0.1", task_status=task_status)

    b = await nursery.start(serve_b, 0)
    a_port, b_port = a[0].socket.getsockname()[1], b[0].socket.getsockname()[1]
    _, (bound,) = await start_proxy(nursery, [f"127.0.0.1:{a_port}", f"127.0.0.1:{b_port}"])
    assert [await _name(bound.port) for _ in range(2)] == [b"a", b"b"]
    b_scope.cancel()  # b dies
    await trio.sleep(0.05)
    # the next connection tries a (round-robin), the one after b: refused, then a
    assert [await _name(bound.port) for _ in range(2)] == [b"a", b"a"]
    assert [r.error for r in access.records[-2:]] == [None, None]
    down = [r.getMessage() for r in caplog.records if "down" in r.getMessage()]
    assert down == [f"backend 127.0.0.1:{b_port} down: connection refused (left out for 1s)"]
    for _ in range(4):  # within the back-off (tests/test_balancing.py: b left out)
        assert await _name(bound.port) == b"a"
    b_scope = trio.CancelScope()
    await nursery.start(serve_b, b_port)  # b is back, on its port
    with trio.fail_after(5):
        # polled through real connections: b is back once its back-off (1 s) passed
        while await _name(bound.port) != b"b":  # noqa: ASYNC110
            await trio.sleep(0.1)
    ups = [r.getMessage() for r in caplog.records if " up" in r.getMessage()]
    assert ups == [f"backend 127.0.0.1:{b_port} up: connected"]
    assert len([r for r in caplog.records if "down" in r.getMessage()]) == 1  # once each


async def test_every_backend_down_fails_at_once_with_one_line(
    nursery: trio.Nursery, access: AccessWatcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="l4proxy.health")
    _, (bound,) = await start_proxy(nursery, ["127.0.0.1:1"])  # nothing listens on port 1
    for _ in range(4):
        assert bound.port is not None
        async with await trio.open_tcp_stream("127.0.0.1", bound.port) as stream:
            with trio.fail_after(5):
                assert await stream.receive_some() == b""
    with trio.fail_after(5):
        records = await access.wait(4)
    assert [r.outcome for r in records] == ["connect_failed", *["no_backend"] * 3]
    assert records[1].error == "every backend of the pool is down"
    lines = [r.getMessage() for r in caplog.records if "every backend is down" in r.getMessage()]
    assert len(lines) == 1
    assert "127.0.0.1:1" in lines[0]
