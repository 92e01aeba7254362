"""The TLS streams: trio's generic stream tests, and how handshakes fail.

Both kinds of stream are checked: memory BIOs (:class:`TLSStream`) and OpenSSL on the
socket itself (:class:`SocketTLSStream`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing
from OpenSSL import SSL

from l4proxy.config import TLSConfig, TLSVersion
from l4proxy.tls import BackendTLS, ServerTLS, SocketTLSStream, TLSStream, build_server_tls

if TYPE_CHECKING:
    from .tlsfixtures import PKI

Transport = Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]


def tls_ends(pki: PKI, version: TLSVersion) -> tuple[ServerTLS, BackendTLS]:
    """A server for a.example (at least ``version``) and a client that speaks ``version``."""
    server_tls = build_server_tls(
        TLSConfig(certs=[{"cert": pki.a.cert, "key": pki.a.key}], min_version=version),
        session_id=b"test",
        key_path="tls",
    )
    backend = BackendTLS(pki.ca_file, server_name=None, key_path="backend_ca")
    if version is TLSVersion.TLS1_2:
        backend.context.set_max_proto_version(SSL.TLS1_2_VERSION)
    return server_tls, backend


async def tls_pair(
    pki: PKI, transport: Transport, version: TLSVersion
) -> tuple[TLSStream, TLSStream]:
    server_tls, backend = tls_ends(pki, version)
    client_transport, server_transport = transport()
    connection, name = backend.connection("a.example")
    client = TLSStream(client_transport, connection)
    server = TLSStream(server_transport, server_tls.connection("a.example"))

    async def client_handshake() -> None:
        await client.do_handshake()
        if version is TLSVersion.TLS1_3:
            # The server sends session tickets after its handshake; over an unbuffered
            # (lockstep) transport it waits until the client reads them, which a real
            # socket's buffer would absorb. Read them into the client's BIO now.
            await client._feed()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_handshake)
        nursery.start_soon(server.do_handshake)
    backend.verify(client.connection, name)
    return client, server


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of a loopback TCP connection (client, server): resets need TCP."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
    return client, server


def client_hello(pki: PKI) -> bytes:
    """The first flight of a real client: a complete ClientHello for a.example."""
    _server_tls, backend = tls_ends(pki, TLSVersion.TLS1_3)
    connection, _ = backend.connection("a.example")
    with pytest.raises(SSL.WantReadError):
        connection.do_handshake()
    return connection.bio_read(65536)


def server_stream(
    pki: PKI, kind: str, transport: trio.SocketStream, version: TLSVersion = TLSVersion.TLS1_2
) -> TLSStream:
    """A server for a.example (at least ``version``) of the given kind over ``transport``."""
    server_tls, _ = tls_ends(pki, version)
    if kind == "socket":
        return SocketTLSStream(transport, server_tls.connection("a.example", sock=transport.socket))
    return TLSStream(transport, server_tls.connection("a.example"))


@pytest.fixture(params=["memory", "socket"])
def kind(request: pytest.FixtureRequest) -> str:
    """Which server stream: memory BIOs, or OpenSSL on the socket itself."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(params=[TLSVersion.TLS1_2, TLSVersion.TLS1_3], ids=["tls1.2", "tls1.3"])
def version(request: pytest.FixtureRequest) -> TLSVersion:
    return request.param  # type: ignore[no-any-return]


async def test_generic_half_closeable_stream_behaviour(pki: PKI, version: TLSVersion) -> None:
    async def stream_maker() -> tuple[TLSStream, TLSStream]:
        return await tls_pair(pki, trio.testing.memory_stream_pair, version)

    async def clogged_stream_maker() -> tuple[TLSStream, TLSStream]:
        return await tls_pair(pki, trio.testing.lockstep_stream_pair, version)

    await trio.testing.check_half_closeable_stream(stream_maker, clogged_stream_maker)


async def test_negotiated_details(pki: PKI, version: TLSVersion) -> None:
    client, server = await tls_pair(pki, trio.testing.memory_stream_pair, version)
    assert server.protocol_version == ("TLSv1.2" if version is TLSVersion.TLS1_2 else "TLSv1.3")
    assert server.cipher is not None
    assert server.cipher.startswith("ECDHE-ECDSA-" if version is TLSVersion.TLS1_2 else "TLS_AES_")
    await client.aclose()
    await server.aclose()


