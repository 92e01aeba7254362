"""Cases of the one connection pipeline (``l4proxy/pipeline.py``) on TLS listeners, end
to end: passthrough half-close, the idle timeout and the drain on terminated
connections, and ``Proxy.handle_stream`` on a terminating listener.

Real loopback sockets, the in-process proxy, stdlib ``ssl`` clients and servers through
``trio.SSLStream`` (a second TLS stack next to the proxy's pyOpenSSL), trustme
certificates (the session ``pki`` fixture).
"""

from __future__ import annotations

import contextlib
import ssl
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

import l4proxy
import l4proxy.connect
import l4proxy.splice
from l4proxy.config import CertKey, RouteConfig, TLSConfig

from .conftest import (
    AccessWatcher,
    connect_to,
    identify,
    read_line,
    receive_all,
    receive_exactly,
    serve_in,
    start_backend,
    start_proxy,
)

if TYPE_CHECKING:
    from pathlib import Path

    from .tlsfixtures import PKI, CertFiles

WAIT = 10  # seconds: the bound on every step that should take milliseconds


class Counting(trio.abc.HalfCloseableStream):
    """A socket stream that counts what crosses it: the TLS records, not the plaintext."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.sent = 0
        self.received = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)
        self.sent += len(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        self.received += len(data)
        return bytes(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


def server_context(cert: CertFiles) -> ssl.SSLContext:
    """A stdlib TLS server context: a passthrough backend's own TLS."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.cert, cert.key)
    return context


def terminating(pki: PKI, **settings: object) -> TLSConfig:
    return TLSConfig(
        certs=[CertKey(cert=files.cert, key=files.key) for files in (pki.a, pki.c)],
        **settings,  # type: ignore[arg-type]
    )


async def open_tls(
    address: l4proxy.BoundAddress | tuple[str, int], pki: PKI, server_hostname: str
) -> trio.SSLStream[trio.SocketStream]:
    """A stdlib TLS client, handshake done."""
    if isinstance(address, l4proxy.BoundAddress):
        transport = await connect_to(address)
    else:
        transport = await trio.open_tcp_stream(*address)
    tls = trio.SSLStream(transport, pki.client_context(), server_hostname=server_hostname)
    try:
        await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls


async def lines_until_bye(stream: trio.SocketStream) -> None:
    """A backend that echoes lines; after ``bye`` it half-closes, then reads until the
    client's EOF (so the connection ends cleanly both ways, outcome ``ok``)."""
    async with stream:
        try:
            while True:
                line = await read_line(stream)
                await stream.send_all(line)
                if line == b"bye\n":
                    break
            await stream.send_eof()
            await receive_all(stream)
        except (AssertionError, trio.BrokenResourceError):
            pass  # the proxy cut it (idle timeout, drain)


# --- passthrough: the client half-closes, the reply still arrives -----------------------------


class BioTLS:
    """One end of a TLS session (stdlib ``ssl``) driven over memory BIOs, so the test
    decides what its transport does: here, a TCP half-close that OpenSSL never hears of.
    (``trio.SSLStream`` takes a transport EOF for the end of the session both ways, and
    refuses to send after it.)"""

    def __init__(
        self,
        transport: Counting,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self.transport = transport
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=server_hostname
        )

    async def do_handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._feed():
                    raise AssertionError("EOF during the handshake") from None
            else:
                break
        await self._flush()

    async def send_all(self, data: bytes) -> None:
        self.tls.write(data)
        await self._flush()

    async def receive_some(self) -> bytes:
        """Plaintext; ``b""`` at the peer's close_notify or at the transport's EOF."""
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLWantReadError:
                pass
            if not await self._feed():
                return b""

    async def receive_all(self) -> bytes:
        data = bytearray()
        while chunk := await self.receive_some():
            data += chunk
        return bytes(data)

    async def close_notify(self) -> None:
        """Send close_notify (without waiting for the peer's)."""
        with contextlib.suppress(ssl.SSLWantReadError):  # ours is written; theirs not awaited
            self.tls.unwrap()
        await self._flush()

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            await self.transport.send_all(data)

    async def _feed(self) -> bool:
        data = await self.transport.receive_some(65536)
        if data:
            self.incoming.write(data)
        return bool(data)


