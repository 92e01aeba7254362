"""Eager start (``l4proxy/eager.py``): a connection's set-up runs in the accept loop
until its first wait, and only then moves into a task of its own.

The driver on its own (a coroutine that ends inline, one that moves, one that waits
without saying so), then through the proxy: a plain connection to a loopback backend
costs no set-up task, a terminating one does, and a connect that has to wait moves
into a task and times out there without holding up the listener's other connections.
Real loopback sockets; tasks counted with a trio instrument.
"""

from __future__ import annotations

import contextlib
import socket
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

import l4proxy
import l4proxy.connect
import l4proxy.tlsfront
from l4proxy import eager

from .conftest import (
    connect_to,
    echo,
    receive_exactly,
    serve_in,
    start_backend,
    start_proxy,
)
from .test_connect import _backend_with_a_full_backlog
from .test_core import _core, _inject
from .test_pipeline_cases import open_tls, terminating

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from .conftest import AccessWatcher
    from .tlsfixtures import PKI

WAIT = 10  # seconds: generous bounds for a busy machine, never a timing assertion


class _Host:
    """A host without a data core: every wait, for a socket or not, gets a task."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.parks = 0

    def park(self, wait: eager.SocketWait) -> bool:
        self.parks += 1
        return False


async def test_a_coroutine_that_never_waits_ends_inline(nursery: trio.Nursery) -> None:
    """No task: it has ended by the time start() returns, in the caller's task."""
    ran_in: list[trio.lowlevel.Task] = []

    async def quick(value: int) -> None:
        ran_in.append(trio.lowlevel.current_task())
        assert value == 7

    eager.start(_Host(nursery), quick, 7)
    assert ran_in == [trio.lowlevel.current_task()]
    assert nursery.child_tasks == set()  # the fixture's nursery: nothing spawned


async def test_own_task_moves_the_rest_into_a_task_of_its_own(nursery: trio.Nursery) -> None:
    """Before own_task() it runs in the caller; after it, in a new task of the
    nursery, from where it stopped, and trio's waits work there."""
    caller = trio.lowlevel.current_task()
    seen: list[tuple[str, trio.lowlevel.Task]] = []
    done = trio.Event()

    async def setup() -> None:
        seen.append(("before", trio.lowlevel.current_task()))
        await eager.own_task()
        seen.append(("after", trio.lowlevel.current_task()))
        await trio.sleep(0.01)
        with trio.move_on_after(0.01):
            await trio.sleep_forever()
        done.set()

    eager.start(_Host(nursery), setup)
    assert seen == [("before", caller)]
    with trio.fail_after(WAIT):
        await done.wait()
    assert seen[1][0] == "after"
    assert seen[1][1] is not caller


async def test_own_task_in_a_task_is_a_no_op() -> None:
    """Awaited normally (``handle_stream`` runs the pipeline in its caller's task)."""
    task = trio.lowlevel.current_task()
    await eager.own_task()
    assert trio.lowlevel.current_task() is task


async def test_a_wait_without_own_task_costs_that_coroutine_only(nursery: trio.Nursery) -> None:
    """A trio wait while inline would register the accept loop's task: a programming
    error. start() takes the wait back and throws RuntimeError into the coroutine
    (serve turns that into ``error:internal`` for its connection); the socket can be
    waited on again, and nothing reaches the caller."""
    left, right = socket.socketpair()
    caught: list[BaseException] = []

    async def careless() -> None:
        try:
            await trio.lowlevel.wait_readable(left)
        except RuntimeError as exc:
            caught.append(exc)

    with left, right:
        eager.start(_Host(nursery), careless)
        (error,) = caught
        assert "careless waited on trio" in str(error)
        assert "own_task()" in str(error)
        right.send(b"x")
        with trio.fail_after(WAIT):
            await trio.lowlevel.wait_readable(left)  # not busy: the stray wait was undone


async def test_a_coroutine_that_keeps_waiting_inline_is_closed(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    closed = []

    async def stubborn() -> None:
        try:
            while True:
                with contextlib.suppress(RuntimeError):
                    await trio.lowlevel.checkpoint()
        finally:
            closed.append(True)

    eager.start(_Host(nursery), stubborn)
    assert closed == [True]
    assert "stubborn waited on trio" in caplog.text


async def test_what_it_raises_inline_reaches_the_caller(nursery: trio.Nursery) -> None:
    async def failing() -> None:
        raise ValueError("inline")

    with pytest.raises(ValueError, match="inline"):
        eager.start(_Host(nursery), failing)


async def test_what_it_raises_after_moving_reaches_the_nursery() -> None:
    async def failing() -> None:
        await eager.own_task()
        await trio.lowlevel.checkpoint()
        raise ValueError("in its task")

    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="in its task")):
        async with trio.open_nursery() as nursery:
            eager.start(_Host(nursery), failing)


