"""The sans-IO mail preambles (SMTP, IMAP, POP3): every path by example, then hostile
bytes on both sides.

``run`` drives a dialogue the way :mod:`l4proxy.preamble` does (bytes only when asked,
at most ``RECEIVE_SIZE`` at a time, ``b""`` once a side has no more) and checks the
driver's contract at every event, so every test, by example or by hypothesis, checks it.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence

import attrs
import pytest
from hypothesis import event, given, settings as hypothesis_settings, strategies as st

from l4proxy.protocols.dialogue import (
    RECEIVE_SIZE,
    Close,
    ConnectBackend,
    DialogueSettings,
    Done,
    Event,
    NeedBackendData,
    NeedClientData,
    SendToBackend,
    SendToClient,
    StartBackendTLS,
    StartClientTLS,
)
from l4proxy.protocols.imap import IMAP
from l4proxy.protocols.lines import REFUSAL_LIMIT, REPLY_LIMIT, LineBuffer, MailPreamble
from l4proxy.protocols.pop3 import POP3
from l4proxy.protocols.smtp import SMTP
from l4proxy.record import Outcome

PLAIN = DialogueSettings(server_name="mx.example")
BACKEND_TLS = DialogueSettings(server_name="mx.example", backend_tls=True)


@attrs.define
class Transcript:
    """What a dialogue did: its events but the reads, and what each side was sent."""

    events: list[Event] = attrs.Factory(list)
    to_client: bytes = b""
    to_backend: bytes = b""

    @property
    def end(self) -> Event:
        return self.events[-1]

    def after_tls(self) -> list[Event]:
        """The events once the client's TLS was asked for."""
        return self.events[self.events.index(StartClientTLS(alpn=_alpn(self))) + 1 :]


def _alpn(transcript: Transcript) -> tuple[bytes, ...]:
    return next(e.alpn for e in transcript.events if isinstance(e, StartClientTLS))


def run(
    preamble: MailPreamble,
    client: Sequence[bytes] = (),
    backend: Sequence[bytes] = (),
    settings: DialogueSettings = PLAIN,
) -> Transcript:
    """Drive a new dialogue to its Done or Close, feeding each side's chunks one per
    read, checking the driver's contract as it goes."""
    dialogue = preamble(settings)
    line_limit = preamble.rules.line_limit
    client_chunks, backend_chunks = deque(client), deque(backend)
    transcript = Transcript()
    client_fed = b""  # what the client sent, as far as the dialogue read it
    client_in_tls = b""  # the part of it after StartClientTLS
    backend_sent_after_setup = b""
    tls = connected = backend_tls = reading_client_in_tls = False
    for _ in range(100_000):
        event = dialogue.next_event()
        if isinstance(event, NeedClientData):
            chunk = client_chunks.popleft() if client_chunks else b""
            assert len(chunk) <= RECEIVE_SIZE
            dialogue.receive_client(chunk)
            client_fed += chunk
            if tls:
                client_in_tls += chunk
                reading_client_in_tls = True
            assert dialogue.buffered_client < line_limit + RECEIVE_SIZE
            continue
        if isinstance(event, NeedBackendData):
            assert connected, "read the backend before connecting"
            chunk = backend_chunks.popleft() if backend_chunks else b""
            assert len(chunk) <= RECEIVE_SIZE
            dialogue.receive_backend(chunk)
            assert dialogue.buffered_backend < REPLY_LIMIT + RECEIVE_SIZE
            continue
        transcript.events.append(event)
        if isinstance(event, SendToClient):
            assert event.data
            if not tls:
                assert event.data.endswith(b"\r\n"), "the proxy's own replies are whole lines"
            transcript.to_client += event.data
        elif isinstance(event, SendToBackend):
            assert event.data
            assert connected, "sent to the backend before connecting"
            transcript.to_backend += event.data
            if reading_client_in_tls:
                backend_sent_after_setup += event.data
        elif isinstance(event, StartClientTLS):
            assert not tls, "TLS asked twice"
            assert not connected
            # CVE-2011-0411: every byte read is consumed, up to the end of the STARTTLS line.
            assert dialogue.buffered_client == 0
            assert client_fed.endswith(b"\n")
            tls = True
        elif isinstance(event, ConnectBackend):
            assert tls, "mail needs TLS before a backend"
            assert not connected, "connected twice"
            connected = True
        elif isinstance(event, StartBackendTLS):
            assert connected
            assert settings.backend_tls
            assert not backend_tls, "backend TLS asked twice"
            assert dialogue.buffered_backend == 0
            backend_tls = True
        elif isinstance(event, Done):
            assert connected
            assert backend_tls == settings.backend_tls
            assert dialogue.buffered_client == dialogue.buffered_backend == 0
            # Every client byte read in TLS went on to the backend, in order.
            assert backend_sent_after_setup == client_in_tls
            return transcript
        else:
            assert isinstance(event, Close)
            assert event.reason
            return transcript
    raise AssertionError("the dialogue never ended")


