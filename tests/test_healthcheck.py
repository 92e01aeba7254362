"""Active health checks (issue #11): real backends on loopback that die and come back,
a real redis-server checked with PING / +PONG, TLS backends whose handshake works or
fails, rise and fall, reloads, the log lines and what ``Proxy.stats()`` says.

Intervals are short (0.05 s) so a backend goes down or up within a few tenths of a
second; every wait is bounded by ``trio.fail_after`` and waits for an event (a log
line, an access record, an accepted connection), never for time to pass.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import subprocess
import time
from typing import TYPE_CHECKING

import attrs
import pytest
import trio

import l4proxy
import l4proxy.healthcheck
from l4proxy import HealthCheck, ListenerConfig, RouteConfig, TCPAddress
from l4proxy.addresses import parse_address
from l4proxy.balancing import BackendPool
from l4proxy.cli import main
from l4proxy.connect import target
from l4proxy.healthcheck import _Schedule, _Watch, record
from l4proxy.healthprobe import Probe
from l4proxy.protocols.proxyheader import Command, ProxyHeader, parse_proxy_header

from .conftest import identify, read_line, refused_port
from .proxyprocess import ProxyProcess
from .realservers import free_port, require_binary
from .test_tls_passthrough import server_context, tls_identify

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from pathlib import Path

    from .conftest import AccessWatcher, Handler
    from .tlsfixtures import PKI

WAIT = 10  # seconds: the bound on every wait for something that takes a fraction of one
FAST = 0.05  # the check interval of these tests


class HealthLog(logging.Handler):
    """The ``l4proxy.health`` lines; a test awaits the one it expects."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, line: str) -> None:
        """Until ``line`` was logged (the caller bounds the wait)."""
        await self.wait_until(lambda: line in self.lines)

    async def wait_until(self, done: Callable[[], bool]) -> None:
        while not done():
            await self._changed.wait()

    def about(self, address: str) -> list[str]:
        return [line for line in self.lines if f"backend {address} " in line]


@pytest.fixture
def health() -> Iterator[HealthLog]:
    handler = HealthLog()
    logger = logging.getLogger("l4proxy.health")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@attrs.define
class Backend:
    """A loopback backend that can die (its listener closed: connects are refused) and
    come back on the same port; counts and remembers the connections it accepted."""

    handler: Handler
    port: int = 0
    accepted: list[tuple[str, int]] = attrs.field(factory=list)
    scope: trio.CancelScope | None = None
    arrived: trio.Event = attrs.field(factory=trio.Event)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, nursery: trio.Nursery) -> None:
        self.scope = trio.CancelScope()
        listeners = await nursery.start(self._serve, self.port)
        self.port = listeners[0].socket.getsockname()[1]

    def die(self) -> None:
        assert self.scope is not None
        self.scope.cancel()

    async def wait_accepted(self, count: int) -> None:
        while len(self.accepted) < count:
            await self.arrived.wait()

    async def _serve(
        self, port: int, task_status: trio.TaskStatus[list[trio.SocketListener]]
    ) -> None:
        assert self.scope is not None
        with self.scope:
            await trio.serve_tcp(self._handle, port, host="127.0.0.1", task_status=task_status)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.accepted.append(stream.socket.getpeername()[:2])
        self.arrived.set()
        self.arrived = trio.Event()
        await self.handler(stream)


async def backend(nursery: trio.Nursery, handler: Handler) -> Backend:
    started = Backend(handler)
    await started.start(nursery)
    return started


async def start_proxy(
    nursery: trio.Nursery, listener: ListenerConfig
) -> tuple[l4proxy.Proxy, l4proxy.BoundAddress]:
    proxy = l4proxy.Proxy(l4proxy.Config(listeners=[listener]))
    bound = await nursery.start(proxy.serve)
    return proxy, bound[0]


def listener(backends: list[str], **settings: object) -> ListenerConfig:
    return ListenerConfig(
        listen=["127.0.0.1:0"],
        backends=backends,
        name="front",
        **settings,  # type: ignore[arg-type]
    )


