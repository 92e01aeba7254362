"""PostgreSQL's preamble, sans-IO: how a client reaches TLS, and the session's cancel key.

Theory of operation (frontend/backend protocol 3.0 and 3.2). A client opens in one of
three ways, and the dialogue answers as a PostgreSQL server would:

* **Direct TLS** (PostgreSQL 17, ``sslnegotiation=direct``): a ClientHello at once. Its
  first byte, 0x16, can never begin a startup packet (that length would be far over
  ``MAX_STARTUP_PACKET_LENGTH``), so one byte classifies it. ALPN ``postgresql`` is
  required, as PostgreSQL requires it, so a TLS client of another protocol is refused.
* **SSLRequest**: answer ``S`` and terminate TLS. A byte the client sent after the
  request without waiting for the answer is refused (CVE-2021-23214: cleartext
  injected ahead of the handshake). A GSSENCRequest is answered ``N`` (no GSSAPI
  encryption here); the client may then ask for TLS.
* **Cleartext**: a StartupMessage without TLS, let through only with
  ``allow_plaintext``; otherwise a FATAL ErrorResponse whose message psql prints.

The first packet inside TLS (or an allowed cleartext one) is a StartupMessage, which
connects to the route's backend, or a CancelRequest (libpq 17's ``PQcancelConn`` sends
it inside TLS, older ones in cleartext), which is sent to the backend of the session it
names and nothing else. With ``backend_tls`` either goes to the backend inside TLS, after
the dialogue's own SSLRequest.

After the StartupMessage the dialogue relays the backend's startup messages to the
client unchanged, one send per batch received, to note the session's BackendKeyData
(:class:`SessionKey`): that is what lets a later CancelRequest reach this backend.
Authentication requests that need an answer let exactly one client message through.
ReadyForQuery or an ErrorResponse ends the preamble (:class:`Done`). The relay is a
courtesy: anything it does not understand (an oversized message, a second key, an
authentication request it cannot tell the answer of) hands over to the data phase at
once with everything held, so a session is never broken by it, only left without a
cancel key. A backend that closes during startup ends the connection as
``backend_preamble_failed`` (after what it sent is passed on), not as a data phase.

Memory: every packet and message read is length-prefixed and capped, and a side is read
only while what is held is an incomplete one, so each side holds at most
:data:`BUFFER_LIMIT` bytes.
"""

from __future__ import annotations

import collections
import enum

from l4proxy.protocols.dialogue import (
    RECEIVE_SIZE,
    Close,
    ConnectBackend,
    ConnectSessionOwner,
    DialogueSettings,
    Done,
    Event,
    NeedBackendData,
    NeedClientData,
    SendToBackend,
    SendToClient,
    SessionKey,
    StartBackendTLS,
    StartClientTLS,
)
from l4proxy.record import Outcome

__all__ = [
    "ALPN_PROTOCOLS",
    "BUFFER_LIMIT",
    "CANCEL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "MAX_MESSAGE_LENGTH",
    "MAX_STARTUP_PACKET_LENGTH",
    "POSTGRES",
    "SSL_REQUEST",
    "SSL_REQUEST_CODE",
    "TLS_REQUIRED_MESSAGE",
    "PostgresDialogue",
    "PostgresPreamble",
    "error_response",
]

SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
#: PostgreSQL's own cap on a startup packet (``MAX_STARTUP_PACKET_LENGTH``).
MAX_STARTUP_PACKET_LENGTH = 10000
#: The SSLRequest packet, as the dialogue sends it to a TLS backend.
SSL_REQUEST = (8).to_bytes(4, "big") + SSL_REQUEST_CODE.to_bytes(4, "big")
#: The ALPN protocol PostgreSQL 17 registered (required for direct TLS).
ALPN_PROTOCOLS = (b"postgresql",)
#: Longest message the startup relay reads (its length field): room for an
#: authentication token of ``PG_MAX_AUTH_TOKEN_LENGTH`` (65535) bytes and its header.
MAX_MESSAGE_LENGTH = 64 * 1024 + 64
#: The most bytes the dialogue holds from either side.
BUFFER_LIMIT = MAX_MESSAGE_LENGTH + RECEIVE_SIZE
#: What psql prints when a client tries cleartext where TLS is required.
TLS_REQUIRED_MESSAGE = "SSL/TLS required: connect with sslmode=require (l4proxy)"

