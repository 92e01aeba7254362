"""Proxy.reload: a failure of any kind changes nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

import l4proxy

from .badcerts import write_unparsable_san_cert
from .conftest import identify, receive_exactly, serve_in, start_backend

if TYPE_CHECKING:
    from pathlib import Path

    from .tlsfixtures import PKI


def _tls_config(cert: str, backend: str) -> l4proxy.Config:
    return l4proxy.Config(
        listeners=[
            l4proxy.ListenerConfig(
                name="tls",
                listen=["127.0.0.1:0"],
                backends=[backend],
                tls=l4proxy.TLSConfig(certs=[cert]),
            )
        ]
    )


async def _greeting(bound: l4proxy.BoundAddress, pki: PKI) -> bytes:
    """What the backend says first, through a TLS connection to the proxy."""
    assert isinstance(bound.address, l4proxy.TCPAddress)
    assert bound.address.host is not None
    tcp = await trio.open_tcp_stream(bound.address.host, bound.address.port)
    async with trio.SSLStream(tcp, pki.client_context(), server_hostname="a.example") as client:
        return await receive_exactly(client, 6)


async def test_a_reload_that_raises_keeps_the_running_configuration(
    nursery: trio.Nursery, tmp_path: Path, pki: PKI
) -> None:
    first = await start_backend(nursery, identify(b"first"))
    second = await start_backend(nursery, identify(b"secnd"))
    running = _tls_config(pki.a.combined, first)
    proxy = l4proxy.Proxy(running)
    bad = tmp_path / "bad.pem"
    write_unparsable_san_cert(bad)
    with trio.fail_after(10):
        (bound,), served = await serve_in(nursery, proxy)
        assert await _greeting(bound, pki) == b"first\n"
        with pytest.raises(ValueError, match="error parsing asn1 value"):
            await proxy.reload(_tls_config(str(bad), second))
        assert proxy.config is running
        assert await _greeting(bound, pki) == b"first\n"  # a new connection, the old config
        await proxy.reload(_tls_config(pki.a.combined, second))  # and reloads still work
        assert await _greeting(bound, pki) == b"secnd\n"
        proxy.close()
        await served.wait()