def closed(outcome: Outcome, reason: str | None = None) -> Close:
    return Close(outcome, reason)


# SMTP

SMTP_GREETING = b"220 mx.example ESMTP l4proxy\r\n"
SMTP_EHLO = b"250-mx.example\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n"
SMTP_READY = b"220 2.0.0 Ready to start TLS\r\n"
SMTP_MUST = b"530 5.7.0 Must issue a STARTTLS command first\r\n"
BACKEND_GREETING = b"220-backend.example ESMTP\r\n220 welcome\r\n"
BACKEND_EHLO = b"250-backend.example\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 SIZE 10240000\r\n"
SMTP_TO_TLS = [b"EHLO client.example\r\n", b"STARTTLS\r\n"]


def test_smtp_whole_dialogue_filters_starttls_from_the_ehlo_reply() -> None:
    transcript = run(
        SMTP,
        client=[*SMTP_TO_TLS, b"EHLO client.example\r\n"],
        backend=[BACKEND_GREETING[:10], BACKEND_GREETING[10:], BACKEND_EHLO],
    )
    assert transcript.events == [
        SendToClient(SMTP_GREETING),
        SendToClient(SMTP_EHLO),
        SendToClient(SMTP_READY),
        StartClientTLS(),
        ConnectBackend(),
        SendToBackend(b"EHLO client.example\r\n"),
        SendToClient(b"250-backend.example\r\n250-PIPELINING\r\n250 SIZE 10240000\r\n"),
        Done(),
    ]


def test_smtp_starttls_as_the_last_ehlo_line_makes_the_line_before_it_the_last() -> None:
    reply = b"250-backend.example\r\n250-SIZE 100\r\n250 STARTTLS\r\n"
    transcript = run(SMTP, client=[*SMTP_TO_TLS, b"EHLO c\r\n"], backend=[b"220 hi\r\n", reply])
    assert transcript.after_tls()[-2:] == [
        SendToClient(b"250-backend.example\r\n250 SIZE 100\r\n"),
        Done(),
    ]


def test_smtp_backend_starttls_then_a_first_command_that_goes_on_as_it_is() -> None:
    transcript = run(
        SMTP,
        client=[*SMTP_TO_TLS, b"mail FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"],
        backend=[b"220 backend.example ESMTP\r\n", BACKEND_EHLO, b"220 2.0.0 go ahead\r\n"],
        settings=BACKEND_TLS,
    )
    assert transcript.after_tls() == [
        ConnectBackend(),
        SendToBackend(b"EHLO mx.example\r\n"),
        SendToBackend(b"STARTTLS\r\n"),
        StartBackendTLS(),
        SendToBackend(b"mail FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"),
        Done(),
    ]


@pytest.mark.parametrize(
    ("backend", "reason"),
    [
        (
            [b"220 hi\r\n", b"250-b\r\n250 SIZE 1\r\n"],
            "backend's reply to 'EHLO mx.example': '250 SIZE 1'",
        ),
        (
            [b"220 hi\r\n", BACKEND_EHLO, b"454 4.7.0 TLS not available\r\n"],
            "backend's reply to 'STARTTLS': '454 4.7.0 TLS not available'",
        ),
        ([b"220 hi\r\n", BACKEND_EHLO, b"220 go\r\nearly"], "backend sent bytes after STARTTLS"),
        ([b"220 hi\r\n", b"250-b\r\n"], "backend closed during its reply to 'EHLO mx.example'"),
        ([b"220 hi\r\n", b"250-b\r\n251 x\r\n"], "backend's reply to 'EHLO mx.example': '251 x'"),
    ],
)
def test_smtp_backend_starttls_failures(backend: list[bytes], reason: str) -> None:
    transcript = run(SMTP, client=SMTP_TO_TLS, backend=backend, settings=BACKEND_TLS)
    assert transcript.end == closed(Outcome.BACKEND_PREAMBLE_FAILED, reason)
    assert StartBackendTLS() not in transcript.events
    assert transcript.to_client == SMTP_GREETING + SMTP_EHLO + SMTP_READY


def test_smtp_refusing_backend_greeting_is_passed_to_the_client() -> None:
    refusal = b"554-backend.example\r\n554 no service\r\n"
    transcript = run(SMTP, client=SMTP_TO_TLS, backend=[refusal])
    assert transcript.after_tls()[1:] == [
        SendToClient(refusal),
        closed(Outcome.BACKEND_PREAMBLE_FAILED, "backend's greeting: '554 no service'"),
    ]


