"""Shared helpers: loopback backends and an in-process proxy, all on port 0."""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from functools import partial

import pytest
import trio

import l4proxy
import l4proxy.connect
import l4proxy.pipeline
import l4proxy.splice

Handler = Callable[[trio.SocketStream], Awaitable[None]]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The command's main() configures logging as a command should (a handler on this
    test's captured stderr): undo it, so later tests do not log to a closed stream."""
    loggers = [logging.getLogger(name) for name in ("l4proxy", "l4proxy.access")]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    yield
    for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


async def echo(stream: trio.abc.Stream) -> None:
    """Echo until EOF, then half-close back (so half-close is visible end to end)."""
    async with stream:
        try:
            async for data in stream:
                await stream.send_all(data)
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
        except trio.BrokenResourceError:
            pass


def identify(name: bytes) -> Handler:
    """A backend that greets with its name, then echoes: tells which backend was picked."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await stream.send_all(name + b"\n")
        except trio.BrokenResourceError:
            await stream.aclose()
            return
        await echo(stream)

    return handler


async def start_backend(
    nursery: trio.Nursery, handler: Handler = echo, host: str = "127.0.0.1"
) -> str:
    """Serve ``handler`` on ``host`` port 0; return the address as the proxy spells it."""
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=host))
    host, port = listeners[0].socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_proxy(
    nursery: trio.Nursery,
    backends: Sequence[str],
    *,
    listen: Sequence[str] = ("127.0.0.1:0",),
    connect: l4proxy.Connector | None = None,
    **settings: object,
) -> tuple[l4proxy.Proxy, list[l4proxy.BoundAddress]]:
    """Run a one-listener proxy in ``nursery``; return it and its bound addresses."""
    config = l4proxy.Config(
        listeners=[l4proxy.ListenerConfig(listen=list(listen), backends=list(backends), **settings)]  # type: ignore[arg-type]
    )
    proxy = l4proxy.Proxy(config, connect=connect)
    bound = await nursery.start(proxy.serve)
    return proxy, bound


async def read_line(stream: trio.abc.ReceiveStream) -> bytes:
    """One line (an ``identify`` greeting), its newline included; EOF first fails."""
    line = bytearray()
    while not line.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            raise AssertionError(f"EOF after {bytes(line)!r}")
        line += chunk
    return bytes(line)


async def serve_in(
    nursery: trio.Nursery, proxy: l4proxy.Proxy
) -> tuple[list[l4proxy.BoundAddress], trio.Event]:
    """Run ``proxy.serve`` in ``nursery``; return its bound addresses and an event set
    when ``serve`` has returned (after ``close()`` and the drain)."""
    served = trio.Event()

    async def serve(task_status: trio.TaskStatus[list[l4proxy.BoundAddress]]) -> None:
        await proxy.serve(task_status=task_status)
        served.set()

    bound: list[l4proxy.BoundAddress] = await nursery.start(serve)
    return bound, served


async def connect_to(bound: l4proxy.BoundAddress) -> trio.SocketStream:
    address = bound.address
    if isinstance(address, l4proxy.UnixAddress):
        return await trio.open_unix_socket(address.path)
    assert address.host is not None
    return await trio.open_tcp_stream(address.host, address.port)


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    async for chunk in stream:
        data += chunk
    return bytes(data)


def refused_port() -> int:
    """A loopback port nobody listens on (bound then closed: connects are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


class AccessWatcher(logging.Handler):
    """Collects access records from the ``l4proxy.access`` logger; lets tests await them."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[l4proxy.AccessRecord] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.access)  # type: ignore[attr-defined]
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, count: int = 1) -> list[l4proxy.AccessRecord]:
        """Wait until ``count`` records arrived (the caller bounds the wait)."""
        while len(self.records) < count:
            await self._changed.wait()
        return self.records

    @property
    def outcomes(self) -> list[str]:
        return [record.outcome for record in self.records]


@pytest.fixture
def access() -> Iterator[AccessWatcher]:
    """Access records of listeners without an ``access_log`` file."""
    watcher = AccessWatcher()
    logger = logging.getLogger("l4proxy.access")
    level = logger.level
    logger.addHandler(watcher)
    logger.setLevel(logging.INFO)
    try:
        yield watcher
    finally:
        logger.removeHandler(watcher)
        logger.setLevel(level)


from .tlsfixtures import pki  # noqa: E402, F401  (a session fixture for every module)


@pytest.fixture(params=["core", "streams", "copy", "loop"])
def pump_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each way of moving bytes: the data core splicing raw sockets (plain listener,
    IP-literal or Unix backends); the core taking over trio socket streams (backends
    dialled as if they were host names); the core copying (no splice: recv/send, as
    for TLS); and the generic copy loop over trio streams (what embedders' own streams
    get)."""
    if request.param == "copy":
        monkeypatch.setattr(l4proxy.splice, "AVAILABLE", False)
    else:
        assert l4proxy.splice.AVAILABLE, "this kernel/Python has no os.splice"
    if request.param == "streams":
        monkeypatch.setattr(l4proxy.connect, "socket_address", lambda address: None)
    if request.param == "loop":
        monkeypatch.setattr(l4proxy.pipeline, "_for_core", lambda connection, core: False)
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(params=["core", "loop"])
def tls_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The two byte movers of TLS connections (termination, passthrough, backend TLS):
    the data core (pyOpenSSL driven on the sockets in callbacks) and the generic copy
    loop over the TLS streams."""
    if request.param == "loop":
        monkeypatch.setattr(l4proxy.pipeline, "_for_core", lambda connection, core: False)
    return request.param  # type: ignore[no-any-return]
