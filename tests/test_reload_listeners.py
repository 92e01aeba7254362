"""Reloads change listeners too: added, removed, renamed, moved; ``listen`` and
``access_log`` changes; and no connection is refused while it happens."""

from __future__ import annotations

import logging
import signal
import socket
from typing import TYPE_CHECKING

import pytest
import trio

import l4proxy

from .conftest import (
    AccessWatcher,
    connect_to,
    identify,
    read_line,
    receive_exactly,
    refused_port,
    serve_in,
    start_backend,
)
from .proxyprocess import ProxyProcess

if TYPE_CHECKING:
    from pathlib import Path

WAIT = 20


def _listener(
    name: str, listen: str | list[str], backend: str, **settings: object
) -> l4proxy.ListenerConfig:
    addresses = [listen] if isinstance(listen, str) else listen
    return l4proxy.ListenerConfig(name=name, listen=addresses, backends=[backend], **settings)  # type: ignore[arg-type]


def _config(*listeners: l4proxy.ListenerConfig) -> l4proxy.Config:
    return l4proxy.Config(listeners=list(listeners))


def _by_name(proxy: l4proxy.Proxy) -> dict[str, list[l4proxy.BoundAddress]]:
    found: dict[str, list[l4proxy.BoundAddress]] = {}
    for bound in proxy.addresses:
        found.setdefault(bound.listener, []).append(bound)
    return found


async def _greeting(bound: l4proxy.BoundAddress) -> bytes:
    async with await connect_to(bound) as client:
        return await read_line(client)


async def _refused(bound: l4proxy.BoundAddress) -> bool:
    try:
        stream = await connect_to(bound)
    except OSError:
        return True
    await stream.aclose()
    return False