@pytest.mark.parametrize(
    ("backend", "reason"),
    [
        ([b"HTTP/1.1 400 Bad Request\r\n"], "backend's greeting: 'HTTP/1.1 400 Bad Request'"),
        ([b"220-a\r\n230 b\r\n"], "backend's greeting: '230 b'"),
        ([b"220-half"], "backend closed during its greeting"),
        ([], "backend closed during its greeting"),
        ([b"2" * RECEIVE_SIZE] * 4, f"backend's greeting longer than {REPLY_LIMIT} bytes"),
    ],
)
def test_smtp_backend_greeting_that_cannot_be_read(backend: list[bytes], reason: str) -> None:
    transcript = run(SMTP, client=SMTP_TO_TLS, backend=backend)
    assert transcript.after_tls() == [
        ConnectBackend(),
        closed(Outcome.BACKEND_PREAMBLE_FAILED, reason),
    ]


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"HELO client.example", b"250 mx.example\r\n"),
        (b"helo client.example", b"250 mx.example\r\n"),
        (b"NOOP", b"250 2.0.0 OK\r\n"),
        (b"Rset", b"250 2.0.0 OK\r\n"),
        (b"ehlo c", SMTP_EHLO),
        (b"MAIL FROM:<a@example.com>", SMTP_MUST),
        (b"RCPT TO:<a@example.com>", SMTP_MUST),
        (b"DATA", SMTP_MUST),
        (b"AUTH PLAIN AGFsaWNlAHNlY3JldA==", SMTP_MUST),
        (b"VRFY alice", SMTP_MUST),
        (b"", SMTP_MUST),
        (b"\x16\x03\x01\x02\x00", SMTP_MUST),
        (b"STARTTLS now", b"501 5.5.4 Syntax error (no parameters allowed)\r\n"),
        (b"EHLO", b"501 5.5.4 Syntax: EHLO hostname\r\n"),  # RFC 5321 4.1.1.1: a domain
        (b"helo ", b"501 5.5.4 Syntax: HELO hostname\r\n"),
    ],
)
def test_smtp_cleartext_commands(command: bytes, reply: bytes) -> None:
    transcript = run(SMTP, client=[command + b"\r\n", b"QUIT\r\n"])
    assert transcript.events == [
        SendToClient(SMTP_GREETING),
        SendToClient(reply),
        SendToClient(b"221 2.0.0 Bye\r\n"),
        closed(Outcome.QUIT, "client quit before STARTTLS"),
    ]


def test_smtp_starttls_is_case_insensitive_and_bare_lf_ends_a_line() -> None:
    transcript = run(SMTP, client=[b"StartTLS\n"], backend=[b"220 hi\n"])
    assert transcript.events[:3] == [
        SendToClient(SMTP_GREETING),
        SendToClient(SMTP_READY),
        StartClientTLS(),
    ]
    assert transcript.end == closed(Outcome.QUIT, "client closed before its first command in TLS")


@pytest.mark.parametrize("after", [b"MAIL FROM:<a@example.com>\r\n", b"\x16", b"\n"])
def test_smtp_cleartext_pipelined_after_starttls_is_refused(after: bytes) -> None:
    """CVE-2011-0411: bytes after STARTTLS in the same read never reach TLS."""
    transcript = run(SMTP, client=[b"EHLO c\r\nSTARTTLS\r\n" + after])
    assert transcript.events[2:] == [
        SendToClient(b"554 5.5.1 Cleartext pipelined after STARTTLS\r\n"),
        closed(Outcome.BAD_PREAMBLE, "cleartext pipelined after STARTTLS"),
    ]


def test_smtp_pipelined_commands_before_starttls_are_answered_in_order() -> None:
    transcript = run(SMTP, client=[b"EHLO c\r\nNOOP\r\nSTARTTLS\r\n"], backend=[b"220 hi\r\n"])
    assert transcript.events[:5] == [
        SendToClient(SMTP_GREETING),
        SendToClient(SMTP_EHLO),
        SendToClient(b"250 2.0.0 OK\r\n"),
        SendToClient(SMTP_READY),
        StartClientTLS(),
    ]


def test_smtp_line_limit_is_512_bytes_with_the_crlf() -> None:
    longest = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    assert len(longest) == 512
    transcript = run(SMTP, client=[longest[:300], longest[300:], b"QUIT\r\n"])
    assert transcript.end == closed(Outcome.QUIT, "client quit before STARTTLS")
    transcript = run(SMTP, client=[b"NOOP " + b"x" * (512 - 6) + b"\r\n"])
    assert transcript.events[1:] == [
        SendToClient(b"500 5.5.2 Line too long\r\n"),
        closed(Outcome.BAD_PREAMBLE, "command line too long"),
    ]


