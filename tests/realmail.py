"""Real mail servers for the mail-preamble tests: Dovecot (IMAP and POP3, Debian's
``dovecot-imapd`` / ``dovecot-pop3d``) and aiosmtpd (SMTP, in a thread of this process).

Dovecot runs unprivileged on free loopback ports with a configuration of its own (no
``/etc/dovecot``): as the ``dovecot`` user through ``runuser`` when we are root, as
ourselves otherwise. One user, ``alice`` / ``secret``, has one message in her INBOX.
Neither server has TLS of its own unless a test asks: the proxy terminates it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pwd
import shutil
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from aiosmtpd.controller import Controller

from .realservers import INSTALL_HINT, SERVER_START_SECONDS, free_port, owned_tempdir, tail

if TYPE_CHECKING:
    import ssl
    from collections.abc import Iterator

    from aiosmtpd.smtp import SMTP, Envelope, Session

DOVECOT = "/usr/sbin/dovecot"
MAIL_USER, MAIL_PASSWORD = "alice", "secret"
#: The one message in alice's INBOX (CRLF line ends, as IMAP and POP3 send it).
STORED_MESSAGE = (
    b"From: bob@example.org\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: through the proxy\r\n"
    b"\r\n"
    b"Hello Alice, this came through l4proxy.\r\n"
)


@dataclass(frozen=True)
class Dovecot:
    imap_port: int
    pop3_port: int

    @property
    def imap(self) -> str:
        return f"127.0.0.1:{self.imap_port}"

    @property
    def pop3(self) -> str:
        return f"127.0.0.1:{self.pop3_port}"


def _dovecot_config(base: Path, user: str, imap_port: int, pop3_port: int) -> str:
    return f"""
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
protocols = imap pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = 1
first_valid_gid = 1
default_internal_user = {user}
default_internal_group = {user}
default_login_user = {user}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {base}/passwd
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {base}/passwd
  default_fields = uid={user} gid={user} home={base}/home/%u
}}
mail_location = maildir:~/Maildir
service imap-login {{
  chroot =
  inet_listener imap {{
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  chroot =
  inet_listener pop3 {{
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
service imap-urlauth-login {{
  chroot =
}}
"""


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"dovecot exited with {process.returncode}:\n{tail(log)}", pytrace=False)
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    pytest.fail(f"dovecot not listening on {port} after {SERVER_START_SECONDS}s", pytrace=False)


@contextlib.contextmanager
def dovecot() -> Iterator[Dovecot]:
    if not Path(DOVECOT).is_file():
        pytest.fail(f"{DOVECOT} not found (dovecot-imapd, dovecot-pop3d; {INSTALL_HINT})")
    if os.geteuid() == 0:
        owner = pwd.getpwnam("dovecot")
        prefix = [shutil.which("runuser") or "runuser", "-u", "dovecot", "--"]
    else:
        owner, prefix = pwd.getpwuid(os.geteuid()), []
    base = owned_tempdir("l4proxy-dovecot-", owner)
    imap_port, pop3_port = free_port(), free_port()
    try:
        (base / "dovecot.conf").write_text(
            _dovecot_config(base, owner.pw_name, imap_port, pop3_port)
        )
        (base / "passwd").write_text(f"{MAIL_USER}:{{PLAIN}}{MAIL_PASSWORD}::::::\n")
        maildir = base / "home" / MAIL_USER / "Maildir"
        for sub in ("new", "cur", "tmp"):
            (maildir / sub).mkdir(parents=True)
        (maildir / "new" / "1.l4proxy").write_bytes(STORED_MESSAGE)
        for sub in ("run", "state"):
            (base / sub).mkdir()
        for path in (base, *base.rglob("*")):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        log = base / "dovecot.log"
        process = subprocess.Popen(
            [*prefix, DOVECOT, "-F", "-c", str(base / "dovecot.conf")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
        )
        try:
            _wait_for_port(imap_port, process, log)
            _wait_for_port(pop3_port, process, log)
            yield Dovecot(imap_port, pop3_port)
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(15)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class MailSink:
    """aiosmtpd's handler: keeps what each DATA delivered, byte for byte."""

    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    ehlo_names: list[str] = field(default_factory=list)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        self.ehlo_names.append(hostname)
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content
        assert isinstance(content, bytes)
        self.messages.append((str(envelope.mail_from), list(envelope.rcpt_tos), content))
        return "250 2.0.0 Message accepted"


@dataclass(frozen=True)
class SMTPServer:
    address: str
    sink: MailSink


@contextlib.contextmanager
def smtp_server(tls: ssl.SSLContext | None = None) -> Iterator[SMTPServer]:
    """aiosmtpd on a free loopback port; with ``tls`` it offers STARTTLS and requires it
    (a backend like Postfix with ``smtpd_tls_auth_only``)."""
    sink = MailSink()
    port = free_port()
    controller = Controller(
        sink,
        hostname="127.0.0.1",
        port=port,
        server_hostname="backend.example",
        tls_context=tls,
        require_starttls=tls is not None,
        ready_timeout=SERVER_START_SECONDS,
    )
    controller.start()
    try:
        yield SMTPServer(f"127.0.0.1:{port}", sink)
    finally:
        controller.stop()
        # aiosmtpd leaves the plain transport under a STARTTLS upgrade unclosed; collect
        # it here, quietly, rather than have its ResourceWarning fail a later test.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
