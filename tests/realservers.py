"""Real servers for the end-to-end tests: helpers to run them and their clients, and a
throwaway PostgreSQL cluster (:func:`pg_cluster`).

Nothing is skipped: a missing binary fails the test with a message saying how to install
it. PostgreSQL refuses to run as root, so when the tests run as root (as in CI) ``initdb``,
``pg_ctl`` and ``postgres`` run as the ``postgres`` user through ``runuser``. A cluster's
directory then cannot live under pytest's ``tmp_path`` (``/tmp/pytest-of-root`` is mode
0700, so ``postgres`` cannot reach it), so it is a ``tempfile.mkdtemp`` directory owned by
``postgres``, removed at teardown; the short path also keeps the socket path well under
the 107-byte limit of ``sun_path``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

if TYPE_CHECKING:
    from collections.abc import Iterator

INSTALL_HINT = "`make test` installs it"
SERVER_START_SECONDS = 60
CLIENT_SECONDS = 60


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name!r} not found on PATH; the real-server tests need it ({INSTALL_HINT})",
            pytrace=False,
        )
    return path


def tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


def free_port() -> int:
    """A loopback TCP port free a moment ago, for a server that must be told its port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_sync(
    argv: list[str], *, what: str, log: Path | None = None, timeout: float = SERVER_START_SECONDS
) -> None:
    """Run a server-management command in a fixture; fail with its output if it fails."""
    try:
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
            cwd="/",
        )
    except subprocess.TimeoutExpired:
        details = f"\nserver log:\n{tail(log)}" if log else ""
        pytest.fail(
            f"{what} timed out after {timeout}s: {shlex.join(argv)}{details}", pytrace=False
        )
    if result.returncode != 0:
        details = f"\nserver log:\n{tail(log)}" if log else ""
        pytest.fail(
            f"{what} failed (exit {result.returncode}): {shlex.join(argv)}\n"
            f"{result.stdout.decode(errors='replace')}{result.stderr.decode(errors='replace')}{details}",
            pytrace=False,
        )


async def run_client(
    argv: list[str],
    *,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
    timeout: float = CLIENT_SECONDS,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run a client to completion (bounded); with ``check``, insist that it succeeded."""
    with trio.fail_after(timeout):
        result = await trio.run_process(
            argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False, env=env
        )
    assert not check or result.returncode == 0, (
        f"{shlex.join(argv)} exited with {result.returncode}\n"
        f"stdout: {result.stdout[-2000:].decode(errors='replace')}\n"
        f"stderr: {result.stderr[-2000:].decode(errors='replace')}"
    )
    return result


def unprivileged_user(name: str) -> tuple[list[str], pwd.struct_passwd | None]:
    """The command prefix that runs a server as ``name`` when we are root (``runuser``),
    and that user's entry; nothing to do when we are not root."""
    if os.geteuid() != 0:
        return [], None
    try:
        owner = pwd.getpwnam(name)
    except KeyError:
        pytest.fail(
            f"running as root but there is no {name!r} user to run the server as "
            f"(its Debian package creates it; {INSTALL_HINT})",
            pytrace=False,
        )
    return [require_binary("runuser"), "-u", name, "--"], owner


def owned_tempdir(prefix: str, owner: pwd.struct_passwd | None) -> Path:
    base = Path(tempfile.mkdtemp(prefix=prefix))
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    return base


# --------------------------------------------------------------------------- PostgreSQL


def _version_key(bindir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name))


def postgres_bindir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin that has the server programs."""
    candidates = [
        path
        for path in Path("/usr/lib/postgresql").glob("*/bin")
        if all((path / program).is_file() for program in ("initdb", "pg_ctl", "postgres"))
    ]
    if not candidates:
        pytest.fail(
            "no PostgreSQL server found (expected /usr/lib/postgresql/<version>/bin/initdb, "
            f"pg_ctl and postgres; {INSTALL_HINT})",
            pytrace=False,
        )
    return max(candidates, key=_version_key)


def pg_client_env() -> dict[str, str]:
    """The environment without any PG* setting that could redirect or alter a client."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    env["PGGSSENCMODE"] = "disable"  # no GSSAPI probe; SSL negotiation ("prefer") stays on
    return env