def test_smtp_too_many_refused_commands_in_a_row() -> None:
    refused = [b"MAIL FROM:<a@example.com>\r\n"] * (REFUSAL_LIMIT - 1)
    transcript = run(SMTP, client=[*refused, b"NOOP\r\n", *refused, b"QUIT\r\n"])
    assert transcript.end == closed(Outcome.QUIT, "client quit before STARTTLS")
    transcript = run(SMTP, client=[b"VRFY x\r\n" * REFUSAL_LIMIT])
    assert transcript.events[-2:] == [
        SendToClient(b"421 4.7.0 mx.example Too many errors\r\n"),
        closed(Outcome.BAD_PREAMBLE, "too many refused commands"),
    ]
    assert transcript.to_client.count(SMTP_MUST) == REFUSAL_LIMIT - 1


@pytest.mark.parametrize("client", [[], [b"EHLO c\r\n"], [b"EHLO c\r\nNOO"]])
def test_smtp_client_closing_before_starttls(client: list[bytes]) -> None:
    assert run(SMTP, client=client).end == closed(Outcome.QUIT, "client closed before STARTTLS")


def test_smtp_client_bytes_after_ehlo_go_on_after_the_reply_and_backend_extras_too() -> None:
    transcript = run(
        SMTP,
        client=[*SMTP_TO_TLS, b"EHLO c\r\nAUTH PLAIN"],
        backend=[b"220 hi\r\n", b"250-b\r\n250 STARTTLS\r\n334 "],
    )
    assert transcript.after_tls()[1:] == [
        SendToBackend(b"EHLO c\r\n"),
        SendToClient(b"250 b\r\n334 "),
        SendToBackend(b"AUTH PLAIN"),
        Done(),
    ]


def test_smtp_capability_reply_that_cannot_be_parsed_goes_on_unfiltered() -> None:
    reply = b"250-b\r\nnot smtp\r\n250 STARTTLS\r\n"
    transcript = run(SMTP, client=[*SMTP_TO_TLS, b"EHLO c\r\n"], backend=[b"220 hi\r\n", reply])
    assert transcript.after_tls()[-2:] == [SendToClient(reply), Done()]


def test_smtp_capability_reply_over_the_cap_goes_on_unfiltered() -> None:
    """What is held is sent on and the data phase brings the rest."""
    reply = b"250-STARTTLS\r\n" + b"250-X" + b"y" * REPLY_LIMIT + b"\r\n250 STARTTLS\r\n"
    reads = [reply[i : i + RECEIVE_SIZE] for i in range(0, len(reply), RECEIVE_SIZE)]
    transcript = run(SMTP, client=[*SMTP_TO_TLS, b"EHLO c\r\n"], backend=[b"220 hi\r\n", *reads])
    sent = b"".join(e.data for e in transcript.after_tls() if isinstance(e, SendToClient))
    assert transcript.end == Done()
    assert REPLY_LIMIT <= len(sent) < REPLY_LIMIT + RECEIVE_SIZE
    assert reply.startswith(sent)


def test_smtp_backend_closing_during_the_capability_reply() -> None:
    transcript = run(
        SMTP, client=[*SMTP_TO_TLS, b"EHLO c\r\n"], backend=[b"220 hi\r\n", b"250-b\r\n250-ST"]
    )
    assert transcript.events[-2:] == [
        SendToClient(b"250-b\r\n250-ST"),
        closed(Outcome.BACKEND_PREAMBLE_FAILED, "backend closed during its capability reply"),
    ]


def test_smtp_over_long_first_command_in_tls_is_the_backends_to_judge() -> None:
    long_line = b"X" * 700
    transcript = run(SMTP, client=[*SMTP_TO_TLS, long_line], backend=[b"220 hi\r\n"])
    assert transcript.after_tls()[1:] == [SendToBackend(long_line), Done()]


def test_a_server_name_cannot_break_a_line() -> None:
    transcript = run(SMTP, settings=DialogueSettings(server_name="evil\r\n250 x é"))
    assert transcript.events[0] == SendToClient(b"220 evil??250?x?? ESMTP l4proxy\r\n")


def test_asking_again_after_the_end_gives_the_end_again() -> None:
    dialogue = SMTP(PLAIN)
    assert dialogue.next_event() == SendToClient(SMTP_GREETING)
    assert dialogue.next_event() == NeedClientData()
    dialogue.receive_client(b"QUIT\r\n")
    assert dialogue.next_event() == SendToClient(b"221 2.0.0 Bye\r\n")
    end = dialogue.next_event()
    assert isinstance(end, Close)
    assert dialogue.next_event() == end


# IMAP

