"""Closing a Unix listener removes its socket file only while it is still the one this
process bound: never a socket someone else has bound at the same path since."""

from __future__ import annotations

import os
import socket
import stat
from typing import TYPE_CHECKING

import pytest
import trio

import l4proxy

from .conftest import connect_to, receive_exactly, serve_in, start_backend

if TYPE_CHECKING:
    from pathlib import Path

WAIT = 10


@pytest.fixture(params=["close", "cancel"])
def stop(request: pytest.FixtureRequest) -> str:
    """How the proxy stops: ``close()`` (and ``serve`` returns), or ``serve`` cancelled."""
    return request.param  # type: ignore[no-any-return]


def _proxy(path: str, backend: str) -> l4proxy.Proxy:
    return l4proxy.Proxy(
        l4proxy.Config(
            listeners=[l4proxy.ListenerConfig(listen=[f"unix:{path}"], backends=[backend])]
        )
    )


async def _stop(proxy: l4proxy.Proxy, serving: trio.Nursery, served: trio.Event, how: str) -> None:
    if how == "close":
        proxy.close()
        await served.wait()
    else:
        serving.cancel_scope.cancel()


async def test_closing_removes_its_own_socket_file(tmp_path: Path, stop: str) -> None:
    path = str(tmp_path / "proxy.sock")
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            backend = await start_backend(nursery)
            proxy = _proxy(path, backend)
            async with trio.open_nursery() as serving:
                bound, served = await serve_in(serving, proxy)
                assert stat.S_ISSOCK(os.lstat(path).st_mode)
                async with await connect_to(bound[0]) as client:  # it is the proxy's
                    await client.send_all(b"ping")
                    assert await receive_exactly(client, 4) == b"ping"
                await _stop(proxy, serving, served, stop)
            with pytest.raises(FileNotFoundError):  # removed
                os.lstat(path)
            nursery.cancel_scope.cancel()


async def test_closing_leaves_a_socket_file_someone_else_bound_since(
    tmp_path: Path, stop: str
) -> None:
    """Another process removed the proxy's file and bound its own socket at the path
    (a second instance starting, say): stopping the proxy must not remove it."""
    path = str(tmp_path / "proxy.sock")
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            backend = await start_backend(nursery)
            proxy = _proxy(path, backend)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
                async with trio.open_nursery() as serving:
                    _, served = await serve_in(serving, proxy)
                    os.unlink(path)
                    other.bind(path)
                    other.listen()
                    theirs = os.lstat(path).st_ino
                    await _stop(proxy, serving, served, stop)
                assert os.lstat(path).st_ino == theirs  # still there, still theirs
                async with await trio.open_unix_socket(path):  # and it still reaches them
                    pass
            nursery.cancel_scope.cancel()
