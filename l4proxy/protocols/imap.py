"""The IMAP STARTTLS preamble (RFC 9051 §6.2.1, RFC 2595), sans-IO: :data:`IMAP`.

Before TLS the proxy is the IMAP server in the not-authenticated state (the shape every
mail preamble shares is in :mod:`l4proxy.protocols.lines`):

* It greets ``* OK [CAPABILITY IMAP4rev1 IMAP4rev2 STARTTLS LOGINDISABLED] <server_name>
  ready``. ``tag CAPABILITY`` lists the same, ``tag NOOP`` is OK, and ``tag LOGOUT``
  gets ``* BYE`` and ``tag OK`` and ends the connection (``quit``). ``LOGIN`` and
  ``AUTHENTICATE`` get ``tag NO [PRIVACYREQUIRED]`` (LOGINDISABLED says so already),
  other commands ``tag BAD``, and a line without a valid tag ``* BAD``. Commands are
  case-insensitive; tags are echoed as sent.
* ``tag STARTTLS`` gets ``tag OK Begin TLS negotiation now``, then TLS, unless bytes
  already follow it (CVE-2011-0411). Then the client hears ``* BYE`` and is hung up
  on (``bad_preamble``), as it is after a line over 8 KiB or ten refused commands in a
  row.

In TLS, the backend's greeting is swallowed (``* BYE`` is passed to the client and
ends the connection; ``* OK`` and ``* PREAUTH`` are fine). With backend TLS, the proxy
sends ``L4P1 STARTTLS`` and needs ``L4P1 OK``. The client's first command then goes to
the backend: if it is ``tag CAPABILITY``, the untagged lines up to ``tag OK`` come back
with the STARTTLS atom taken out of ``* CAPABILITY`` lines and ``[CAPABILITY ...]``
response codes (RFC 3207 §4.2's rule, which RFC 9051 §6.2.1 also implies).

Callers should know that a client which skips CAPABILITY and logs in at once is passed on
as it is. Without backend TLS, the backend sees a cleartext session. If it advertises
LOGINDISABLED there, the client will not log in, so it must allow plaintext login from
the proxy. Backend replies are read as lines: a literal (``{n}``) in one is not
expected before login.
"""

from __future__ import annotations

import re
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
    strip_eol,
)

__all__ = ["BACKEND_TAG", "IMAP", "LINE_LIMIT", "IMAPGreeting", "IMAPRules", "TaggedReply"]

#: The longest command line the proxy reads before TLS (RFC 9051 leaves it to the
#: server; RFC 7162 §4 asks clients to keep to about 8192 octets).
LINE_LIMIT = 8 * 1024
#: The tag of the proxy's own STARTTLS towards the backend.
BACKEND_TAG = b"L4P1"

_CAPABILITIES = b"IMAP4rev1 IMAP4rev2 STARTTLS LOGINDISABLED"
#: RFC 9051 §9: a tag is ASTRING-CHARs but "+": printable ASCII but atom-specials.
_NOT_IN_TAG = frozenset(b'(){%*"\\+')
#: Commands that take no arguments before TLS.
_BARE = frozenset((b"CAPABILITY", b"NOOP", b"LOGOUT", b"STARTTLS"))
_CAPABILITY_CODE = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)


def _is_tag(word: bytes) -> bool:
    return bool(word) and all(0x21 <= c < 0x7F and c not in _NOT_IN_TAG for c in word)


class IMAPGreeting:
    """The backend's greeting: one line, ``* OK`` or ``* PREAUTH`` (fine) or ``* BYE``."""

    __slots__ = ()

    def add(self, line: bytes) -> Verdict | None:
        """The verdict on the greeting's one line."""
        words = strip_eol(line).split(maxsplit=2)
        if len(words) < 2 or words[0] != b"*":
            return Verdict.MALFORMED
        status = words[1].upper()
        if status in (b"OK", b"PREAUTH"):
            return Verdict.POSITIVE
        return Verdict.NEGATIVE if status == b"BYE" else Verdict.MALFORMED