IMAP_CAPABILITIES = b"IMAP4rev1 IMAP4rev2 STARTTLS LOGINDISABLED"
IMAP_GREETING = b"* OK [CAPABILITY " + IMAP_CAPABILITIES + b"] mx.example ready\r\n"
IMAP_TO_TLS = [b"a1 CAPABILITY\r\n", b"a2 STARTTLS\r\n"]
IMAP_BACKEND_GREETING = b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] Dovecot ready.\r\n"


def test_imap_whole_dialogue_filters_starttls_from_the_capability_reply() -> None:
    reply = (
        b"* CAPABILITY IMAP4rev1 SASL-IR starttls AUTH=PLAIN\r\n"
        b"* OK [ALERT] STARTTLS is fine to mention here\r\n"
        b"b1 OK [CAPABILITY IMAP4rev1 STARTTLS ID] Pre-login capabilities listed\r\n"
    )
    transcript = run(
        IMAP,
        client=[*IMAP_TO_TLS, b"b1 CAPABILITY\r\n"],
        backend=[IMAP_BACKEND_GREETING, reply],
    )
    assert transcript.events == [
        SendToClient(IMAP_GREETING),
        SendToClient(b"* CAPABILITY " + IMAP_CAPABILITIES + b"\r\na1 OK CAPABILITY completed\r\n"),
        SendToClient(b"a2 OK Begin TLS negotiation now\r\n"),
        StartClientTLS(alpn=(b"imap",)),
        ConnectBackend(),
        SendToBackend(b"b1 CAPABILITY\r\n"),
        SendToClient(
            b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN\r\n"
            b"* OK [ALERT] STARTTLS is fine to mention here\r\n"
            b"b1 OK [CAPABILITY IMAP4rev1 ID] Pre-login capabilities listed\r\n"
        ),
        Done(),
    ]


def test_imap_backend_starttls_then_login_goes_on() -> None:
    transcript = run(
        IMAP,
        client=[*IMAP_TO_TLS, b"a3 LOGIN alice secret\r\n"],
        backend=[b"* OK ready\r\n", b"* OK still here\r\nL4P1 OK Begin TLS\r\n"],
        settings=BACKEND_TLS,
    )
    assert transcript.after_tls() == [
        ConnectBackend(),
        SendToBackend(b"L4P1 STARTTLS\r\n"),
        StartBackendTLS(),
        SendToBackend(b"a3 LOGIN alice secret\r\n"),
        Done(),
    ]


@pytest.mark.parametrize(
    ("backend", "reason"),
    [
        ([b"* OK hi\r\n", b"L4P1 BAD no\r\n"], "backend's reply to 'L4P1 STARTTLS': 'L4P1 BAD no'"),
        ([b"* OK hi\r\n", b"L4P1 MAYBE\r\n"], "backend's reply to 'L4P1 STARTTLS': 'L4P1 MAYBE'"),
        ([b"* OK hi\r\n", b"junk\r\n"], "backend's reply to 'L4P1 STARTTLS': 'junk'"),
        ([b"* PREAUTH hi\r\n", b"L4P1 OK\r\n\x16"], "backend sent bytes after STARTTLS"),
        ([b"+ what\r\n"], "backend's greeting: '+ what'"),
    ],
)
def test_imap_backend_failures(backend: list[bytes], reason: str) -> None:
    transcript = run(IMAP, client=IMAP_TO_TLS, backend=backend, settings=BACKEND_TLS)
    assert transcript.end == closed(Outcome.BACKEND_PREAMBLE_FAILED, reason)


def test_imap_bye_greeting_is_passed_to_the_client() -> None:
    transcript = run(IMAP, client=IMAP_TO_TLS, backend=[b"* BYE too busy\r\n"])
    assert transcript.after_tls()[1:] == [
        SendToClient(b"* BYE too busy\r\n"),
        closed(Outcome.BACKEND_PREAMBLE_FAILED, "backend's greeting: '* BYE too busy'"),
    ]


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"t NOOP", b"t OK NOOP completed\r\n"),
        (b"t noop", b"t OK NOOP completed\r\n"),
        (b"t LOGIN alice secret", b"t NO [PRIVACYREQUIRED] Use STARTTLS first\r\n"),
        (b"t authenticate PLAIN", b"t NO [PRIVACYREQUIRED] Use STARTTLS first\r\n"),
        (b"t LOGIN {5}", b"t NO [PRIVACYREQUIRED] Use STARTTLS first\r\n"),
        (b"t SELECT INBOX", b"t BAD Command not allowed before STARTTLS\r\n"),
        (b"t", b"t BAD Missing command\r\n"),
        (b"t STARTTLS now", b"t BAD STARTTLS takes no arguments\r\n"),
        (b"", b"* BAD Missing or invalid tag\r\n"),
        (b"+ LOGIN", b"* BAD Missing or invalid tag\r\n"),
        (b"a*b NOOP", b"* BAD Missing or invalid tag\r\n"),
    ],
)
def test_imap_cleartext_commands(command: bytes, reply: bytes) -> None:
    transcript = run(IMAP, client=[command + b"\r\n", b"z LOGOUT\r\n"])
    assert transcript.events == [
        SendToClient(IMAP_GREETING),
        SendToClient(reply),
        SendToClient(b"* BYE mx.example logging out\r\nz OK LOGOUT completed\r\n"),
        closed(Outcome.QUIT, "client quit before STARTTLS"),
    ]