async def greeting(bound: l4proxy.BoundAddress) -> bytes:
    """Which backend a new connection through the proxy reached (its greeting)."""
    assert bound.port is not None
    async with await trio.open_tcp_stream("127.0.0.1", bound.port) as stream:
        return (await read_line(stream)).strip()


def backends_of(proxy: l4proxy.Proxy) -> dict[str, l4proxy.BackendStats]:
    return {str(stats.address): stats for stats in proxy.stats()["front"].backends}


def down_line(address: str, reason: str, checks: int = 3) -> str:
    return f"backend {address} down: {reason} ({checks} checks)"


def up_line(address: str, checks: int = 2) -> str:
    return f"backend {address} up: {checks} checks passed"


def wrong_reply(reply: bytes) -> Handler:
    """A backend that accepts, reads one request and answers ``reply``."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.receive_some()
                await stream.send_all(reply)

    return handler


# --------------------------------------------------------------------------- die and return


async def test_a_backend_that_dies_is_held_down_and_taken_back_after_rise_checks(
    nursery: trio.Nursery, health: HealthLog, access: AccessWatcher
) -> None:
    a = await backend(nursery, identify(b"a"))
    b = await backend(nursery, identify(b"b"))
    proxy, bound = await start_proxy(nursery, listener([a.address, b.address], health_check=FAST))
    with trio.fail_after(WAIT):
        assert {await greeting(bound) for _ in range(2)} == {b"a", b"b"}
        b.die()
        await health.wait_for(down_line(b.address, "connection refused"))
        marked = time.time()
        for _ in range(6):  # b is left out: no connection even tries it (no passive line)
            assert await greeting(bound) == b"a"
        await access.wait(8)
    stats = backends_of(proxy)
    assert stats[a.address].up
    assert stats[a.address].checked
    down = stats[b.address]
    assert (down.up, down.held, down.reason) == (False, True, "connection refused")
    assert down.down_since is not None
    assert abs(down.down_since - marked) < 1

    with trio.fail_after(WAIT):
        await b.start(nursery)  # back, on its port
        await health.wait_for(up_line(b.address))
        assert {await greeting(bound) for _ in range(2)} == {b"a", b"b"}
    back = backends_of(proxy)[b.address]
    assert (back.up, back.held, back.down_since, back.reason) == (True, False, None, None)
    # One line per change: the passive path said nothing (no connect ever failed).
    assert health.about(b.address) == [
        down_line(b.address, "connection refused"),
        up_line(b.address),
    ]


async def test_a_backend_failing_its_check_gets_no_connections_though_it_accepts(
    nursery: trio.Nursery, health: HealthLog
) -> None:
    """Held down means no passive retry: a backend that accepts connections but
    answers the check wrongly never gets one, however long it stays down."""
    good = await backend(nursery, identify(b"+PONG"))
    bad = await backend(nursery, wrong_reply(b"-ERR unknown command 'PING'\r\n"))
    check = HealthCheck(interval=FAST, send="PING\r\n", expect="+PONG")
    proxy, bound = await start_proxy(
        nursery, listener([good.address, bad.address], health_check=check)
    )
    with trio.fail_after(WAIT):
        reason = "expected '+PONG', got '-ERR '"
        await health.wait_for(down_line(bad.address, reason))
        checks = len(bad.accepted)
        for _ in range(6):
            assert await greeting(bound) == b"+PONG"
        await bad.wait_accepted(checks + 4)  # the checks go on...
    assert backends_of(proxy)[bad.address].reason == reason
    assert not backends_of(proxy)[bad.address].up  # ...and it stays down
    assert health.about(good.address) == []


# --------------------------------------------------------------------------- redis


@contextlib.asynccontextmanager
async def redis_server(port: int) -> AsyncIterator[trio.Process]:
    """A real redis-server on loopback ``port`` (no persistence), stopped on exit."""
    argv = [require_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--daemonize", "no"]  # fmt: skip
    process = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        with trio.fail_after(WAIT):
            while True:  # until it accepts (bounded by the deadline)
                assert process.poll() is None, "redis-server exited at start"
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.02)
                    continue
                await stream.aclose()
                break
        yield process
    finally:
        process.terminate()
        with trio.move_on_after(WAIT) as cleanup:
            cleanup.shield = True
            await process.wait()
        if process.poll() is None:
            process.kill()


async def test_a_real_redis_passes_ping_pong_and_is_held_down_while_it_is_stopped(
    nursery: trio.Nursery, health: HealthLog
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    impostor = await backend(nursery, wrong_reply(b"-NOAUTH Authentication required.\r\n"))
    check = HealthCheck(interval=FAST, send="PING\r\n", expect="+PONG")
    with trio.fail_after(WAIT):
        async with redis_server(port):
            proxy, _ = await start_proxy(
                nursery, listener([address, impostor.address], health_check=check)
            )
            # Both are checked alike; only the impostor's reply is wrong.
            await health.wait_for(down_line(impostor.address, "expected '+PONG', got '-NOAU'"))
            await impostor.wait_accepted(6)
            assert backends_of(proxy)[address].up
            assert health.about(address) == []
        await health.wait_for(down_line(address, "connection refused"))  # stopped
        assert backends_of(proxy)[address].held
        async with redis_server(port):  # back on its port
            await health.wait_for(up_line(address))
            assert backends_of(proxy)[address].up


# --------------------------------------------------------------------------- TLS


async def test_tls_backends_are_checked_with_a_handshake(
    nursery: trio.Nursery, pki: PKI, health: HealthLog
) -> None:
    good = await backend(nursery, tls_identify(server_context(pki.a), b"good"))
    wrong_name = await backend(nursery, tls_identify(server_context(pki.c), b"c"))
    plain = await backend(nursery, identify(b"plain"))
    addresses = [good.address, wrong_name.address, plain.address]
    proxy, bound = await start_proxy(
        nursery,
        listener(
            addresses,
            health_check=FAST,
            backend_tls=True,
            backend_ca=pki.ca_file,
            backend_sni="a.example",
        ),
    )
    with trio.fail_after(WAIT):
        await health.wait_for(
            down_line(
                wrong_name.address,
                "TLS handshake failed: backend certificate does not match 'a.example'",
            )
        )
        await health.wait_until(lambda: bool(health.about(plain.address)))
        await good.wait_accepted(3)
    (plain_down,) = health.about(plain.address)
    assert plain_down.startswith(f"backend {plain.address} down: TLS handshake failed: ")
    assert plain_down.endswith(" (3 checks)")
    stats = backends_of(proxy)
    assert [stats[address].up for address in addresses] == [True, False, False]
    with trio.fail_after(WAIT):  # connections go to the good one only
        for _ in range(3):
            assert bound.port is not None
            async with await trio.open_tcp_stream("127.0.0.1", bound.port) as client:
                assert await read_line(client) == b"good\n"


async def test_a_preamble_listener_checks_without_a_tls_handshake(
    nursery: trio.Nursery, pki: PKI, health: HealthLog
) -> None:
    """With a preamble the backend's TLS starts after STARTTLS, which checks do not
    speak: a plain SMTP greeting passes ``expect = "220"`` though ``backend_tls`` is on."""
    smtp = await backend(nursery, identify(b"220 mail.example ESMTP"))
    silent = await backend(nursery, identify(b"421 closing"))
    proxy, _ = await start_proxy(
        nursery,
        listener(
            [smtp.address, silent.address],
            tls=l4proxy.TLSConfig(certs=[l4proxy.CertKey(cert=pki.a.combined)]),
            preamble="smtp",
            backend_tls=True,
            backend_ca=pki.ca_file,
            backend_sni="a.example",
            health_check=HealthCheck(interval=FAST, expect="220"),
        ),
    )
    with trio.fail_after(WAIT):
        await health.wait_for(down_line(silent.address, "expected '220', got '421'"))
        await smtp.wait_accepted(4)
    assert health.about(smtp.address) == []
    assert backends_of(proxy)[smtp.address].up


# --------------------------------------------------------------------------- what a check sends


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_a_check_from_source_address_with_a_local_proxy_header(
    nursery: trio.Nursery, version: str
) -> None:
    """A check comes from ``source_address`` and, where backends are sent PROXY headers,
    starts with one saying "a health check" (v2 LOCAL, v1 UNKNOWN)."""
    headers: list[ProxyHeader] = []
    got = trio.Event()

    async def read_header(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while (header := parse_proxy_header(data)) is None:
                chunk = await stream.receive_some()
                if not chunk:
                    return
                data += chunk
            headers.append(header)
            got.set()

    checked = await backend(nursery, read_header)
    await start_proxy(
        nursery,
        listener(
            [checked.address],
            health_check=FAST,
            proxy_protocol=version,
            source_address="127.0.0.2",
        ),
    )
    with trio.fail_after(WAIT):
        await got.wait()
    assert checked.accepted[0][0] == "127.0.0.2"
    header = headers[0]
    assert (header.source, header.destination) == (None, None)
    if version == "v2":
        assert header.command is Command.LOCAL


# --------------------------------------------------------------------------- rise and fall


def _watch(pools: list[BackendPool[l4proxy.connect.Target]], rise: int, fall: int) -> _Watch:
    backend_target = pools[0].backends[0]
    return _Watch(
        Probe(backend_target, 1.0),
        _Schedule(1.0, rise, fall),
        [(pool, backend_target) for pool in pools],
        None,
    )


def test_fall_failures_in_a_row_hold_down_and_rise_passes_in_a_row_release(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="l4proxy.health")
    x = target(parse_address("10.0.0.6:5432", role="backend"))
    y = target(parse_address("10.0.0.7:5432", role="backend"))
    default = BackendPool((x, y))
    route = BackendPool((y, x), board=default.board)  # one proxy: one board
    watch = _watch([default, route], rise=2, fall=3)

    def order() -> tuple[l4proxy.connect.Target, ...]:
        return default.order(now=5.0)

    for problem in ["refused", "refused", None, "refused", "refused"]:  # not 3 in a row
        record(watch, problem, 1.0)
    assert x in order()
    assert not caplog.records
    record(watch, "connection refused", 2.0)
    assert x not in order()
    assert x not in route.order(now=5.0)
    assert default.board.down == 2
    for problem in [None, "refused", None]:  # not 2 passes in a row
        record(watch, problem, 3.0)
    assert x not in order()
    assert default.failed(x, 4.0) is None
    assert not default.succeeded(x)
    record(watch, None, 4.0)
    assert x in order()
    assert x in route.order(now=5.0)
    assert default.board.down == 0
    assert [r.getMessage() for r in caplog.records] == [
        "backend 10.0.0.6:5432 down: connection refused (3 checks)",
        "backend 10.0.0.6:5432 up: 2 checks passed",
    ]


def test_passes_take_back_a_backend_passive_health_marked_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="l4proxy.health")
    x = target(parse_address("10.0.0.6:5432", role="backend"))
    pool = BackendPool((x,))
    watch = _watch([pool], rise=1, fall=1)
    record(watch, None, 0.0)  # passes while up count for nothing
    assert pool.failed(x, 1.0, "connection refused") == 1.0  # a connect failed
    assert pool.order(now=1.5) == ()
    record(watch, None, 1.5)
    assert pool.order(now=1.5) == (x,)
    # A backend down for a back-off then failing its check is held, said once already.
    assert pool.failed(x, 2.0, "connection refused") == 1.0
    record(watch, "connection refused", 2.5)
    assert pool.order(now=100.0) == ()  # no back-off ends a hold
    assert [r.getMessage() for r in caplog.records] == ["backend 10.0.0.6:5432 up: 1 check passed"]


# --------------------------------------------------------------------------- reload


async def test_a_reload_stops_checking_removed_backends_and_checks_added_ones(
    nursery: trio.Nursery, health: HealthLog
) -> None:
    kept = await backend(nursery, identify(b"kept"))
    removed = await backend(nursery, identify(b"removed"))
    proxy, _ = await start_proxy(
        nursery, listener([kept.address, removed.address], health_check=FAST)
    )
    with trio.fail_after(WAIT):
        await removed.wait_accepted(2)
        added = f"127.0.0.1:{refused_port()}"
        await proxy.reload(
            l4proxy.Config(listeners=[listener([kept.address, added], health_check=FAST)])
        )
        await kept.wait_accepted(len(kept.accepted) + 1)  # a check after the reload...
        checks = len(removed.accepted)  # (a check in flight at the reload has landed)
        await kept.wait_accepted(len(kept.accepted) + 4)  # ...and four more
        await health.wait_for(down_line(added, "connection refused"))
    assert len(removed.accepted) == checks
    assert set(backends_of(proxy)) == {kept.address, added}


async def test_a_reload_turning_checks_off_lets_connections_try_a_held_backend(
    nursery: trio.Nursery, health: HealthLog
) -> None:
    """Checks off: nothing releases a hold any more, so the hold ends with them and
    passive health takes over (the next connection tries the backend)."""
    a = await backend(nursery, identify(b"a"))
    odd = await backend(nursery, identify(b"odd"))  # accepts, but fails the check
    check = HealthCheck(interval=FAST, expect="a")
    proxy, bound = await start_proxy(
        nursery, listener([odd.address, a.address], health_check=check)
    )
    with trio.fail_after(WAIT):
        await health.wait_for(down_line(odd.address, "expected 'a', got 'o'"))
        assert {await greeting(bound) for _ in range(4)} == {b"a"}
        await proxy.reload(l4proxy.Config(listeners=[listener([odd.address, a.address])]))
        assert {await greeting(bound) for _ in range(3)} == {b"a", b"odd"}  # in turn
    assert health.about(odd.address)[-1] == f"backend {odd.address} up: connected"
    assert not backends_of(proxy)[odd.address].checked


# --------------------------------------------------------------------------- stats


async def test_stats_list_every_backend_of_every_pool(nursery: trio.Nursery) -> None:
    config = listener(
        [{"address": "127.0.0.1:7001", "weight": 3}, {"address": "[::1]:7002", "backup": True}],  # type: ignore[list-item]
        passthrough=True,
        routes=[RouteConfig(sni=["db.example", "*.db.example"], alpn=["h2"], backends=["db:7003"])],
        health_check={"interval": 30, "send": "PING"},
    )
    proxy, _ = await start_proxy(nursery, config)
    assert proxy.stats()["front"].backends == (
        l4proxy.BackendStats(
            address=parse_address("127.0.0.1:7001", role="backend"),
            route="default",
            weight=3,
            checked=True,
        ),
        l4proxy.BackendStats(
            address=parse_address("[::1]:7002", role="backend"),
            route="default",
            backup=True,
            checked=True,
        ),
        l4proxy.BackendStats(
            address=parse_address("db:7003", role="backend"),
            route="db.example,*.db.example alpn=h2",
            checked=True,
        ),
    )


@pytest.mark.parametrize("balance", ["round-robin", "source-hash"])
async def test_open_connections_are_counted_per_backend_whatever_the_balance(
    nursery: trio.Nursery, access: AccessWatcher, balance: str
) -> None:
    a = await backend(nursery, identify(b"a"))
    proxy, bound = await start_proxy(nursery, listener([a.address], balance=balance))
    assert bound.port is not None
    with trio.fail_after(WAIT):
        async with await trio.open_tcp_stream("127.0.0.1", bound.port) as client:
            assert await read_line(client) == b"a\n"
            assert backends_of(proxy)[a.address].open == 1
        await access.wait(1)  # logged: closed, and released at its backend
    assert backends_of(proxy)[a.address].open == 0


# --------------------------------------------------------------------------- config


def problems_of(data: dict[str, object]) -> tuple[str, ...]:
    with pytest.raises(l4proxy.ConfigError) as info:
        l4proxy.Config.from_mapping(data, source="test.toml")
    return info.value.problems


def one_listener(**settings: object) -> dict[str, object]:
    return {"listeners": [{"listen": ":1", "backends": ["a:1"], **settings}]}


def test_health_check_is_a_number_of_seconds_or_a_table() -> None:
    config = l4proxy.Config.from_mapping(
        {
            "health_check": 2,  # the default of every listener
            "listeners": [
                {"listen": ":1", "backends": ["a:1"]},
                {
                    "listen": ":2",
                    "backends": ["a:1"],
                    "health_check": {
                        "interval": 0.5,
                        "timeout": 0.25,
                        "rise": 1,
                        "fall": 5,
                        "send": "PING\r\n",
                        "expect": "+PONG",
                    },
                },
                {"listen": ":3", "backends": ["a:1"], "connect_timeout": 1},
            ],
        }
    )
    first, second, third = (listener.health_check for listener in config.listeners)
    assert first == third == HealthCheck(interval=2.0)
    assert second == HealthCheck(
        interval=0.5, timeout=0.25, rise=1, fall=5, send="PING\r\n", expect="+PONG"
    )
    assert (first.rise, first.fall, first.send, first.expect) == (2, 3, None, None)
    # The default timeout: the smaller of the listener's connect timeout and the interval.
    assert [
        check.seconds(listener.connect_timeout)
        for check, listener in zip((first, second, third), config.listeners, strict=True)
        if check is not None
    ] == [2.0, 0.25, 1.0]
    assert l4proxy.Config.from_mapping(one_listener()).listeners[0].health_check is None


def test_health_check_problems_name_the_key() -> None:
    problems = problems_of(
        one_listener(
            health_check={
                "intervall": 1,
                "timeout": -1,
                "rise": 0,
                "fall": 1.5,
                "send": "",
                "expect": 3,
            }
        )
    )
    assert set(problems) == {
        "listeners[0].health_check.intervall: unknown key (did you mean 'interval'?)",
        "listeners[0].health_check.interval: required (a number of seconds)",
        "listeners[0].health_check.timeout: expected a number of seconds > 0, got -1",
        "listeners[0].health_check.rise: expected a whole number from 1 to 100, got 0",
        "listeners[0].health_check.fall: expected a whole number from 1 to 100, got 1.5",
        "listeners[0].health_check.send: expected a non-empty string of at most 4096 bytes, got ''",
        "listeners[0].health_check.expect: expected a non-empty string of at most 1024 bytes, got 3",
    }
    wanted = "a number of seconds or a table {interval, timeout, rise, fall, send, expect}"
    assert problems_of(one_listener(health_check="5")) == (
        f"listeners[0].health_check: expected {wanted}, got '5'",
    )
    assert problems_of({"health_check": 0, **one_listener()}) == (
        f"health_check: expected {wanted}, got 0",
    )
    assert problems_of(one_listener(health_check=float("inf"))) == (
        "listeners[0].health_check: expected a finite number of seconds >= 0.01, got inf",
    )
    assert problems_of(one_listener(health_check={"interval": 0.001})) == (
        "listeners[0].health_check.interval: expected a finite number of seconds >= 0.01, got 0.001",
    )


def test_health_check_given_in_code() -> None:
    def check_of(value: object) -> HealthCheck | None:
        return ListenerConfig(listen=[":1"], backends=["a:1"], health_check=value).health_check  # type: ignore[arg-type]

    assert check_of(1) == HealthCheck(interval=1.0)
    assert check_of({"interval": 1, "expect": "220"}) == HealthCheck(interval=1, expect="220")
    for bad, message in [
        (-1, "health_check: expected a number of seconds or a table"),
        ({"interval": 1, "rise": 0}, "health_check.rise: expected a whole number from 1 to 100"),
        ({"interval": 1, "sned": "x"}, "health_check: "),
        ({"interval": 1, "expect": "x" * 1025}, "health_check.expect: expected a non-empty"),
    ]:
        with pytest.raises(l4proxy.ConfigError, match=re.escape(message)):
            check_of(bad)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "Invalid value for '--health-check': expected a number of seconds > 0, got '0'"),
        ("soon", "Invalid value for '--health-check': expected a number of seconds, got 'soon'"),
        ("0.001", "--health-check: expected a finite number of seconds >= 0.01, got 0.001"),
    ],
)
def test_a_bad_health_check_flag_exits_2_naming_it(
    value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1", "--health-check", value]
    with pytest.raises(SystemExit) as info:
        main([*args, "--check"])
    assert info.value.code == 2
    assert capsys.readouterr().err == f"l4proxy: error: {message}\n"


async def test_the_health_check_flag_checks_in_the_real_command(nursery: trio.Nursery) -> None:
    """``--health-check S`` in the ``l4proxy`` process: the backends are checked (and a
    dead one reported) with no client at all."""
    alive = await backend(nursery, identify(b"alive"))
    dead = f"127.0.0.1:{refused_port()}"
    args = ["--listen", "127.0.0.1:0", "--backend", alive.address, "--backend", dead,
            "--health-check", "0.05"]  # fmt: skip
    with trio.fail_after(WAIT):
        async with ProxyProcess(nursery, args) as proc:
            await proc.wait_for(re.escape(down_line(dead, "connection refused")))
            await alive.wait_accepted(3)


# --------------------------------------------------------------------------- more kinds of check


async def test_a_silent_backend_times_out_after_the_default_timeout(
    nursery: trio.Nursery, health: HealthLog
) -> None:
    """No ``timeout``: the smaller of ``connect_timeout`` and the interval."""

    async def silent(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some()  # until the check gives up and closes

    quiet = await backend(nursery, silent)
    await start_proxy(
        nursery, listener([quiet.address], health_check=HealthCheck(interval=0.1, expect="+OK"))
    )
    with trio.fail_after(WAIT):
        await health.wait_for(down_line(quiet.address, "timed out after 0.1s"))


async def test_a_unix_socket_backend_is_checked(
    nursery: trio.Nursery, health: HealthLog, tmp_path: Path
) -> None:
    path = tmp_path / "backend.sock"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen()
    scope = trio.CancelScope()

    async def serve(task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await trio.serve_listeners(
                identify(b"unix"), [trio.SocketListener(sock)], task_status=task_status
            )

    await nursery.start(serve)
    address = f"unix:{path}"
    proxy, _ = await start_proxy(nursery, listener([address], health_check=FAST))
    with trio.fail_after(WAIT):
        scope.cancel()  # its listener closed; the path stays: connects are refused
        await health.wait_for(down_line(address, "connection refused"))
    assert backends_of(proxy)[address].held


class CountingStream(trio.abc.Stream):
    """A stream that counts itself open in ``counter`` until it is closed."""

    def __init__(self, inner: trio.SocketStream, counter: list[int]) -> None:
        self.inner, self.counter = inner, counter
        counter[0] += 1
        counter[1] = max(counter[1], counter[0])

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        self.counter[0] -= 1
        await self.inner.aclose()


async def test_checks_run_at_most_max_concurrent_at_once(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six silent backends whose checks each last their whole timeout, two checks at a
    time: never more than two open (counted at the proxy's own connector, which checks
    use as connections do)."""
    monkeypatch.setattr(l4proxy.healthcheck, "MAX_CONCURRENT", 2)

    async def silent(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some()

    backends = [await backend(nursery, silent) for _ in range(6)]
    counter = [0, 0]  # open now, the most open at once

    async def connect(address: l4proxy.Address) -> trio.abc.Stream:
        assert isinstance(address, TCPAddress)
        assert address.host is not None
        stream = CountingStream(await trio.open_tcp_stream(address.host, address.port), counter)
        return stream

    check = HealthCheck(interval=FAST, timeout=0.1, expect="+OK")
    config = l4proxy.Config(listeners=[listener([b.address for b in backends], health_check=check)])
    proxy = l4proxy.Proxy(config, connect=connect)
    await nursery.start(proxy.serve)
    with trio.fail_after(WAIT):
        for each in backends:  # every backend checked twice, so checks queued up
            await each.wait_accepted(2)
    assert counter[1] == 2