class TaggedReply:
    """A reply to a tagged command: untagged lines (``* ...``) up to the line with the
    tag; ``OK`` there is positive, ``NO`` or ``BAD`` negative."""

    __slots__ = ("_prefix",)

    def __init__(self, tag: bytes) -> None:
        self._prefix = tag + b" "

    def add(self, line: bytes) -> Verdict | None:
        """Take the next line: the verdict at the tagged one, else ``None``."""
        text = strip_eol(line)
        if text.startswith(self._prefix):
            status = first_word(text[len(self._prefix) :])
            if status == b"OK":
                return Verdict.POSITIVE
            return Verdict.NEGATIVE if status in (b"NO", b"BAD") else Verdict.MALFORMED
        if text.startswith((b"* ", b"+")):
            return None
        return Verdict.MALFORMED


@attrs.frozen
class IMAPRules:
    """IMAP's words for :class:`~l4proxy.protocols.lines.MailDialogue`."""

    line_limit: ClassVar[int] = LINE_LIMIT
    alpn: ClassVar[tuple[bytes, ...]] = (b"imap",)  # IANA's ALPN id (RFC 2595)

    def greeting(self, server_name: bytes) -> bytes:
        return b"* OK [CAPABILITY " + _CAPABILITIES + b"] " + server_name + b" ready\r\n"

    def answer(self, command: bytes, server_name: bytes) -> Answer:
        words = command.split(maxsplit=2)
        if not words or not _is_tag(words[0]):
            return Answer(b"* BAD Missing or invalid tag\r\n", refused=True)
        tag = words[0]
        verb = words[1].upper() if len(words) > 1 else b""
        if verb in _BARE and len(words) > 2:
            return Answer(tag + b" BAD " + verb + b" takes no arguments\r\n", refused=True)
        if verb == b"CAPABILITY":
            return Answer(
                b"* CAPABILITY " + _CAPABILITIES + b"\r\n" + tag + b" OK CAPABILITY completed\r\n"
            )
        if verb == b"NOOP":
            return Answer(tag + b" OK NOOP completed\r\n")
        if verb == b"LOGOUT":
            bye = b"* BYE " + server_name + b" logging out\r\n"
            return Answer(bye + tag + b" OK LOGOUT completed\r\n", Then.QUIT)
        if verb == b"STARTTLS":
            return Answer(tag + b" OK Begin TLS negotiation now\r\n", Then.START_TLS)
        if verb in (b"LOGIN", b"AUTHENTICATE"):
            return Answer(tag + b" NO [PRIVACYREQUIRED] Use STARTTLS first\r\n", refused=True)
        if not verb:
            return Answer(tag + b" BAD Missing command\r\n", refused=True)
        return Answer(tag + b" BAD Command not allowed before STARTTLS\r\n", refused=True)

    def last_words(self, violation: Violation, server_name: bytes) -> bytes:
        if violation is Violation.LINE_TOO_LONG:
            return b"* BYE Line too long\r\n"
        if violation is Violation.TOO_MANY_ERRORS:
            return b"* BYE Too many errors\r\n"
        return b"* BYE Cleartext pipelined after STARTTLS\r\n"

    def greeting_reply(self) -> Reply:
        return IMAPGreeting()

    def backend_starttls(self, server_name: bytes) -> tuple[Exchange, ...]:
        return (Exchange(BACKEND_TAG + b" STARTTLS\r\n", TaggedReply(BACKEND_TAG)),)

    def capability_reply(self, command: bytes) -> Reply | None:
        words = command.split()
        if len(words) == 2 and _is_tag(words[0]) and words[1].upper() == b"CAPABILITY":
            return TaggedReply(words[0])
        return None

    def without_starttls(self, lines: list[bytes]) -> list[bytes]:
        return [_without_starttls(line) for line in lines]


def _without_starttls(line: bytes) -> bytes:
    """The line without the STARTTLS atom in a ``* CAPABILITY`` list or in a
    ``[CAPABILITY ...]`` response code (the same line if there is none)."""
    text = strip_eol(line)
    line_end = line[len(text) :]
    words = text.split(b" ")
    if len(words) > 1 and words[0] == b"*" and words[1].upper() == b"CAPABILITY":
        text = b" ".join(words[:2] + [word for word in words[2:] if word.upper() != b"STARTTLS"])
    text = _CAPABILITY_CODE.sub(_code_without_starttls, text)
    return text + line_end


def _code_without_starttls(match: re.Match[bytes]) -> bytes:
    atoms = [atom for atom in match[1].split(b" ") if atom.upper() != b"STARTTLS"]
    return b"[CAPABILITY " + b" ".join(atoms) + b"]"


#: The IMAP preamble: ``preamble = "imap"``.
IMAP = MailPreamble("imap", IMAPRules())