def test_imap_cleartext_pipelined_after_starttls_is_refused() -> None:
    transcript = run(IMAP, client=[b"a STARTTLS\r\nb LOGIN alice secret\r\n"])
    assert transcript.events[1:] == [
        SendToClient(b"* BYE Cleartext pipelined after STARTTLS\r\n"),
        closed(Outcome.BAD_PREAMBLE, "cleartext pipelined after STARTTLS"),
    ]


def test_imap_line_limit_is_8_kib() -> None:
    transcript = run(IMAP, client=[b"a NOOP " + b"x" * 8 * 1024])
    assert transcript.events[1:] == [
        SendToClient(b"* BYE Line too long\r\n"),
        closed(Outcome.BAD_PREAMBLE, "command line too long"),
    ]


def test_imap_capability_reply_is_read_up_to_the_clients_tag() -> None:
    transcript = run(
        IMAP,
        client=[*IMAP_TO_TLS, b"c CAPABILITY\r\n"],
        backend=[b"* OK hi\r\n", b"* CAPABILITY IMAP4rev1 STARTTLS\r\n", b"c OK done\r\n"],
    )
    assert transcript.after_tls()[-2:] == [
        SendToClient(b"* CAPABILITY IMAP4rev1\r\nc OK done\r\n"),
        Done(),
    ]


def test_imap_capability_reply_with_another_tag_goes_on_unfiltered() -> None:
    reply = b"* CAPABILITY IMAP4rev1 STARTTLS\r\nx OK not yours\r\n"
    transcript = run(
        IMAP, client=[*IMAP_TO_TLS, b"c CAPABILITY\r\n"], backend=[b"* OK hi\r\n", reply]
    )
    assert transcript.after_tls()[-2:] == [SendToClient(reply), Done()]


# POP3

POP3_GREETING = b"+OK mx.example ready\r\n"
POP3_CAPA = b"+OK Capability list follows\r\nSTLS\r\nIMPLEMENTATION l4proxy\r\n.\r\n"
POP3_TO_TLS = [b"CAPA\r\n", b"STLS\r\n"]


def test_pop3_whole_dialogue_filters_stls_from_the_capa_reply() -> None:
    transcript = run(
        POP3,
        client=[*POP3_TO_TLS, b"capa\r\n"],
        backend=[
            b"+OK Dovecot ready. <1.2@backend>\r\n",
            b"+OK\r\nTOP\r\nstls\r\nUSER\r\n",
            b".\r\n",
        ],
    )
    assert transcript.events == [
        SendToClient(POP3_GREETING),
        SendToClient(POP3_CAPA),
        SendToClient(b"+OK Begin TLS negotiation\r\n"),
        StartClientTLS(alpn=(b"pop3",)),
        ConnectBackend(),
        SendToBackend(b"capa\r\n"),
        SendToClient(b"+OK\r\nTOP\r\nUSER\r\n.\r\n"),
        Done(),
    ]


def test_pop3_negative_capa_reply_is_one_line() -> None:
    transcript = run(POP3, client=[*POP3_TO_TLS, b"CAPA\r\n"], backend=[b"+OK\r\n", b"-ERR no\r\n"])
    assert transcript.after_tls()[-2:] == [SendToClient(b"-ERR no\r\n"), Done()]


def test_pop3_backend_stls_then_user_goes_on() -> None:
    transcript = run(
        POP3,
        client=[*POP3_TO_TLS, b"USER alice\r\n"],
        backend=[b"+OK hi\r\n", b"+OK go\r\n"],
        settings=BACKEND_TLS,
    )
    assert transcript.after_tls() == [
        ConnectBackend(),
        SendToBackend(b"STLS\r\n"),
        StartBackendTLS(),
        SendToBackend(b"USER alice\r\n"),
        Done(),
    ]


