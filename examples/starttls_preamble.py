"""A preamble of your own: a toy line protocol with STARTTLS, behind SNI routing.

The protocol: the server greets ``READY``; a client that sends ``STARTTLS`` gets ``GO``
and starts TLS; ``PING`` gets ``PONG``; anything else is refused. After TLS the proxy
routes on the SNI and the backend sees only what the client sends inside TLS.

:class:`ToyDialogue` is all a protocol needs: a sans-IO state machine with three
methods (``receive_client``, ``receive_backend``, ``next_event``); the proxy performs
its events. ``TOY`` is the ``Preamble`` you put in the listener's config, in code.

Run it from the repository root (it makes a throw-away CA with ``trustme``, installed
with the test extra)::

    .venv/bin/python examples/starttls_preamble.py

Everything binds to 127.0.0.1 with port 0.
"""

from __future__ import annotations

import ssl
import sys
import tempfile
from functools import partial
from pathlib import Path

import trio
import trustme

import l4proxy
from l4proxy.protocols.dialogue import (
    Close,
    ConnectBackend,
    DialogueSettings,
    Done,
    Event,
    NeedClientData,
    SendToClient,
    StartClientTLS,
)
from l4proxy.record import Outcome

LINE_LIMIT = 100


class ToyDialogue:
    """One connection of the toy protocol: cleartext lines until STARTTLS, then TLS."""

    def __init__(self, settings: DialogueSettings) -> None:
        self._buffer = bytearray()
        self._closed = False
        self._in_tls = False
        # Events waiting to be handed out, oldest first: the greeting comes first.
        self._pending: list[Event] = [SendToClient(f"READY {settings.server_name}\n".encode())]

    def receive_client(self, data: bytes) -> None:
        self._closed = not data
        self._buffer += data

    def receive_backend(self, data: bytes) -> None:
        pass  # this protocol never asks for backend data

    def next_event(self) -> Event:
        if self._pending:
            return self._pending.pop(0)
        if self._in_tls:  # the driver has terminated TLS: connect, then move bytes
            self._pending.append(Done())
            return ConnectBackend()
        line, newline, rest = bytes(self._buffer).partition(b"\n")
        if not newline:
            if len(self._buffer) > LINE_LIMIT:
                return Close(Outcome.BAD_PREAMBLE, "line too long")
            if self._closed:
                return Close(Outcome.QUIT, "client closed before STARTTLS")
            return NeedClientData()
        self._buffer = bytearray(rest)
        command = line.strip().upper()
        if command == b"PING":
            return SendToClient(b"PONG\n")
        if command != b"STARTTLS":
            return SendToClient(b"ERR say STARTTLS first\n")
        if rest:  # cleartext pipelined after STARTTLS must never reach TLS or a backend
            return Close(Outcome.BAD_PREAMBLE, "bytes pipelined after STARTTLS")
        self._in_tls = True
        self._pending.append(StartClientTLS())
        return SendToClient(b"GO\n")


class ToyPreamble:
    """The ``Preamble``: a name for the access log, a new dialogue per connection."""

    name = "toy"

    def __call__(self, settings: DialogueSettings) -> ToyDialogue:
        return ToyDialogue(settings)


TOY = ToyPreamble()


async def backend(stream: trio.SocketStream) -> None:
    """Says which backend it is, then echoes."""
    async with stream:
        data = await stream.receive_some()
        await stream.send_all(b"backend got " + data)


async def main() -> None:
    ca = trustme.CA()
    certificate = ca.issue_cert("toy.example")
    with tempfile.TemporaryDirectory() as directory:
        pem = Path(directory, "toy.pem")
        certificate.private_key_and_cert_chain_pem.write_to_path(str(pem))
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, backend, 0, host="127.0.0.1"))
            backend_port = listeners[0].socket.getsockname()[1]
            config = l4proxy.Config(
                listeners=[
                    l4proxy.ListenerConfig(
                        listen=["127.0.0.1:0"],
                        backends=[f"127.0.0.1:{backend_port}"],
                        tls=l4proxy.TLSConfig(certs=[l4proxy.CertKey(cert=str(pem))]),
                        preamble=TOY,
                    )
                ]
            )
            proxy = l4proxy.Proxy(config)
            bound = await nursery.start(proxy.serve)
            address = bound[0].address
            stream = await trio.open_tcp_stream(address.host, address.port)
            print("greeting:", (await stream.receive_some()).decode().strip())
            await stream.send_all(b"STARTTLS\n")
            print("reply:", (await stream.receive_some()).decode().strip())
            context = ssl.create_default_context()
            ca.configure_trust(context)
            tls = trio.SSLStream(stream, context, server_hostname="toy.example")
            await tls.send_all(b"hello inside TLS")
            print("through the proxy:", (await tls.receive_some()).decode())
            await tls.aclose()
            nursery.cancel_scope.cancel()  # the proxy and the backend server


if __name__ == "__main__":
    trio.run(main)
    sys.exit(0)