async def test_passthrough_client_half_close_still_gets_the_whole_reply(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, pump_path: str
) -> None:
    """A TLS client sends its request, then shuts down its side of the TCP connection
    (FIN, no close_notify). The TLS backend sees the EOF, only then answers with a
    reply of many chunks, and the client gets all of it; the access line counts the TLS
    bytes each way exactly."""
    request = b"GET / HTTP/1.0\r\n\r\n"
    reply = bytes(range(256)) * 4096  # 1 MiB: several reads, pipes and TLS records
    backend_view: list[tuple[bytes, int, int]] = []  # request, bytes received, bytes sent

    async def reply_after_eof(stream: trio.SocketStream) -> None:
        async with stream:
            counted = Counting(stream)
            tls = BioTLS(counted, server_context(pki.a), server_side=True)
            await tls.do_handshake()
            got = await tls.receive_all()  # until the client's half-close
            await tls.send_all(reply)
            await tls.close_notify()
        backend_view.append((got, counted.received, counted.sent))

    backend = await start_backend(nursery, reply_after_eof)
    _, bound = await start_proxy(nursery, [backend], passthrough=True)
    with trio.fail_after(WAIT):
        async with await connect_to(bound[0]) as stream:
            transport = Counting(stream)
            tls = BioTLS(
                transport, pki.client_context(), server_side=False, server_hostname="a.example"
            )
            await tls.do_handshake()  # the certificate for a.example: the backend's own
            await tls.send_all(request)
            await transport.send_eof()  # the half-close: TCP FIN after the request
            received = await tls.receive_all()  # the reply, then the backend's close_notify
            assert await transport.receive_some() == b""  # and its FIN
        (record,) = await access.wait()
    assert received == reply
    ((got, backend_received, backend_sent),) = backend_view
    assert got == request
    assert (transport.sent, transport.received) == (backend_received, backend_sent)
    assert record.outcome == "ok"
    assert record.sni == "a.example"
    assert (record.bytes_to_backend, record.bytes_to_client) == (transport.sent, backend_sent)
    assert record.bytes_to_client > len(reply)  # TLS records: the reply and more


# --- terminating: the idle timeout --------------------------------------------------------------


