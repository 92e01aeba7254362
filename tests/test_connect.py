from __future__ import annotations

import contextlib
import errno
import socket
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from l4proxy import TCPAddress, UnixAddress, UpstreamConnectError, connect
from l4proxy.balancing import BackendPool
from l4proxy.connect import Target, connect_with_failover, open_connection, target

from .conftest import refused_port

A, B, C = (TCPAddress(f"10.0.0.{i}", 5432) for i in (1, 2, 3))


def pool(*addresses: TCPAddress | UnixAddress) -> BackendPool[Target]:
    return BackendPool(tuple(target(address) for address in addresses))


def test_round_robin_rotates_the_starting_backend() -> None:
    backends = BackendPool((A, B, C))
    assert [backends.order() for _ in range(4)] == [(A, B, C), (B, C, A), (C, A, B), (A, B, C)]


class FakeDialer:
    """Records attempts; each address either fails, hangs or returns a memory stream."""

    def __init__(self, behaviour: dict[TCPAddress, str]) -> None:
        self.behaviour = behaviour
        self.attempts: list[TCPAddress] = []

    async def __call__(self, address: TCPAddress) -> trio.abc.Stream:  # type: ignore[override]
        self.attempts.append(address)
        match self.behaviour[address]:
            case "refuse":
                raise ConnectionRefusedError(111, "Connection refused")
            case "hang":
                await trio.sleep_forever()
        return trio.testing.memory_stream_pair()[0]


async def test_failover_skips_backends_that_refuse() -> None:
    dialer = FakeDialer({A: "refuse", B: "ok", C: "ok"})
    stream, chosen = await connect_with_failover(pool(A, B, C), dialer, attempt_seconds=5)  # type: ignore[arg-type]
    assert chosen.address == B
    assert dialer.attempts == [A, B]
    await stream.aclose()


async def test_failover_skips_backends_that_time_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dialer = FakeDialer({A: "hang", B: "hang", C: "ok"})
    start = trio.current_time()
    _, chosen = await connect_with_failover(pool(A, B, C), dialer, attempt_seconds=2)  # type: ignore[arg-type]
    assert chosen.address == C
    assert trio.current_time() - start == pytest.approx(4)