@pytest.mark.parametrize(
    ("backend", "reason"),
    [
        ([b"+OK hi\r\n", b"-ERR no TLS\r\n"], "backend's reply to 'STLS': '-ERR no TLS'"),
        ([b"+OKAY\r\n"], "backend's greeting: '+OKAY'"),
        ([b"+OK hi\r\n"], "backend closed during its reply to 'STLS'"),
    ],
)
def test_pop3_backend_failures(backend: list[bytes], reason: str) -> None:
    transcript = run(POP3, client=POP3_TO_TLS, backend=backend, settings=BACKEND_TLS)
    assert transcript.end == closed(Outcome.BACKEND_PREAMBLE_FAILED, reason)


def test_pop3_err_greeting_is_passed_to_the_client() -> None:
    transcript = run(POP3, client=POP3_TO_TLS, backend=[b"-ERR maintenance\r\n"])
    assert transcript.events[-2:] == [
        SendToClient(b"-ERR maintenance\r\n"),
        closed(Outcome.BACKEND_PREAMBLE_FAILED, "backend's greeting: '-ERR maintenance'"),
    ]


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"USER alice", b"-ERR Use STLS first\r\n"),
        (b"pass secret", b"-ERR Use STLS first\r\n"),
        (b"APOP alice 0123456789abcdef", b"-ERR Use STLS first\r\n"),
        (b"AUTH PLAIN", b"-ERR Use STLS first\r\n"),
        (b"NOOP", b"-ERR Command not valid before STLS\r\n"),
        (b"RSET", b"-ERR Command not valid before STLS\r\n"),
        (b"STAT", b"-ERR Command not valid before STLS\r\n"),
        (b"STLS please", b"-ERR STLS takes no arguments\r\n"),
    ],
)
def test_pop3_cleartext_commands(command: bytes, reply: bytes) -> None:
    transcript = run(POP3, client=[command + b"\r\n", b"quit\r\n"])
    assert transcript.events == [
        SendToClient(POP3_GREETING),
        SendToClient(reply),
        SendToClient(b"+OK mx.example signing off\r\n"),
        closed(Outcome.QUIT, "client quit before STARTTLS"),
    ]


def test_pop3_cleartext_pipelined_after_stls_and_line_limit() -> None:
    transcript = run(POP3, client=[b"STLS\r\nUSER alice\r\n"])
    assert transcript.events[1:] == [
        SendToClient(b"-ERR Cleartext pipelined after STLS\r\n"),
        closed(Outcome.BAD_PREAMBLE, "cleartext pipelined after STARTTLS"),
    ]
    assert (
        run(POP3, client=[b"USER " + b"a" * 248 + b"\r\n", b"QUIT\r\n"]).end.outcome == Outcome.QUIT
    )  # type: ignore[union-attr]
    transcript = run(POP3, client=[b"USER " + b"a" * 249 + b"\r\n"])
    assert transcript.events[1:] == [
        SendToClient(b"-ERR Line too long\r\n"),
        closed(Outcome.BAD_PREAMBLE, "command line too long"),
    ]


# The line buffer


def test_line_buffer_finds_lines_fed_a_byte_at_a_time_and_keeps_line_ends() -> None:
    buffer = LineBuffer(limit=8)
    for byte in b"ab\r\ncd\nefgh":
        buffer.feed(bytes([byte]))
    assert (buffer.pop_line(), buffer.pop_line(), buffer.pop_line()) == (b"ab\r\n", b"cd\n", None)
    assert (buffer.held, buffer.too_long) == (4, False)
    buffer.feed(b"ijkl")
    assert buffer.too_long
    assert buffer.take() == b"efghijkl"
    assert buffer.held == 0
    buffer.feed(b"")
    assert buffer.eof


# Hostile bytes on both sides

PREAMBLES = [SMTP, IMAP, POP3]
CLIENT_WORDS = {
    "smtp": [b"EHLO c\r\n", b"HELO c\r\n", b"STARTTLS\r\n", b"NOOP\r\n", b"QUIT\r\n", b"MAIL\r\n"],
    "imap": [b"a CAPABILITY\r\n", b"a STARTTLS\r\n", b"a LOGIN x y\r\n", b"a LOGOUT\r\n"],
    "pop3": [b"CAPA\r\n", b"STLS\r\n", b"USER a\r\n", b"QUIT\r\n"],
}
BACKEND_WORDS = {
    "smtp": [b"220 hi\r\n", b"220-a\r\n", b"250-b\r\n", b"250-STARTTLS\r\n", b"250 SIZE 1\r\n"],
    "imap": [b"* OK hi\r\n", b"* BYE\r\n", b"a OK\r\n", b"* CAPABILITY STARTTLS\r\n"],
    "pop3": [b"+OK\r\n", b"-ERR\r\n", b"STLS\r\n", b".\r\n"],
}
#: A client's STARTTLS alone in its read, and a backend's greeting and STARTTLS replies:
#: sessions built on them reach the paths after TLS.
STARTTLS = {"smtp": b"STARTTLS\r\n", "imap": b"a STARTTLS\r\n", "pop3": b"STLS\r\n"}
BACKEND_SETUP = {
    "smtp": [b"220 hi\r\n", b"250-b\r\n250 STARTTLS\r\n", b"220 go\r\n"],
    "imap": [b"* OK hi\r\n", b"L4P1 OK\r\n"],
    "pop3": [b"+OK\r\n", b"+OK\r\n"],
}
FILLERS = [b"\r\n", b"\n", b" ", b"x" * 300, b"y" * 9000]