class _Greetings:
    """What a client loop received, connection by connection, for waiting on."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self._changed = trio.Event()

    def add(self, greeting: bytes) -> None:
        self.seen.append(greeting)
        self._changed.set()
        self._changed = trio.Event()

    async def more(self, count: int) -> None:
        """Wait for ``count`` more (the caller bounds the wait)."""
        target = len(self.seen) + count
        while len(self.seen) < target:
            await self._changed.wait()


async def test_a_reload_adds_and_removes_listeners_and_the_removed_one_drains(
    nursery: trio.Nursery, access: AccessWatcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="l4proxy.server")
    a = await start_backend(nursery, identify(b"a"))
    b = await start_backend(nursery, identify(b"b"))
    c = await start_backend(nursery, identify(b"c"))
    proxy = l4proxy.Proxy(
        _config(_listener("a", "127.0.0.1:0", a), _listener("b", "127.0.0.1:0", b))
    )
    with trio.fail_after(WAIT):
        bound, served = await serve_in(nursery, proxy)
        first = _by_name(proxy)
        assert {address.listener for address in bound} == {"a", "b"}
        held = await connect_to(first["b"][0])
        assert await read_line(held) == b"b\n"

        await proxy.reload(
            _config(_listener("a", "127.0.0.1:0", a), _listener("c", "127.0.0.1:0", c))
        )

        now = _by_name(proxy)
        assert now["a"] == first["a"]  # the same socket, the same port
        assert set(now) == {"a", "c"}
        assert await _greeting(now["a"][0]) == b"a\n"
        assert await _greeting(now["c"][0]) == b"c\n"
        assert await _refused(first["b"][0])
        # The removed listener's connection goes on, and is counted until it ends.
        assert set(proxy.stats()) == {"a", "b", "c"}
        assert proxy.stats()["b"].open == 1
        await held.send_all(b"still there")
        assert await receive_exactly(held, 11) == b"still there"
        await held.aclose()
        records = await access.wait(3)
        while "b" in proxy.stats():  # gone once drained  # noqa: ASYNC110
            await trio.sleep(0.01)
        assert [r.listener for r in records if r.listener == "b"] == ["b"]
        assert "listener 'b': removed by the reload; draining" in caplog.text
        proxy.close()
        await served.wait()


async def test_a_removed_listener_is_cut_at_its_drain_timeout(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    a = await start_backend(nursery, identify(b"a"))
    proxy = l4proxy.Proxy(
        _config(
            _listener("a", "127.0.0.1:0", a),
            _listener("b", "127.0.0.1:0", a, drain_timeout=0.2),
        )
    )
    with trio.fail_after(WAIT):
        _, served = await serve_in(nursery, proxy)
        held = await connect_to(_by_name(proxy)["b"][0])
        assert await read_line(held) == b"a\n"
        await proxy.reload(_config(_listener("a", "127.0.0.1:0", a)))
        (record,) = await access.wait(1)
        assert (record.listener, record.outcome) == ("b", "drained")
        await held.aclose()
        proxy.close()
        await served.wait()


async def test_renaming_a_listener_and_moving_an_address_refuse_no_connection(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    """A client loop runs across reloads that rename the listener, change its backend,
    and move its address to a listener that already exists: every connection gets a
    greeting, and the access lines name the listener that took it."""
    one = await start_backend(nursery, identify(b"one"))
    two = await start_backend(nursery, identify(b"two"))
    proxy = l4proxy.Proxy(_config(_listener("first", "127.0.0.1:0", one)))
    with trio.fail_after(WAIT):
        (bound,), served = await serve_in(nursery, proxy)
        address = str(bound.address)
        other = f"127.0.0.1:{refused_port()}"
        stop = trio.Event()
        greetings = _Greetings()

        async def client_loop() -> None:
            for _ in range(5000):  # bounded; stopped much sooner
                greetings.add(await _greeting(bound))
                if stop.is_set():
                    return

        async with trio.open_nursery() as clients:
            clients.start_soon(client_loop)
            steps = [
                _config(_listener("second", address, two)),
                _config(_listener("third", address, one)),
                # "third" moves to a new address; a new "fourth" takes its old one
                _config(_listener("third", other, one), _listener("fourth", address, two)),
                # and then the address of "third", which is gone
                _config(_listener("fourth", [address, other], one)),
            ]
            for config in steps:
                await greetings.more(5)  # some connections on each config
                await proxy.reload(config)
            await greetings.more(5)
            stop.set()
        assert set(greetings.seen) == {b"one\n", b"two\n"}
        records = await access.wait(len(greetings.seen))
        assert {r.listener for r in records} == {"first", "second", "third", "fourth"}
        assert all(r.outcome == "ok" for r in records)
        assert [b.listener for b in proxy.addresses] == ["fourth", "fourth"]
        proxy.close()
        await served.wait()


async def test_changing_listen_binds_the_new_address_and_closes_the_old(
    nursery: trio.Nursery,
) -> None:
    backend = await start_backend(nursery, identify(b"svc"))
    proxy = l4proxy.Proxy(_config(_listener("svc", "127.0.0.1:0", backend)))
    with trio.fail_after(WAIT):
        (old,), served = await serve_in(nursery, proxy)
        port = refused_port()
        await proxy.reload(_config(_listener("svc", f"127.0.0.1:{port}", backend)))
        (new,) = proxy.addresses
        assert new.port == port
        assert await _greeting(new) == b"svc\n"
        assert await _refused(old)
        proxy.close()
        await served.wait()


async def test_an_address_that_cannot_be_bound_is_logged_and_the_rest_applies(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    old = await start_backend(nursery, identify(b"old"))
    new = await start_backend(nursery, identify(b"new"))
    proxy = l4proxy.Proxy(_config(_listener("svc", "127.0.0.1:0", old)))
    with trio.fail_after(WAIT), socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        (bound,), served = await serve_in(nursery, proxy)
        await proxy.reload(
            _config(_listener("svc", str(bound.address), new), _listener("extra", busy, new))
        )
        assert await _greeting(bound) == b"new\n"
        assert [b.listener for b in proxy.addresses] == ["svc"]
        assert (
            f"reload: cannot listen on {busy} (listener 'extra'): address already in use; "
            "the rest of the new configuration applies"
        ) in caplog.text
        assert proxy.config.listeners[1].name == "extra"
        proxy.close()
        await served.wait()


async def test_an_access_log_change_applies_to_new_connections(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = await start_backend(nursery, identify(b"svc"))
    before, after = tmp_path / "before.log", tmp_path / "after.log"
    proxy = l4proxy.Proxy(_config(_listener("svc", "127.0.0.1:0", backend, access_log=str(before))))
    with trio.fail_after(WAIT):
        (bound,), served = await serve_in(nursery, proxy)
        assert await _greeting(bound) == b"svc\n"
        with pytest.raises(l4proxy.ConfigError, match=r"access_log: cannot open .*nowhere"):
            await proxy.reload(
                _config(
                    _listener(
                        "svc",
                        str(bound.address),
                        backend,
                        access_log=str(tmp_path / "nowhere" / "x"),
                    )
                )
            )
        await proxy.reload(
            _config(_listener("svc", str(bound.address), backend, access_log=str(after)))
        )
        assert await _greeting(bound) == b"svc\n"
        assert await _greeting(bound) == b"svc\n"
        proxy.close()
        await served.wait()  # flushes and closes both files
    assert len(before.read_text().splitlines()) == 1
    assert len(after.read_text().splitlines()) == 2


async def test_sighup_applies_listener_changes_with_a_client_loop_running(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The real command: a client loop connects without pause while SIGHUP renames the
    listener, changes its backend and adds a second listener; no connection fails."""
    one = await start_backend(nursery, identify(b"one"))
    two = await start_backend(nursery, identify(b"two"))
    port, extra = refused_port(), refused_port()
    config = tmp_path / "l4proxy.toml"

    def write(name: str, backend: str, *, more: bool = False) -> None:
        text = f'[[listeners]]\nname = "{name}"\nlisten = ["127.0.0.1:{port}"]\nbackends = ["{backend}"]\n'
        if more:
            text += f'[[listeners]]\nname = "extra"\nlisten = ["127.0.0.1:{extra}"]\nbackends = ["{one}"]\n'
        config.write_text(text)

    write("svc", one)
    bound = l4proxy.BoundAddress("svc", l4proxy.TCPAddress("127.0.0.1", port))
    with trio.fail_after(60):
        async with ProxyProcess(nursery, ["--config", str(config)]) as proc:
            await proc.listening()
            greetings = _Greetings()
            stop = trio.Event()

            async def client_loop() -> None:
                for _ in range(20000):  # bounded; stopped much sooner
                    greetings.add(await _greeting(bound))
                    if stop.is_set():
                        return

            async with trio.open_nursery() as clients:
                clients.start_soon(client_loop)
                for step, (name, backend, more) in enumerate(
                    [("renamed", two, False), ("renamed", one, True), ("svc", two, True)], 1
                ):
                    await greetings.more(20)
                    write(name, backend, more=more)
                    proc.signal(signal.SIGHUP)
                    await proc.wait_for("configuration reloaded", count=step)
                await greetings.more(20)
                stop.set()
            assert set(greetings.seen) == {b"one\n", b"two\n"}
            extra_bound = l4proxy.BoundAddress("extra", l4proxy.TCPAddress("127.0.0.1", extra))
            assert await _greeting(extra_bound) == b"one\n"
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0
    assert not [line for line in proc.stderr if "ERROR" in line]