async def test_a_moved_coroutine_is_cancelled_with_its_nursery() -> None:
    """Cancellation reaches it through the task, and its cleanup runs."""
    cleaned = []

    async def waits_forever() -> None:
        await eager.own_task()
        try:
            await trio.sleep_forever()
        finally:
            cleaned.append(True)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            eager.start(_Host(nursery), waits_forever)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert cleaned == [True]


# --- through the proxy ---------------------------------------------------------------


class _Spawns(trio.abc.Instrument):
    """Counts the tasks spawned per coroutine name."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.names.append(task.coro.__qualname__)

    def count(self, *names: str) -> int:
        return sum(name in names for name in self.names)


@contextlib.contextmanager
def _counting_spawns() -> Iterator[_Spawns]:
    spawns = _Spawns()
    trio.lowlevel.add_instrument(spawns)
    try:
        yield spawns
    finally:
        trio.lowlevel.remove_instrument(spawns)


SETUP_TASKS = ("serve", "_go_on")  # a set-up task, as started before eager start or since


async def _start_unix_backend(nursery: trio.Nursery, path: Path) -> str:
    sock = trio.socket.socket(socket.AF_UNIX)
    await sock.bind(str(path))
    sock.listen()
    nursery.start_soon(trio.serve_listeners, echo, [trio.SocketListener(sock)])
    return f"unix:{path}"


async def test_a_plain_connection_to_a_local_backend_needs_no_task(
    nursery: trio.Nursery, access: AccessWatcher, tmp_path: Path
) -> None:
    """A Unix socket connects at once (a loopback TCP connect usually does too, inside
    ``connect``, unless the kernel defers its handshake): accept, connect and the
    hand-over to the data core all happen in the accept loop; a refused connect fails
    there too. Unix backends, so the test does not depend on the kernel's timing."""
    backend = await _start_unix_backend(nursery, tmp_path / "echo.sock")
    _, bound = await start_proxy(nursery, [backend])
    _, refusing = await start_proxy(nursery, [f"unix:{tmp_path / 'nobody.sock'}"])
    with _counting_spawns() as spawns, trio.fail_after(WAIT):
        for index in range(5):
            stream = await connect_to(bound[0])
            async with stream:
                await stream.send_all(b"ping %d" % index)
                assert await receive_exactly(stream, 6) == b"ping %d" % index
        async with await connect_to(refusing[0]) as stream:
            assert await stream.receive_some() == b""
        await access.wait(6)
    assert spawns.count(*SETUP_TASKS) == 0
    assert sorted(access.outcomes) == ["connect_failed"] + ["ok"] * 5


async def test_a_terminating_connection_waits_in_the_core_without_a_task(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, tmp_path: Path
) -> None:
    """The ClientHello and the handshake wait only for the client's socket: those waits
    are parked in the data core, which drives the set-up on; no task at all. (A Unix
    backend: its connect never waits, whatever the kernel's timing.)"""
    backend = await _start_unix_backend(nursery, tmp_path / "echo.sock")
    _, bound = await start_proxy(nursery, [backend], tls=terminating(pki))
    with _counting_spawns() as spawns, trio.fail_after(WAIT):
        for _ in range(3):
            async with await open_tls(bound[0], pki, "a.example") as tls:
                await tls.send_all(b"hello")
                assert await receive_exactly(tls, 5) == b"hello"
        await access.wait(3)
    assert spawns.count(*SETUP_TASKS) == 0
    assert access.outcomes == ["ok"] * 3
    assert all(record.tls_version == "TLSv1.3" for record in access.records)


async def test_a_socket_wait_without_parking_goes_on_in_a_task(nursery: trio.Nursery) -> None:
    """A host that cannot park (a failed core): the coroutine gets a task, where the
    same wait_socket() is a trio wait; its deadline still holds."""
    host = _Host(nursery)
    left, right = socket.socketpair()
    left.setblocking(False)
    got: list[object] = []
    done = trio.Event()

    async def waits_for_bytes() -> None:
        deadline = trio.current_time() + WAIT
        while True:
            try:
                got.append(left.recv(10))
                break
            except BlockingIOError:
                await eager.wait_socket(left, deadline=deadline)
        with contextlib.suppress(eager.TooSlow):
            await eager.wait_socket(left, deadline=trio.current_time() + 0.01)
            got.append("no timeout")
        got.append(trio.lowlevel.current_task().name)
        done.set()

    with left, right, trio.fail_after(WAIT):
        eager.start(host, waits_for_bytes)
        assert host.parks == 1
        right.send(b"x")
        await done.wait()
    assert got[0] == b"x"
    assert got[1:] == [
        f"{__name__}.test_a_socket_wait_without_parking_goes_on_in_a_task.<locals>.waits_for_bytes"
    ]


