"""``balance`` through the proxy (issue #11): least-conn on real open connections,
source-hash keeping each client address on one backend, a route's own method, and the
key's errors in the file and on the command line."""

from __future__ import annotations

import ssl
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import attrs
import pytest
import trio

import l4proxy

from .conftest import identify, read_line, start_backend, start_proxy
from .test_cli import run_main

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import AccessWatcher


async def _backends(nursery: trio.Nursery, *names: bytes) -> list[str]:
    return [await start_backend(nursery, identify(name)) for name in names]


async def _open(port: int | None, stack: AsyncExitStack, source: str = "127.0.0.1") -> bytes:
    """A connection through the proxy, kept open in ``stack``: the backend's name."""
    assert port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    await stack.enter_async_context(stream)
    with trio.fail_after(5):
        return (await read_line(stream)).strip()


async def test_least_conn_sends_the_next_connection_to_the_least_loaded(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    backends = await _backends(nursery, b"a", b"b", b"c")
    _, (bound,) = await start_proxy(nursery, backends, balance="least-conn")
    async with AsyncExitStack() as held:
        first = [await _open(bound.port, held) for _ in range(2)]
        assert first == [b"a", b"b"]  # all at 0: in turn
        async with AsyncExitStack() as brief:
            assert await _open(bound.port, brief) == b"c"
        with trio.fail_after(5):  # c's connection ended: c has 0, a and b 1 each
            await access.wait(1)
        # round-robin would go on with a; least-conn goes back to c
        assert await _open(bound.port, held) == b"c"
        assert await _open(bound.port, held) in (b"a", b"b")  # all tied at 1: in turn


async def test_source_hash_keeps_each_client_address_on_one_backend(
    nursery: trio.Nursery,
) -> None:
    backends = await _backends(nursery, b"a", b"b", b"c")
    _, (bound,) = await start_proxy(nursery, backends, balance="source-hash")
    seen: dict[str, set[bytes]] = {}
    for host in range(2, 32):
        source = f"127.0.1.{host}"
        for _ in range(3):
            async with AsyncExitStack() as stack:
                seen.setdefault(source, set()).add(await _open(bound.port, stack, source))
    assert all(len(names) == 1 for names in seen.values()), seen
    assert set().union(*seen.values()) == {b"a", b"b", b"c"}  # 30 clients spread over all


async def test_source_hash_fails_over_to_the_clients_next_choice(nursery: trio.Nursery) -> None:
    a, b = await _backends(nursery, b"a", b"b")
    dead = "127.0.0.1:1"  # nothing listens on port 1
    _, (bound,) = await start_proxy(nursery, [dead, a, b], balance="source-hash")
    for host in range(2, 12):
        async with AsyncExitStack() as stack:
            assert await _open(bound.port, stack, f"127.0.2.{host}") in (b"a", b"b")


def _client_hello(server_name: str) -> bytes:
    """A real ClientHello (the stdlib's OpenSSL) naming ``server_name``."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def test_a_route_may_balance_its_own_way(nursery: trio.Nursery) -> None:
    """From one client address: the route (least-conn) spreads held connections, the
    listener's default pool (source-hash) keeps them on one backend."""
    backends = await _backends(nursery, b"a", b"b")
    route = l4proxy.RouteConfig(sni=["x.example"], backends=backends, balance="least-conn")
    listener = l4proxy.ListenerConfig(
        listen=["127.0.0.1:0"], backends=backends, routes=[route], balance="source-hash",
        passthrough=True,
    )  # fmt: skip
    assert listener.routes[0].balance == "least-conn"
    proxy = l4proxy.Proxy(l4proxy.Config(listeners=[listener]))
    (bound,) = await nursery.start(proxy.serve)

    async def hello(name: str, stack: AsyncExitStack) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", bound.port)
        await stack.enter_async_context(stream)
        await stream.send_all(_client_hello(name))
        with trio.fail_after(5):
            return (await read_line(stream)).strip()

    async with AsyncExitStack() as held:
        assert {await hello("x.example", held) for _ in range(2)} == {b"a", b"b"}
        assert len({await hello("other.example", held) for _ in range(4)}) == 1


def test_balance_errors_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "l4proxy.toml"
    config.write_text(
        'balance = "least-conn"\n[[listeners]]\nlisten = [":1"]\nbackends = ["a:1"]\n'
        '[[listeners]]\nlisten = [":2"]\nbackends = ["b:1"]\nbalance = "fastest"\n'
    )
    code, _, err = run_main(["--config", str(config), "--check"], capsys)
    assert code == 2
    assert "listeners[1].balance: expected one of 'round-robin', 'least-conn'" in err
    code, _, err = run_main(["-l", ":1", "-b", "a:1", "--balance", "fastest"], capsys)
    assert code == 2
    assert "Invalid value for '--balance'" in err
    code, _, _ = run_main(["-l", ":1", "-b", "a:1", "--balance", "source-hash", "--check"], capsys)
    assert code == 0
    with pytest.raises(l4proxy.ConfigError, match="balance: expected one of"):
        l4proxy.ListenerConfig(listen=[":1"], backends=["a:1"], balance="fastest")


async def test_weights_share_connections_and_backups_wait_for_the_primaries(
    nursery: trio.Nursery,
) -> None:
    a, b, spare = await _backends(nursery, b"a", b"b", b"spare")
    pool = [l4proxy.Backend(a, weight=3), b, {"address": spare, "backup": True}]
    _, (bound,) = await start_proxy(nursery, pool)  # type: ignore[arg-type]
    async with AsyncExitStack() as stack:
        names = [await _open(bound.port, stack) for _ in range(8)]
    assert names == [b"a", b"a", b"b", b"a"] * 2  # smooth: 3 to 1, spread out
    dead = "127.0.0.1:1"  # nothing listens on port 1
    _, (failing,) = await start_proxy(
        nursery,
        [dead, {"address": spare, "backup": True}],  # type: ignore[list-item]
    )
    async with AsyncExitStack() as stack:
        assert await _open(failing.port, stack) == b"spare"


def test_backend_tables_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "l4proxy.toml"
    path.write_text(
        '[[listeners]]\nlisten = [":1"]\nbalance = "least-conn"\nbackends = [\n'
        '  "10.0.0.5:5432",\n  { address = "10.0.0.6:5432", weight = 3 },\n'
        '  { address = "unix:/run/pg.sock", backup = true },\n]\n'
    )
    (listener,) = l4proxy.Config.load(path).listeners
    assert listener.backends == (
        l4proxy.Backend("10.0.0.5:5432"),
        l4proxy.Backend("10.0.0.6:5432", weight=3),
        l4proxy.Backend("unix:/run/pg.sock", backup=True),
    )
    assert str(listener.backends[1]) == "10.0.0.6:5432"


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        ('{ address = "a:1", weight = 0 }', "backends[1].weight: expected a whole number from 1 to 1000, got 0"),
        ('{ address = "a:1", wieght = 2 }', "backends[1].wieght: unknown key (did you mean 'weight'?)"),
        ("{ weight = 2 }", "backends[1].address: required (an address string)"),
        ('{ address = "a" }', "backends[1].address: expected HOST:PORT"),
        ('{ address = "a:1", backup = "yes" }', "backends[1].backup: expected true or false"),
        ("5", "backends[1]: expected an address string or a table, got an integer"),
    ],
)  # fmt: skip
def test_bad_backend_tables_name_the_key(tmp_path: Path, item: str, problem: str) -> None:
    path = tmp_path / "l4proxy.toml"
    path.write_text(f'[[listeners]]\nlisten = [":1"]\nbackends = ["b:1", {item}]\n')
    with pytest.raises(l4proxy.ConfigError) as caught:
        l4proxy.Config.load(path)
    assert any(p.startswith(f"listeners[0].{problem}") for p in caught.value.problems), (
        caught.value.problems
    )