async def socket_tls_pair(pki: PKI, version: TLSVersion) -> tuple[TLSStream, SocketTLSStream]:
    """Client over memory BIOs, server bound to its socket (the fast path)."""
    server_tls, backend = tls_ends(pki, version)
    left, right = trio.socket.socketpair()
    client_transport, server_transport = trio.SocketStream(left), trio.SocketStream(right)
    connection, _ = backend.connection("a.example")
    client = TLSStream(client_transport, connection)
    server = SocketTLSStream(
        server_transport, server_tls.connection("a.example", sock=server_transport.socket)
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    return client, server


async def test_socket_bound_stream_behaves_like_a_half_closeable_stream(
    pki: PKI, version: TLSVersion
) -> None:
    async def stream_maker() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
        client, server = await socket_tls_pair(pki, version)
        return server, client

    async def reversed_maker() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
        client, server = await socket_tls_pair(pki, version)
        return client, server

    await trio.testing.check_half_closeable_stream(stream_maker, None)
    await trio.testing.check_half_closeable_stream(reversed_maker, None)


def _socketpair_streams() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    left, right = trio.socket.socketpair()
    return trio.SocketStream(left), trio.SocketStream(right)


async def test_receiving_is_not_held_up_by_a_sender_stalled_on_a_slow_reader(
    pki: PKI, version: TLSVersion
) -> None:
    """The backend streams a reply the client does not read yet while the client still
    uploads: the memory-BIO stream must keep receiving (no head-of-line blocking)."""
    client, server = await tls_pair(pki, _socketpair_streams, version)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_all, b"\0" * (8 << 20))  # stalls: nobody reads it
        await trio.testing.wait_all_tasks_blocked()
        await client.send_all(b"hello")
        with trio.fail_after(5):
            assert await server.receive_some(5) == b"hello"
        nursery.cancel_scope.cancel()
    await trio.aclose_forcefully(client)
    await trio.aclose_forcefully(server)


# --- handshake failures: the same words from both streams --------------------------------


async def test_a_backend_certificate_for_another_name_is_refused(pki: PKI) -> None:
    client, server = await tls_pair(pki, trio.testing.memory_stream_pair, TLSVersion.TLS1_3)
    async with client, server:
        trusted = BackendTLS(pki.ca_file, server_name=None, key_path="backend_ca")
        with pytest.raises(
            trio.BrokenResourceError, match=r"backend certificate does not match 'c\.example'"
        ):
            trusted.verify(client.connection, "c.example")


async def test_a_certificate_that_fails_verification_breaks_both_handshakes(
    pki: PKI, version: TLSVersion, kind: str
) -> None:
    """A client that does not trust the server's CA stops at its certificate with
    OpenSSL's reason, and its alert reaches the server (memory BIOs flush it)."""
    wrong_trust = BackendTLS(pki.other_ca_file, server_name=None, key_path="backend_ca")
    if version is TLSVersion.TLS1_2:
        wrong_trust.context.set_max_proto_version(SSL.TLS1_2_VERSION)
    client_transport, server_transport = await tcp_pair()
    client = TLSStream(client_transport, wrong_trust.connection("a.example")[0])
    server = server_stream(pki, kind, server_transport, version)
    failures: dict[str, str] = {}

    async def handshake(name: str, stream: TLSStream) -> None:
        with pytest.raises(trio.BrokenResourceError) as caught:
            await stream.do_handshake()
        failures[name] = str(caught.value)

    async with client, server:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(handshake, "client", client)
                nursery.start_soon(handshake, "server", server)
    assert failures == {"client": "certificate verify failed", "server": "tlsv1 alert unknown ca"}


async def test_a_server_that_is_not_speaking_tls_breaks_the_handshake(pki: PKI) -> None:
    _, backend = tls_ends(pki, TLSVersion.TLS1_3)
    client_transport, server_transport = trio.testing.memory_stream_pair()
    client = TLSStream(client_transport, backend.connection("a.example")[0])

    async def answer_with_garbage() -> None:
        await server_transport.receive_some()
        await server_transport.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    async with client, server_transport, trio.open_nursery() as nursery:
        nursery.start_soon(answer_with_garbage)
        with pytest.raises(
            trio.BrokenResourceError,
            match=r"wrong version number|record layer failure|packet length too long",
        ):
            await client.do_handshake()


@pytest.mark.parametrize("sent", ["nothing", "part", "whole"])
async def test_a_peer_closing_during_the_handshake_reads_as_closed(
    pki: PKI, kind: str, sent: str
) -> None:
    hello = client_hello(pki)
    first = {"nothing": b"", "part": hello[:10], "whole": hello}[sent]
    client, transport = await tcp_pair()
    server = server_stream(pki, kind, transport)
    async with client, server:
        if first:
            await client.send_all(first)
        await client.send_eof()  # FIN, still reading: the server's flight has somewhere to go
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as caught:
            await server.do_handshake()
        assert str(caught.value) == "peer closed the connection during the handshake"
        with pytest.raises(trio.BrokenResourceError, match="broken"):
            await server.receive_some()  # and the stream stays broken


async def test_a_peer_resetting_during_the_handshake_reads_as_reset(pki: PKI, kind: str) -> None:
    client, transport = await tcp_pair()
    server = server_stream(pki, kind, transport)
    failure: list[trio.BrokenResourceError] = []

    async def handshake() -> None:
        with pytest.raises(trio.BrokenResourceError) as caught:
            await server.do_handshake()
        failure.append(caught.value)

    async with client, server, trio.open_nursery() as nursery:
        nursery.start_soon(handshake)
        await client.send_all(client_hello(pki))
        assert (await client.receive_some(65536))[:1] == b"\x16"  # the server's flight
        await trio.testing.wait_all_tasks_blocked()  # the server waits for the Finished
        client.socket.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        client.socket.close()  # RST, not FIN
    (error,) = failure
    if kind == "socket":
        assert str(error) == "peer reset the connection during the handshake"
    else:  # the transport's own error, passed on as trio's SSLStream does
        assert "reset" in str(error).lower()
