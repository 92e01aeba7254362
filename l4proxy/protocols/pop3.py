"""The POP3 STLS preamble (RFC 1939, RFC 2449, RFC 2595 §4), sans-IO: :data:`POP3`.

Before TLS the proxy is the POP3 server in the AUTHORIZATION state (the shape every mail
preamble shares is in :mod:`l4proxy.protocols.lines`):

* It greets ``+OK <server_name> ready``. ``CAPA`` lists ``STLS`` and
  ``IMPLEMENTATION l4proxy``, but not ``USER``, which is not allowed before TLS
  (RFC 2595 §4). ``QUIT`` gets ``+OK`` and ends the connection (``quit``).
  ``USER``/``PASS``/``APOP``/``AUTH`` get ``-ERR Use STLS first``; no ``[AUTH]``
  response code, since RFC 3206 keeps that for bad credentials, and a client would
  ask for the password again. Everything else gets ``-ERR``, NOOP and RSET too: they
  belong to the TRANSACTION state (RFC 1939 §5). Commands are case-insensitive.
* ``STLS`` gets ``+OK Begin TLS negotiation``, then TLS, unless bytes already follow
  it (CVE-2011-0411). Then the client hears ``-ERR`` and is hung up on
  (``bad_preamble``), as it is after a command line over 255 bytes or ten refused
  commands in a row.

In TLS, the backend's greeting is swallowed (``-ERR`` is passed to the client and ends
the connection). With backend TLS, the proxy sends ``STLS`` and needs ``+OK``. The
client's first command then goes to the backend: if it is ``CAPA``, the reply (``+OK``
and lines up to ``.``, or one ``-ERR`` line) comes back without its ``STLS`` line.

Callers should know that APOP cannot work through the proxy: its digest covers the
timestamp in the greeting, and the client saw the proxy's greeting, not the backend's.
Without backend TLS, the backend sees a cleartext session and must allow USER/PASS
there.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from l4proxy.protocols.lines import (
    Answer,
    Exchange,
    MailPreamble,
    Reply,
    Then,
    Verdict,
    Violation,
    first_word,
    split_command,
    strip_eol,
)

__all__ = ["LINE_LIMIT", "POP3", "MultiLineReply", "POP3Rules", "StatusReply"]

#: RFC 2449 §4: a command line is at most 255 octets, its CRLF included.
LINE_LIMIT = 255

_AUTHENTICATION = frozenset((b"USER", b"PASS", b"APOP", b"AUTH"))


def _status(line: bytes) -> Verdict:
    word = first_word(strip_eol(line))
    if word == b"+OK":
        return Verdict.POSITIVE
    return Verdict.NEGATIVE if word == b"-ERR" else Verdict.MALFORMED


class StatusReply:
    """A one-line reply: ``+OK`` or ``-ERR`` (RFC 1939 §3)."""

    __slots__ = ()

    def add(self, line: bytes) -> Verdict | None:
        """The verdict on the reply's one line."""
        return _status(line)


class MultiLineReply:
    """``+OK`` then lines up to a lone ``.`` (RFC 1939 §3), or one ``-ERR`` line."""

    __slots__ = ("_started",)

    def __init__(self) -> None:
        self._started = False

    def add(self, line: bytes) -> Verdict | None:
        """Take the next line: the verdict after the last one, else ``None``."""
        if self._started:
            return Verdict.POSITIVE if strip_eol(line) == b"." else None
        status = _status(line)
        self._started = status is Verdict.POSITIVE
        return None if self._started else status


@attrs.frozen
class POP3Rules:
    """POP3's words for :class:`~l4proxy.protocols.lines.MailDialogue`."""

    line_limit: ClassVar[int] = LINE_LIMIT
    alpn: ClassVar[tuple[bytes, ...]] = (b"pop3",)  # IANA's ALPN id (RFC 2595)

    def greeting(self, server_name: bytes) -> bytes:
        return b"+OK " + server_name + b" ready\r\n"

    def answer(self, command: bytes, server_name: bytes) -> Answer:
        verb, arguments = split_command(command)
        if verb == b"CAPA":
            return Answer(b"+OK Capability list follows\r\nSTLS\r\nIMPLEMENTATION l4proxy\r\n.\r\n")
        if verb == b"STLS":
            if arguments:
                return Answer(b"-ERR STLS takes no arguments\r\n", refused=True)
            return Answer(b"+OK Begin TLS negotiation\r\n", Then.START_TLS)
        if verb == b"QUIT":
            return Answer(b"+OK " + server_name + b" signing off\r\n", Then.QUIT)
        if verb in _AUTHENTICATION:
            return Answer(b"-ERR Use STLS first\r\n", refused=True)
        return Answer(b"-ERR Command not valid before STLS\r\n", refused=True)

    def last_words(self, violation: Violation, server_name: bytes) -> bytes:
        if violation is Violation.LINE_TOO_LONG:
            return b"-ERR Line too long\r\n"
        if violation is Violation.TOO_MANY_ERRORS:
            return b"-ERR Too many errors\r\n"
        return b"-ERR Cleartext pipelined after STLS\r\n"

    def greeting_reply(self) -> Reply:
        return StatusReply()

    def backend_starttls(self, server_name: bytes) -> tuple[Exchange, ...]:
        return (Exchange(b"STLS\r\n", StatusReply()),)

    def capability_reply(self, command: bytes) -> Reply | None:
        return MultiLineReply() if split_command(command) == (b"CAPA", b"") else None

    def without_starttls(self, lines: list[bytes]) -> list[bytes]:
        head, *capabilities = lines  # the status line, then one capability a line
        return [head, *(line for line in capabilities if first_word(line) != b"STLS")]


#: The POP3 preamble: ``preamble = "pop3"``.
POP3 = MailPreamble("pop3", POP3Rules())
