"""The preamble interface: a protocol's dialogue around TLS, sans-IO (h11-style).

Databases and mail servers speak a cleartext dialogue before TLS starts (PostgreSQL's
SSLRequest, SMTP/IMAP/POP3 STARTTLS), and some need a little more once it has: the
backend's own greeting swallowed, its capability reply filtered, the session's cancel
key noted. A :class:`Dialogue` is that conversation as a state machine: bytes from the
client and from the backend go in (:meth:`Dialogue.receive_client`,
:meth:`Dialogue.receive_backend`), and :meth:`Dialogue.next_event` says what to do
next. The pipeline's preamble steps (:mod:`l4proxy.preamble`) perform each event and
ask again, until :class:`Done` (move bytes both ways) or :class:`Close`.

The driver's contract, which a dialogue may rely on:

* It calls :meth:`~Dialogue.next_event` and performs the event before asking again.
* :class:`NeedClientData` / :class:`NeedBackendData`: it receives what is there (at
  most :data:`RECEIVE_SIZE` bytes, at least one, or ``b""`` at end of stream) and
  passes it on; it reads a side only when asked, so bytes a peer sends early wait in
  the socket.
* :class:`StartClientTLS`: before any backend is connected, it reads the ClientHello
  (``replay`` holds bytes of it the dialogue already took), routes on its SNI,
  terminates TLS, and asks again; from then on client bytes are decrypted ones.
* :class:`ConnectBackend`: connects to the route's pool (the default pool when no TLS
  was started), with failover, once. :class:`ConnectSessionOwner` instead connects to
  the backend of the live connection that announced ``key`` (:class:`SessionKey`); if
  there is none, it ends the connection as ``cancel_unknown`` without a byte.
* :class:`StartBackendTLS`: a verified TLS handshake with the backend (only asked when
  :attr:`DialogueSettings.backend_tls` is set; a dialogue with that setting must ask
  before :class:`Done`).
* :class:`Done`: the data phase starts; the dialogue must have sent on every byte it
  still holds (with :class:`SendToBackend` / :class:`SendToClient`).
* :class:`Close`: the connection ends with that outcome, after the sends before it.
* The whole dialogue runs under the listener's ``handshake_timeout`` (the part before
  the backend connect with the ClientHello and handshake, under one deadline; the
  backend part under another).

A dialogue must never raise: malformed input is a :class:`Close`. It must bound what it
buffers, whatever the peers send (the hypothesis tests feed it arbitrary bytes).
"""

from __future__ import annotations

from typing import Protocol, TypeAlias

import attrs

from l4proxy.record import Outcome  # noqa: TC001 - dialogues build Close(Outcome...) at run time

__all__ = [
    "RECEIVE_SIZE",
    "Close",
    "ConnectBackend",
    "ConnectSessionOwner",
    "Dialogue",
    "DialogueSettings",
    "Done",
    "Event",
    "NeedBackendData",
    "NeedClientData",
    "Preamble",
    "SendToBackend",
    "SendToClient",
    "SessionKey",
    "StartBackendTLS",
    "StartClientTLS",
]

#: The most bytes the driver passes to one ``receive_*`` call.
RECEIVE_SIZE = 16 * 1024


@attrs.frozen
class SendToClient:
    """Send these bytes to the client (in TLS once it has started)."""

    data: bytes


@attrs.frozen
class SendToBackend:
    """Send these bytes to the backend (only after a connect)."""

    data: bytes


@attrs.frozen
class NeedClientData:
    """Receive from the client and call :meth:`Dialogue.receive_client`."""


@attrs.frozen
class NeedBackendData:
    """Receive from the backend and call :meth:`Dialogue.receive_backend`."""


@attrs.frozen
class StartClientTLS:
    """Terminate TLS with the client now (ClientHello, route by SNI, handshake).

    Attributes:
        alpn: the protocols to select when the client offers them (server
            preference), unless the route names its own.
        require_alpn: refuse a ClientHello that offers none of ``alpn`` (a fatal
            ``no_application_protocol`` alert; outcome ``bad_preamble``).
        replay: bytes the dialogue already received that begin the ClientHello (a
            client that opens with TLS at once). Any other unconsumed byte is the
            dialogue's to refuse before it asks for TLS (STARTTLS command injection).
    """

    alpn: tuple[bytes, ...] = ()
    require_alpn: bool = False
    replay: bytes = b""


@attrs.frozen
class ConnectBackend:
    """Connect to the route's backend pool (failover as for every connection)."""


@attrs.frozen
class ConnectSessionOwner:
    """Connect to the backend serving the live connection that announced ``key``."""

    key: bytes


@attrs.frozen
class SessionKey:
    """This connection's backend owns ``key`` until the connection ends (PostgreSQL's
    BackendKeyData: a later cancel request carrying it goes to that backend)."""

    key: bytes


@attrs.frozen
class StartBackendTLS:
    """A verified TLS handshake with the backend now."""


@attrs.frozen
class Done:
    """The dialogue is over: move bytes both ways."""


@attrs.frozen
class Close:
    """End the connection with this outcome (and error text for the access line)."""

    outcome: Outcome
    reason: str | None = None


Event: TypeAlias = (
    SendToClient
    | SendToBackend
    | NeedClientData
    | NeedBackendData
    | StartClientTLS
    | ConnectBackend
    | ConnectSessionOwner
    | SessionKey
    | StartBackendTLS
    | Done
    | Close
)


@attrs.frozen
class DialogueSettings:
    """What a listener tells each of its dialogues.

    Attributes:
        server_name: the name the proxy gives in greetings (mail), the host's name by
            default.
        backend_tls: the listener re-encrypts to its backends: the dialogue asks for
            :class:`StartBackendTLS` where the backend's protocol expects it.
        allow_plaintext: a client may go on without TLS (PostgreSQL's cleartext
            startup); otherwise TLS is required.
    """

    server_name: str = "l4proxy"
    backend_tls: bool = False
    allow_plaintext: bool = False


class Dialogue(Protocol):
    """One connection's dialogue: bytes in, :data:`Event` out (see the module doc)."""

    def receive_client(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` is the end of its stream."""

    def receive_backend(self, data: bytes) -> None:
        """Bytes from the backend; ``b""`` is the end of its stream."""

    def next_event(self) -> Event:
        """What the driver does next."""
        ...


class Preamble(Protocol):
    """A protocol's dialogues: the listener's ``preamble``. Called once per connection."""

    @property
    def name(self) -> str:
        """Its name in errors and timeouts (``postgres``, ``smtp``...)."""
        ...

    def __call__(self, settings: DialogueSettings) -> Dialogue:
        """A new dialogue for one connection."""
        ...
