"""TLSStream conformance: trio's own generic stream tests, over in-memory transports."""

from __future__ import annotations

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


async def test_a_failed_handshake_is_a_broken_resource_with_the_reason(pki: PKI) -> None:
    wrong_trust = BackendTLS(pki.other_ca_file, server_name=None, key_path="backend_ca")
    client, _server = await tls_pair(pki, trio.testing.memory_stream_pair, TLSVersion.TLS1_3)
    trusted = BackendTLS(pki.ca_file, server_name=None, key_path="backend_ca")
    with pytest.raises(
        trio.BrokenResourceError, match=r"backend certificate does not match 'c\.example'"
    ):
        trusted.verify(client.connection, "c.example")
    client_transport, server_transport = trio.testing.memory_stream_pair()
    garbage_client = TLSStream(client_transport, wrong_trust.connection("a.example")[0])
    plain_server = server_transport
    async with trio.open_nursery() as nursery:

        async def answer_with_garbage() -> None:
            await plain_server.receive_some()
            await plain_server.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        nursery.start_soon(answer_with_garbage)
        with pytest.raises(
            trio.BrokenResourceError,
            match=r"wrong version number|record layer failure|packet length too long",
        ):
            await garbage_client.do_handshake()


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