async def test_a_reload_racing_the_start_of_serve_applies_to_its_listeners(
    nursery: trio.Nursery,
) -> None:
    """``serve`` binds while holding the reload lock: a reload issued at the same time
    applies before the binding (then ``serve`` binds the new config) or after (then
    the listeners change); never to a half-started proxy."""
    old = await start_backend(nursery, identify(b"old"))
    new = await start_backend(nursery, identify(b"new"))
    for delay in (0.0, 0.001, 0.01):
        proxy = l4proxy.Proxy(_config(_listener("a", "127.0.0.1:0", old)))
        with trio.fail_after(WAIT):
            served = trio.Event()

            async def serve(proxy: l4proxy.Proxy = proxy, served: trio.Event = served) -> None:
                await proxy.serve()
                served.set()

            nursery.start_soon(serve)
            await trio.sleep(delay)
            await proxy.reload(_config(_listener("b", "127.0.0.1:0", new)))
            while not proxy.addresses:  # noqa: ASYNC110  (serve may still be binding)
                await trio.sleep(0.001)
            (bound,) = proxy.addresses
            assert bound.listener == "b"
            assert await _greeting(bound) == b"new\n"
            proxy.close()
            await served.wait()
            assert proxy.stats() == {"b": l4proxy.ListenerStats(open=0, parked=0)}


async def test_a_replacement_that_cannot_bind_keeps_the_old_socket_on_its_port(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """127.0.0.1:P to 0.0.0.0:P: the wildcard cannot be bound while the old socket holds
    the port; the old socket stays (for the listener that wanted the port), so the port
    is not left without a listener."""
    backend = await start_backend(nursery, identify(b"svc"))
    port = refused_port()
    proxy = l4proxy.Proxy(_config(_listener("svc", f"127.0.0.1:{port}", backend)))
    with trio.fail_after(WAIT):
        (bound,), served = await serve_in(nursery, proxy)
        await proxy.reload(_config(_listener("svc", f"0.0.0.0:{port}", backend)))
        assert proxy.addresses == [bound]
        assert await _greeting(bound) == b"svc\n"
        assert f"keeping 127.0.0.1:{port} open, since its replacement could not be bound" in (
            caplog.text
        )
        proxy.close()
        await served.wait()


async def test_a_reload_before_serve_opens_its_new_access_log_when_serving(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = await start_backend(nursery, identify(b"svc"))
    log = tmp_path / "access.log"
    proxy = l4proxy.Proxy(_config(_listener("svc", "127.0.0.1:0", backend)))
    await proxy.reload(_config(_listener("svc", "127.0.0.1:0", backend, access_log=str(log))))
    with trio.fail_after(WAIT):
        (bound,), served = await serve_in(nursery, proxy)
        assert await _greeting(bound) == b"svc\n"
        proxy.close()
        await served.wait()
    assert len(log.read_text().splitlines()) == 1


async def test_one_listener_may_listen_on_host_0_twice_across_reloads(
    nursery: trio.Nursery,
) -> None:
    backend = await start_backend(nursery, identify(b"svc"))
    config = _config(_listener("svc", ["127.0.0.1:0", "127.0.0.1:0"], backend))
    proxy = l4proxy.Proxy(config)
    with trio.fail_after(WAIT):
        bound, served = await serve_in(nursery, proxy)
        assert len({b.port for b in bound}) == 2
        await proxy.reload(config)
        assert proxy.addresses == bound  # both kept, none bound again
        await proxy.reload(_config(_listener("other", ["127.0.0.1:0", "127.0.0.1:0"], backend)))
        assert len({b.port for b in proxy.addresses}) == 2  # a new name: two new ports
        for address in proxy.addresses:
            assert await _greeting(address) == b"svc\n"
        proxy.close()
        await served.wait()