def chunks(words: list[bytes]) -> st.SearchStrategy[list[bytes]]:
    """Streams of protocol words and arbitrary bytes, cut at arbitrary points into
    non-empty reads of at most RECEIVE_SIZE bytes."""
    pieces = st.one_of(st.sampled_from(words + FILLERS), st.binary(max_size=24))
    return st.lists(pieces, max_size=16).map(b"".join).flatmap(_cut)


def _cut(stream: bytes) -> st.SearchStrategy[list[bytes]]:
    def at(cuts: list[int]) -> list[bytes]:
        bounds = [0, *sorted(cuts), len(stream)]
        reads = [stream[a:b] for a, b in itertools.pairwise(bounds)]
        return [r[i : i + RECEIVE_SIZE] for r in reads if r for i in range(0, len(r), RECEIVE_SIZE)]

    return st.lists(st.integers(0, len(stream)), max_size=8).map(at)


def client_reads(name: str) -> st.SearchStrategy[list[bytes]]:
    """Anything, or anything, then STARTTLS in a read of its own, then anything."""
    anything = chunks(CLIENT_WORDS[name])
    session = st.tuples(anything, anything).map(lambda ba: [*ba[0], STARTTLS[name], *ba[1]])
    return st.one_of(anything, session)


def backend_reads(name: str) -> st.SearchStrategy[list[bytes]]:
    """Anything, or some of a good start (greeting, STARTTLS replies), then anything."""
    setup = BACKEND_SETUP[name]
    start = st.integers(0, len(setup)).map(lambda n: setup[:n])
    anything = chunks(BACKEND_WORDS[name])
    return st.tuples(start, anything).map(lambda sa: [*sa[0], *sa[1]])


@hypothesis_settings(max_examples=200, deadline=None)
@given(data=st.data(), backend_tls=st.booleans())
@pytest.mark.parametrize("preamble", PREAMBLES, ids=lambda p: p.name)
def test_protocol_words_and_garbage_in_any_chunks_keep_the_contract(
    preamble: MailPreamble, backend_tls: bool, data: st.DataObject
) -> None:
    client = data.draw(client_reads(preamble.name), label="client")
    backend = data.draw(backend_reads(preamble.name), label="backend")
    end = run(preamble, client, backend, DialogueSettings(backend_tls=backend_tls)).end
    reason = getattr(end, "reason", "")
    event(
        f"{type(end).__name__} {reason.split(':')[0]}"
    )  # the paths taken, for --hypothesis-show-statistics


@hypothesis_settings(max_examples=100, deadline=None)
@given(
    client=st.lists(st.binary(min_size=1, max_size=64), max_size=12),
    backend=st.lists(st.binary(min_size=1, max_size=64), max_size=12),
    backend_tls=st.booleans(),
)
@pytest.mark.parametrize("preamble", PREAMBLES, ids=lambda p: p.name)
def test_arbitrary_bytes_keep_the_contract(
    preamble: MailPreamble, client: list[bytes], backend: list[bytes], backend_tls: bool
) -> None:
    run(preamble, client, backend, DialogueSettings(backend_tls=backend_tls))


@hypothesis_settings(max_examples=100, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("preamble", PREAMBLES, ids=lambda p: p.name)
def test_the_path_to_tls_in_any_chunks_reaches_the_backend(
    preamble: MailPreamble, data: st.DataObject
) -> None:
    """Whole commands cut anywhere: as long as nothing follows STARTTLS in its read, the
    dialogue gets to the backend and hands over."""
    to_tls = {"smtp": SMTP_TO_TLS, "imap": IMAP_TO_TLS, "pop3": POP3_TO_TLS}[preamble.name]
    *before, starttls = to_tls
    client = [*data.draw(_cut(b"".join(before) + starttls[:-1]), label="client"), starttls[-1:]]
    greeting = {"smtp": BACKEND_GREETING, "imap": IMAP_BACKEND_GREETING, "pop3": b"+OK\r\n"}
    backend = data.draw(_cut(greeting[preamble.name]), label="backend")
    transcript = run(preamble, [*client, b"NOOP\r\n"], backend)
    assert transcript.end == Done()
