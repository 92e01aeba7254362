"""Reloads: a failure of any kind changes nothing."""

from __future__ import annotations

import logging
import os
import signal
from typing import TYPE_CHECKING

import pytest
import trio

import l4proxy
from l4proxy.runner import run_proxy

from .badcerts import write_unparsable_san_cert
from .conftest import identify, receive_exactly, serve_in, start_backend
from .proxyprocess import ProxyProcess

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
        with pytest.raises(l4proxy.ConfigError, match=r"cannot parse its extensions"):
            await proxy.reload(_tls_config(str(bad), second))
        assert proxy.config is running
        assert await _greeting(bound, pki) == b"first\n"  # a new connection, the old config
        await proxy.reload(_tls_config(pki.a.combined, second))  # and reloads still work
        assert await _greeting(bound, pki) == b"secnd\n"
        proxy.close()
        await served.wait()


def test_a_certificate_whose_extensions_cannot_be_parsed_is_a_config_error(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.pem"
    write_unparsable_san_cert(bad)
    with pytest.raises(l4proxy.ConfigError) as caught:
        l4proxy.Proxy(_tls_config(str(bad), "127.0.0.1:1"))
    assert str(caught.value).startswith(
        f"listeners[0].tls.certs[0].cert: {str(bad)!r}: cannot parse its extensions:"
    )


async def test_sighup_survives_a_loader_that_fails_with_anything(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """The command's SIGHUP handler (run in process here, with a real signal): a reload
    that fails with an exception that is not a ConfigError is one ERROR line, and the
    proxy keeps serving with its configuration."""
    backend = await start_backend(nursery, identify(b"first"))
    config = l4proxy.Config(
        listeners=[l4proxy.ListenerConfig(listen=["127.0.0.1:0"], backends=[backend])]
    )
    proxy = l4proxy.Proxy(config)
    loads = 0

    def failing_loader() -> l4proxy.Config:
        nonlocal loads
        loads += 1
        raise PermissionError(13, "Permission denied", "/etc/l4proxy.toml")

    ready = trio.Event()
    bound: list[l4proxy.BoundAddress] = []
    status: list[int] = []

    def on_ready(addresses: list[l4proxy.BoundAddress]) -> None:
        bound.extend(addresses)
        ready.set()

    async def run() -> None:
        status.append(await run_proxy(proxy, failing_loader, on_ready=on_ready))

    caplog.set_level(logging.ERROR, logger="l4proxy.cli")
    with trio.fail_after(10):
        nursery.start_soon(run)
        await ready.wait()
        os.kill(os.getpid(), signal.SIGHUP)
        while not caplog.records:  # noqa: ASYNC110 - waiting for the handler's one line
            await trio.sleep(0.01)
        assert loads == 1
        assert proxy.config is config
        address = bound[0].address
        assert isinstance(address, l4proxy.TCPAddress)
        assert address.host is not None
        async with await trio.open_tcp_stream(address.host, address.port) as client:
            assert await receive_exactly(client, 6) == b"first\n"
        os.kill(os.getpid(), signal.SIGTERM)
        while not status:  # noqa: ASYNC110 - run_proxy returns once drained
            await trio.sleep(0.01)
    assert status == [0]
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert line == (
        "SIGHUP: reload failed, keeping the running configuration: "
        "PermissionError: [Errno 13] Permission denied: '/etc/l4proxy.toml'"
    )


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_applies_log_level_moved_by_the_flags(
    nursery: trio.Nursery, tmp_path: Path, workers: int
) -> None:
    """With ``-v``: ``log_level = "warning"`` logs INFO; a reload to ``"error"`` stops
    INFO lines (the ``-v`` still counts: warning); one back to ``"warning"`` brings
    them back. In the supervisor and in every worker."""
    backend = await start_backend(nursery, identify(b"first"))
    path = tmp_path / "l4proxy.toml"
    processes = workers + 1 if workers > 1 else 1
    reloaded = r" INFO .*configuration reloaded"

    def write(level: str) -> None:
        path.write_text(
            f'log_level = "{level}"\nworkers = {workers}\n[[listeners]]\nname = "svc"\n'
            f'listen = ["127.0.0.1:0"]\nbackends = ["{backend}"]\n'
        )

    write("warning")
    with trio.fail_after(30):
        async with ProxyProcess(nursery, ["-v", "--config", str(path)]) as proc:
            await proc.listening(count=workers)
            write("error")
            proc.signal(signal.SIGHUP)  # logged at INFO, then the level is WARNING
            await proc.wait_for(reloaded, count=processes)
            proc.signal(signal.SIGHUP)  # at WARNING: no line
            with trio.move_on_after(1):
                await proc.wait_for(reloaded, count=processes + 1)
                pytest.fail("an INFO line after log_level became 'error' (with -v: warning)")
            write("warning")
            # The first reload logs at WARNING still (nothing); the next ones at INFO.
            # Signals sent together may arrive as one, so send until the lines come.
            while True:
                proc.signal(signal.SIGHUP)
                with trio.move_on_after(0.5):
                    await proc.wait_for(reloaded, count=2 * processes)
                    break
            assert not [line for line in proc.stderr if " DEBUG " in line]
