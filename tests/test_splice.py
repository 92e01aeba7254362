"""Splicing's edge cases, on real loopback sockets spliced by a data core's link."""

from __future__ import annotations

import fcntl
import itertools
import os
import socket
from typing import TYPE_CHECKING

import trio

from l4proxy import links, splice
from l4proxy.core import Core, Link
from l4proxy.record import Transfer

if TYPE_CHECKING:
    from pathlib import Path

    import pytest


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    for sock in (near, far):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return near, far


async def _drain(sock: socket.socket, total: int) -> int:
    got = 0
    while got < total:
        await trio.lowlevel.wait_readable(sock)
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        got += len(chunk)
    return got


def _start_link(
    nursery: trio.Nursery, client: socket.socket, backend: socket.socket, pool: splice.PipePool
) -> Link:
    """A core in ``nursery`` splicing between ``client`` and ``backend`` (it owns them),
    from the first byte on and whatever the sizes (the tests set ``COPY_BELOW`` to 0)."""
    core = Core(nursery)
    nursery.start_soon(core.run)
    link = Link(client, backend, Transfer(), pool, 0.0, lambda link: None)
    link.up.splices = link.down.splices = True
    assert core.add(link)
    return link


async def test_short_reads_with_bytes_left_are_followed_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thousands of tiny segments fill the pipe's slots before its bytes: a splice read
    comes back short with data still queued. The direction then waits for readability
    first, which (level-triggered) returns at once: every byte still arrives."""
    client, proxy_client = _tcp_pair()
    proxy_backend, backend = _tcp_pair()
    pages = tmp_path / "pages.bin"
    pages.write_bytes(b"y" * 4096 * 3000)
    sent = 0
    with open(pages, "rb") as source:  # noqa: ASYNC230 - a local file, before any task runs
        for index in range(3000):  # one small segment per page: no coalescing
            sent += os.sendfile(client.fileno(), source.fileno(), index * 4096, 17)
    with trio.fail_after(5):
        while _queued(proxy_client.fileno()) < sent:  # noqa: ASYNC110 - the kernel's queue
            await trio.sleep(0.01)
    short_with_bytes_left = 0
    real_splice = os.splice

    def watching_splice(src: int, dst: int, count: int, *args: object, **kwargs: object) -> int:
        nonlocal short_with_bytes_left
        moved = real_splice(src, dst, count, *args, **kwargs)  # type: ignore[arg-type]
        if src == proxy_client.fileno() and 0 < moved < count:
            short_with_bytes_left += bool(_queued(src))
        return moved

    monkeypatch.setattr(os, "splice", watching_splice)
    monkeypatch.setattr(links, "COPY_BELOW", 0)
    for sock in (proxy_client, proxy_backend, backend):
        sock.setblocking(False)
    try:
        async with trio.open_nursery() as nursery:
            _start_link(nursery, proxy_client, proxy_backend, splice.PipePool())
            with trio.fail_after(5):
                assert await _drain(backend, sent) == sent
            assert short_with_bytes_left  # the case under test did happen
            nursery.cancel_scope.cancel()
    finally:
        client.close()
        backend.close()


def _queued(fd: int) -> int:
    import termios

    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), "little")


async def test_a_pipe_the_kernel_would_not_grow_still_moves_bulk_without_waiting_per_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past fs.pipe-user-pages-soft the kernel refuses F_SETPIPE_SZ: the pipe keeps its
    default 64 KiB, and a full 64 KiB read is a full read, not a short one."""
    real_fcntl = fcntl.fcntl

    def refusing_fcntl(fd: int, command: int, arg: int = 0) -> int:
        if command == fcntl.F_SETPIPE_SZ:
            raise PermissionError(1, "Operation not permitted")
        return real_fcntl(fd, command, arg)

    monkeypatch.setattr(splice.fcntl, "fcntl", refusing_fcntl)
    pool = splice.PipePool()
    pipe = pool.acquire()
    assert pipe[2] == 65536
    pool.release(pipe, empty=True)

    client, proxy_client = _tcp_pair()
    proxy_backend, backend = _tcp_pair()
    for sock in (client, proxy_client, proxy_backend, backend):
        sock.setblocking(False)
    steps: list[int] = []  # bytes of each splice from the client's socket; 0 a wake-up
    real_wait, real_splice = trio.lowlevel.wait_readable, os.splice

    async def noting_wait(fd: object) -> None:
        steps.append(0)
        await real_wait(fd)  # type: ignore[arg-type]

    def noting_splice(src: int, dst: int, count: int, *args: object, **kwargs: object) -> int:
        moved = real_splice(src, dst, count, *args, **kwargs)  # type: ignore[arg-type]
        if src == proxy_client.fileno():
            steps.append(moved)
        return moved

    monkeypatch.setattr(trio.lowlevel, "wait_readable", noting_wait)
    monkeypatch.setattr(os, "splice", noting_splice)
    monkeypatch.setattr(links, "COPY_BELOW", 0)
    total = 16 << 20

    async def send_all() -> None:
        data = memoryview(b"z" * total)
        while data:
            try:
                data = data[client.send(data) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(client)

    try:
        async with trio.open_nursery() as nursery:
            _start_link(nursery, proxy_client, proxy_backend, pool)
            nursery.start_soon(send_all)
            with trio.fail_after(10):
                assert await _drain(backend, total) == total
            nursery.cancel_scope.cancel()
    finally:
        client.close()
        backend.close()
        pool.close()
    # A full 64 KiB read is followed by another read in the same wake-up, not a wait.
    assert any(a == 65536 and b > 0 for a, b in itertools.pairwise(steps))
