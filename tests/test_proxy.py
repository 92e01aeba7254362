"""The proxy end to end on loopback: real sockets, real backends, in-process proxy."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

import l4proxy
import l4proxy.connect
import l4proxy.splice

from .conftest import (
    AccessWatcher,
    connect_to,
    echo,
    identify,
    ipv6_loopback_available,
    receive_all,
    receive_exactly,
    refused_port,
    serve_in,
    start_backend,
    start_proxy,
)

#: Every test here runs on each way of moving bytes (the ``pump_path`` fixture).
pytestmark = pytest.mark.usefixtures("pump_path")


async def test_the_chosen_pump_is_used_and_idle_connections_hold_no_pipe(
    nursery: trio.Nursery, pump_path: str
) -> None:
    backend = await start_backend(nursery)
    proxy, bound = await start_proxy(nursery, [backend])
    async with await connect_to(bound[0]) as client:
        for _ in range(3):
            await client.send_all(b"x" * 100_000)
            await receive_exactly(client, 100_000)
        await trio.testing.wait_all_tasks_blocked()
        pipes = proxy.pipe_stats()
        assert pipes.in_use == 0  # established but idle: no pipe held
        assert (pipes.created > 0) == (pump_path in ("core", "streams"))
        # Every path but the generic copy loop runs in the data core, without a task.
        stats = proxy.stats()[proxy.config.listeners[0].name]
        assert stats == l4proxy.ListenerStats(open=1, parked=int(pump_path != "loop"))


async def test_echo_through_the_proxy_is_logged(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    backend = await start_backend(nursery)
    _, bound = await start_proxy(nursery, [backend])
    async with await connect_to(bound[0]) as client:
        await client.send_all(b"ping\n")
        assert await receive_exactly(client, 5) == b"ping\n"
        await client.send_eof()
        assert await receive_all(client) == b""
    with trio.fail_after(5):
        await access.wait()
    (record,) = access.records
    assert record.outcome == "ok"
    assert str(record.backend) == backend
    assert str(record.client).startswith("127.0.0.1:")
    assert (record.bytes_to_backend, record.bytes_to_client) == (5, 5)
    assert record.listener == "127.0.0.1:0"
    assert record.duration >= 0


def _pattern(seed: int, size: int) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB of non-repeating-ish bytes
    return (block * (size // len(block) + 1))[:size]


@pytest.mark.slow
async def test_64_mib_each_way_arrives_intact(nursery: trio.Nursery) -> None:
    size = 64 * 1024 * 1024
    chunk = _pattern(1, 1 << 20)
    received_by_backend: dict[str, str] = {}
    backend_done = trio.Event()

    async def sink_and_source(stream: trio.SocketStream) -> None:
        """Reads everything (hashing it) while sending 64 MiB back."""
        async with stream:
            async with trio.open_nursery() as inner:

                async def send() -> None:
                    for _ in range(size // len(chunk)):
                        await stream.send_all(chunk)
                    await stream.send_eof()

                inner.start_soon(send)
                digest = hashlib.sha256()
                async for data in stream:
                    digest.update(data)
                received_by_backend["sha256"] = digest.hexdigest()
                backend_done.set()

    backend = await start_backend(nursery, sink_and_source)
    _, bound = await start_proxy(nursery, [backend])
    expected = hashlib.sha256(chunk * (size // len(chunk))).hexdigest()
    with trio.fail_after(120):
        async with await connect_to(bound[0]) as client:
            async with trio.open_nursery() as inner:

                async def send() -> None:
                    for _ in range(size // len(chunk)):
                        await client.send_all(chunk)
                    await client.send_eof()

                inner.start_soon(send)
                digest = hashlib.sha256()
                total = 0
                async for data in client:
                    digest.update(data)
                    total += len(data)
        await backend_done.wait()
    assert total == size
    assert digest.hexdigest() == expected
    assert received_by_backend["sha256"] == expected


async def test_200_concurrent_connections_each_get_their_own_bytes(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery)
    _, bound = await start_proxy(nursery, [backend])
    results: dict[int, bool] = {}

    async def one(index: int) -> None:
        payload = _pattern(index, 20_000 + index)
        async with await connect_to(bound[0]) as client:
            await client.send_all(payload)
            await client.send_eof()
            results[index] = await receive_all(client) == payload

    with trio.fail_after(60):
        async with trio.open_nursery() as clients:
            for index in range(200):
                clients.start_soon(one, index)
    assert len(results) == 200
    assert all(results.values())


async def test_client_half_close_then_backend_replies(nursery: trio.Nursery) -> None:
    async def reply_after_eof(stream: trio.SocketStream) -> None:
        async with stream:
            request = await receive_all(stream)  # reads until the client's EOF
            await stream.send_all(b"got " + request)
            await stream.send_eof()

    backend = await start_backend(nursery, reply_after_eof)
    _, bound = await start_proxy(nursery, [backend])
    with trio.fail_after(5):
        async with await connect_to(bound[0]) as client:
            await client.send_all(b"question")
            await client.send_eof()  # shutdown(SHUT_WR)
            assert await receive_all(client) == b"got question"


async def test_backend_half_close_then_client_keeps_sending(nursery: trio.Nursery) -> None:
    seen: list[bytes] = []
    done = trio.Event()

    async def banner_then_read(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"banner")
            await stream.send_eof()
            seen.append(await receive_all(stream))
            done.set()

    backend = await start_backend(nursery, banner_then_read)
    _, bound = await start_proxy(nursery, [backend])
    with trio.fail_after(5):
        async with await connect_to(bound[0]) as client:
            assert await receive_all(client) == b"banner"
            await client.send_all(b"after your eof")
            await client.send_eof()
        await done.wait()
    assert seen == [b"after your eof"]


def _reset(stream: trio.SocketStream) -> None:
    """Close with SO_LINGER 0: the peer gets RST instead of FIN."""
    stream.socket.setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
    )
    stream.socket.close()


async def test_client_reset_closes_the_backend(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    backend_saw: list[bytes] = []
    connected, closed = trio.Event(), trio.Event()

    async def wait_for_close(stream: trio.SocketStream) -> None:
        async with stream:
            connected.set()
            try:
                backend_saw.append(await receive_all(stream))
            except trio.BrokenResourceError:
                backend_saw.append(b"reset")
            closed.set()

    backend = await start_backend(nursery, wait_for_close)
    _, bound = await start_proxy(nursery, [backend])
    with trio.fail_after(5):
        client = await connect_to(bound[0])
        await client.send_all(b"partial")
        await connected.wait()
        _reset(client)
        await closed.wait()
        await access.wait()
    assert backend_saw in ([b"partial"], [b"reset"])
    assert access.records[0].outcome == "error:client_reset"


async def test_backend_reset_closes_the_client(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    async def reset_at_once(stream: trio.SocketStream) -> None:
        await stream.receive_some(100)
        _reset(stream)

    backend = await start_backend(nursery, reset_at_once)
    _, bound = await start_proxy(nursery, [backend])
    with trio.fail_after(5):
        async with await connect_to(bound[0]) as client:
            await client.send_all(b"hello")
            # A close or a reset: either way the client's connection ends.
            with contextlib.suppress(trio.BrokenResourceError):
                assert await receive_all(client) == b""
        await access.wait()
    assert access.records[0].outcome == "error:backend_reset"


async def test_round_robin_spreads_connections(nursery: trio.Nursery) -> None:
    backends = [await start_backend(nursery, identify(name)) for name in (b"a", b"b", b"c")]
    _, bound = await start_proxy(nursery, backends)
    seen = []
    for _ in range(6):
        async with await connect_to(bound[0]) as client:
            seen.append(await receive_exactly(client, 2))
    assert seen == [b"a\n", b"b\n", b"c\n", b"a\n", b"b\n", b"c\n"]


async def test_dead_backends_are_skipped(nursery: trio.Nursery, access: AccessWatcher) -> None:
    dead = f"127.0.0.1:{refused_port()}"
    alive = await start_backend(nursery, identify(b"alive"))
    _, bound = await start_proxy(nursery, [dead, alive, dead.replace("127.0.0.1", "127.0.0.2")])
    for _ in range(3):
        async with await connect_to(bound[0]) as client:
            assert await receive_exactly(client, 6) == b"alive\n"
    with trio.fail_after(5):
        await access.wait(3)
    assert {str(record.backend) for record in access.records} == {alive}


async def test_no_backend_closes_the_client_and_logs_why(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    dead = [f"127.0.0.1:{refused_port()}", f"127.0.0.2:{refused_port()}"]
    _, bound = await start_proxy(nursery, dead)
    with trio.fail_after(5):
        async with await connect_to(bound[0]) as client:
            assert await receive_all(client) == b""
        await access.wait()
    (record,) = access.records
    assert record.outcome == "connect_failed"
    assert record.backend is None
    assert record.error == f"{dead[0]}: connection refused; {dead[1]}: connection refused"


async def test_unix_sockets_on_both_sides(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend_path = str(tmp_path / "backend.sock")
    backend_socket = trio.socket.socket(socket.AF_UNIX)
    await backend_socket.bind(backend_path)
    backend_socket.listen()
    backend_listener = trio.SocketListener(backend_socket)
    nursery.start_soon(trio.serve_listeners, echo, [backend_listener])
    front = tmp_path / "front.sock"
    front.touch()  # a stale non-socket file must not be silently replaced
    with pytest.raises(l4proxy.ListenError, match="exists and is not a socket"):
        await start_proxy(nursery, [f"unix:{backend_path}"], listen=[f"unix:{front}"])
    front.unlink()
    proxy, bound = await start_proxy(nursery, [f"unix:{backend_path}"], listen=[f"unix:{front}"])
    assert bound[0].address == l4proxy.UnixAddress(str(front))
    async with await connect_to(bound[0]) as client:
        await client.send_all(b"over unix")
        assert await receive_exactly(client, 9) == b"over unix"
    proxy.close()
    await trio.testing.wait_all_tasks_blocked()
    assert not front.exists()  # the socket file is removed once the listener closes


@pytest.mark.skipif(not ipv6_loopback_available(), reason="this machine has no IPv6 loopback")
async def test_ipv6_listen_and_backend(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, host="::1")
    _, bound = await start_proxy(nursery, [backend], listen=["[::1]:0"])
    assert bound[0].host == "::1"
    async with await connect_to(bound[0]) as client:
        await client.send_all(b"v6")
        assert await receive_exactly(client, 2) == b"v6"


async def test_port_only_listens_on_every_interface(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery)
    _, bound = await start_proxy(nursery, [backend], listen=[":0"])
    hosts = {address.host for address in bound}
    assert "0.0.0.0" in hosts
    v4 = next(address for address in bound if address.host == "0.0.0.0")
    async with await trio.open_tcp_stream("127.0.0.1", v4.port) as client:  # type: ignore[arg-type]
        await client.send_all(b"any")
        assert await receive_exactly(client, 3) == b"any"


async def test_port_in_use_is_a_listen_error_and_nothing_stays_bound(nursery: trio.Nursery) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        free_port = free.getsockname()[1]
        free.close()
        with pytest.raises(l4proxy.ListenError) as info:
            await start_proxy(
                nursery, ["127.0.0.1:1"], listen=[f"127.0.0.1:{free_port}", f"127.0.0.1:{port}"]
            )
    assert str(info.value) == (
        f"cannot listen on 127.0.0.1:{port} (listener '127.0.0.1:{free_port}'): address already in use"
    )
    with socket.socket() as again:  # the first address was released
        again.bind(("127.0.0.1", free_port))


async def test_idle_timeout_closes_both_sides(nursery: trio.Nursery, access: AccessWatcher) -> None:
    backend_closed = trio.Event()

    async def quiet(stream: trio.SocketStream) -> None:
        async with stream:
            await receive_all(stream)
            backend_closed.set()

    backend = await start_backend(nursery, quiet)
    _, bound = await start_proxy(nursery, [backend], idle_timeout=0.2)
    with trio.fail_after(5):
        async with await connect_to(bound[0]) as client:
            await client.send_all(b"x")
            assert await receive_all(client) == b""
        await backend_closed.wait()
        await access.wait()
    assert access.records[0].outcome == "idle_timeout"


async def test_close_refuses_new_connections_and_drains_established_ones(
    access: AccessWatcher,
) -> None:
    async with trio.open_nursery() as nursery:
        backend = await start_backend(nursery)
        config = l4proxy.Config(
            listeners=[
                l4proxy.ListenerConfig(listen=["127.0.0.1:0"], backends=[backend], drain_timeout=30)
            ]
        )
        proxy = l4proxy.Proxy(config)
        bound, proxy_done = await serve_in(nursery, proxy)
        with trio.fail_after(10):
            client = await connect_to(bound[0])
            await client.send_all(b"before")
            assert await receive_exactly(client, 6) == b"before"
            proxy.close()
            with pytest.raises(OSError, match="all attempts to connect"):
                await connect_to(bound[0])
            await client.send_all(b"during drain")
            assert await receive_exactly(client, 12) == b"during drain"
            assert not proxy_done.is_set()
            await client.send_eof()
            assert await receive_all(client) == b""
            await client.aclose()
            await proxy_done.wait()
        nursery.cancel_scope.cancel()
    assert [r.outcome for r in access.records] == ["ok"]


async def test_drain_timeout_cuts_what_is_left(
    nursery: trio.Nursery, access: AccessWatcher, autojump_clock: trio.testing.MockClock
) -> None:
    backend = await start_backend(nursery)
    proxy, bound = await start_proxy(nursery, [backend], drain_timeout=7)
    client = await connect_to(bound[0])
    await client.send_all(b"hi")
    await receive_exactly(client, 2)
    proxy.close()
    start = trio.current_time()
    assert await receive_all(client) == b""
    assert trio.current_time() - start == pytest.approx(7)
    await trio.testing.wait_all_tasks_blocked()
    assert [r.outcome for r in access.records] == ["drained"]
    await client.aclose()


async def test_reload_changes_backends_for_new_connections_only(nursery: trio.Nursery) -> None:
    old = await start_backend(nursery, identify(b"old"))
    new = await start_backend(nursery, identify(b"new"))
    proxy, bound = await start_proxy(nursery, [old])
    established = await connect_to(bound[0])
    assert await receive_exactly(established, 4) == b"old\n"
    listener = proxy.config.listeners[0]
    await proxy.reload(
        l4proxy.Config(
            listeners=[
                l4proxy.ListenerConfig(listen=listener.listen, backends=[new], name=listener.name)
            ]
        )
    )
    async with await connect_to(bound[0]) as fresh:
        assert await receive_exactly(fresh, 4) == b"new\n"
    await established.send_all(b"still here")
    assert await receive_exactly(established, 10) == b"still here"
    await established.aclose()
    assert proxy.config.listeners[0].backends == (l4proxy.Backend(new),)


async def test_handle_stream_serves_a_connection_the_host_app_accepted(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    backend = await start_backend(nursery)
    config = l4proxy.Config(
        listeners=[
            l4proxy.ListenerConfig(name="embedded", listen=["127.0.0.1:0"], backends=[backend])
        ]
    )
    proxy = l4proxy.Proxy(config)  # never serves: the host app owns accepting
    app_side, proxy_side = trio.testing.memory_stream_pair()
    nursery.start_soon(
        lambda: proxy.handle_stream(
            proxy_side,
            listener="embedded",
            client=l4proxy.UnixAddress("/run/app.sock"),
            local=l4proxy.TCPAddress("192.0.2.1", 443),
        )
    )
    await app_side.send_all(b"in memory")
    assert await receive_exactly(app_side, 9) == b"in memory"
    await app_side.send_eof()
    assert await receive_all(app_side) == b""
    with trio.fail_after(5):
        await access.wait()
    (record,) = access.records
    assert record.client == l4proxy.UnixAddress("/run/app.sock")
    assert record.local == l4proxy.TCPAddress("192.0.2.1", 443)
    assert (record.outcome, record.route) == ("ok", "default")
    with pytest.raises(ValueError, match="no listener named 'nope'"):
        await proxy.handle_stream(trio.testing.memory_stream_pair()[0], listener="nope")


async def test_an_unexpected_error_costs_one_connection_only(
    nursery: trio.Nursery, access: AccessWatcher, caplog: pytest.LogCaptureFixture
) -> None:
    backend = await start_backend(nursery)
    calls = 0

    async def flaky_connect(address: l4proxy.Address) -> trio.abc.Stream:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug in a custom dialer")
        return await l4proxy.connect.open_connection(address)

    _, bound = await start_proxy(nursery, [backend], connect=flaky_connect)
    with trio.fail_after(5):
        async with await connect_to(bound[0]) as broken:
            assert await receive_all(broken) == b""
        async with await connect_to(bound[0]) as fine:
            await fine.send_all(b"ok")
            assert await receive_exactly(fine, 2) == b"ok"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].getMessage().startswith("connection 1 from 127.0.0.1:")
    assert "RuntimeError: bug in a custom dialer" in caplog.text
    assert access.records[0].outcome == "error:internal"


async def test_access_log_files_in_text_and_json(tmp_path: Path) -> None:
    text_log, json_log = tmp_path / "access.log", tmp_path / "access.jsonl"
    async with trio.open_nursery() as nursery:
        backend = await start_backend(nursery)
        config = l4proxy.Config.from_mapping(
            {
                "listeners": [
                    {
                        "name": "t",
                        "listen": ["127.0.0.1:0"],
                        "backends": [backend],
                        "access_log": str(text_log),
                    },
                    {
                        "name": "j",
                        "listen": ["127.0.0.1:0"],
                        "backends": [backend],
                        "access_log": str(json_log),
                        "log_format": "json",
                    },
                ]
            }
        )
        proxy = l4proxy.Proxy(config)
        bound, served = await serve_in(nursery, proxy)
        for address in bound:
            async with await connect_to(address) as client:
                await client.send_all(b"abc")
                await receive_exactly(client, 3)
                await client.send_eof()
                await receive_all(client)
        proxy.close()  # serve returns once drained, with the access logs flushed
        with trio.fail_after(5):
            await served.wait()
        nursery.cancel_scope.cancel()
    (line,) = text_log.read_text().splitlines()
    assert " listener=t client=127.0.0.1:" in line
    assert f"backend={backend} bytes_to_backend=3 bytes_to_client=3 duration=" in line
    assert line.endswith(" outcome=ok route=default")
    (entry,) = (json.loads(raw) for raw in json_log.read_text().splitlines())
    assert entry["listener"] == "j"
    assert entry["backend"] == backend
    assert (entry["bytes_to_backend"], entry["bytes_to_client"], entry["outcome"]) == (3, 3, "ok")
    assert entry["time"].endswith("Z")
    assert set(entry) == {
        "time",
        "id",
        "listener",
        "client",
        "via",
        "backend",
        "bytes_to_backend",
        "bytes_to_client",
        "route",
        "duration",
        "outcome",
        "error",
        "sni",
        "alpn",
        "tls_version",
        "cipher",
        "client_subject",
    }


async def test_unwritable_access_log_is_a_config_error(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with pytest.raises(
        l4proxy.ConfigError, match=r"access_log: cannot open .*: No such file or directory"
    ):
        await start_proxy(nursery, ["127.0.0.1:1"], access_log=str(tmp_path / "missing" / "a.log"))
