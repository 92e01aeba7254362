"""The admit step (issue #10) on real sockets: allow/deny decided in the accept loop
before any read, refusals logged within a budget, changes applied by a reload.

Clients pick their source address among 127.0.0.0/8 (``local_address``), so one
machine plays several clients."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import TYPE_CHECKING

import attrs
import pytest
import trio

import l4proxy

from .conftest import identify, read_line, start_backend

if TYPE_CHECKING:
    from .conftest import AccessWatcher


async def _connect(port: int, source: str) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port, local_address=source)


async def _closed_at_once(port: int, source: str) -> None:
    """The proxy closes the connection without a byte (a reset counts too)."""
    stream = await _connect(port, source)
    async with stream:
        with trio.fail_after(5), contextlib.suppress(trio.BrokenResourceError):
            assert await stream.receive_some() == b""


async def _served(port: int, source: str) -> None:
    async with await _connect(port, source) as stream:
        with trio.fail_after(5):
            assert await read_line(stream) == b"backend\n"


def _config(backend: str, **settings: object) -> l4proxy.Config:
    listener = l4proxy.ListenerConfig(
        name="edge",
        listen=["127.0.0.1:0"],
        backends=[backend],
        **settings,  # type: ignore[arg-type]
    )
    return l4proxy.Config(listeners=[listener])


async def test_deny_and_allow_decide_before_any_read(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    contacted = []

    async def backend_handler(stream: trio.SocketStream) -> None:
        contacted.append(stream.socket.getpeername())
        await identify(b"backend")(stream)

    backend = await start_backend(nursery, backend_handler)
    proxy = l4proxy.Proxy(_config(backend, allow=["127.0.0.0/30", "::1"], deny=["127.0.0.3"]))
    (bound,) = await nursery.start(proxy.serve)
    await _served(bound.port, "127.0.0.2")  # allowed
    await _closed_at_once(bound.port, "127.0.0.3")  # allowed, but denied: deny wins
    await _closed_at_once(bound.port, "127.0.0.9")  # not in allow
    records = await access.wait(3)
    assert [r.outcome for r in records] == ["ok", "denied", "denied"]
    assert [str(r.client).rsplit(":", 1)[0] for r in records] == [
        "127.0.0.2", "127.0.0.3", "127.0.0.9"
    ]  # fmt: skip
    assert all(r.backend is None and r.to_client == 0 for r in records[1:])
    assert len(contacted) == 1  # a denied client never costs a backend connection


async def test_a_flood_of_refusals_is_logged_within_budget_and_summarised(
    nursery: trio.Nursery, access: AccessWatcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="l4proxy.server")
    backend = await start_backend(nursery, identify(b"backend"))
    proxy = l4proxy.Proxy(_config(backend, deny=["127.0.0.5"]))
    (bound,) = await nursery.start(proxy.serve)
    with trio.fail_after(20):
        for _ in range(60):  # bounded: 60 connections, well within a second or two
            await _closed_at_once(bound.port, "127.0.0.5")
        await _served(bound.port, "127.0.0.6")  # others are still served
        await access.wait(1)
        await trio.sleep(1.5)  # the summary comes once a second
    denied = [r for r in access.records if r.outcome == "denied"]
    assert 10 <= len(denied) < 60  # the first, then the budget of 10 lines a second
    (summary,) = [m for m in caplog.messages if "suppressed" in m]
    assert summary.startswith("suppressed ")
    assert "denied from 127.0.0.5" in summary
    suppressed = int(summary.split()[1])
    assert suppressed + len(denied) == 60


async def test_a_reload_changes_the_lists_for_new_connections(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    backend = await start_backend(nursery, identify(b"backend"))
    proxy = l4proxy.Proxy(_config(backend))
    (bound,) = await nursery.start(proxy.serve)
    established = await _connect(bound.port, "127.0.0.7")
    assert await read_line(established) == b"backend\n"
    await proxy.reload(_config(backend, deny=["127.0.0.7/32"]))
    await _closed_at_once(bound.port, "127.0.0.7")
    await established.send_all(b"still here\n")  # an established connection stays
    assert await read_line(established) == b"still here\n"
    await established.aclose()
    await proxy.reload(_config(backend))
    await _served(bound.port, "127.0.0.7")
    records = await access.wait(3)
    assert sorted(r.outcome for r in records) == ["denied", "ok", "ok"]


async def _open(port: int, source: str) -> trio.SocketStream:
    """A connection the proxy admitted: the backend's greeting came through."""
    stream = await _connect(port, source)
    with trio.fail_after(5):
        assert await read_line(stream) == b"backend\n"
    return stream