async def test_a_connect_that_waits_is_parked_in_the_core_and_times_out_there(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    """Two clients whose connects both hang: each connect's wait for writability is
    parked in the data core, side by side (not one after the other) and without a
    task; each is cut at the connect timeout (the core's timer) and logged."""
    timeout = 2.0  # long enough that both are surely still waiting when counted
    with _backend_with_a_full_backlog() as port:  # connects to it hang
        proxy, bound = await start_proxy(nursery, [f"127.0.0.1:{port}"], connect_timeout=timeout)
        with _counting_spawns() as spawns, trio.fail_after(WAIT):
            core = await _core(proxy)
            first, second = await connect_to(bound[0]), await connect_to(bound[0])
            await trio.testing.wait_all_tasks_blocked(0.05)  # both accepted and waiting
            assert len(core.parked) == 2
            assert access.records == []  # both waiting in their connects at once
            for client in (first, second):
                async with client:
                    with contextlib.suppress(trio.BrokenResourceError):
                        assert await client.receive_some() == b""
            records = await access.wait(2)
    assert spawns.count(*SETUP_TASKS) == 0
    assert [record.outcome for record in records] == ["connect_failed"] * 2
    expected = f"127.0.0.1:{port}: timed out after {timeout:g}s"
    assert [record.error for record in records] == [expected] * 2
    assert not core.parked


async def test_a_set_up_waiting_in_the_core_is_cut_by_the_drain(
    pki: PKI, access: AccessWatcher
) -> None:
    """A client that connected and said nothing: its ClientHello wait is parked in the
    core. The drain's deadline ends it there, with its cleanup, logged as drained;
    and ``serve`` returns."""
    async with trio.open_nursery() as nursery:
        backend = await start_backend(nursery)
        proxy = l4proxy.Proxy(
            l4proxy.Config(
                listeners=[
                    l4proxy.ListenerConfig(
                        listen=["127.0.0.1:0"],
                        backends=[backend],
                        tls=terminating(pki),
                        handshake_timeout=60,
                    )
                ]
            )
        )
        bound, served = await serve_in(nursery, proxy)
        with trio.fail_after(WAIT):
            core = await _core(proxy)
            client = await connect_to(bound[0])
            while not core.parked:  # noqa: ASYNC110 - polling the core's state
                await trio.sleep(0.01)
            proxy.close(drain_timeout=0.2)
            assert await client.receive_some() == b""
            (record,) = await access.wait()
            await served.wait()
            await client.aclose()
        nursery.cancel_scope.cancel()
    assert record.outcome == "drained"
    assert record.sni is None
    assert not core.parked


async def test_a_stalled_handshake_times_out_in_the_core(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    """The deadline of a wait parked in the core is the core's timer: a client that
    says nothing is cut at the handshake timeout without a task ever made. One that
    sends part of a ClientHello is read in a task (trio streams), under the same
    deadline."""
    backend = await start_backend(nursery)
    _, bound = await start_proxy(nursery, [backend], tls=terminating(pki), handshake_timeout=0.3)
    with _counting_spawns() as spawns, trio.fail_after(WAIT):
        silent = await connect_to(bound[0])
        assert await silent.receive_some() == b""
        await access.wait(1)
        assert spawns.count(*SETUP_TASKS) == 0
        partial = await connect_to(bound[0])
        await partial.send_all(b"\x16\x03\x01")  # a ClientHello's first bytes, then nothing
        assert await partial.receive_some() == b""
        await access.wait(2)
        for client in (silent, partial):
            await client.aclose()
    assert access.outcomes == ["handshake_timeout"] * 2
    assert spawns.count(*SETUP_TASKS) == 1


async def test_a_tls_client_from_a_trusted_peer_gets_the_socket_options(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    """Step 2 (a trusted peer's PROXY header) prepares the accepted socket before the
    TLS fast path: it still gets ``TCP_NODELAY`` and the 16 KiB ``TCP_NOTSENT_LOWAT``
    that a trio stream would have set (looked up on the socket in the core)."""
    backend = await start_backend(nursery)
    proxy, bound = await start_proxy(
        nursery, [backend], tls=terminating(pki), accept_proxy_protocol=["127.0.0.0/8"]
    )
    with trio.fail_after(WAIT):
        core = await _core(proxy)
        transport = await connect_to(bound[0])
        await transport.send_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 443\r\n")
        tls = trio.SSLStream(transport, pki.client_context(), server_hostname="a.example")
        await tls.do_handshake()
        await tls.send_all(b"hello")
        assert await receive_exactly(tls, 5) == b"hello"
        (link,) = set(core.links.values())
        nodelay = link.client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        lowat = link.client.getsockopt(socket.IPPROTO_TCP, l4proxy.tlsfront.TCP_NOTSENT_LOWAT)
        await tls.aclose()
        (record,) = await access.wait()
    assert (nodelay, lowat) == (1, 16384)
    assert str(record.proxied_client) == "192.0.2.7:5555"
    assert record.outcome == "ok"


async def test_a_set_up_parked_in_a_core_that_fails_goes_on_in_a_task(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, caplog: pytest.LogCaptureFixture
) -> None:
    """The core's own failure (its epoll's ``poll()`` raising) while a handshake waits
    in it: the set-up is not cut but moved into a task of its own, where it waits in
    trio and finishes; its bytes then take the copy loop."""
    backend = await start_backend(nursery)
    proxy, bound = await start_proxy(nursery, [backend], tls=terminating(pki))
    with trio.fail_after(WAIT):
        core = await _core(proxy)
        epoll = await _inject(proxy)
        transport = await connect_to(bound[0])
        while not core.parked:  # noqa: ASYNC110 - polling the core's state
            await trio.sleep(0.01)
        epoll.fail_poll = True
        tls = trio.SSLStream(transport, pki.client_context(), server_hostname="a.example")
        await tls.do_handshake()  # its ClientHello wakes the core, whose poll() fails
        await tls.send_all(b"hello")
        assert await receive_exactly(tls, 5) == b"hello"
        await tls.aclose()
        (record,) = await access.wait()
    assert not epoll.fail_poll  # the failure was injected, once
    assert "the data core failed" in caplog.text
    assert (record.outcome, record.tls_version) == ("ok", "TLSv1.3")


async def test_a_fast_path_tls_client_with_an_embedders_connector(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    """The handshake on the accepted socket, then an embedder's connector: the client's
    socket and its TLS become one stream for the copy loop. A connect that fails after
    the handshake ends with the client's close_notify (a clean end, not a bare FIN)."""
    backend = await start_backend(nursery)
    failing = trio.Event()

    async def connect(address: l4proxy.Address) -> trio.abc.Stream:
        if failing.is_set():
            raise OSError(111, "Connection refused")
        return await l4proxy.connect.open_connection(address)

    _, bound = await start_proxy(nursery, [backend], tls=terminating(pki), connect=connect)
    with trio.fail_after(WAIT):
        async with await open_tls(bound[0], pki, "a.example") as tls:
            await tls.send_all(b"through a connector")
            assert await receive_exactly(tls, 19) == b"through a connector"
        failing.set()
        async with await open_tls(bound[0], pki, "a.example") as tls:
            assert await tls.receive_some() == b""  # close_notify: no BrokenResourceError
        records = await access.wait(2)
    assert [record.outcome for record in records] == ["ok", "connect_failed"]
    for record in records:
        assert record.tls_version == "TLSv1.3"
        assert record.handshake_seconds is not None
        assert 0 < record.handshake_seconds < WAIT


async def test_tls_on_a_unix_listener_takes_the_fast_path(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, tmp_path: Path
) -> None:
    """A Unix listener's client socket: no TCP options to set, the same parked
    handshake, no task."""
    backend = await _start_unix_backend(nursery, tmp_path / "echo.sock")
    path = tmp_path / "tls.sock"
    _, bound = await start_proxy(nursery, [backend], listen=[f"unix:{path}"], tls=terminating(pki))
    with _counting_spawns() as spawns, trio.fail_after(WAIT):
        transport = await connect_to(bound[0])  # the Unix path
        tls = trio.SSLStream(transport, pki.client_context(), server_hostname="a.example")
        await tls.do_handshake()
        await tls.send_all(b"over unix")
        assert await receive_exactly(tls, 9) == b"over unix"
        await tls.aclose()
        (record,) = await access.wait()
    assert spawns.count(*SETUP_TASKS) == 0
    assert (record.outcome, record.sni, record.tls_version) == ("ok", "a.example", "TLSv1.3")