@dataclass(frozen=True)
class Postgres:
    """A running cluster: its Unix socket always, 127.0.0.1:``port`` when ``tcp``."""

    bindir: Path
    socket_dir: Path
    port: int
    tcp: bool

    @property
    def socket_path(self) -> Path:
        return self.socket_dir / f".s.PGSQL.{self.port}"

    @property
    def address(self) -> str:
        """The backend address as the proxy spells it."""
        return f"127.0.0.1:{self.port}" if self.tcp else f"unix:{self.socket_path}"

    def client(self, name: str) -> str:
        """A client from the server's own version directory, else from PATH."""
        path = self.bindir / name
        return str(path) if path.is_file() else require_binary(name)

    @property
    def psql(self) -> str:
        return self.client("psql")

    @property
    def pgbench(self) -> str:
        return self.client("pgbench")


def _postgres_stop(pg_ctl: Path, datadir: Path, as_postgres: list[str], log: Path) -> None:
    """Stop the server started by the fixture: pg_ctl fast shutdown, else signal its pid."""
    pidfile = datadir / "postmaster.pid"
    if not pidfile.exists():
        return
    result = subprocess.run(
        [*as_postgres, str(pg_ctl), "-D", str(datadir), "-m", "fast", "-w", "-t", "30", "stop"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    if result.returncode == 0 or not pidfile.exists():
        return
    # pg_ctl could not stop it: signal the postmaster this fixture started, by its pid.
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    for sig in (signal.SIGQUIT, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
    pytest.fail(f"could not stop postgres (pid {pid}):\n{tail(log)}", pytrace=False)


@contextlib.contextmanager
def pg_cluster(
    *, tcp: bool = False, tls: tuple[str, str] | None = None, port: int = 5432
) -> Iterator[Postgres]:
    """A throwaway cluster, trust auth, no durability. Always a Unix socket; with ``tcp``
    also 127.0.0.1 on a free port; with ``tls`` = (chain file, key file) ``ssl = on``
    (copied in, so the server's user can read them)."""
    bindir = postgres_bindir()
    initdb, pg_ctl = bindir / "initdb", bindir / "pg_ctl"
    as_postgres, owner = unprivileged_user("postgres")
    base = owned_tempdir("l4proxy-pg-", owner)
    datadir, log = base / "data", base / "postgres.log"
    if tcp:
        port = free_port()
    try:
        run_sync(
            [*as_postgres, str(initdb), "-D", str(datadir), "-A", "trust", "-U", "postgres",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            what="initdb",
        )  # fmt: skip
        settings = [
            "listen_addresses = " + ("'127.0.0.1'" if tcp else "''"),
            f"unix_socket_directories = '{base}'",
            f"port = {port}",
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
        ]
        if tls is not None:
            for source, target in zip(tls, ("server.crt", "server.key"), strict=True):
                shutil.copyfile(source, datadir / target)
                os.chmod(datadir / target, 0o600)
                if owner is not None:
                    os.chown(datadir / target, owner.pw_uid, owner.pw_gid)
            settings.append("ssl = on")
        with open(datadir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# l4proxy tests\n" + "\n".join(settings) + "\n")
        try:
            run_sync(
                [*as_postgres, str(pg_ctl), "-D", str(datadir), "-l", str(log), "-w", "-t",
                 str(SERVER_START_SECONDS), "start"],
                what="pg_ctl start",
                log=log,
                timeout=SERVER_START_SECONDS + 10,
            )  # fmt: skip
            server = Postgres(bindir, base, port, tcp)
            assert server.socket_path.is_socket(), (
                f"no socket at {server.socket_path}:\n{tail(log)}"
            )
            yield server
        finally:
            _postgres_stop(pg_ctl, datadir, as_postgres, log)
    finally:
        shutil.rmtree(base, ignore_errors=True)