def test_backends_in_code() -> None:
    with pytest.raises(l4proxy.ConfigError, match="weight: expected a whole number"):
        l4proxy.Backend("a:1", weight=1001)
    with pytest.raises(l4proxy.ConfigError, match=r"backend\.address: expected HOST:PORT"):
        l4proxy.ListenerConfig(listen=[":1"], backends=[{"address": "nope"}])  # type: ignore[list-item]
    listener = l4proxy.ListenerConfig(listen=[":1"], backends="a:1")  # type: ignore[arg-type]
    assert listener.backends == (l4proxy.Backend("a:1"),)


async def test_least_conn_counts_carry_over_a_reload(nursery: trio.Nursery) -> None:
    a, b, c = await _backends(nursery, b"a", b"b", b"c")
    proxy, (bound,) = await start_proxy(nursery, [a, b], balance="least-conn")
    async with AsyncExitStack() as held:
        assert await _open(bound.port, held) == b"a"
        listener = proxy.config.listeners[0]
        await proxy.reload(l4proxy.Config(listeners=[attrs.evolve(listener, backends=[a, b, c])]))
        # a still has its connection: the next two go to b and c (reset counts and
        # rotation would start at a)
        assert {await _open(bound.port, held) for _ in range(2)} == {b"b", b"c"}
