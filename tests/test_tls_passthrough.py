"""TLS listeners end to end on loopback: SNI passthrough, hostile clients, backend TLS.

The proxy runs in-process; clients and backends are real sockets speaking the stdlib
``ssl`` module (a second TLS stack next to the proxy's pyOpenSSL). Passthrough backends
are TLS servers with their own certificates, so a client that verifies the certificate
it got proves which backend it reached and that the proxy did not terminate.

Some clients are driven by hand over an ``ssl.MemoryBIO`` (:class:`BioClient`) so the
test decides how the ClientHello reaches the wire: one byte per write, re-framed into
several TLS records, cut in half, or followed by a reset.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

import l4proxy.tlsfront
from l4proxy.config import CertKey, RouteConfig, TLSConfig
from l4proxy.protocols.clienthello import ClientHello, parse_client_hello

from .conftest import (
    AccessWatcher,
    Handler,
    connect_to,
    identify,
    receive_all,
    receive_exactly,
    start_backend,
    start_proxy,
)

if TYPE_CHECKING:
    from .tlsfixtures import PKI, CertFiles

WAIT = 10  # seconds: the bound on every step that should take milliseconds

#: Every test here runs on both byte movers of TLS connections (``tls_path``).
pytestmark = pytest.mark.usefixtures("tls_path")

STALLED = 500


# --------------------------------------------------------------------------- helpers


def server_context(cert: CertFiles, seen_sni: list[str | None] | None = None) -> ssl.SSLContext:
    """A stdlib TLS server context for a backend; records the SNI it was asked for."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.cert, cert.key)
    if seen_sni is not None:

        def remember(_tls: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
            seen_sni.append(name)

        context.sni_callback = remember
    return context


def tls_identify(
    context: ssl.SSLContext, name: bytes, received: list[bytes] | None = None
) -> Handler:
    """A TLS backend: handshake, greet with ``name``, then echo (``received`` collects
    every byte the client side sent it)."""

    async def handler(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, context, server_side=True)
        try:
            await tls.do_handshake()
            await tls.send_all(name + b"\n")
            async for data in tls:
                if received is not None:
                    received.append(bytes(data))
                await tls.send_all(data)
        except trio.BrokenResourceError:
            await trio.aclose_forcefully(tls)
            return
        with trio.move_on_after(WAIT):
            with contextlib.suppress(trio.BrokenResourceError):
                await tls.aclose()
        await trio.aclose_forcefully(tls)

    return handler


async def tls_connect(
    bound: l4proxy.BoundAddress, context: ssl.SSLContext, server_hostname: str | None
) -> trio.SSLStream[trio.SocketStream]:
    tls = trio.SSLStream(await connect_to(bound), context, server_hostname=server_hostname)
    await tls.do_handshake()
    return tls


def peer_names(tls: trio.SSLStream[trio.SocketStream]) -> set[str]:
    """The DNS names of the certificate the client verified."""
    certificate = tls.getpeercert()
    assert certificate is not None
    return {value for kind, value in certificate["subjectAltName"] if kind == "DNS"}


def _reset(stream: trio.SocketStream) -> None:
    """Close with SO_LINGER 0: the peer gets RST instead of FIN."""
    stream.socket.setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
    )
    stream.socket.close()


