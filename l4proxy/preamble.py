"""The preamble steps: a listener's dialogue (:mod:`l4proxy.protocols.dialogue`) driven
over the connection's two ends.

Step 3, :func:`client_preamble`, runs the dialogue with the client until it asks for a
backend: on the way, the cleartext start (SSLRequest, STARTTLS), steps 4-6 when it asks
for TLS (ClientHello, route by SNI, termination: :func:`~l4proxy.tlsfront.tls_front`)
and whatever it reads once TLS is up, all under the listener's ``handshake_timeout``.
Step 8, :func:`backend_preamble`, runs it on after the connect (the backend's greeting,
STARTTLS or SSLRequest towards the backend with its TLS, the session's first exchange)
until it hands over to the data phase, under a deadline of the same length.

The dialogue decides; this module only performs its events, so a protocol is a sans-IO
class and nothing here knows PostgreSQL or SMTP.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import trio

from .balancing import BackendPool
from .connect import Target, target
from .connection import underlying_socket
from .errors import L4ProxyError
from .protocols.dialogue import (
    RECEIVE_SIZE,
    Close,
    ConnectBackend,
    ConnectSessionOwner,
    Done,
    NeedBackendData,
    NeedClientData,
    SendToBackend,
    SendToClient,
    SessionKey,
    StartBackendTLS,
    StartClientTLS,
)
from .record import Ended, Outcome
from .routing import Route
from .tlsfront import secure_backend, tls_front

if TYPE_CHECKING:
    from .connection import Connection
    from .protocols.dialogue import Dialogue, Event


async def client_preamble(
    connection: Connection,
) -> tuple[Dialogue, Route[BackendPool[Target]] | None]:
    """Step 3 (with 4-6 inside): the dialogue up to its connect; the route to take.

    The route is the one SNI chose once TLS started, the listener's default pool for a
    session that stays in cleartext (``None`` if it has none), or, for a connection
    that names a live session's key, a pool of that session's backend alone.
    """
    runtime = connection.runtime
    assert runtime.preamble is not None
    dialogue = runtime.preamble(runtime.dialogue_settings)
    seconds = runtime.config.handshake_timeout
    with trio.move_on_after(seconds):
        event = await converse(connection, dialogue)
        route = runtime.default_route
        if type(event) is StartClientTLS:
            route = await tls_front(connection, event)
            event = await converse(connection, dialogue)
        if type(event) is ConnectBackend:
            return dialogue, route
        if type(event) is ConnectSessionOwner:
            return dialogue, _owner_route(connection, event.key)
        raise _misbehaving(dialogue, event, "before connecting")
    raise Ended(
        Outcome.HANDSHAKE_TIMEOUT,
        f"{runtime.preamble.name} preamble, ClientHello and handshake not done within {seconds:g}s",
    )


async def backend_preamble(connection: Connection, dialogue: Dialogue) -> None:
    """Step 8 for a listener with a preamble: the dialogue from the connect to its hand-over."""
    runtime = connection.runtime
    seconds = runtime.config.handshake_timeout
    backend_tls = runtime.backend_tls
    secured = False
    with trio.move_on_after(seconds):
        while True:
            event = await converse(connection, dialogue)
            if type(event) is Done:
                if backend_tls is not None and not secured:
                    raise _misbehaving(dialogue, event, "without asking for backend TLS")
                return
            if type(event) is not StartBackendTLS or backend_tls is None or secured:
                raise _misbehaving(dialogue, event, "after connecting")
            await secure_backend(connection, backend_tls)
            secured = True
    raise Ended(
        Outcome.HANDSHAKE_TIMEOUT,
        f"{dialogue_name(connection)} preamble after the connect not done within {seconds:g}s",
    )


async def converse(connection: Connection, dialogue: Dialogue) -> Event:
    """Perform the dialogue's sends, receives and session keys; return the first event
    that is a step of the pipeline's (TLS, connect, hand-over). A :class:`Close` ends
    the connection with its outcome."""
    record = connection.record
    while True:
        event = dialogue.next_event()
        if type(event) is SendToClient:
            await connection.client_stream().send_all(event.data)
            record.to_client += len(event.data)
        elif type(event) is NeedClientData:
            dialogue.receive_client(
                bytes(await connection.client_stream().receive_some(RECEIVE_SIZE))
            )
        elif type(event) is SendToBackend:
            await connection.backend_stream().send_all(event.data)
            record.to_backend += len(event.data)
        elif type(event) is NeedBackendData:
            dialogue.receive_backend(
                bytes(await connection.backend_stream().receive_some(RECEIVE_SIZE))
            )
        elif type(event) is SessionKey:
            if connection.session_key is not None:
                connection.shared.sessions.discard(connection.session_key, connection)
            connection.session_key = event.key
            connection.session_peer = backend_peer(connection.backend)
            connection.shared.sessions.register(event.key, connection)
        elif type(event) is Close:
            raise Ended(event.outcome, event.reason)
        else:
            return event


def _owner_route(connection: Connection, key: bytes) -> Route[BackendPool[Target]]:
    """A pool of one: the backend of the live session that announced ``key``."""
    owner = connection.shared.sessions.owner(key)
    if owner is None or owner.record.backend is None:
        raise Ended(Outcome.CANCEL_UNKNOWN, "no live session has this key")
    connection.record.route = owner.record.route
    found = target(owner.record.backend)
    if found.sockaddr is None and owner.session_peer is not None:
        # A host name: resolving it again might give another server of the same name.
        found = Target(found.address, *owner.session_peer)
    return Route(owner.record.route or "default", BackendPool((found,)))


def backend_peer(backend: object) -> tuple[int, tuple[str, int]] | None:
    """The TCP address ``backend`` is connected to (family, (host, port)); ``None`` for
    anything else (Unix sockets, an embedder's streams)."""
    sock = underlying_socket(backend)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        peer = sock.getpeername()
    except OSError:
        return None
    return sock.family, (peer[0], peer[1])


def dialogue_name(connection: Connection) -> str:
    preamble = connection.runtime.preamble
    return preamble.name if preamble is not None else "-"


def _misbehaving(dialogue: Dialogue, event: Event, when: str) -> L4ProxyError:
    """A dialogue broke the driver's contract: a bug of the protocol's, ``error:proxy``."""
    return L4ProxyError(
        f"preamble {type(dialogue).__name__} asked for {type(event).__name__} {when}"
    )