async def test_idle_tls_client_is_cut_at_the_idle_timeout(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    """Traffic more often than the idle timeout keeps a terminated connection open well
    past it; silence for the idle timeout ends it, logged as ``idle_timeout``."""
    idle = 0.5
    backend = await start_backend(nursery, lines_until_bye)
    _, bound = await start_proxy(nursery, [backend], tls=terminating(pki), idle_timeout=idle)
    with trio.fail_after(WAIT):
        async with await open_tls(bound[0], pki, "a.example") as tls:
            start = trio.current_time()
            for index in range(8):  # 8 x idle/4: twice the idle timeout in all
                await trio.sleep(idle / 4)
                await tls.send_all(b"%d\n" % index)
                assert await read_line(tls) == b"%d\n" % index
            quiet_from = trio.current_time()
            with contextlib.suppress(trio.BrokenResourceError):  # a close or a reset: a cut
                assert await tls.receive_some() == b""
            cut_after = trio.current_time() - quiet_from
        (record,) = await access.wait()
    assert quiet_from - start >= 2 * idle
    assert idle <= cut_after < idle + 2  # the margin: a busy machine
    assert record.outcome == "idle_timeout"
    assert (record.sni, record.tls_version) == ("a.example", "TLSv1.3")
    assert (record.bytes_to_backend, record.bytes_to_client) == (16, 16)


# --- terminating: drain -------------------------------------------------------------------------


async def test_drain_lets_tls_connections_finish_and_cuts_them_at_the_deadline(
    pki: PKI, access: AccessWatcher
) -> None:
    """After ``close(drain_timeout=...)`` an established TLS connection keeps working and
    ends by itself (``ok``); one still open at the deadline is cut (``drained``), and
    ``serve`` returns then."""
    drain = 1.0
    async with trio.open_nursery() as nursery:
        backend = await start_backend(nursery, lines_until_bye)
        config = l4proxy.Config(
            listeners=[
                l4proxy.ListenerConfig(
                    listen=["127.0.0.1:0"], backends=[backend], tls=terminating(pki)
                )
            ]
        )
        proxy = l4proxy.Proxy(config)
        bound, served = await serve_in(nursery, proxy)
        with trio.fail_after(WAIT):
            finishing = await open_tls(bound[0], pki, "a.example")
            lingering = await open_tls(bound[0], pki, "c.example")
            for tls in (finishing, lingering):
                await tls.send_all(b"hello\n")
                assert await read_line(tls) == b"hello\n"
            proxy.close(drain_timeout=drain)
            closed_at = trio.current_time()
            with pytest.raises(OSError, match="all attempts to connect"):  # no new connections
                await connect_to(bound[0])
            async with finishing:
                await trio.sleep(drain / 4)
                await finishing.send_all(b"during the drain\n")
                assert await read_line(finishing) == b"during the drain\n"
                await finishing.send_all(b"bye\n")
                assert await read_line(finishing) == b"bye\n"
                assert await finishing.receive_some() == b""  # the backend's EOF
            (done,) = await access.wait(1)
            assert not served.is_set()  # the lingering one is still a connection
            await lingering.send_all(b"still here\n")
            assert await read_line(lingering) == b"still here\n"
            with contextlib.suppress(trio.BrokenResourceError):  # a close or a reset: a cut
                assert await lingering.receive_some() == b""  # at the deadline
            cut_after = trio.current_time() - closed_at
            await trio.aclose_forcefully(lingering)
            await served.wait()
            _, cut = await access.wait(2)
        nursery.cancel_scope.cancel()
    assert drain <= cut_after < drain + 2
    assert (done.outcome, done.sni) == ("ok", "a.example")
    assert (done.bytes_to_backend, done.bytes_to_client) == (6 + 17 + 4, 6 + 17 + 4)
    assert (cut.outcome, cut.sni) == ("drained", "c.example")
    assert (cut.bytes_to_backend, cut.bytes_to_client) == (6 + 11, 6 + 11)


# --- handle_stream on a terminating listener ------------------------------------------------------


async def test_handle_stream_terminates_tls_and_routes_by_sni(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    """The host application accepts TCP connections itself and hands each to
    ``handle_stream`` with the client's address: the TLS handshake, SNI routing and the
    access line work as for connections the proxy accepted."""
    default = await start_backend(nursery, identify(b"default"))
    routed = await start_backend(nursery, identify(b"c"))
    config = l4proxy.Config(
        listeners=[
            l4proxy.ListenerConfig(
                name="embedded",
                listen=["127.0.0.1:0"],  # never bound: the proxy does not serve
                backends=[default],
                routes=[RouteConfig(sni=["c.example"], backends=[routed])],
                tls=terminating(pki),
            )
        ]
    )
    proxy = l4proxy.Proxy(config)

    async def host_app(stream: trio.SocketStream) -> None:
        host, port = stream.socket.getpeername()[:2]
        await proxy.handle_stream(
            stream, listener="embedded", client=l4proxy.TCPAddress(host, port)
        )

    listeners = await nursery.start(partial(trio.serve_tcp, host_app, 0, host="127.0.0.1"))
    app_address = listeners[0].socket.getsockname()[:2]
    clients = []
    with trio.fail_after(WAIT):
        for server_name, greeting in (("c.example", b"c\n"), ("a.example", b"default\n")):
            async with await open_tls(app_address, pki, server_name) as tls:
                host, port = tls.transport_stream.socket.getsockname()[:2]
                clients.append(l4proxy.TCPAddress(host, port))
                assert await read_line(tls) == greeting
                await tls.send_all(b"ping")
                assert await receive_exactly(tls, 4) == b"ping"
            await access.wait(len(clients))
    await proxy.aclose()
    assert [(r.sni, r.route, r.tls_version, r.client) for r in access.records] == [
        ("c.example", "c.example", "TLSv1.3", clients[0]),
        ("a.example", "default", "TLSv1.3", clients[1]),
    ]
    assert [r.listener for r in access.records] == ["embedded", "embedded"]
    assert [str(r.backend) for r in access.records] == [routed, default]


async def test_listeners_sharing_an_access_log_file_all_write_to_it(tmp_path: Path) -> None:
    """A top-level access_log is every listener's: one sink, one writer, every line."""
    log = tmp_path / "access.log"
    async with trio.open_nursery() as nursery:
        backend = await start_backend(nursery)
        config = l4proxy.Config.from_mapping(
            {
                "access_log": str(log),
                "listeners": [
                    {"name": name, "listen": ["127.0.0.1:0"], "backends": [backend]}
                    for name in ("a", "b")
                ],
            }
        )
        proxy = l4proxy.Proxy(config)
        with trio.fail_after(WAIT):
            bound, served = await serve_in(nursery, proxy)
            for address in bound:
                async with await connect_to(address) as client:
                    await client.send_all(b"hi")
                    assert await receive_exactly(client, 2) == b"hi"
                    await client.send_eof()
                    assert await receive_all(client) == b""
            proxy.close()
            await served.wait()  # the access logs are flushed when serve returns
        nursery.cancel_scope.cancel()
    lines = log.read_text().splitlines()
    assert sorted(line.split(" listener=")[1].split(" ")[0] for line in lines) == ["a", "b"]


class _FailingClose(trio.abc.HalfCloseableStream):
    """A real backend stream whose ``aclose`` fails after closing (a custom connector's)."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()
        raise OSError(5, "Input/output error")


async def test_a_close_that_fails_costs_that_connection_only(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    backend = await start_backend(nursery)

    async def connect(address: l4proxy.Address) -> trio.abc.Stream:
        stream = await l4proxy.connect.open_connection(address)
        assert isinstance(stream, trio.SocketStream)
        return _FailingClose(stream)

    proxy, bound = await start_proxy(nursery, [backend], connect=connect)
    with trio.fail_after(WAIT):
        for _ in range(2):  # the listener goes on serving after the first failed close
            async with await connect_to(bound[0]) as client:
                await client.send_all(b"ok")
                assert await receive_exactly(client, 2) == b"ok"
                await client.send_eof()
                assert await receive_all(client) == b""
        records = await access.wait(2)
    assert [record.outcome for record in records] == ["ok", "ok"]  # the first outcome stands
    assert proxy.stats()[proxy.config.listeners[0].name].open == 0


async def test_a_pool_of_a_literal_and_a_host_name_serves_both(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    """A connection to the literal gets a raw backend socket, one to the host name a
    stream; either way the data phase gets what it needs (here: the stream pump, as
    the listener cannot splice raw for every backend)."""
    first = await start_backend(nursery, identify(b"first"))
    second = await start_backend(nursery, identify(b"secnd"))
    host_name = "localhost:" + second.rsplit(":", 1)[1]  # /etc/hosts: no DNS traffic
    proxy, bound = await start_proxy(nursery, [first, host_name])
    with trio.fail_after(WAIT):
        greetings = []
        for _ in range(2):
            async with await connect_to(bound[0]) as client:
                greetings.append(await read_line(client))
                await client.send_all(b"ping")
                assert await receive_exactly(client, 4) == b"ping"
        records = await access.wait(2)
    assert sorted(greetings) == [b"first\n", b"secnd\n"]
    assert [record.outcome for record in records] == ["ok", "ok"]
    assert proxy.stats()[proxy.config.listeners[0].name].open == 0
