"""The preamble steps (l4proxy/preamble.py) with dialogues of the test's own: the
driver's contract, whatever the protocol (the built-in ones have their own tests)."""

from __future__ import annotations

import importlib.util
import socket
import sys
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest
import trio

import l4proxy
from l4proxy.protocols.dialogue import (
    Close,
    ConnectBackend,
    ConnectSessionOwner,
    DialogueSettings,
    Done,
    Event,
    NeedClientData,
    SendToBackend,
    SessionKey,
)
from l4proxy.record import Outcome
from l4proxy.sessions import SessionTable

from .conftest import AccessWatcher, identify, read_line, receive_all, start_backend

if TYPE_CHECKING:
    from .tlsfixtures import PKI


def _load_example() -> ModuleType:
    path = Path(__file__).parent.parent / "examples" / "starttls_preamble.py"
    spec = importlib.util.spec_from_file_location("starttls_preamble", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


TOY = _load_example().TOY


async def _proxy(
    nursery: trio.Nursery, pki: PKI, backends: list[str], preamble: object, **settings: object
) -> tuple[str, int]:
    config = l4proxy.Config(
        listeners=[
            l4proxy.ListenerConfig(
                listen=["127.0.0.1:0"],
                backends=backends,
                tls=l4proxy.TLSConfig(certs=[l4proxy.CertKey(cert=pki.a.combined)]),
                preamble=preamble,
                **settings,  # type: ignore[arg-type]
            )
        ]
    )
    bound = await nursery.start(l4proxy.Proxy(config).serve)
    address = bound[0].address
    return address.host, address.port


async def test_the_example_preamble_starts_tls_and_routes(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    backend = await start_backend(nursery, identify(b"backend"))
    host, port = await _proxy(nursery, pki, [backend], TOY)
    stream = await trio.open_tcp_stream(host, port)
    assert (await read_line(stream)).startswith(b"READY ")
    await stream.send_all(b"PING\n")
    assert await read_line(stream) == b"PONG\n"
    await stream.send_all(b"USER alice\n")  # refused in cleartext, the dialogue goes on
    assert await read_line(stream) == b"ERR say STARTTLS first\n"
    await stream.send_all(b"STARTTLS\n")
    assert await read_line(stream) == b"GO\n"
    tls = trio.SSLStream(stream, pki.client_context(), server_hostname="a.example")
    assert await read_line(tls) == b"backend\n"
    await tls.send_all(b"inside\n")
    assert await read_line(tls) == b"inside\n"
    await tls.aclose()
    (record,) = await access.wait(1)
    assert record.outcome == "ok"
    assert record.sni == "a.example"
    assert record.tls_version is not None


async def test_cleartext_pipelined_after_starttls_never_reaches_tls_or_backend(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    seen: list[bytes] = []

    async def recording(stream: trio.SocketStream) -> None:
        seen.append(await stream.receive_some())

    backend = await start_backend(nursery, recording)
    host, port = await _proxy(nursery, pki, [backend], TOY)
    stream = await trio.open_tcp_stream(host, port)
    await read_line(stream)
    await stream.send_all(b"STARTTLS\nINJECTED\n")
    assert await receive_all(stream) == b""  # no GO: closed
    await stream.aclose()
    (record,) = await access.wait(1)
    assert (record.outcome, record.error) == ("bad_preamble", "bytes pipelined after STARTTLS")
    assert record.backend is None
    assert not seen


async def test_a_silent_client_is_cut_by_the_handshake_timeout(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    backend = await start_backend(nursery)
    host, port = await _proxy(nursery, pki, [backend], TOY, handshake_timeout=0.3)
    stream = await trio.open_tcp_stream(host, port)
    await read_line(stream)
    with trio.fail_after(5):
        assert await receive_all(stream) == b""
    await stream.aclose()
    (record,) = await access.wait(1)
    assert record.outcome == "handshake_timeout"
    assert record.error is not None
    assert "toy preamble" in record.error


class _Keyed:
    """``KEY k``: a session on the pool that announces key k. ``OWNER k``: a
    connection for the backend that serves k (like PostgreSQL's cancel request)."""

    def __init__(self, settings: DialogueSettings) -> None:
        self.buffer = b""
        self.events: list[Event] = []

    def receive_client(self, data: bytes) -> None:
        self.buffer += data
        if not data:
            self.events.append(Close(Outcome.QUIT, "eof"))

    def receive_backend(self, data: bytes) -> None:
        raise AssertionError("never asked for")

    def next_event(self) -> Event:
        if self.events:
            return self.events.pop(0)
        if b"\n" not in self.buffer:
            return NeedClientData()
        verb, _, key = self.buffer.strip().partition(b" ")
        if verb == b"KEY":
            self.events += [SessionKey(key), SendToBackend(b"session " + key + b"\n"), Done()]
            return ConnectBackend()
        self.events += [
            SendToBackend(b"cancel " + key + b"\n"),
            Close(Outcome.CANCEL_FORWARDED),
        ]
        return ConnectSessionOwner(key)


class _KeyedPreamble:
    name = "keyed"

    def __call__(self, settings: DialogueSettings) -> _Keyed:
        return _Keyed(settings)


async def test_a_session_key_routes_a_later_connection_to_the_same_backend(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    received: dict[bytes, list[bytes]] = {b"one": [], b"two": []}
    arrived = {name: trio.Event() for name in received}

    def backend_named(name: bytes):  # type: ignore[no-untyped-def]
        async def handler(stream: trio.SocketStream) -> None:
            await stream.send_all(name + b"\n")
            async for chunk in stream:
                received[name].append(bytes(chunk))
                if b"cancel" in chunk:
                    arrived[name].set()

        return handler

    backends = [await start_backend(nursery, backend_named(name)) for name in received]
    host, port = await _proxy(nursery, pki, backends, _KeyedPreamble())
    sessions = []
    for key in (b"k1", b"k2"):  # round-robin: k1 on one backend, k2 on the other
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(b"KEY " + key + b"\n")
        sessions.append((key, (await read_line(stream)).strip(), stream))
    for key, backend, _ in sessions:
        owner = await trio.open_tcp_stream(host, port)
        await owner.send_all(b"OWNER " + key + b"\n")
        assert await receive_all(owner) == b""
        await owner.aclose()
        with trio.fail_after(5):
            await arrived[backend].wait()
        assert received[backend][-1] == b"cancel " + key + b"\n"
    records = await access.wait(2)
    assert [r.outcome for r in records[:2]] == ["cancel_forwarded", "cancel_forwarded"]
    # Once the session has ended, its key is forgotten.
    await sessions[0][2].aclose()
    await access.wait(3)
    owner = await trio.open_tcp_stream(host, port)
    await owner.send_all(b"OWNER k1\n")
    assert await receive_all(owner) == b""
    await owner.aclose()
    records = await access.wait(4)
    assert records[-1].outcome == "cancel_unknown"
    assert records[-1].backend is None
    await sessions[1][2].aclose()


class _Misbehaving(_Keyed):
    def next_event(self) -> Event:
        return Done()  # before any connect: a bug of the dialogue's


async def test_a_dialogue_that_breaks_the_contract_costs_its_connection_only(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    class Preamble:
        name = "broken"

        def __call__(self, settings: DialogueSettings) -> _Misbehaving:
            return _Misbehaving(settings)

    backend = await start_backend(nursery)
    host, port = await _proxy(nursery, pki, [backend], Preamble())
    stream = await trio.open_tcp_stream(host, port)
    assert await receive_all(stream) == b""
    await stream.aclose()
    (record,) = await access.wait(1)
    assert record.outcome == "error:proxy"
    assert record.error == "preamble _Misbehaving asked for Done before connecting"


def test_the_session_table_is_bounded_and_forgets_only_its_own_owner() -> None:
    table = SessionTable[object](capacity=3)
    owners = [object() for _ in range(5)]
    for index, owner in enumerate(owners):
        table.register(bytes([index]), owner)
    assert len(table) == 3
    assert table.owner(b"\x00") is None
    assert table.owner(b"\x04") is owners[4]
    table.register(b"\x04", owners[0])  # the key moved to a new owner
    table.discard(b"\x04", owners[4])
    assert table.owner(b"\x04") is owners[0]
    table.discard(b"\x04", owners[0])
    assert table.owner(b"\x04") is None
    with pytest.raises(ValueError, match="capacity"):
        SessionTable[object](capacity=0)


def test_a_custom_preamble_is_checked_when_the_config_is_built(pki: PKI) -> None:
    with pytest.raises(l4proxy.ConfigError, match=r"expected one of 'postgres'.*Preamble object"):
        l4proxy.ListenerConfig(
            listen=["127.0.0.1:0"],
            backends=["127.0.0.1:1"],
            tls=l4proxy.TLSConfig(certs=[l4proxy.CertKey(cert=pki.a.combined)]),
            preamble=42,
        )


class _RoundRobinResolver(trio.abc.HostnameResolver):
    """``db.test`` is 127.0.0.1 and 127.0.0.2, in turn first: DNS round robin."""

    def __init__(self) -> None:
        self.lookups = 0

    async def getaddrinfo(self, host, port, family=0, socktype=0, proto=0, flags=0):  # type: ignore[no-untyped-def, override]
        assert host == b"db.test", host
        addresses = ["127.0.0.1", "127.0.0.2"]
        self.lookups += 1
        if self.lookups % 2 == 0:
            addresses.reverse()
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, int(port)))
            for a in addresses
        ]

    async def getnameinfo(self, sockaddr, flags):  # type: ignore[no-untyped-def, override]
        raise NotImplementedError


async def _serve_on_both(nursery: trio.Nursery, handler: object, *hosts: str) -> int:
    """Serve ``handler`` on one port of each host: a port free on all of them (another
    test may have left the first one's port of the second host in use)."""
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port: int = probe.getsockname()[1]
        try:
            for host in hosts:
                await nursery.start(partial(trio.serve_tcp, handler, port, host=host))
        except OSError:
            continue  # a listener already started on this port just stays unused
        return port
    raise AssertionError(f"no port free on all of {hosts}")


async def test_a_cancel_dials_the_address_its_session_reached_not_a_new_lookup(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    """A backend given by a host name with two addresses: the session reached one; a
    new lookup for the cancel would give the other first."""
    resolver = _RoundRobinResolver()
    trio.socket.set_custom_hostname_resolver(resolver)
    try:
        cancelled: dict[str, list[bytes]] = {"127.0.0.1": [], "127.0.0.2": []}
        arrived = trio.Event()

        async def handler(stream: trio.SocketStream) -> None:
            here = stream.socket.getsockname()[0]
            await stream.send_all(here.encode() + b"\n")
            async for chunk in stream:
                if b"cancel" in chunk:
                    cancelled[here].append(bytes(chunk))
                    arrived.set()

        backend_port = await _serve_on_both(nursery, handler, "127.0.0.1", "127.0.0.2")
        host, port = await _proxy(nursery, pki, [f"db.test:{backend_port}"], _KeyedPreamble())
        session = await trio.open_tcp_stream(host, port)
        await session.send_all(b"KEY k1\n")
        reached = (await read_line(session)).strip().decode()
        owner = await trio.open_tcp_stream(host, port)
        await owner.send_all(b"OWNER k1\n")
        assert await receive_all(owner) == b""
        await owner.aclose()
        with trio.fail_after(5):
            await arrived.wait()
        assert cancelled[reached] == [b"cancel k1\n"]
        assert resolver.lookups == 1  # the cancel did not look the name up again
        (record,) = await access.wait(1)
        assert record.outcome == "cancel_forwarded"
        await session.aclose()
    finally:
        trio.socket.set_custom_hostname_resolver(None)
