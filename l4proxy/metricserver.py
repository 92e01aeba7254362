"""The metrics endpoint: a tiny HTTP/1.1 responder on trio for ``/metrics``,
``/healthz`` and ``/readyz`` (issue #11, docs/metrics.md).

It serves one request per connection and closes it (``Connection: close``): a scrape
every few seconds gains nothing from keep-alive, and one request per connection keeps
the responder a dozen lines of parsing with hard limits, in the manner of h11:

* the request head may be at most :data:`MAX_HEAD` bytes (else ``431``), the body is
  never read (GET and HEAD have none that matters here);
* the whole exchange, reading the request and writing the answer, has
  :data:`EXCHANGE_SECONDS`; a client that is slower is dropped;
* at most :data:`MAX_CLIENTS` exchanges run at once; a connection beyond that is
  closed unanswered;
* whatever one connection does (garbage, a reset, a stall) ends that connection only:
  the handler contains every error but ``Cancelled``.

The answers come from an :class:`Endpoint` (:class:`~l4proxy.metrics.Metrics`): the
exposition text is built on the trio thread, from state only the trio thread changes,
so it is consistent and needs no lock; it is small (a few families per listener), so
building it does not hold up the connections for long.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

import trio

from .addresses import TCPAddress
from .errors import ListenError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "EXCHANGE_SECONDS",
    "MAX_CLIENTS",
    "MAX_HEAD",
    "BadRequest",
    "Endpoint",
    "EndpointServer",
    "answer",
    "bind_endpoint",
    "parse_request",
    "serve_endpoint",
]

LOGGER = logging.getLogger("l4proxy.metrics")

#: The longest request head (request line and headers) read, in bytes.
MAX_HEAD = 8192
#: Seconds for one whole exchange: the request read and the answer written.
EXCHANGE_SECONDS = 10.0
#: Exchanges served at once; more connections are closed unanswered.
MAX_CLIENTS = 32
#: After answering, at most this much of what the client sends more is read and dropped.
DRAIN_BYTES = 65536

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
_TEXT = "text/plain; charset=utf-8"


class Endpoint(Protocol):
    """What the responder asks of the proxy's metrics."""

    def exposition(self) -> tuple[bytes, str]:
        """The ``/metrics`` body and its content type."""
        ...

    def ready(self) -> bool:
        """Whether ``/readyz`` answers 200: listeners bound and not draining."""
        ...


