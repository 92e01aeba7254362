"""The mail preambles end to end: real servers (aiosmtpd, Dovecot) behind a proxy that
offers STARTTLS itself and terminates TLS, real clients (smtplib, ``swaks --tls``,
imaplib, poplib) in front; and STARTTLS command injection, which must never reach a
backend.

The stdlib clients are blocking and run in threads (``trio.to_thread``), bounded by
their socket timeouts. They verify the proxy's certificate against the name they were
given as ``host``, so each is pointed at 127.0.0.1 and then told the name to check.
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import ssl
from typing import TYPE_CHECKING

import pytest
import trio

import l4proxy

from .conftest import read_line
from .realmail import (
    MAIL_PASSWORD,
    MAIL_USER,
    STORED_MESSAGE,
    Dovecot,
    SMTPServer,
    dovecot,
    smtp_server,
)
from .realservers import require_binary, run_client

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from .conftest import AccessWatcher
    from .tlsfixtures import PKI

CLIENT_TIMEOUT = 15
#: A message with what SMTP transports must keep intact: a dot-stuffed line, a long line,
#: 8-bit bytes, an empty line, CRLF ends.
MESSAGE = (
    b"From: alice@example.org\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: byte for byte\r\n"
    b"\r\n"
    b"First line.\r\n"
    b".a line that starts with a dot\r\n"
    b"\r\n" + b"x" * 900 + b"\r\n"
    b"caf\xc3\xa9 8-bit\r\n"
)


@pytest.fixture(scope="session")
def mailboxes() -> Iterator[Dovecot]:
    with dovecot() as server:
        yield server


@pytest.fixture
def smtp_backend() -> Iterator[SMTPServer]:
    with smtp_server() as server:
        yield server


async def _proxy(
    nursery: trio.Nursery, pki: PKI, preamble: str, backend: str, **settings: object
) -> int:
    listener = l4proxy.ListenerConfig(
        name=preamble,
        listen=["127.0.0.1:0"],
        backends=[backend],
        tls=l4proxy.TLSConfig(certs=[l4proxy.CertKey(cert=pki.a.combined)]),
        preamble=preamble,
        **settings,  # type: ignore[arg-type]
    )
    bound = await nursery.start(l4proxy.Proxy(l4proxy.Config(listeners=[listener])).serve)
    port: int = bound[0].port
    return port


# --------------------------------------------------------------------------- SMTP


def _smtplib_session(port: int, context: ssl.SSLContext) -> dict[str, object]:
    seen: dict[str, object] = {}
    with smtplib.SMTP("127.0.0.1", port, timeout=CLIENT_TIMEOUT) as smtp:
        smtp._host = "mail.b.example"  # type: ignore[attr-defined]  # the name to verify
        smtp.ehlo("client.example")
        seen["before"] = dict(smtp.esmtp_features)
        seen["refused"] = smtp.mail("alice@example.org")
        smtp.starttls(context=context)
        smtp.ehlo("client.example")
        seen["after"] = dict(smtp.esmtp_features)
        smtp.sendmail("alice@example.org", ["bob@example.org"], MESSAGE)
        seen["quit"] = smtp.docmd("QUIT")
        # As a careful client: read the proxy's close_notify (it follows the backend's
        # close) and send ours, so neither side sees a reset.
        assert isinstance(smtp.sock, ssl.SSLSocket)
        smtp.sock.unwrap()
        smtp.close()
    return seen


async def test_smtplib_starttls_delivers_byte_for_byte(
    nursery: trio.Nursery, pki: PKI, smtp_backend: SMTPServer, access: AccessWatcher
) -> None:
    port = await _proxy(nursery, pki, "smtp", smtp_backend.address)
    seen = await trio.to_thread.run_sync(_smtplib_session, port, pki.client_context())
    assert "starttls" in seen["before"]  # type: ignore[operator]
    assert seen["refused"] == (530, b"5.7.0 Must issue a STARTTLS command first")
    assert "starttls" not in seen["after"]  # type: ignore[operator]  # filtered: in TLS now
    assert smtp_backend.sink.messages == [("alice@example.org", ["bob@example.org"], MESSAGE)]
    assert smtp_backend.sink.ehlo_names == ["client.example"]  # only the one inside TLS
    assert seen["quit"] == (221, b"Bye")  # aiosmtpd's: the session is the backend's now
    (record,) = await access.wait(1)
    assert record.outcome == "ok"
    assert record.sni == "mail.b.example"
    assert record.tls_version is not None


async def test_swaks_tls_delivers_byte_for_byte(
    nursery: trio.Nursery,
    pki: PKI,
    smtp_backend: SMTPServer,
    access: AccessWatcher,
    tmp_path: Path,
) -> None:
    port = await _proxy(nursery, pki, "smtp", smtp_backend.address)
    message = tmp_path / "message.eml"
    message.write_bytes(MESSAGE.removesuffix(b"\r\n"))  # swaks ends DATA with CRLF itself
    result = await run_client(
        [require_binary("swaks"), "--server", f"127.0.0.1:{port}", "--tls", "--tls-verify",
         "--tls-ca-path", pki.ca_file, "--tls-sni", "mail.b.example", "--ehlo", "swaks.example",
         "--from", "alice@example.org", "--to", "bob@example.org", "--data", str(message)],
    )  # fmt: skip
    transcript = result.stdout.decode(errors="replace")
    assert "<-  220 2.0.0 Ready to start TLS" in transcript, transcript
    assert "<~  250 2.0.0 Message accepted" in transcript, transcript
    assert smtp_backend.sink.messages == [("alice@example.org", ["bob@example.org"], MESSAGE)]
    (record,) = await access.wait(1)
    # swaks closes after QUIT's 221 without reading the proxy's close_notify (sent when
    # the backend closed), so the kernel may answer with a reset; all was delivered.
    assert record.outcome in ("ok", "error:client_reset")


async def test_smtp_backend_that_requires_starttls_gets_it_from_the_proxy(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    backend_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    backend_tls.load_cert_chain(pki.c.cert, pki.c.key)
    with smtp_server(tls=backend_tls) as backend:
        port = await _proxy(
            nursery, pki, "smtp", backend.address,
            backend_tls=True, backend_ca=pki.ca_file, backend_sni="c.example",
        )  # fmt: skip
        seen = await trio.to_thread.run_sync(_smtplib_session, port, pki.client_context())
        assert backend.sink.messages == [("alice@example.org", ["bob@example.org"], MESSAGE)]
    assert "starttls" not in seen["after"]  # type: ignore[operator]
    (record,) = await access.wait(1)
    assert record.outcome == "ok"


@pytest.mark.parametrize(
    ("preamble", "greeting", "pipelined"),
    [
        ("smtp", b"220 ", b"STARTTLS\r\nMAIL FROM:<evil@example.org>\r\n"),
        ("smtp", b"220 ", b"STARTTLS\r\n\x16\x03\x01"),  # even the start of a ClientHello
        ("imap", b"* OK ", b"a STARTTLS\r\nb LOGIN alice secret\r\n"),
        ("pop3", b"+OK ", b"STLS\r\nUSER alice\r\n"),
    ],
)
async def test_cleartext_pipelined_after_starttls_never_reaches_the_backend(
    nursery: trio.Nursery,
    pki: PKI,
    smtp_backend: SMTPServer,
    mailboxes: Dovecot,
    access: AccessWatcher,
    preamble: str,
    greeting: bytes,
    pipelined: bytes,
) -> None:
    backend = {"smtp": smtp_backend.address, "imap": mailboxes.imap, "pop3": mailboxes.pop3}
    port = await _proxy(nursery, pki, preamble, backend[preamble])
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        assert (await read_line(stream)).startswith(greeting)
        await stream.send_all(pipelined)
        rest = bytearray()
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                rest += chunk
    assert not rest.startswith((b"220 ", b"a OK", b"+OK")), rest  # no go-ahead for TLS
    (record,) = await access.wait(1)
    assert record.outcome == "bad_preamble"
    assert record.backend is None  # no connection to any backend was even made
    assert smtp_backend.sink.ehlo_names == []


# --------------------------------------------------------------------------- IMAP


def _imaplib_session(port: int, context: ssl.SSLContext) -> dict[str, object]:
    seen: dict[str, object] = {}
    with imaplib.IMAP4("127.0.0.1", port, timeout=CLIENT_TIMEOUT) as imap:
        seen["before"] = imap.capabilities
        try:
            imap.login(MAIL_USER, MAIL_PASSWORD)
        except imaplib.IMAP4.error as exc:
            seen["refused"] = str(exc)
        imap.host = "imap.b.example"  # the name to verify
        imap.starttls(context)
        seen["after"] = imap.capabilities
        imap.login(MAIL_USER, MAIL_PASSWORD)
        seen["select"] = imap.select("INBOX")
        _, data = imap.fetch("1", "(RFC822)")
        seen["fetched"] = data[0][1] if isinstance(data[0], tuple) else data
    return seen


async def test_imaplib_starttls_login_select_fetch(
    nursery: trio.Nursery, pki: PKI, mailboxes: Dovecot, access: AccessWatcher
) -> None:
    port = await _proxy(nursery, pki, "imap", mailboxes.imap)
    seen = await trio.to_thread.run_sync(_imaplib_session, port, pki.client_context())
    assert {"STARTTLS", "LOGINDISABLED", "IMAP4REV1"} <= set(seen["before"])  # type: ignore[call-overload]
    assert "PRIVACYREQUIRED" in str(seen["refused"]).upper()
    assert "STARTTLS" not in seen["after"]  # type: ignore[operator]  # filtered: in TLS now
    assert "LOGINDISABLED" not in seen["after"]  # type: ignore[operator]  # Dovecot's own list
    assert seen["select"] == ("OK", [b"1"])
    assert seen["fetched"] == STORED_MESSAGE
    (record,) = await access.wait(1)
    assert record.outcome == "ok"
    assert record.sni == "imap.b.example"


# --------------------------------------------------------------------------- POP3


def _poplib_session(port: int, context: ssl.SSLContext) -> dict[str, object]:
    seen: dict[str, object] = {}
    pop = poplib.POP3("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    try:
        seen["before"] = pop.capa()
        try:
            pop.user(MAIL_USER)
        except poplib.error_proto as exc:
            seen["refused"] = exc.args[0]
        pop.host = "pop.b.example"  # the name to verify
        pop.stls(context)
        seen["after"] = pop.capa()
        pop.user(MAIL_USER)
        pop.pass_(MAIL_PASSWORD)
        seen["stat"] = pop.stat()
        _, lines, _ = pop.retr(1)
        seen["retrieved"] = b"".join(line + b"\r\n" for line in lines)
        pop.quit()
    finally:
        pop.close()
    return seen


async def test_poplib_stls_user_pass_stat_retr(
    nursery: trio.Nursery, pki: PKI, mailboxes: Dovecot, access: AccessWatcher
) -> None:
    port = await _proxy(nursery, pki, "pop3", mailboxes.pop3)
    seen = await trio.to_thread.run_sync(_poplib_session, port, pki.client_context())
    assert "STLS" in seen["before"]  # type: ignore[operator]
    assert str(seen["refused"]).startswith("b'-ERR"), seen["refused"]
    assert "STLS" not in seen["after"]  # type: ignore[operator]  # filtered: in TLS now
    assert seen["stat"] == (1, len(STORED_MESSAGE))
    assert seen["retrieved"] == STORED_MESSAGE
    (record,) = await access.wait(1)
    assert record.outcome == "ok"
    assert record.sni == "pop.b.example"
