"""One active health check of one backend: what it does on the wire, and why it failed.

A check does what the data path does before the first client byte, and no more:

1. **connect** as connections do (:func:`~l4proxy.connect.dial`: the embedder's
   connector if the proxy has one, else a raw socket to an IP address or a Unix path,
   from ``source_address`` if set, or a host name resolved off the event loop); a
   check that only connects closes that socket at once, without making a stream;
2. the **PROXY header** if the listener sends one, saying "a health check, not a
   client": version 2's ``LOCAL`` command, version 1's ``UNKNOWN`` (the PROXY
   protocol spec, section 2.1 and 2.2), so a backend that insists on the header does not
   drop the check;
3. the **TLS handshake** if the listener has ``backend_tls``, with the listener's own
   backend context, the certificate and its name verified as for a connection (not
   for a listener with a ``preamble``: there the backend's TLS starts inside its
   protocol, after STARTTLS or SSLRequest, so the check stops at the connect and
   ``send``/``expect``, e.g. ``expect = "220"`` for an SMTP greeting);
4. ``send``, then ``expect``: the reply must start with those bytes (read until that
   many arrived, so a reply split over segments still matches; a different first
   byte fails at once).

All of it under one deadline, the check's ``timeout``. Every socket is trio's, so a
check never blocks the event loop; it is closed on every path, without waiting for
the peer (``aclose_forcefully``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import trio

from .addresses import TCPAddress
from .connect import describe_os_error, dial
from .protocols.proxyheader import Command, encode_v2
from .tls import TLSStream

if TYPE_CHECKING:
    from .connect import Connector, Target
    from .tls import BackendTLS

__all__ = ["Probe", "probe"]

#: PROXY headers that say "no client: the proxy's own connection" (a health check).
LOCAL_HEADERS = {"v1": b"PROXY UNKNOWN\r\n", "v2": encode_v2(None, None, command=Command.LOCAL)}


@attrs.frozen
class Probe:
    """What one check of one backend does. Equal probes are one check: a backend
    listed in several pools (or listeners with the same settings) is checked once.

    Attributes:
        target: the backend, as the pools know it.
        seconds: the deadline of the whole check.
        send, expect: the bytes to send and to expect (empty: none).
        source: ``source_address``, for TCP.
        proxy_protocol: ``"v1"``/``"v2"`` when the listener sends PROXY headers.
        tls: ``(backend_ca, backend_sni)`` when the listener re-encrypts, else ``None``.
    """

    target: Target
    seconds: float
    send: bytes = b""
    expect: bytes = b""
    source: str | None = None
    proxy_protocol: str | None = None
    tls: tuple[str | None, str | None] | None = None


async def probe(
    check: Probe, connect: Connector | None, backend_tls: BackendTLS | None
) -> str | None:
    """Run one check: ``None`` if it passed, else why not (``connection refused``,
    ``timed out after 0.5s``, ``TLS handshake failed: ...``, ``expected '+PONG', got
    '-ERR'``).

    Error handling:
        Failures of the backend (``OSError``, a broken stream, a timeout) are the
        result, not raised. ``Cancelled`` passes (a reload removed the backend, or the
        proxy stopped).
    """
    with trio.move_on_after(check.seconds):
        try:
            return await _run(check, connect, backend_tls)
        except OSError as exc:
            return describe_os_error(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return f"connection lost: {exc}" if str(exc) else "connection lost"
    return f"timed out after {check.seconds:g}s"


async def _run(
    check: Probe, connect: Connector | None, backend_tls: BackendTLS | None
) -> str | None:
    dialed = await dial(check.target, connect, check.seconds, check.source)
    if isinstance(dialed, trio.abc.Stream):
        stream = dialed
    elif check.proxy_protocol is None and backend_tls is None and not check.send + check.expect:
        dialed.close()  # connected: that was the whole check
        return None
    else:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(dialed))
    try:
        if check.proxy_protocol is not None:
            await stream.send_all(LOCAL_HEADERS[check.proxy_protocol])
        if backend_tls is not None:
            stream, problem = await _handshake(stream, check.target, backend_tls)
            if problem is not None:
                return problem
        if check.send:
            await stream.send_all(check.send)
        if check.expect:
            return await _expect(stream, check.expect)
        return None
    finally:
        await trio.aclose_forcefully(stream)


async def _handshake(
    stream: trio.abc.Stream, target: Target, backend_tls: BackendTLS
) -> tuple[trio.abc.Stream, str | None]:
    """Step 3: the stream to go on with (TLS), and why the handshake failed if it did."""
    address = target.address
    host = address.host if isinstance(address, TCPAddress) else None
    connection, name = backend_tls.connection(host)
    tls = TLSStream(stream, connection)
    try:
        await tls.do_handshake()
        backend_tls.verify(connection, name)
    except trio.BrokenResourceError as exc:
        return tls, f"TLS handshake failed: {exc}"
    return tls, None


async def _expect(stream: trio.abc.Stream, expect: bytes) -> str | None:
    """Step 4's reply: ``None`` if it starts with ``expect``."""
    reply = bytearray()
    while len(reply) < len(expect) and expect.startswith(reply):
        chunk = await stream.receive_some(len(expect) - len(reply))
        if not chunk:
            break
        reply += chunk
    if reply.startswith(expect):
        return None
    wanted = expect.decode(errors="replace")
    if not reply:
        return f"expected {wanted!r}, got nothing (closed)"
    return f"expected {wanted!r}, got {bytes(reply).decode(errors='replace')!r}"