class BadRequest(Exception):
    """A request head that is not HTTP/1.x; ``status`` is the answer to give."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def parse_request(head: bytes) -> tuple[str, str]:
    """The method and path (query dropped) of a request head, sans-IO.

    Example:
        >>> parse_request(b"GET /metrics?x=1 HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
        ('GET', '/metrics')

    Raises:
        BadRequest: the request line is not ``METHOD TARGET HTTP/1.x``.
    """
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[0].isalpha():
        raise BadRequest(400, "expected a request line METHOD TARGET HTTP/1.x")
    method, target = parts[0].decode("ascii"), parts[1].decode("latin-1")
    path = target.split("?", 1)[0]
    if not path.startswith("/"):
        raise BadRequest(400, "expected a path starting with /")
    return method, path


def answer(method: str, path: str, endpoint: Endpoint) -> bytes:
    """The whole response to a parsed request (HEAD: the headers GET would get)."""
    if method not in ("GET", "HEAD"):
        return _response(405, b"only GET and HEAD\n", extra="Allow: GET, HEAD\r\n")
    if path == "/metrics":
        body, content_type = endpoint.exposition()
        response = _response(200, body, content_type)
    elif path == "/healthz":
        response = _response(200, b"ok\n")
    elif path == "/readyz":
        response = _response(200, b"ready\n") if endpoint.ready() else _response(503, b"draining\n")
    else:
        response = _response(404, b"not found: try /metrics, /healthz or /readyz\n")
    if method == "HEAD":
        return response[: response.index(b"\r\n\r\n") + 4]
    return response


def _response(status: int, body: bytes, content_type: str = _TEXT, *, extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


async def bind_endpoint(address: TCPAddress) -> list[trio.SocketListener]:
    """Listening sockets for ``address`` (``:PORT``: every interface, IPv4 and IPv6).

    Error handling:
        Raises :class:`~l4proxy.errors.ListenError` naming the address, as a
        listener's bind failure does (the command exits 1).
    """
    try:
        return await trio.open_tcp_listeners(address.port, host=address.host)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise ListenError(f"cannot serve metrics on {address}: {reason}") from exc


def bound_addresses(listeners: Sequence[trio.SocketListener]) -> tuple[TCPAddress, ...]:
    """The addresses ``listeners`` are bound to (port 0 resolved)."""
    result = []
    for listener in listeners:
        host, port = listener.socket.getsockname()[:2]
        result.append(TCPAddress(host, port))
    return tuple(result)


async def serve_endpoint(listeners: list[trio.SocketListener], endpoint: Endpoint) -> None:
    """Answer requests on ``listeners`` until cancelled.

    Resource handling:
        Closes ``listeners`` when it ends, however it ends.
    """
    active = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal active
        if active >= MAX_CLIENTS:
            await trio.aclose_forcefully(stream)
            return
        active += 1
        try:
            await _exchange(stream, endpoint)
        finally:
            active -= 1

    try:
        for address in bound_addresses(listeners):
            host = f"[{address.host}]" if address.host and ":" in address.host else address.host
            LOGGER.info("serving metrics on http://%s:%d/metrics", host, address.port)
        await trio.serve_listeners(handle, listeners)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


class EndpointServer:
    """The endpoint's sockets over a proxy's life: bound at start, moved by a reload.

    :meth:`bind` binds before the proxy reports itself started (a failure fails the
    start); :meth:`run` serves until cancelled; :meth:`move` (a reload) binds the new
    address first and only then closes the old sockets, so scrapes keep an answer;
    a new address that cannot be bound is logged and the old endpoint stays (the next
    reload tries again), as for a listener a reload cannot bind.

    Attributes:
        addresses: the bound addresses while :meth:`run` runs (port 0 resolved).
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self.addresses: tuple[TCPAddress, ...] = ()
        self._wanted: TCPAddress | None = None  # the address the sockets were bound for
        self._listeners: list[trio.SocketListener] = []
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    async def bind(self, address: TCPAddress | None) -> None:
        """Bind ``address`` (nothing for ``None``) for :meth:`run`.

        Error handling:
            Raises :class:`~l4proxy.errors.ListenError` naming the address.
        """
        if address is not None:
            self._use(address, await bind_endpoint(address))

    async def run(self) -> None:
        """Serve what :meth:`bind` and later :meth:`move` bound, until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._start()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._stop()
            self._wanted = None

    async def move(self, address: TCPAddress | None) -> None:
        """Serve on ``address`` from now on (a reload); nothing if it is unchanged or
        :meth:`run` is not running (``serve`` binds the configured address itself)."""
        if self._nursery is None or address == self._wanted:
            return
        if address is None:
            self._stop()
            self._wanted = None
            return
        try:
            listeners = await bind_endpoint(address)
        except ListenError as exc:
            if self._wanted is None or self._wanted.port != address.port or not address.port:
                LOGGER.error("%s; %s", exc, self._kept())
                return
            # The same port on another host (127.0.0.1 to every interface, say): the
            # old sockets hold it, so they must go first.
            listeners = await self._replace_on_same_port(address)
            if not listeners:
                return
        self._stop()
        self._use(address, listeners)
        self._start()

    async def _replace_on_same_port(self, address: TCPAddress) -> list[trio.SocketListener]:
        old = self._wanted
        assert old is not None
        self._stop()
        try:
            return await bind_endpoint(address)
        except ListenError as exc:
            LOGGER.error("%s", exc)
        # Put the old endpoint back (it was bound a moment ago, so this should work).
        try:
            self._use(old, await bind_endpoint(old))
        except ListenError as exc:
            self._wanted = old  # retried by the next reload that changes it
            LOGGER.error("%s; the metrics endpoint is down until a reload moves it", exc)
        else:
            LOGGER.error("%s", self._kept())
            self._start()
        return []

    def _kept(self) -> str:
        where = ", ".join(str(address) for address in self.addresses) or "nowhere"
        return f"the metrics endpoint stays on {where}"

    def _use(self, address: TCPAddress, listeners: list[trio.SocketListener]) -> None:
        self._wanted = address
        self._listeners = listeners
        self.addresses = bound_addresses(listeners)

    def _start(self) -> None:
        if self._nursery is None or not self._listeners:
            return
        scope = trio.CancelScope()
        self._scope = scope
        self._nursery.start_soon(self._serve, self._listeners, scope)

    async def _serve(self, listeners: list[trio.SocketListener], scope: trio.CancelScope) -> None:
        with scope:
            await serve_endpoint(listeners, self._endpoint)

    def _stop(self) -> None:
        """Stop serving and close the sockets now (the port is free on return)."""
        if self._scope is not None:
            self._scope.cancel()  # first: the accept waits end cancelled, not closed
            self._scope = None
        for listener in self._listeners:
            listener.socket.close()
        self._listeners = []
        self.addresses = ()


async def _exchange(stream: trio.SocketStream, endpoint: Endpoint) -> None:
    """One request and its answer; every failure costs this connection only."""
    try:
        with trio.move_on_after(EXCHANGE_SECONDS):
            try:
                head = await _read_head(stream)
                if head is None:
                    return  # closed (or reset) before a whole request: nothing to answer
                method, path = parse_request(head)
                response = answer(method, path, endpoint)
            except BadRequest as exc:
                response = _response(exc.status, f"{exc}\n".encode())
            await stream.send_all(response)
            # Closing with unread bytes would reset the connection, and a reset can
            # destroy the answer before the client reads it: end our side, then let
            # the client close first (a bounded amount read, within the deadline).
            await stream.send_eof()
            unread = DRAIN_BYTES
            while unread > 0:
                chunk = await stream.receive_some(unread)
                if not chunk:
                    break
                unread -= len(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the client went away: its scrape is lost, nothing else
    except Exception:  # never let one scrape end the endpoint (or the proxy)
        LOGGER.exception("metrics request failed")
    finally:
        await trio.aclose_forcefully(stream)


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request head up to its blank line; ``None`` at EOF before one.

    Raises:
        BadRequest: 431 when the head exceeds :data:`MAX_HEAD`.
    """
    data = bytearray()
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) >= MAX_HEAD:
            raise BadRequest(431, f"request head over {MAX_HEAD} bytes")
        chunk = await stream.receive_some(MAX_HEAD - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)