async def test_each_backend_is_tried_at_most_once_then_the_error_says_why(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dialer = FakeDialer({A: "refuse", B: "hang", C: "refuse"})
    backends = pool(A, B, C)
    backends.order()  # start the next connection at B
    with pytest.raises(UpstreamConnectError) as info:
        await connect_with_failover(backends, dialer, attempt_seconds=1.5)  # type: ignore[arg-type]
    assert dialer.attempts == [B, C, A]
    assert info.value.attempts == (
        ("10.0.0.2:5432", "timed out after 1.5s"),
        ("10.0.0.3:5432", "connection refused"),
        ("10.0.0.1:5432", "connection refused"),
    )


async def test_real_refused_backend_is_described_and_a_host_name_resolves(
    nursery: trio.Nursery,
) -> None:
    refused = TCPAddress("127.0.0.1", refused_port())
    with pytest.raises(UpstreamConnectError) as info:
        await connect_with_failover(pool(refused), open_connection, attempt_seconds=5)
    assert info.value.attempts == ((str(refused), "connection refused"),)
    # "localhost" resolves from /etc/hosts, off the event loop; no DNS traffic leaves the machine.
    listeners = await nursery.start(partial(trio.serve_tcp, _close_at_once, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    stream, chosen = await connect_with_failover(
        pool(TCPAddress("localhost", port)), None, attempt_seconds=5
    )
    assert chosen.address == TCPAddress("localhost", port)
    assert isinstance(stream, trio.SocketStream)  # a host name goes through open_connection
    await stream.aclose()


async def _close_at_once(stream: trio.SocketStream) -> None:
    await stream.aclose()


@contextlib.contextmanager
def _backend_with_a_full_backlog():
    """A listener that never accepts and has a full queue drops SYNs: connects hang."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):  # more than the accept queue holds; the rest are pending
                filler = socket.socket()
                filler.setblocking(False)
                fillers.append(filler)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
            yield port
        finally:
            for filler in fillers:
                filler.close()


async def test_real_connect_timeout_on_a_backend_whose_backlog_is_full() -> None:
    with _backend_with_a_full_backlog() as port:
        with pytest.raises(UpstreamConnectError) as info:
            await connect_with_failover(
                pool(TCPAddress("127.0.0.1", port)),
                open_connection,
                attempt_seconds=0.3,
            )
        assert info.value.attempts == (("127.0.0.1:" + str(port), "timed out after 0.3s"),)


def test_raw_socket_targets_only_for_literals_and_unix_paths() -> None:
    found = [
        target(a)
        for a in (TCPAddress("127.0.0.1", 1), TCPAddress("::1", 2), UnixAddress("/run/db.sock"))
    ]
    assert [(t.family, t.sockaddr, str(t)) for t in found] == [
        (socket.AF_INET, ("127.0.0.1", 1), "127.0.0.1:1"),
        (socket.AF_INET6, ("::1", 2), "[::1]:2"),
        (socket.AF_UNIX, "/run/db.sock", "unix:/run/db.sock"),
    ]
    assert target(TCPAddress("localhost", 2)).sockaddr is None


async def test_direct_connect_fails_over_from_a_refused_backend(nursery: trio.Nursery) -> None:
    refused = TCPAddress("127.0.0.1", refused_port())
    listeners = await nursery.start(partial(trio.serve_tcp, _close_at_once, 0, host="127.0.0.1"))
    good = TCPAddress("127.0.0.1", listeners[0].socket.getsockname()[1])
    backends = pool(refused, good)
    sock, chosen = await connect_with_failover(backends, None, attempt_seconds=5)
    assert isinstance(sock, socket.socket)
    with sock:
        assert chosen.address == good
        assert sock.getpeername() == ("127.0.0.1", good.port)
        assert not sock.getblocking()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    with pytest.raises(UpstreamConnectError) as info:
        await connect_with_failover(pool(refused), None, attempt_seconds=5)
    assert info.value.attempts == ((str(refused), "connection refused"),)


async def test_direct_connect_times_out_on_a_backend_whose_backlog_is_full() -> None:
    with _backend_with_a_full_backlog() as port:
        with pytest.raises(UpstreamConnectError) as info:
            await connect_with_failover(
                pool(TCPAddress("127.0.0.1", port)), None, attempt_seconds=0.3
            )
        assert info.value.attempts == (("127.0.0.1:" + str(port), "timed out after 0.3s"),)


async def test_direct_connect_out_of_descriptors_is_a_failed_attempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A socket that cannot be made fails that attempt."""

    def no_descriptors(*args: object, **kwargs: object) -> socket.socket:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(connect.socket, "socket", no_descriptors)
    with pytest.raises(UpstreamConnectError) as info:
        await connect_with_failover(pool(A, B), None, attempt_seconds=1)
    assert info.value.attempts == ((str(A), "too many open files"), (str(B), "too many open files"))


async def test_direct_connect_to_unix_sockets(nursery: trio.Nursery, tmp_path: Path) -> None:
    missing = UnixAddress(str(tmp_path / "missing.sock"))
    path = tmp_path / "backend.sock"
    listener = trio.socket.socket(socket.AF_UNIX)
    await listener.bind(str(path))
    listener.listen()
    nursery.start_soon(trio.serve_listeners, _close_at_once, [trio.SocketListener(listener)])
    sock, chosen = await connect_with_failover(
        pool(missing, UnixAddress(str(path))), None, attempt_seconds=5
    )
    assert isinstance(sock, socket.socket)
    with sock:
        assert str(chosen) == f"unix:{path}"
        assert sock.getpeername() == str(path)
        assert not sock.getblocking()


async def test_direct_connect_waits_while_a_unix_queue_is_full(tmp_path: Path) -> None:
    """A full accept queue makes a non-blocking Unix connect fail with EAGAIN at once;
    like a blocking connect, the attempt keeps trying until its time is up."""
    path = tmp_path / "full.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen(0)
        fillers = []
        try:
            while True:  # fill the queue (bounded: a queue of 0 holds one or two)
                filler = socket.socket(socket.AF_UNIX)
                filler.setblocking(False)
                fillers.append(filler)
                if filler.connect_ex(str(path)) == errno.EAGAIN or len(fillers) > 16:
                    break
            start = trio.current_time()
            with pytest.raises(UpstreamConnectError) as info:
                await connect_with_failover(pool(UnixAddress(str(path))), None, attempt_seconds=0.3)
            assert info.value.attempts == ((f"unix:{path}", "timed out after 0.3s"),)
            assert trio.current_time() - start >= 0.3
            server.accept()[0].close()  # room again: the next attempt gets in
            sock, _ = await connect_with_failover(
                pool(UnixAddress(str(path))), None, attempt_seconds=5
            )
            assert isinstance(sock, socket.socket)
            sock.close()
        finally:
            for filler in fillers:
                filler.close()


async def test_direct_connect_fails_over_from_an_address_connect_rejects(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Some addresses make connect() raise instead of failing (a Unix path longer than
    the kernel takes): that attempt fails, the next backend is tried."""
    too_long = UnixAddress("/" + "x" * 200)
    listeners = await nursery.start(partial(trio.serve_tcp, _close_at_once, 0, host="127.0.0.1"))
    good = TCPAddress("127.0.0.1", listeners[0].socket.getsockname()[1])
    sock, chosen = await connect_with_failover(pool(too_long, good), None, attempt_seconds=5)
    assert isinstance(sock, socket.socket)
    sock.close()
    assert chosen.address == good
    with pytest.raises(UpstreamConnectError) as info:
        await connect_with_failover(pool(too_long), None, attempt_seconds=5)
    ((name, reason),) = info.value.attempts
    assert name == str(too_long)
    assert "too long" in reason