class BioClient:
    """A stdlib TLS client over memory BIOs: the test writes its bytes to the socket."""

    def __init__(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)

    def client_hello(self) -> bytes:
        """Start the handshake and take the ClientHello OpenSSL wrote (not sent yet)."""
        with pytest.raises(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.outgoing.read()

    async def finish_handshake(self, stream: trio.abc.Stream) -> None:
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush(stream)
                await self._feed(stream)
            else:
                break
        await self._flush(stream)

    async def send_all(self, stream: trio.abc.Stream, data: bytes) -> None:
        self.tls.write(data)
        await self._flush(stream)

    async def receive_exactly(self, stream: trio.abc.Stream, size: int) -> bytes:
        data = b""
        while len(data) < size:
            try:
                data += self.tls.read(size - len(data))
            except ssl.SSLWantReadError:
                await self._flush(stream)  # e.g. a KeyUpdate answer
                await self._feed(stream)
        return data

    async def _flush(self, stream: trio.abc.Stream) -> None:
        data = self.outgoing.read()
        if data:
            await stream.send_all(data)

    async def _feed(self, stream: trio.abc.Stream) -> None:
        data = await stream.receive_some(65536)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()


def reframe(hello: bytes, size: int) -> bytes:
    """The same handshake message, carried by several TLS records of ``size`` bytes."""
    assert hello[0] == 22
    assert int.from_bytes(hello[3:5], "big") == len(hello) - 5  # one record to start with
    body = hello[5:]
    return b"".join(
        hello[:3] + len(body[i : i + size]).to_bytes(2, "big") + body[i : i + size]
        for i in range(0, len(body), size)
    )


async def wait_for_record(access: AccessWatcher, count: int = 1) -> list[l4proxy.AccessRecord]:
    with trio.fail_after(WAIT):
        return await access.wait(count)


# --------------------------------------------------------------------------- routing


@pytest.fixture(params=["passthrough", "terminating"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


async def start_sni_listener(
    nursery: trio.Nursery, pki: PKI, mode: str, *, default: bool = True
) -> l4proxy.BoundAddress:
    """a.example -> backend 'a', c.example -> backend 'c', anything else -> 'default'.

    Passthrough: the backends are TLS servers (certs a, c and a; a also covers
    *.b.example). Terminating: the proxy serves certs a and c, the backends are plain.
    Either way the client sees a certificate for the name it asked for.
    """
    if mode == "passthrough":
        settings: dict[str, Any] = {"passthrough": True}

        def backend(cert: CertFiles, name: bytes) -> Handler:
            return tls_identify(server_context(cert), name)
    else:
        settings = {
            "tls": TLSConfig(certs=[CertKey(cert=c.cert, key=c.key) for c in (pki.a, pki.c)])
        }

        def backend(cert: CertFiles, name: bytes) -> Handler:
            return identify(name)

    a = await start_backend(nursery, backend(pki.a, b"a"))
    c = await start_backend(nursery, backend(pki.c, b"c"))
    fallback = [await start_backend(nursery, backend(pki.a, b"default"))]
    _, bound = await start_proxy(
        nursery,
        fallback if default else [],
        routes=[
            RouteConfig(sni=["a.example"], backends=[a]),
            RouteConfig(sni=["c.example"], backends=[c]),
        ],
        **settings,
    )
    return bound[0]


@pytest.mark.parametrize(
    ("server_name", "backend", "names"),
    [
        ("a.example", b"a", {"a.example", "*.b.example"}),
        ("C.Example", b"c", {"c.example"}),  # SNI matching ignores case
        ("x.b.example", b"default", {"a.example", "*.b.example"}),  # unknown SNI
    ],
)
async def test_sni_routes_and_the_client_sees_a_certificate_for_its_name(
    nursery: trio.Nursery,
    pki: PKI,
    access: AccessWatcher,
    mode: str,
    server_name: str,
    backend: bytes,
    names: set[str],
) -> None:
    bound = await start_sni_listener(nursery, pki, mode)
    with trio.fail_after(WAIT):
        tls = await tls_connect(bound, pki.client_context(), server_name)
        # The hostname check passed; in passthrough against the backend's certificate.
        assert peer_names(tls) == names
        assert await receive_exactly(tls, len(backend) + 1) == backend + b"\n"
        await tls.send_all(b"end to end")
        assert await receive_exactly(tls, 10) == b"end to end"
        await tls.aclose()
    (record,) = await wait_for_record(access)
    assert record.sni == server_name.lower()
    if mode == "passthrough":
        assert record.tls_version is None  # passthrough never sees the negotiated version
        assert record.bytes_to_backend > 10  # ClientHello and encrypted records
    else:
        assert record.tls_version == "TLSv1.3"
        assert record.bytes_to_backend == 10


async def test_no_sni_uses_the_default_pool(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, mode: str
) -> None:
    bound = await start_sni_listener(nursery, pki, mode)
    context = pki.client_context()
    context.check_hostname = False  # no server_hostname, so no SNI
    with trio.fail_after(WAIT):
        tls = await tls_connect(bound, context, None)
        assert peer_names(tls) == {"a.example", "*.b.example"}  # default cert / backend
        assert await receive_exactly(tls, 8) == b"default\n"
        await tls.aclose()
    (record,) = await wait_for_record(access)
    assert record.sni is None


async def test_no_route_and_no_default_closes_and_logs_the_sni(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, mode: str
) -> None:
    bound = await start_sni_listener(nursery, pki, mode, default=False)
    hello = BioClient(pki.client_context(), "z.example").client_hello()
    with trio.fail_after(WAIT):
        async with await connect_to(bound) as client:
            await client.send_all(hello)
            answer = await receive_all(client)
    if mode == "passthrough":
        assert answer == b""  # a plain close: passthrough speaks no TLS
    else:
        assert answer == b"\x15\x03\x03\x00\x02\x02\x70"  # fatal unrecognized_name alert
    (record,) = await wait_for_record(access)
    assert record.outcome == "no_route"
    assert record.sni == "z.example"
    assert record.backend is None
    assert record.error is not None
    assert "z.example" in record.error


# --------------------------------------------------------------------------- ClientHello shapes


async def handshake_with_hello_written_by(
    bound: l4proxy.BoundAddress,
    pki: PKI,
    write: Callable[[trio.SocketStream, bytes], Awaitable[None]],
    *,
    alpn: list[str] | None = None,
) -> tuple[bytes, bytes]:
    """Connect, let ``write(stream, hello)`` put the ClientHello on the wire, finish the
    handshake, exchange data; return the ClientHello and the backend's greeting."""
    client = BioClient(pki.client_context(alpn=alpn), "c.example")
    hello = client.client_hello()
    async with await connect_to(bound) as stream:
        await write(stream, hello)
        await client.finish_handshake(stream)
        assert client.tls.getpeercert() is not None  # verified c.example
        greeting = await client.receive_exactly(stream, 2)
        await client.send_all(stream, b"after a custom hello")
        assert await client.receive_exactly(stream, 20) == b"after a custom hello"
    return hello, greeting


async def test_client_hello_written_one_byte_at_a_time_still_routes(
    nursery: trio.Nursery,
    pki: PKI,
    access: AccessWatcher,
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bound = await start_sni_listener(nursery, pki, mode)
    parsed: list[int] = []  # the buffer sizes the proxy parsed, to show it got single bytes

    def counting_parse(data: bytes, **kwargs: int) -> ClientHello | None:
        parsed.append(len(data))
        return parse_client_hello(data, **kwargs)

    monkeypatch.setattr(l4proxy.tlsfront, "parse_client_hello", counting_parse)

    async def one_byte_at_a_time(stream: trio.SocketStream, hello: bytes) -> None:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        for index in range(len(hello)):
            await stream.send_all(hello[index : index + 1])
            # The proxy runs in this event loop: let it read (and parse) this byte alone.
            await trio.testing.wait_all_tasks_blocked()

    with trio.fail_after(WAIT):
        hello, greeting = await handshake_with_hello_written_by(bound, pki, one_byte_at_a_time)
    assert greeting == b"c\n"
    # The first parse is of the peeked first byte (MSG_PEEK: the fast path that leaves a
    # whole ClientHello in the socket); it is incomplete, so the proxy reads from there on,
    # parsing each byte of the record header, then only once the record is complete
    # (work linear in the ClientHello's size, however it trickles in).
    assert parsed == [1, 1, 2, 3, 4, 5, len(hello)]
    (record,) = await wait_for_record(access)
    assert record.sni == "c.example"


async def test_client_hello_split_into_several_records_still_routes(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, mode: str
) -> None:
    bound = await start_sni_listener(nursery, pki, mode)
    framed: list[bytes] = []

    async def several_records(stream: trio.SocketStream, hello: bytes) -> None:
        framed.append(reframe(hello, 50))
        await stream.send_all(framed[0])

    with trio.fail_after(WAIT):
        hello, greeting = await handshake_with_hello_written_by(bound, pki, several_records)
    assert greeting == b"c\n"
    assert len(framed[0]) == len(hello) + 5 * (-(-(len(hello) - 5) // 50) - 1)  # more headers
    (record,) = await wait_for_record(access)
    assert record.sni == "c.example"
    if mode == "passthrough":
        assert record.bytes_to_backend >= len(framed[0])  # replayed as received


@pytest.mark.parametrize("count", [200, 2000], ids=["2.6KB", "28KB-two-records"])
async def test_large_client_hello_routes(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, mode: str, count: int
) -> None:
    bound = await start_sni_listener(nursery, pki, mode)
    protocols = [f"protocol-{index:04d}" for index in range(count)]

    async def at_once(stream: trio.SocketStream, hello: bytes) -> None:
        await stream.send_all(hello)

    with trio.fail_after(WAIT):
        hello, greeting = await handshake_with_hello_written_by(bound, pki, at_once, alpn=protocols)
    assert len(hello) > 1536
    assert (hello[3:5] == b"\x40\x00") == (count == 2000)  # OpenSSL filled a first record
    assert greeting == b"c\n"
    (record,) = await wait_for_record(access)
    assert record.sni == "c.example"
    # Passthrough logs the ALPN offered; terminating the one negotiated (none here).
    assert record.alpn == (",".join(protocols) if mode == "passthrough" else None)


# --------------------------------------------------------------------------- hostile clients


async def start_tls_listener(
    nursery: trio.Nursery, pki: PKI, mode: str, **settings: Any
) -> l4proxy.BoundAddress:
    """One backend greeting with b"backend": behind a passthrough listener it is a TLS
    server with cert a; behind a terminating listener (cert a) it is plain."""
    if mode == "passthrough":
        backend = await start_backend(nursery, tls_identify(server_context(pki.a), b"backend"))
        _, bound = await start_proxy(nursery, [backend], passthrough=True, **settings)
    else:
        backend = await start_backend(nursery, identify(b"backend"))
        tls = TLSConfig(certs=[CertKey(cert=pki.a.cert, key=pki.a.key)])
        _, bound = await start_proxy(nursery, [backend], tls=tls, **settings)
    return bound[0]


async def open_served_client(
    bound: l4proxy.BoundAddress, pki: PKI
) -> trio.SSLStream[trio.SocketStream]:
    tls = await tls_connect(bound, pki.client_context(), "a.example")
    assert await receive_exactly(tls, 8) == b"backend\n"
    return tls


async def assert_served(bound: l4proxy.BoundAddress, pki: PKI) -> None:
    tls = await open_served_client(bound, pki)
    await tls.send_all(b"served")
    assert await receive_exactly(tls, 6) == b"served"
    await tls.aclose()


@pytest.mark.parametrize(
    ("first_bytes", "reason"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "not a TLS handshake record (content type 71)"),
        (b"G", "not a TLS handshake record (content type 71)"),  # known from one byte
        (b"\x16\x02", "not a TLS record (version byte 2)"),
        (
            b"\x16\x03\x01\x00\x30\x02",
            "first handshake message is type 2, not ClientHello",
        ),
        (  # a handshake header announcing 100000 bytes: over the 64 KiB cap, refused early
            b"\x16\x03\x01\x40\x00\x01" + (100000).to_bytes(3, "big") + bytes(16380),
            "ClientHello larger than the 65536-byte limit",
        ),
    ],
    ids=["http", "one-byte", "record-version", "server-hello", "over-the-cap"],
)
async def test_garbage_first_bytes_are_closed_at_once_as_bad_client_hello(
    nursery: trio.Nursery,
    pki: PKI,
    access: AccessWatcher,
    mode: str,
    first_bytes: bytes,
    reason: str,
) -> None:
    # A long handshake timeout: the close must come from classifying the bytes.
    bound = await start_tls_listener(nursery, pki, mode, handshake_timeout=60)
    with trio.fail_after(WAIT):
        async with await connect_to(bound) as client:
            await client.send_all(first_bytes)
            assert await receive_all(client) == b""
    (record,) = await wait_for_record(access)
    assert record.outcome == "bad_client_hello"
    assert record.error == reason
    assert record.backend is None
    assert record.duration < 5
    with trio.fail_after(WAIT):
        await assert_served(bound, pki)


async def test_half_a_client_hello_then_silence_times_out(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, mode: str
) -> None:
    bound = await start_tls_listener(nursery, pki, mode, handshake_timeout=0.3)
    hello = BioClient(pki.client_context(), "a.example").client_hello()
    with trio.fail_after(WAIT):
        started = trio.current_time()  # before the connect: the proxy's clock starts at accept
        async with await connect_to(bound) as client:
            await client.send_all(hello[: len(hello) // 2])
            assert await receive_all(client) == b""
            waited = trio.current_time() - started
    assert 0.25 <= waited < 3
    (record,) = await wait_for_record(access)
    assert record.outcome == "handshake_timeout"
    assert record.error == "no complete ClientHello and handshake within 0.3s"
    assert record.backend is None


async def test_terminating_handshake_stalled_after_the_client_hello_times_out(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    bound = await start_tls_listener(nursery, pki, "terminating", handshake_timeout=0.3)
    hello = BioClient(pki.client_context(), "a.example").client_hello()
    with trio.fail_after(WAIT):
        started = trio.current_time()  # before the connect: the proxy's clock starts at accept
        async with await connect_to(bound) as client:
            await client.send_all(hello)  # the whole ClientHello, then never a Finished
            server_flight = await receive_all(client)
            waited = trio.current_time() - started
    assert server_flight[:1] == b"\x16"  # the proxy answered with its ServerHello
    assert 0.25 <= waited < 3
    (record,) = await wait_for_record(access)
    assert record.outcome == "handshake_timeout"
    assert record.sni == "a.example"


async def test_terminating_client_alert_mid_handshake_costs_that_connection(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    bound = await start_tls_listener(nursery, pki, "terminating")
    hello = BioClient(pki.client_context(), "a.example").client_hello()
    with trio.fail_after(WAIT):
        async with await connect_to(bound) as client:
            await client.send_all(hello)
            assert (await client.receive_some(65536))[:1] == b"\x16"
            await client.send_all(b"\x15\x03\x03\x00\x02\x02\x28")  # fatal handshake_failure
            assert await receive_all(client) == b""
        (record,) = await wait_for_record(access)
        await assert_served(bound, pki)
    assert record.outcome == "tls_handshake_failed"
    assert record.error is not None
    assert "alert handshake failure" in record.error


async def test_the_handshake_timeout_does_not_limit_an_established_connection(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, mode: str
) -> None:
    bound = await start_tls_listener(nursery, pki, mode, handshake_timeout=0.2)
    with trio.fail_after(WAIT):
        tls = await open_served_client(bound, pki)
        await trio.sleep(0.5)  # well past the handshake deadline, on the wall clock
        await tls.send_all(b"later")
        assert await receive_exactly(tls, 5) == b"later"
        await tls.aclose()
        (record,) = await access.wait(1)
    assert record.outcome != "handshake_timeout"
    assert record.duration >= 0.5


@contextlib.contextmanager
def file_descriptors(wanted: int) -> Iterator[None]:
    """Raise the soft open-files limit for the test if it is below ``wanted``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft >= target:
        yield
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_500_stalled_handshakes_do_not_stop_another_client(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, mode: str
) -> None:
    """Connected-and-silent, half a ClientHello, and (terminating) a whole ClientHello
    with no Finished: none of them holds up a client that completes its handshake."""
    bound = await start_tls_listener(nursery, pki, mode, handshake_timeout=60)
    hello = BioClient(pki.client_context(), "a.example").client_hello()
    shapes = {"silent": b"", "half": hello[: len(hello) // 2]}
    if mode == "terminating":
        shapes["whole"] = hello
    stalled: dict[str, str] = {}  # client address as logged -> shape
    streams: list[trio.SocketStream] = []
    with file_descriptors(4 * STALLED + 256), trio.fail_after(60):
        try:
            for index in range(STALLED):
                shape = list(shapes)[index % len(shapes)]
                stream = await connect_to(bound)
                streams.append(stream)
                host, port = stream.socket.getsockname()[:2]
                stalled[f"{host}:{port}"] = shape
                if shapes[shape]:
                    await stream.send_all(shapes[shape])
            with trio.fail_after(5):
                await assert_served(bound, pki)
                served = await access.wait(1)
            # The one finished connection is the served client: no stalled one ended.
            assert [str(record.client) in stalled for record in served] == [False]
        finally:
            for stream in streams:
                await trio.aclose_forcefully(stream)
        records = await access.wait(1 + STALLED)
    outcomes = {record.outcome for record in records[1:] if stalled[str(record.client)] != "whole"}
    assert outcomes == {"bad_client_hello"}  # EOF before a complete ClientHello
    whole = {record.outcome for record in records[1:] if stalled[str(record.client)] == "whole"}
    assert whole == ({"tls_handshake_failed"} if mode == "terminating" else set())


async def test_a_reset_mid_handshake_costs_only_that_connection(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, mode: str
) -> None:
    bound = await start_tls_listener(nursery, pki, mode)
    hello = BioClient(pki.client_context(), "a.example").client_hello()
    with trio.fail_after(WAIT):
        established = await open_served_client(bound, pki)
        victim = await connect_to(bound)
        if mode == "passthrough":
            await victim.send_all(hello[:100])
        else:
            await victim.send_all(hello)
            assert (await victim.receive_some(65536))[:1] == b"\x16"  # mid-handshake now
        await trio.testing.wait_all_tasks_blocked()
        _reset(victim)
        (record,) = await access.wait(1)
        await established.send_all(b"still here")
        assert await receive_exactly(established, 10) == b"still here"
        await assert_served(bound, pki)
        await established.aclose()
    if mode == "passthrough":
        assert record.outcome == "error:reset"
    else:
        assert record.outcome == "tls_handshake_failed"
    assert record.error is not None
    assert "reset" in record.error.lower()
    assert record.backend is None


# --------------------------------------------------------------------------- backend TLS


@pytest.fixture(params=["plain", "terminating"])
def front(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


async def start_backend_tls_proxy(
    nursery: trio.Nursery, pki: PKI, front: str, backend: str, **settings: Any
) -> l4proxy.BoundAddress:
    tls = TLSConfig(certs=[CertKey(cert=pki.a.cert, key=pki.a.key)]) if front != "plain" else None
    _, bound = await start_proxy(nursery, [backend], tls=tls, backend_tls=True, **settings)
    return bound[0]


async def open_front(bound: l4proxy.BoundAddress, pki: PKI, front: str) -> trio.abc.Stream:
    if front == "plain":
        return await connect_to(bound)
    return await tls_connect(bound, pki.client_context(), "a.example")


async def test_backend_tls_verified_end_to_end(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, front: str
) -> None:
    seen_sni: list[str | None] = []
    backend = await start_backend(
        nursery, tls_identify(server_context(pki.a, seen_sni), b"secured")
    )
    bound = await start_backend_tls_proxy(
        nursery, pki, front, backend, backend_ca=pki.ca_file, backend_sni="a.example"
    )
    with trio.fail_after(WAIT):
        client = await open_front(bound, pki, front)
        assert await receive_exactly(client, 8) == b"secured\n"
        await client.send_all(b"re-encrypted")
        assert await receive_exactly(client, 12) == b"re-encrypted"
        await client.aclose()
        (record,) = await access.wait(1)
    assert seen_sni == ["a.example"]
    assert record.outcome == "ok"
    assert str(record.backend) == backend


@pytest.mark.parametrize(
    ("trust", "backend_sni", "reason"),
    [
        ("other_ca_file", "a.example", "certificate verify failed"),
        ("ca_file", "c.example", "backend certificate does not match 'c.example'"),
        # No backend_sni: the name is the backend's host, here an IP the cert lacks.
        ("ca_file", None, "backend certificate does not match '127.0.0.1'"),
    ],
    ids=["wrong-ca", "wrong-name", "ip-not-in-cert"],
)
async def test_backend_tls_failure_closes_the_client_before_any_byte_reaches_the_backend(
    nursery: trio.Nursery,
    pki: PKI,
    access: AccessWatcher,
    front: str,
    trust: str,
    backend_sni: str | None,
    reason: str,
) -> None:
    received: list[bytes] = []
    backend = await start_backend(
        nursery, tls_identify(server_context(pki.a), b"secured", received)
    )
    bound = await start_backend_tls_proxy(
        nursery, pki, front, backend, backend_ca=getattr(pki, trust), backend_sni=backend_sni
    )
    with trio.fail_after(WAIT):
        client = await open_front(bound, pki, front)
        try:
            await client.send_all(b"secret")
            # Closed: a FIN, or a reset when the proxy closes with "secret" unread.
            assert await receive_all(client) == b""
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(client)
        (record,) = await access.wait(1)
    assert record.outcome == "backend_tls_failed"
    assert record.error is not None
    assert reason in record.error
    assert str(record.backend) == backend
    assert record.bytes_to_backend == 0
    assert received == []


async def test_backend_tls_stalled_or_plain_backend_is_backend_tls_failed(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, front: str
) -> None:
    """A backend that accepts but never answers the handshake (bounded by
    handshake_timeout), and one that does not speak TLS at all."""
    release = trio.Event()

    async def silent(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(WAIT):
                await release.wait()

    stalled = await start_backend(nursery, silent)
    plain = await start_backend(nursery, identify(b"plaintext"))
    expected = {
        stalled: "backend handshake took longer than 0.3s",
        plain: "wrong version number",
    }
    with trio.fail_after(WAIT):
        for backend in (stalled, plain):
            bound = await start_backend_tls_proxy(
                nursery, pki, front, backend, backend_ca=pki.ca_file, handshake_timeout=0.3
            )
            client = await open_front(bound, pki, front)
            assert await receive_all(client) == b""
            await client.aclose()
        records = await access.wait(2)
    release.set()
    assert [(str(r.backend), r.outcome) for r in records] == [
        (stalled, "backend_tls_failed"),
        (plain, "backend_tls_failed"),
    ]
    for record in records:
        assert record.error is not None
        assert expected[str(record.backend)] in record.error  # type: ignore[index]


async def test_a_backend_failing_its_tls_handshake_fails_over_to_the_next(
    nursery: trio.Nursery,
    pki: PKI,
    access: AccessWatcher,
    front: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A TLS handshake that fails counts as a failed connect (issue #11): the next
    backend is tried, the failed one is marked down, and nothing reaches it."""
    received: list[bytes] = []
    plain = await start_backend(nursery, identify(b"plaintext"))
    wrong_name = await start_backend(nursery, tls_identify(server_context(pki.c), b"c", received))
    good = await start_backend(nursery, tls_identify(server_context(pki.a), b"secured"))
    tls = TLSConfig(certs=[CertKey(cert=pki.a.cert, key=pki.a.key)]) if front != "plain" else None
    _, (bound,) = await start_proxy(
        nursery, [plain, wrong_name, good], tls=tls, backend_tls=True,
        backend_ca=pki.ca_file, backend_sni="a.example",
    )  # fmt: skip
    with trio.fail_after(WAIT):
        for _ in range(2):  # the second finds both failed ones down: straight to good
            client = await open_front(bound, pki, front)
            assert await receive_exactly(client, 8) == b"secured\n"
            await client.aclose()
        records = await access.wait(2)
    assert [(r.outcome, str(r.backend)) for r in records] == [("ok", good), ("ok", good)]
    assert received == []
    await trio.sleep(1.1)  # the back-off (1 s) passed: the bad ones are tried again
    with trio.fail_after(WAIT):
        for _ in range(3):  # one of these starts at plain, whichever the rotation
            client = await open_front(bound, pki, front)
            assert await receive_exactly(client, 8) == b"secured\n"
            await client.aclose()
    health = [r.getMessage() for r in caplog.records if r.name == "l4proxy.health"]
    # a TCP connect alone never marks a TLS backend up: no up/down flapping
    assert not [line for line in health if " up: " in line], health
    assert len([line for line in health if line.startswith(f"backend {plain} down")]) == 1
    all_bad = await start_backend_tls_proxy(nursery, pki, front, plain, backend_ca=pki.ca_file)
    with trio.fail_after(WAIT):
        client = await open_front(all_bad, pki, front)
        assert await receive_all(client) == b""
        await client.aclose()
        records = await access.wait(6)
    assert records[5].outcome == "backend_tls_failed"
    assert records[5].error is not None
    assert records[5].error.startswith(f"{plain}: ")


async def test_backend_tls_default_sni_is_the_backend_host_name(
    nursery: trio.Nursery,
    pki: PKI,
    access: AccessWatcher,
    front: str,
) -> None:
    localhost = pki.ca.issue_cert("localhost")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    localhost.configure_cert(context)
    seen_sni: list[str | None] = []

    def remember(_tls: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        seen_sni.append(name)

    context.sni_callback = remember
    address = await start_backend(nursery, tls_identify(context, b"localhost"))
    backend = address.replace("127.0.0.1", "localhost")  # resolved from /etc/hosts
    bound = await start_backend_tls_proxy(nursery, pki, front, backend, backend_ca=pki.ca_file)
    with trio.fail_after(WAIT):
        client = await open_front(bound, pki, front)
        assert await receive_exactly(client, 10) == b"localhost\n"
        await client.send_all(b"by name")
        assert await receive_exactly(client, 7) == b"by name"
        await client.aclose()
        (record,) = await access.wait(1)
    assert seen_sni == ["localhost"]
    assert record.outcome == "ok"
    assert str(record.backend) == backend