async def test_per_client_and_listener_limits(nursery: trio.Nursery, access: AccessWatcher) -> None:
    backend = await start_backend(nursery, identify(b"backend"))
    proxy = l4proxy.Proxy(_config(backend, max_connections_per_ip=2, max_connections=3))
    (bound,) = await nursery.start(proxy.serve)
    first = [await _open(bound.port, "127.0.0.21") for _ in range(2)]
    await _closed_at_once(bound.port, "127.0.0.21")  # its third: limit_per_ip
    third = await _open(bound.port, "127.0.0.22")  # another client: in
    await _closed_at_once(bound.port, "127.0.0.23")  # the listener's fourth: limit_total
    await first[0].aclose()
    with trio.fail_after(5):
        await access.wait(3)  # its line is written after its counts are released
    again = await _open(bound.port, "127.0.0.21")  # a place freed: in again
    refused = [r.outcome for r in access.records]
    assert refused[:2] == ["limit_per_ip", "limit_total"]
    for stream in (first[1], third, again):
        await stream.aclose()


async def test_rate_per_client_is_a_token_bucket(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    backend = await start_backend(nursery, identify(b"backend"))
    proxy = l4proxy.Proxy(_config(backend, rate_per_ip=3))
    (bound,) = await nursery.start(proxy.serve)
    opened = [await _open(bound.port, "127.0.0.31") for _ in range(3)]  # the burst
    await _closed_at_once(bound.port, "127.0.0.31")  # a fourth within the same second
    opened.append(await _open(bound.port, "127.0.0.32"))  # another client has its own
    for stream in opened:
        await stream.aclose()
    await trio.sleep(0.4)  # a token back (3 a second)
    opened = [await _open(bound.port, "127.0.0.31")]
    await opened[0].aclose()
    assert [r.outcome for r in access.records if r.outcome != "ok"] == ["rate_limited"]


async def test_the_process_limit_and_open_counts_carry_over_a_reload(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    backend = await start_backend(nursery, identify(b"backend"))
    config = _config(backend, max_connections_per_ip=1)
    proxy = l4proxy.Proxy(config)
    (bound,) = await nursery.start(proxy.serve)
    held = await _open(bound.port, "127.0.0.41")
    # The same limits reloaded: the open connection still counts for its client...
    await proxy.reload(config)
    await _closed_at_once(bound.port, "127.0.0.41")
    # ...and for a process-wide limit added by a reload.
    await proxy.reload(attrs.evolve(config, max_connections=1))
    await _closed_at_once(bound.port, "127.0.0.42")
    await held.aclose()
    with trio.fail_after(5):
        await access.wait(3)  # its line is written after its counts are released
    await (await _open(bound.port, "127.0.0.42")).aclose()
    outcomes = [r.outcome for r in access.records]
    assert outcomes[:2] == ["limit_per_ip", "limit_total"]


async def test_backend_connections_come_from_the_source_address(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    seen: list[str] = []

    async def handler(stream: trio.SocketStream) -> None:
        seen.append(stream.socket.getpeername()[0])
        await identify(b"backend")(stream)

    backend = await start_backend(nursery, handler)
    by_name = "localhost:" + backend.rsplit(":", 1)[1]  # a host name: the connector's path
    for target in (backend, by_name):
        proxy = l4proxy.Proxy(_config(target, source_address="127.0.0.77"))
        (bound,) = await nursery.start(proxy.serve)
        await (await _open(bound.port, "127.0.0.1")).aclose()
        proxy.close()
    assert seen == ["127.0.0.77", "127.0.0.77"]


async def test_a_source_address_not_on_this_machine_fails_at_start_and_on_reload(
    nursery: trio.Nursery,
) -> None:
    config = _config("127.0.0.1:9", source_address="192.0.2.1")  # TEST-NET-1: not ours
    with pytest.raises(
        l4proxy.ListenError, match=r"cannot make backend connections from 192\.0\.2\.1"
    ):
        await l4proxy.Proxy(config).serve()
    proxy = l4proxy.Proxy(_config("127.0.0.1:9"))
    await nursery.start(proxy.serve)
    with pytest.raises(l4proxy.ConfigError, match="source_address"):
        await proxy.reload(config)
    proxy.close()


async def test_the_cli_exits_1_with_one_line_for_a_foreign_source_address() -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "l4proxy", "-l", "127.0.0.1:0", "-b", "127.0.0.1:9",
         "--source-address", "192.0.2.1"],
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "192.0.2.1" in lines[0]
    assert "cannot assign requested address" in lines[0]