_AUTHENTICATION, _BACKEND_KEY_DATA, _ERROR_RESPONSE, _READY_FOR_QUERY = b"RKEZ"
_NOTED = frozenset({_AUTHENTICATION, _BACKEND_KEY_DATA})  # the messages whose body is read
_PROTOCOL_VIOLATION = "08P01"
_INVALID_AUTHORIZATION = "28000"
#: A cancel request is length, code, pid and a secret of 4 (3.0) to 256 (3.2) bytes.
_CANCEL_LENGTHS = range(12 + 4, 12 + 256 + 1)
#: BackendKeyData's body: pid and a secret of 4 to 256 bytes, what a cancel carries.
_KEY_LENGTHS = range(4 + 4, 4 + 256 + 1)
#: AuthenticationOk and AuthenticationSASLFinal: the backend goes on by itself.
_AUTH_WITHOUT_ANSWER = frozenset({0, 12})
#: Cleartext, MD5, GSS, SSPI, SASL, SASLContinue: the client always answers once.
#: AuthenticationGSSContinue (8) is not here: the client answers only if its GSS context
#: is not yet complete, which the proxy cannot tell, so it ends the relay.
_AUTH_WITH_ANSWER = frozenset({3, 5, 7, 9, 10, 11})


def error_response(severity: str, sqlstate: str, message: str) -> bytes:
    """An ErrorResponse message: severity (localised ``S`` and plain ``V``), SQLSTATE
    ``C`` and message ``M``, each a NUL-terminated string, then a final NUL.

    Raises:
        ValueError: a field contains NUL, which would cut the message short.

    Example:
        >>> error_response("FATAL", "08P01", "bad")[:6]
        b'E\\x00\\x00\\x00\\x1fS'
    """
    fields = ((b"S", severity), (b"V", severity), (b"C", sqlstate), (b"M", message))
    if any("\0" in value for _, value in fields):
        raise ValueError("an ErrorResponse field cannot contain NUL")
    body = b"".join(kind + value.encode() + b"\0" for kind, value in fields) + b"\0"
    return b"E" + (4 + len(body)).to_bytes(4, "big") + body


class _Phase(enum.Enum):
    OPENING = enum.auto()  # the first bytes: direct TLS still possible
    CLEARTEXT = enum.auto()  # after refusing GSS encryption: another cleartext packet
    IN_TLS = enum.auto()  # TLS is up: the first packet inside it
    BACKEND_TLS = enum.auto()  # SSLRequest sent to the backend: its one-byte answer
    RELAY = enum.auto()  # backend startup messages on to the client, up to ReadyForQuery
    AUTH_ANSWER = enum.auto()  # one client message answering an authentication request
    ENDED = enum.auto()  # Done or Close given: it is given again if asked


