"""``accept_proxy_protocol`` (issue #10): peers in the trusted CIDRs must open with a
PROXY header, whose source then stands for the client everywhere (lists and limits,
the access log, the header sent on); from anyone else a header is just payload."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

import l4proxy
from l4proxy.protocols.proxyheader import (
    V2_SIGNATURE,
    InetEndpoint,
    encode_v1,
    encode_v2,
)

from .conftest import echo, read_line, receive_all, start_backend
from .test_proxy_protocol_out import HeaderBackend

if TYPE_CHECKING:
    from .conftest import AccessWatcher

CLIENT = InetEndpoint("203.0.113.5", 40000)
FRONT = InetEndpoint("198.51.100.1", 443)


async def _proxy(nursery: trio.Nursery, backend: str, **settings: object) -> int:
    listener = l4proxy.ListenerConfig(
        name="in",
        listen=["127.0.0.1:0"],
        backends=[backend],
        **settings,  # type: ignore[arg-type]
    )
    (bound,) = await nursery.start(l4proxy.Proxy(l4proxy.Config(listeners=[listener])).serve)
    port: int = bound.port
    return port


async def _send(port: int, *pieces: bytes, source: str = "127.0.0.1") -> bytes:
    """Send the pieces (a pause between them), then read until the proxy closes."""
    async with await trio.open_tcp_stream("127.0.0.1", port, local_address=source) as stream:
        try:  # a refused connection may be closed (even reset) before all is sent
            for index, piece in enumerate(pieces):
                if index:
                    await trio.sleep(0.05)
                await stream.send_all(piece)
            await stream.send_eof()
            with trio.fail_after(5):
                return await receive_all(stream)
        except trio.BrokenResourceError:
            return b""


async def test_a_trusted_header_names_the_client_and_is_not_passed_on(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    port = await _proxy(
        nursery, await start_backend(nursery, echo), accept_proxy_protocol=["127.0.0.0/8"]
    )
    v1 = encode_v1(CLIENT, FRONT)
    assert await _send(port, v1 + b"payload\n") == b"payload\n"  # header and data in one
    assert await _send(port, v1[:9], v1[9:], b"later\n") == b"later\n"  # split in pieces
    v2 = encode_v2(CLIENT, FRONT)
    assert await _send(port, v2 + b"two\n") == b"two\n"
    records = await access.wait(3)
    assert [r.outcome for r in records] == ["ok"] * 3
    assert all(str(r.proxied_client) == "203.0.113.5:40000" for r in records)
    text = l4proxy.accesslog.format_text(records[0])
    assert " client=203.0.113.5:40000 " in text
    assert " via=127.0.0.1:" in text


async def test_from_an_untrusted_peer_a_header_is_payload(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    port = await _proxy(
        nursery, await start_backend(nursery, echo), accept_proxy_protocol=["10.0.0.0/8"]
    )
    spoofed = encode_v1(CLIENT, FRONT) + b"data\n"
    assert await _send(port, spoofed) == spoofed
    (record,) = await access.wait(1)
    assert record.proxied_client is None


async def test_a_trusted_peer_without_a_valid_header_costs_its_connection(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    contacted = []

    async def backend(stream: trio.SocketStream) -> None:
        contacted.append(True)
        await echo(stream)

    port = await _proxy(
        nursery,
        await start_backend(nursery, backend),
        accept_proxy_protocol=["127.0.0.1"],
        handshake_timeout=0.5,
    )
    assert await _send(port, b"GET / HTTP/1.1\r\n\r\n") == b""
    assert await _send(port, b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n") == b""
    assert await _send(port, V2_SIGNATURE + b"\x21\x11\xff\xff") == b""  # over the cap
    async with await trio.open_tcp_stream("127.0.0.1", port) as silent:
        with trio.fail_after(5):
            assert await receive_all(silent) == b""  # cut at the handshake timeout
    records = await access.wait(4)
    assert [r.outcome for r in records] == ["bad_proxy_header"] * 3 + ["handshake_timeout"]
    assert records[1].error == "malformed PROXY v1 header 'PROXY TCP4 1.2.3.4 5.6.7.8 1'"
    assert not contacted


async def test_a_local_health_check_keeps_the_real_endpoints(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    port = await _proxy(
        nursery, await start_backend(nursery, echo), accept_proxy_protocol=["127.0.0.0/8"]
    )
    local = encode_v2(None, None, command=l4proxy.protocols.proxyheader.Command.LOCAL)
    assert await _send(port, local + b"ping\n") == b"ping\n"
    (record,) = await access.wait(1)
    assert record.proxied_client is None


async def test_lists_and_limits_apply_to_the_client_the_header_names(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    port = await _proxy(
        nursery,
        await start_backend(nursery, echo),
        accept_proxy_protocol=["127.0.0.1"],
        deny=["203.0.113.0/24"],
        rate_per_ip=1,
    )
    other = InetEndpoint("192.0.2.7", 1)
    assert await _send(port, encode_v1(CLIENT, FRONT) + b"x\n") == b""  # denied by header
    assert await _send(port, encode_v1(other, FRONT) + b"y\n") == b"y\n"
    assert await _send(port, encode_v1(other, FRONT) + b"z\n") == b""  # its rate: 1/s
    records = await access.wait(3)
    assert [r.outcome for r in records] == ["denied", "ok", "rate_limited"]
    assert str(records[0].proxied_client) == "203.0.113.5:40000"


async def test_a_chain_passes_the_original_client_on(
    nursery: trio.Nursery, access: AccessWatcher
) -> None:
    """A sends v2 to B, which trusts A and sends v1 on: B's backend sees the client
    that reached A, and the address it reached there (as HAProxy does)."""
    backend = HeaderBackend()
    port_b = await _proxy(
        nursery,
        await start_backend(nursery, backend),
        accept_proxy_protocol=["127.0.0.1"],
        proxy_protocol="v1",
    )
    port_a = await _proxy(nursery, f"127.0.0.1:{port_b}", proxy_protocol="v2")
    async with await trio.open_tcp_stream("127.0.0.1", port_a, local_address="127.0.0.8") as c:
        await c.send_all(b"through A and B\n")
        with trio.fail_after(5):
            assert await read_line(c) == b"through A and B\n"
        client_port = c.socket.getsockname()[1]
    (header,) = backend.headers
    assert header.source == InetEndpoint("127.0.0.8", client_port)
    assert header.destination == InetEndpoint("127.0.0.1", port_a)
