"""The SMTP STARTTLS preamble (RFC 5321, RFC 3207), sans-IO: :data:`SMTP`.

The proxy terminates TLS for a mail server that offers STARTTLS, so before TLS it is
the SMTP server (the shape every mail preamble shares is in
:mod:`l4proxy.protocols.lines`):

* It greets ``220 <server_name> ESMTP l4proxy``. ``EHLO`` gets a multi-line 250
  offering ``STARTTLS`` (and ENHANCEDSTATUSCODES, since its replies carry them), but
  no PIPELINING: nothing should follow STARTTLS in the same packet. ``HELO``, ``NOOP``,
  ``RSET`` get 250, ``QUIT`` gets 221 and ends the connection (``quit``). Every other
  command (MAIL, RCPT, DATA, AUTH, VRFY...) gets ``530 5.7.0 Must issue a STARTTLS
  command first`` (RFC 3207 §4). Commands are case-insensitive.
* ``STARTTLS`` gets ``220 2.0.0 Ready to start TLS``, then TLS, unless bytes already
  follow it (CVE-2011-0411: they would count as sent over TLS). Then the client hears
  ``554`` and is hung up on (``bad_preamble``), as it is after a command line over
  512 bytes (RFC 5321 §4.5.3.1.4, ``500``) or ten refused commands in a row (``421``).
  ``STARTTLS`` with parameters is a syntax error (``501``, RFC 3207 §4).

In TLS, the backend's greeting is swallowed (a non-2xx one is passed to the client and
ends the connection). With backend TLS, the proxy sends ``EHLO <server_name>``, needs
STARTTLS listed in the 250 reply, sends ``STARTTLS`` and needs 220. The client's
first command then goes to the backend: if it is ``EHLO``, the reply comes back
without its STARTTLS line (RFC 3207 §4.2). If that line was the last one, the line
before it becomes the last (``250-`` becomes ``250 ``).

Callers should know that the backend sees the client's EHLO as the session's only one.
Without backend TLS, the backend sees a cleartext session: it must offer AUTH there.
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

__all__ = ["LINE_LIMIT", "SMTP", "SMTPReply", "SMTPRules"]

#: RFC 5321 §4.5.3.1.4: a command line is at most 512 octets, its CRLF included.
LINE_LIMIT = 512

_OK = b"250 2.0.0 OK\r\n"
_MUST_STARTTLS = b"530 5.7.0 Must issue a STARTTLS command first\r\n"


class SMTPReply:
    """A reply being read: ``ddd-text`` lines up to the last, ``ddd text`` or just
    ``ddd`` (RFC 5321 §4.2.1), all with one code.

    It is positive if its code starts with ``positive``, and, when ``required`` is set,
    an EHLO keyword line (one after the first) names it.
    """

    __slots__ = ("_code", "_found", "_positive", "_required")

    def __init__(self, positive: bytes = b"2", required: bytes | None = None) -> None:
        self._positive = positive
        self._required = required
        self._found = required is None
        self._code: bytes | None = None

    def add(self, line: bytes) -> Verdict | None:
        """Take the next line: the verdict after the last one, else ``None``."""
        text = strip_eol(line)
        code, separator = text[:3], text[3:4]
        if not _is_reply_line(text) or self._code not in (None, code):
            return Verdict.MALFORMED
        if self._code is not None and first_word(text[4:]) == self._required:
            self._found = True
        self._code = code
        if separator == b"-":
            return None
        positive = code.startswith(self._positive) and self._found
        return Verdict.POSITIVE if positive else Verdict.NEGATIVE


def _is_reply_line(text: bytes) -> bool:
    return len(text) >= 3 and text[:3].isdigit() and text[3:4] in (b"", b" ", b"-")


@attrs.frozen
class SMTPRules:
    """SMTP's words for :class:`~l4proxy.protocols.lines.MailDialogue`."""

    line_limit: ClassVar[int] = LINE_LIMIT
    #: No ALPN id is registered for SMTP (IANA has ``imap`` and ``pop3``).
    alpn: ClassVar[tuple[bytes, ...]] = ()

    def greeting(self, server_name: bytes) -> bytes:
        return b"220 " + server_name + b" ESMTP l4proxy\r\n"

    def answer(self, command: bytes, server_name: bytes) -> Answer:
        verb, arguments = split_command(command)
        if verb in (b"EHLO", b"HELO") and not arguments.strip():
            return Answer(b"501 5.5.4 Syntax: " + verb + b" hostname\r\n", refused=True)
        if verb == b"EHLO":
            return Answer(
                b"250-" + server_name + b"\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n"
            )
        if verb == b"HELO":
            return Answer(b"250 " + server_name + b"\r\n")
        if verb == b"STARTTLS":
            if arguments:
                return Answer(b"501 5.5.4 Syntax error (no parameters allowed)\r\n", refused=True)
            return Answer(b"220 2.0.0 Ready to start TLS\r\n", Then.START_TLS)
        if verb in (b"NOOP", b"RSET"):
            return Answer(_OK)
        if verb == b"QUIT":
            return Answer(b"221 2.0.0 Bye\r\n", Then.QUIT)
        return Answer(_MUST_STARTTLS, refused=True)

    def last_words(self, violation: Violation, server_name: bytes) -> bytes:
        if violation is Violation.LINE_TOO_LONG:
            return b"500 5.5.2 Line too long\r\n"
        if violation is Violation.TOO_MANY_ERRORS:
            return b"421 4.7.0 " + server_name + b" Too many errors\r\n"
        return b"554 5.5.1 Cleartext pipelined after STARTTLS\r\n"

    def greeting_reply(self) -> Reply:
        return SMTPReply()

    def backend_starttls(self, server_name: bytes) -> tuple[Exchange, ...]:
        return (
            Exchange(b"EHLO " + server_name + b"\r\n", SMTPReply(b"250", required=b"STARTTLS")),
            Exchange(b"STARTTLS\r\n", SMTPReply(b"220")),
        )

    def capability_reply(self, command: bytes) -> Reply | None:
        return SMTPReply() if first_word(command) == b"EHLO" else None

    def without_starttls(self, lines: list[bytes]) -> list[bytes]:
        head, *keywords = lines  # the first line is the server's name, not a keyword
        kept = [head, *(line for line in keywords if first_word(line[4:]) != b"STARTTLS")]
        last = kept[-1]
        if last[3:4] == b"-":  # the last line went: the one before it is now the last
            kept[-1] = last[:3] + b" " + last[4:]
        return kept


#: The SMTP preamble: ``preamble = "smtp"``.
SMTP = MailPreamble("smtp", SMTPRules())
