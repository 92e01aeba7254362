"""What the mail preambles share: a bounded line buffer and the one dialogue that SMTP,
IMAP and POP3 all speak around STARTTLS (sans-IO, see :mod:`l4proxy.protocols.dialogue`).

Theory of operation
-------------------
The three protocols differ in their words, not in their shape, so :class:`MailDialogue`
is the state machine and a :class:`MailRules` object (``SMTPRules``, ``IMAPRules``,
``POP3Rules``) supplies the words:

1. **Cleartext, the proxy speaks.** No backend yet: the proxy greets the client itself,
   answers the capability command (advertising STARTTLS), NOOP and the like, refuses
   everything else (above all authentication: RFC 3207 §4, RFC 2595 §3.1), and answers
   QUIT/LOGOUT with a goodbye and ``Close(QUIT)``. STARTTLS is answered positively
   only if no byte follows its line: a cleartext byte already received after it would
   otherwise be read as if it came over TLS (CVE-2011-0411, "STARTTLS command
   injection"), so that is ``Close(BAD_PREAMBLE)`` instead. So :class:`StartClientTLS`
   is never asked while a client byte is held. A line over the protocol's limit, too
   many refused commands in a row (:data:`REFUSAL_LIMIT`) and garbage end the
   connection as ``bad_preamble``; the client's end of stream as ``quit``.
2. **The backend's greeting is swallowed.** Once the client's TLS is up the dialogue asks
   for the backend (:class:`ConnectBackend`) and reads its greeting: the client already
   had the proxy's. A refusing greeting (SMTP not 2xx, IMAP ``* BYE``, POP3 ``-ERR``) is
   passed to the client and the connection ends as ``backend_preamble_failed``.
3. **STARTTLS towards the backend**, when :attr:`DialogueSettings.backend_tls` is set:
   the protocol's exchanges (:meth:`MailRules.backend_starttls`), then
   :class:`StartBackendTLS`. Any other reply, or a byte after the last one (the mirror
   image of the injection above), is ``backend_preamble_failed``.
4. **The client's first command in TLS.** If it is the capability command, it goes to
   the backend and the whole reply is read and passed on without STARTTLS (RFC 3207
   §4.2: a session already in TLS must not be offered STARTTLS again; a client that
   believed it would try it and fail). Anything else goes on as it is. Either way,
   every byte still held on both sides is sent on, then :class:`Done`.

Bounds: a side is read only when no whole line is held. The client's buffer thus holds
less than the protocol's line limit plus one read (:data:`RECEIVE_SIZE`). The backend's
reply and buffer together hold less than :data:`REPLY_LIMIT` plus one read. A
capability reply that would not fit is passed on unfiltered, and so is one that cannot
be parsed. The proxy never fails a session over filtering.

Lines end at LF (CRLF, or the bare LF some clients send); the line end is kept, so a
reply passed on unfiltered is byte for byte the backend's. TLS is always required:
:attr:`DialogueSettings.allow_plaintext` means nothing here, since a client that never
says STARTTLS never reaches a backend.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import TYPE_CHECKING, Protocol

import attrs

from l4proxy.protocols.dialogue import (
    Close,
    ConnectBackend,
    Done,
    NeedBackendData,
    NeedClientData,
    SendToBackend,
    SendToClient,
    StartBackendTLS,
    StartClientTLS,
)
from l4proxy.record import Outcome

if TYPE_CHECKING:
    from l4proxy.protocols.dialogue import DialogueSettings, Event

__all__ = [
    "REFUSAL_LIMIT",
    "REPLY_LIMIT",
    "Answer",
    "Exchange",
    "LineBuffer",
    "MailDialogue",
    "MailPreamble",
    "MailRules",
    "Reply",
    "Then",
    "Verdict",
    "Violation",
    "first_word",
    "quote",
    "split_command",
    "strip_eol",
]

#: The most bytes of one backend reply held (its lines plus the unread rest), a cap
#: no real greeting or capability list comes near.
REPLY_LIMIT = 64 * 1024
#: Refused commands in a row after which the proxy hangs up (as Postfix's
#: ``smtpd_hard_error_limit`` does): a client this lost is not going to STARTTLS.
REFUSAL_LIMIT = 10


class LineBuffer:
    """Bytes from one peer, cut into lines at LF, looking no further than ``limit``.

    A line is at most ``limit`` bytes, its line end included. :meth:`pop_line` gives
    whole lines; when it gives ``None``, :attr:`too_long` says whether the next line is
    already over the limit (so reading more cannot help) and :attr:`eof` whether the
    peer has ended its stream. The bytes scanned for LF are remembered, so a line that
    trickles in one byte per read is still scanned once.
    """

    __slots__ = ("_data", "_scanned", "_start", "eof", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.eof = False
        self._data = bytearray()
        self._start = 0  # the unread bytes are _data[_start:]
        self._scanned = 0  # and _data[_start:_scanned] holds no LF

    def feed(self, data: bytes) -> None:
        """Append bytes from the peer; ``b""`` is the end of its stream."""
        if not data:
            self.eof = True
            return
        if self._start:
            del self._data[: self._start]
            self._scanned -= self._start
            self._start = 0
        self._data += data

    def pop_line(self) -> bytes | None:
        """The next whole line with its line end, or ``None`` while there is none within
        ``limit`` bytes."""
        end = self._data.find(b"\n", self._scanned, self._start + self.limit)
        if end < 0:
            self._scanned = min(len(self._data), self._start + self.limit)
            return None
        line = bytes(self._data[self._start : end + 1])
        self._start = self._scanned = end + 1
        return line

    @property
    def too_long(self) -> bool:
        """The next line is longer than ``limit``: ``limit`` bytes are held without an LF."""
        return (
            self.held >= self.limit
            and self._data.find(b"\n", self._start, self._start + self.limit) < 0
        )

    @property
    def held(self) -> int:
        """How many bytes are held, not yet taken as lines."""
        return len(self._data) - self._start

    def take(self) -> bytes:
        """Every byte held (to send on as it is); the buffer is then empty."""
        data = bytes(self._data[self._start :])
        self._data.clear()
        self._start = self._scanned = 0
        return data


def strip_eol(line: bytes) -> bytes:
    """The line without its CRLF (or bare LF)."""
    return line.removesuffix(b"\n").removesuffix(b"\r")


def split_command(text: bytes) -> tuple[bytes, bytes]:
    """``(VERB, arguments)``: the first word upper-cased (commands are case-insensitive
    in all three protocols) and the rest, stripped."""
    words = text.split(maxsplit=1)
    if not words:
        return b"", b""
    return words[0].upper(), words[1].strip() if len(words) > 1 else b""


def first_word(text: bytes) -> bytes:
    """The first word of a line, upper-cased (``b""`` for a blank one)."""
    return split_command(text)[0]


def quote(line: bytes) -> str:
    """A line for an access log's error text: cut short and escaped, so a peer's bytes
    can neither flood nor forge log lines."""
    return repr(strip_eol(line)[:80])[1:]


class Verdict(enum.Enum):
    """What a complete reply from the backend says."""

    POSITIVE = "positive"
    NEGATIVE = "negative"
    #: Not the protocol's syntax (or not a reply to what was sent).
    MALFORMED = "malformed"


class Reply(Protocol):
    """A backend reply being read, fed one line (with its line end) at a time."""

    def add(self, line: bytes) -> Verdict | None:
        """Take the next line: the verdict once the reply is complete, else ``None``."""
        ...


@attrs.frozen(eq=False)
class Exchange:
    """A command the proxy sends the backend and the reply it must get to go on."""

    command: bytes
    reply: Reply


class Then(enum.Enum):
    """What follows a cleartext answer."""

    STAY = "stay"
    START_TLS = "start_tls"
    QUIT = "quit"


@attrs.frozen
class Answer:
    """The proxy's answer to one cleartext command.

    Attributes:
        reply: what to send the client.
        then: whether the dialogue goes on, starts TLS or ends (the client quit).
        refused: the command was refused; :data:`REFUSAL_LIMIT` of them in a row end
            the connection.
    """

    reply: bytes
    then: Then = Then.STAY
    refused: bool = False


class Violation(enum.Enum):
    """Why a cleartext client is hung up on as ``bad_preamble`` (the value is the
    access log's error text)."""

    LINE_TOO_LONG = "command line too long"
    TOO_MANY_ERRORS = "too many refused commands"
    PIPELINED = "cleartext pipelined after STARTTLS"


class MailRules(Protocol):
    """One mail protocol's words for :class:`MailDialogue`.

    Stateless, so one object serves every connection (what a reply being read must
    remember lives in its :class:`Reply`). ``server_name`` is the proxy's name as
    wire-safe bytes; a ``command`` is a client's line without its line end.

    Attributes:
        line_limit: the longest client line, line end included.
        alpn: the protocol's ALPN id (RFC 7301), selected when the client offers it.

    Methods:
        greeting: the proxy's own greeting.
        answer: the answer to a cleartext command.
        last_words: what the client hears before the proxy hangs up on it.
        greeting_reply: a reader of the backend's greeting (negative: passed on).
        backend_starttls: the exchanges, in order, that start TLS with the backend.
        capability_reply: a reader of the reply to the client's first command in TLS
            if that is the capability command, else ``None`` (it goes on unread).
        without_starttls: a complete capability reply without STARTTLS.
    """

    @property
    def line_limit(self) -> int: ...
    @property
    def alpn(self) -> tuple[bytes, ...]: ...
    def greeting(self, server_name: bytes) -> bytes: ...
    def answer(self, command: bytes, server_name: bytes) -> Answer: ...
    def last_words(self, violation: Violation, server_name: bytes) -> bytes: ...
    def greeting_reply(self) -> Reply: ...
    def backend_starttls(self, server_name: bytes) -> tuple[Exchange, ...]: ...
    def capability_reply(self, command: bytes) -> Reply | None: ...
    def without_starttls(self, lines: list[bytes]) -> list[bytes]: ...


class _Phase(enum.Enum):
    CLEARTEXT = "cleartext"  # the proxy speaks the protocol, until STARTTLS
    CONNECT = "connect"  # the client's TLS is up: ask for the backend
    BACKEND_SETUP = "backend_setup"  # its greeting, then the STARTTLS exchanges
    FIRST_COMMAND = "first_command"  # the client's first command in TLS
    CAPABILITIES = "capabilities"  # the backend's capability reply, to filter
    OVER = "over"  # Done or Close was given


class _Cut(enum.Enum):
    """Why a backend reply could not be read to its end."""

    ENDED = "ended"
    OVERSIZED = "oversized"


class MailDialogue:
    """One mail connection's dialogue (see the module doc); made by :class:`MailPreamble`.

    Error handling: it never raises; peers' mistakes are :class:`Close` events.
    """

    __slots__ = (
        "_backend",
        "_client",
        "_events",
        "_exchanges",
        "_final",
        "_phase",
        "_refusals",
        "_reply",
        "_reply_lines",
        "_reply_size",
        "rules",
        "server_name",
        "settings",
    )

    def __init__(self, rules: MailRules, settings: DialogueSettings) -> None:
        self.rules = rules
        self.settings = settings
        # Never raises, and a configured name cannot break a line (CR, LF) or a word.
        name = settings.server_name.encode("ascii", "replace")
        self.server_name = bytes(c if 0x21 <= c < 0x7F else 0x3F for c in name) or b"l4proxy"
        self._client = LineBuffer(rules.line_limit)
        self._backend = LineBuffer(REPLY_LIMIT)
        self._events: deque[Event] = deque([SendToClient(rules.greeting(self.server_name))])
        self._phase = _Phase.CLEARTEXT
        self._final: Event = Done()
        self._refusals = 0
        # The greeting is an exchange that sends nothing; backend TLS adds its own.
        self._exchanges = deque([Exchange(b"", rules.greeting_reply())])
        if settings.backend_tls:
            self._exchanges.extend(rules.backend_starttls(self.server_name))
        self._reply: Reply | None = None  # the backend reply being read, its lines, their size
        self._reply_lines: list[bytes] = []
        self._reply_size = 0

    def receive_client(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` is the end of its stream."""
        self._client.feed(data)

    def receive_backend(self, data: bytes) -> None:
        """Bytes from the backend; ``b""`` is the end of its stream."""
        self._backend.feed(data)

    def next_event(self) -> Event:
        """What the driver does next."""
        while not self._events:  # each step emits an event or consumes a line
            self._step()
        return self._events.popleft()

    @property
    def buffered_client(self) -> int:
        """Client bytes held (for tests: bounded, and none at a hand-over)."""
        return self._client.held

    @property
    def buffered_backend(self) -> int:
        """Backend bytes held, a reply being read included."""
        return self._backend.held + self._reply_size

    def _step(self) -> None:
        phase = self._phase
        if phase is _Phase.CLEARTEXT:
            self._cleartext()
        elif phase is _Phase.CONNECT:
            self._events.append(ConnectBackend())
            self._phase = _Phase.BACKEND_SETUP
        elif phase is _Phase.BACKEND_SETUP:
            self._backend_setup()
        elif phase is _Phase.FIRST_COMMAND:
            self._first_command()
        elif phase is _Phase.CAPABILITIES:
            self._capabilities()
        else:
            self._events.append(self._final)

    def _cleartext(self) -> None:
        client = self._client
        line = client.pop_line()
        if line is None:
            if client.too_long:
                self._hang_up(Violation.LINE_TOO_LONG)
            elif client.eof:
                self._close(Outcome.QUIT, "client closed before STARTTLS")
            else:
                self._events.append(NeedClientData())
            return
        answer = self.rules.answer(strip_eol(line), self.server_name)
        self._refusals = self._refusals + 1 if answer.refused else 0
        if self._refusals >= REFUSAL_LIMIT:
            self._hang_up(Violation.TOO_MANY_ERRORS)
        elif answer.then is Then.START_TLS and client.held:
            self._hang_up(Violation.PIPELINED)  # CVE-2011-0411: no TLS after injected bytes
        else:
            self._send_client(answer.reply)
            if answer.then is Then.START_TLS:
                self._events.append(StartClientTLS(alpn=self.rules.alpn))
                self._phase = _Phase.CONNECT
            elif answer.then is Then.QUIT:
                self._close(Outcome.QUIT, "client quit before STARTTLS")

    def _backend_setup(self) -> None:
        if self._reply is None:
            if self._exchanges:
                self._reply = self._exchanges[0].reply
                self._send_backend(self._exchanges[0].command)
            elif self.settings.backend_tls and self._backend.held:
                # Bytes after the STARTTLS reply would be taken as sent in TLS.
                self._close(Outcome.BACKEND_PREAMBLE_FAILED, "backend sent bytes after STARTTLS")
            else:
                if self.settings.backend_tls:
                    self._events.append(StartBackendTLS())
                self._phase = _Phase.FIRST_COMMAND
            return
        result = self._read_reply()
        if result is None:
            return
        command = self._exchanges.popleft().command
        what = f"reply to {quote(command)}" if command else "greeting"
        if result is Verdict.POSITIVE:
            self._end_reply()
            return
        if result is Verdict.NEGATIVE and not command:  # the client's to hear
            self._send_client(b"".join(self._reply_lines))
        if isinstance(result, _Cut):
            reason = f"backend closed during its {what}"
            if result is _Cut.OVERSIZED:
                reason = f"backend's {what} longer than {REPLY_LIMIT} bytes"
        else:
            reason = f"backend's {what}: {quote(self._reply_lines[-1])}"
        self._close(Outcome.BACKEND_PREAMBLE_FAILED, reason)

    def _first_command(self) -> None:
        client = self._client
        line = client.pop_line()
        if line is None:
            if client.too_long:
                self._hand_over()  # not the capability command: the backend's to judge
            elif client.eof:
                self._close(Outcome.QUIT, "client closed before its first command in TLS")
            else:
                self._events.append(NeedClientData())
            return
        self._reply = self.rules.capability_reply(strip_eol(line))
        if self._reply is None:
            self._hand_over(to_backend=line)
        else:
            self._send_backend(line)
            self._phase = _Phase.CAPABILITIES

    def _capabilities(self) -> None:
        result = self._read_reply()
        if result is None:
            return
        lines = self._reply_lines
        if result is _Cut.ENDED:
            self._send_client(b"".join(lines) + self._backend.take())
            reason = "backend closed during its capability reply"
            self._close(Outcome.BACKEND_PREAMBLE_FAILED, reason)
            return
        if result is Verdict.POSITIVE or result is Verdict.NEGATIVE:
            lines = self.rules.without_starttls(lines)
        self._hand_over(to_client=b"".join(lines))  # oversized or malformed: unfiltered

    def _read_reply(self) -> Verdict | _Cut | None:
        """Take one more line of the reply being read. The verdict once it is complete
        (or why it cannot be); ``None`` after taking a line or asking for more."""
        backend = self._backend
        reply = self._reply
        if reply is None:  # not reached: every phase that reads sets a reply first
            return Verdict.MALFORMED
        line = backend.pop_line()
        if line is None:
            if self._reply_size + backend.held >= REPLY_LIMIT:
                return _Cut.OVERSIZED
            if backend.eof:
                return _Cut.ENDED
            self._events.append(NeedBackendData())
            return None
        self._reply_lines.append(line)
        self._reply_size += len(line)
        return reply.add(line)

    def _end_reply(self) -> None:
        self._reply = None
        self._reply_lines = []
        self._reply_size = 0

    def _hand_over(self, *, to_backend: bytes = b"", to_client: bytes = b"") -> None:
        """Send on everything still held, both ways, then :class:`Done`."""
        self._send_client(to_client + self._backend.take())
        self._send_backend(to_backend + self._client.take())
        self._end_reply()
        self._final = Done()
        self._events.append(self._final)
        self._phase = _Phase.OVER

    def _hang_up(self, violation: Violation) -> None:
        self._send_client(self.rules.last_words(violation, self.server_name))
        self._close(Outcome.BAD_PREAMBLE, violation.value)

    def _close(self, outcome: Outcome, reason: str) -> None:
        self._final = Close(outcome, reason)
        self._events.append(self._final)
        self._phase = _Phase.OVER

    def _send_client(self, data: bytes) -> None:
        if data:
            self._events.append(SendToClient(data))

    def _send_backend(self, data: bytes) -> None:
        if data:
            self._events.append(SendToBackend(data))


class MailPreamble:
    """A mail protocol's :class:`~l4proxy.protocols.dialogue.Preamble`: its name and
    rules; calling it makes one connection's :class:`MailDialogue`.

    A plain class rather than a frozen attrs one: ``Preamble.name`` is a plain
    attribute of the protocol, and mypy does not let a read-only one stand for it.
    """

    __slots__ = ("name", "rules")

    def __init__(self, name: str, rules: MailRules) -> None:
        self.name = name
        self.rules = rules

    def __call__(self, settings: DialogueSettings) -> MailDialogue:
        """A new dialogue for one connection."""
        return MailDialogue(self.rules, settings)