class PostgresDialogue:
    """One PostgreSQL connection's preamble (see the module doc); a
    :class:`~l4proxy.protocols.dialogue.Dialogue`."""

    __slots__ = (
        "_backend",
        "_backend_eof",
        "_client",
        "_client_eof",
        "_events",
        "_final",
        "_packet",
        "_phase",
        "_settings",
        "session_key",
    )

    def __init__(self, settings: DialogueSettings) -> None:
        self._settings = settings
        self._phase = _Phase.OPENING
        self._events: collections.deque[Event] = collections.deque()
        self._client = bytearray()
        self._backend = bytearray()
        self._client_eof = False
        self._backend_eof = False
        self._packet = b""  # the client's StartupMessage or CancelRequest, for the backend
        self._final: Done | Close = Done()
        #: The BackendKeyData body once the backend sent it (``None`` until then).
        self.session_key: bytes | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet passed on (none when :class:`Done` is given)."""
        return len(self._client) + len(self._backend)

    def receive_client(self, data: bytes) -> None:
        if data:
            self._client += data
        else:
            self._client_eof = True

    def receive_backend(self, data: bytes) -> None:
        if data:
            self._backend += data
        else:
            self._backend_eof = True

    def next_event(self) -> Event:
        if not self._events:
            match self._phase:
                case _Phase.OPENING | _Phase.CLEARTEXT | _Phase.IN_TLS:
                    self._read_first_packet()
                case _Phase.BACKEND_TLS:
                    self._read_tls_answer()
                case _Phase.RELAY:
                    self._relay()
                case _Phase.AUTH_ANSWER:
                    self._pass_auth_answer()
                case _Phase.ENDED:
                    self._events.append(self._final)
        return self._events.popleft()

    # The client's first packet.

    def _read_first_packet(self) -> None:
        data = self._client
        if self._phase is _Phase.OPENING and data[:1] == b"\x16":
            self._events.append(
                StartClientTLS(alpn=ALPN_PROTOCOLS, require_alpn=True, replay=bytes(data))
            )
            data.clear()
            self._phase = _Phase.IN_TLS
            return
        if len(data) < 8:
            self._need_first_packet()
            return
        length = int.from_bytes(data[:4], "big")
        code = int.from_bytes(data[4:8], "big")
        if not 8 <= length <= MAX_STARTUP_PACKET_LENGTH:
            self._close(Outcome.BAD_PREAMBLE, f"startup packet length {length} out of range")
        elif code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
            self._negotiate_encryption(length, code)
        elif code == CANCEL_REQUEST_CODE:
            if length not in _CANCEL_LENGTHS:
                self._close(Outcome.BAD_PREAMBLE, f"cancel request of length {length}")
            elif len(data) < length:
                self._need_first_packet()
            else:
                self._connect(ConnectSessionOwner(bytes(data[8:length])), self._take(length))
        elif code >> 16 != 3:
            major, minor = code >> 16, code & 0xFFFF
            self._refuse(f"unsupported frontend protocol {major}.{minor}: l4proxy relays 3.x")
        elif len(data) < length:  # all of it first, even to refuse it: a close with
            self._need_first_packet()  # unread bytes is a reset, which may eat the refusal
        elif self._phase is not _Phase.IN_TLS and not self._settings.allow_plaintext:
            self._refuse(TLS_REQUIRED_MESSAGE, _INVALID_AUTHORIZATION, Outcome.TLS_REQUIRED)
        else:
            self._connect(ConnectBackend(), self._take(length))

    def _negotiate_encryption(self, length: int, code: int) -> None:
        name = "SSL" if code == SSL_REQUEST_CODE else "GSSAPI encryption"
        if length != 8:
            self._refuse(f"{name} request of length {length}")
        elif self._phase is _Phase.IN_TLS:
            self._refuse(f"{name} request inside TLS")
        elif len(self._client) > 8:  # CVE-2021-23214: bytes that did not wait for the answer
            self._refuse(f"received unencrypted data after {name} request")
        elif code == SSL_REQUEST_CODE:
            self._client.clear()
            self._events.append(SendToClient(b"S"))
            self._events.append(StartClientTLS(alpn=ALPN_PROTOCOLS, require_alpn=False))
            self._phase = _Phase.IN_TLS
        elif self._phase is _Phase.CLEARTEXT:
            self._refuse("GSSAPI encryption requested twice")
        else:
            self._client.clear()
            self._events.append(SendToClient(b"N"))
            self._phase = _Phase.CLEARTEXT

    def _need_first_packet(self) -> None:
        if not self._client_eof:
            self._events.append(NeedClientData())
        elif self._client:
            self._close(Outcome.BAD_PREAMBLE, "client closed in the middle of a startup packet")
        else:
            self._close(Outcome.QUIT, "client closed before its startup packet")

    def _take(self, length: int) -> bytes:
        packet = bytes(self._client[:length])
        del self._client[:length]
        return packet

    def _refuse(
        self,
        message: str,
        sqlstate: str = _PROTOCOL_VIOLATION,
        outcome: Outcome = Outcome.BAD_PREAMBLE,
    ) -> None:
        self._events.append(SendToClient(error_response("FATAL", sqlstate, message)))
        self._close(outcome, message)

    # The backend: its TLS, the client's packet, the startup messages.

    def _connect(self, connect: ConnectBackend | ConnectSessionOwner, packet: bytes) -> None:
        """Connect, then send ``packet`` on (inside TLS with ``backend_tls``). Client
        bytes after it stay held: the relay passes them one answer at a time."""
        self._events.append(connect)
        self._packet = packet
        if self._settings.backend_tls:
            self._events.append(SendToBackend(SSL_REQUEST))
            self._phase = _Phase.BACKEND_TLS
        else:
            self._send_packet()

    def _send_packet(self) -> None:
        self._events.append(SendToBackend(self._packet))
        if int.from_bytes(self._packet[4:8], "big") == CANCEL_REQUEST_CODE:
            self._close(Outcome.CANCEL_FORWARDED)  # PostgreSQL answers a cancel with nothing
        else:
            self._phase = _Phase.RELAY

    def _read_tls_answer(self) -> None:
        answer = self._backend
        if not answer:
            if self._backend_eof:
                self._close(
                    Outcome.BACKEND_PREAMBLE_FAILED, "backend closed before answering SSLRequest"
                )
            else:
                self._events.append(NeedBackendData())
        elif answer == b"S":
            answer.clear()
            self._events.append(StartBackendTLS())
            self._send_packet()
        elif answer[:1] == b"N":
            self._close(
                Outcome.BACKEND_TLS_FAILED, "backend refused TLS (answered 'N' to SSLRequest)"
            )
        elif answer[:1] == b"S":  # CVE-2021-23222: bytes injected ahead of the handshake
            self._close(Outcome.BACKEND_PREAMBLE_FAILED, "backend sent data after 'S' before TLS")
        else:
            self._close(
                Outcome.BACKEND_PREAMBLE_FAILED,
                f"backend answered {bytes(answer[:1])!r} to SSLRequest",
            )

    def _relay(self) -> None:
        """Scan the complete messages held; pass them on in one send, with the session
        key noted first (so it is registered before the client can know it)."""
        data = self._backend
        end = 0  # end of the messages scanned
        while len(data) - end >= 5:
            kind = data[end]
            length = int.from_bytes(data[end + 1 : end + 5], "big")
            if not 4 <= length <= MAX_MESSAGE_LENGTH:
                self._hand_over()
                return
            if len(data) - end < 1 + length:
                break
            body = data[end + 5 : end + 1 + length] if kind in _NOTED else b""
            end += 1 + length
            if kind in (_READY_FOR_QUERY, _ERROR_RESPONSE):  # ErrorResponse: FATAL here
                self._hand_over()
                return
            if kind == _BACKEND_KEY_DATA:
                if self.session_key is not None or len(body) not in _KEY_LENGTHS:
                    self._hand_over()
                    return
                self.session_key = bytes(body)
                self._events.append(SessionKey(self.session_key))
            elif kind == _AUTHENTICATION:
                code = int.from_bytes(body[:4], "big") if len(body) >= 4 else -1
                if code in _AUTH_WITH_ANSWER:
                    self._send_to_client(end)
                    self._phase = _Phase.AUTH_ANSWER
                    return
                if code not in _AUTH_WITHOUT_ANSWER:
                    self._hand_over()
                    return
        if self._backend_eof:
            self._send_to_client(len(data))
            self._close(Outcome.BACKEND_PREAMBLE_FAILED, "backend closed during startup")
            return
        self._send_to_client(end)
        self._events.append(NeedBackendData())

    def _pass_auth_answer(self) -> None:
        data = self._client
        if len(data) >= 5:
            length = int.from_bytes(data[1:5], "big")
            if not 4 <= length <= MAX_MESSAGE_LENGTH:
                self._hand_over()
                return
            if len(data) >= 1 + length:
                self._events.append(SendToBackend(bytes(data[: 1 + length])))
                del data[: 1 + length]
                self._phase = _Phase.RELAY
                return
        if self._client_eof:
            self._close(Outcome.QUIT, "client closed during authentication")
        else:
            self._events.append(NeedClientData())

    def _send_to_client(self, end: int) -> None:
        if end:
            self._events.append(SendToClient(bytes(self._backend[:end])))
            del self._backend[:end]

    def _hand_over(self) -> None:
        """Pass on everything held, both ways, and start the data phase."""
        self._send_to_client(len(self._backend))
        if self._client:
            self._events.append(SendToBackend(bytes(self._client)))
            self._client.clear()
        self._end(Done())

    def _close(self, outcome: Outcome, reason: str | None = None) -> None:
        self._end(Close(outcome, reason))

    def _end(self, event: Done | Close) -> None:
        self._events.append(event)
        self._final = event
        self._phase = _Phase.ENDED


class PostgresPreamble:
    """The ``postgres`` preamble: a :class:`~l4proxy.protocols.dialogue.Preamble`
    giving each connection a new :class:`PostgresDialogue`.

    Not a frozen attrs class: ``Preamble.name`` is a plain (settable) protocol member,
    which a frozen field does not satisfy; there is no state to freeze anyway.
    """

    __slots__ = ()
    name: str = "postgres"

    def __call__(self, settings: DialogueSettings) -> PostgresDialogue:
        return PostgresDialogue(settings)


#: The built-in ``preamble = "postgres"``.
POSTGRES = PostgresPreamble()
