"""End to end: real PostgreSQL and Redis servers behind the proxy, driven by their own clients.

The servers listen only on Unix sockets in temporary directories; the proxy listens on
127.0.0.1 with an ephemeral port and forwards to those sockets. ``psql``, ``pgbench``,
``redis-cli`` and ``redis-benchmark`` talk to the proxy over loopback TCP, so every byte
of their wire protocols (startup and SSL negotiation, COPY, pipelined commands,
concurrent connections, 1 MiB values) goes through :func:`l4proxy.pump.pump`.

The servers are session-scoped (started once, stopped at the end of the session); each
test gets its own proxy, whose access records are read from the ``l4proxy.access``
logger through ``caplog``. Nothing is skipped: a missing binary fails the test with a
message saying how to install it.

PostgreSQL refuses to run as root, so when the tests run as root (as in CI) ``initdb``,
``pg_ctl`` and ``postgres`` run as the ``postgres`` user through ``runuser``. Its data
directory then cannot live under pytest's ``tmp_path`` (``/tmp/pytest-of-root`` is mode
0700, so ``postgres`` cannot reach it), so it is a ``tempfile.mkdtemp`` directory owned
by ``postgres``, removed at teardown; the short path also keeps the socket path well
under the 107-byte limit of ``sun_path``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

import l4proxy

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

INSTALL_HINT = "`make test` installs it"
PG_PORT = 5432  # only names the socket file (.s.PGSQL.<port>); postgres has no TCP listener
SERVER_START_SECONDS = 60
CLIENT_SECONDS = 60
RECORD_WAIT_SECONDS = 10
PROXY_STOP_SECONDS = 15


# --------------------------------------------------------------------------- helpers


def _require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name!r} not found on PATH; the real-server tests need it ({INSTALL_HINT})",
            pytrace=False,
        )
    return path


def _version_key(bindir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name))


def _postgres_bindir() -> Path:
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


def _client_binary(bindir: Path, name: str) -> str:
    """A client from the server's own version directory, else from PATH."""
    path = bindir / name
    return str(path) if path.is_file() else _require_binary(name)


def _client_env() -> dict[str, str]:
    """The environment without any PG* setting that could redirect or alter a client."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    env["PGGSSENCMODE"] = "disable"  # no GSSAPI probe; SSL negotiation ("prefer") stays on
    return env


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


def _run_sync(
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
        details = f"\nserver log:\n{_tail(log)}" if log else ""
        pytest.fail(
            f"{what} timed out after {timeout}s: {shlex.join(argv)}{details}", pytrace=False
        )
    if result.returncode != 0:
        details = f"\nserver log:\n{_tail(log)}" if log else ""
        pytest.fail(
            f"{what} failed (exit {result.returncode}): {shlex.join(argv)}\n"
            f"{result.stdout.decode(errors='replace')}{result.stderr.decode(errors='replace')}{details}",
            pytrace=False,
        )


async def _run(
    argv: list[str],
    *,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
    timeout: float = CLIENT_SECONDS,
) -> subprocess.CompletedProcess[bytes]:
    """Run a client to completion (bounded) and insist that it succeeded."""
    with trio.fail_after(timeout):
        result = await trio.run_process(
            argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False, env=env
        )
    assert result.returncode == 0, (
        f"{shlex.join(argv)} exited with {result.returncode}\n"
        f"stdout: {result.stdout[-2000:].decode(errors='replace')}\n"
        f"stderr: {result.stderr[-2000:].decode(errors='replace')}"
    )
    return result


async def _wait_for_unix_socket(path: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll until ``path`` accepts a connection; fail early if the server died."""
    with trio.fail_after(SERVER_START_SECONDS):
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"server exited with {process.returncode} before listening on {path}\n{_tail(log)}",
                    pytrace=False,
                )
            try:
                stream = await trio.open_unix_socket(str(path))
            except OSError:
                await trio.sleep(0.02)
                continue
            await stream.aclose()
            return


# --------------------------------------------------------------------------- the proxy


class _RecordWakeup(logging.Handler):
    """Wakes a waiting test when an access record is logged (the proxy logs from the trio
    thread, so setting a trio.Event here is safe). The records themselves are read from
    caplog."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._event = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self._event.set()

    async def next_record(self) -> None:
        self._event = trio.Event()
        await self._event.wait()


@dataclass
class RunningProxy:
    """One proxy listener on 127.0.0.1 in front of one Unix-socket backend."""

    proxy: l4proxy.Proxy
    name: str
    host: str
    port: int
    backend: str
    caplog: pytest.LogCaptureFixture
    wakeup: _RecordWakeup
    stopped: trio.Event

    def records(self) -> list[l4proxy.AccessRecord]:
        """Access records of this proxy's finished connections, in finishing order."""
        found = []
        for entry in self.caplog.records:
            record = getattr(entry, "access", None)
            if isinstance(record, l4proxy.AccessRecord) and record.listener == self.name:
                found.append(record)
        return found

    async def wait_for_records(self, count: int) -> list[l4proxy.AccessRecord]:
        """The first ``count`` records, waiting (bounded) for connections still finishing."""
        with trio.fail_after(RECORD_WAIT_SECONDS):
            while len(self.records()) < count:
                await self.wakeup.next_record()
        return self.records()

    async def stop(self) -> list[l4proxy.AccessRecord]:
        """Close the listener, wait for every connection to end, return all records."""
        self.proxy.close(drain_timeout=5)
        with trio.fail_after(PROXY_STOP_SECONDS):
            await self.stopped.wait()
        return self.records()


@contextlib.asynccontextmanager
async def _running_proxy(
    name: str, backend: str, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[RunningProxy]:
    caplog.set_level(logging.INFO, logger="l4proxy.access")
    config = l4proxy.Config(
        listeners=[l4proxy.ListenerConfig(name=name, listen=["127.0.0.1:0"], backends=[backend])]
    )
    proxy = l4proxy.Proxy(config)
    stopped = trio.Event()
    wakeup = _RecordWakeup()
    access_logger = logging.getLogger("l4proxy.access")

    async def serve(
        *, task_status: trio.TaskStatus[list[l4proxy.BoundAddress]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await proxy.serve(task_status=task_status)
        finally:
            stopped.set()

    access_logger.addHandler(wakeup)
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):
                bound: list[l4proxy.BoundAddress] = await nursery.start(serve)
            assert len(bound) == 1
            assert bound[0].host == "127.0.0.1"
            assert bound[0].port
            yield RunningProxy(
                proxy, name, "127.0.0.1", bound[0].port, backend, caplog, wakeup, stopped
            )
            proxy.close(drain_timeout=5)
    finally:
        access_logger.removeHandler(wakeup)


def _assert_ok(record: l4proxy.AccessRecord, proxied: RunningProxy) -> None:
    assert record.outcome == "ok", record
    assert record.error is None, record
    assert str(record.backend) == proxied.backend, record
    assert str(record.client).startswith("127.0.0.1:"), record
    assert record.bytes_to_backend > 0, record
    assert record.bytes_to_client > 0, record


# --------------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class Postgres:
    bindir: Path
    socket_dir: Path
    port: int

    @property
    def socket_path(self) -> Path:
        return self.socket_dir / f".s.PGSQL.{self.port}"

    @property
    def psql(self) -> str:
        return _client_binary(self.bindir, "psql")

    @property
    def pgbench(self) -> str:
        return _client_binary(self.bindir, "pgbench")


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
    pytest.fail(f"could not stop postgres (pid {pid}):\n{_tail(log)}", pytrace=False)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster listening only on a Unix socket, trust auth."""
    bindir = _postgres_bindir()
    initdb, pg_ctl = bindir / "initdb", bindir / "pg_ctl"
    as_postgres: list[str] = []
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        as_postgres = [_require_binary("runuser"), "-u", "postgres", "--"]
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail(
                "running as root but there is no 'postgres' user to run the server as "
                f"(the postgresql package creates it; {INSTALL_HINT})",
                pytrace=False,
            )
    base = Path(tempfile.mkdtemp(prefix="l4proxy-pg-"))
    datadir, log = base / "data", base / "postgres.log"
    try:
        if owner is not None:
            os.chown(base, owner.pw_uid, owner.pw_gid)
        _run_sync(
            [*as_postgres, str(initdb), "-D", str(datadir), "-A", "trust", "-U", "postgres",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            what="initdb",
        )  # fmt: skip
        with open(datadir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(
                "\n# l4proxy tests: Unix socket only, no durability needed\n"
                "listen_addresses = ''\n"
                f"unix_socket_directories = '{base}'\n"
                f"port = {PG_PORT}\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
            )
        try:
            _run_sync(
                [*as_postgres, str(pg_ctl), "-D", str(datadir), "-l", str(log), "-w", "-t",
                 str(SERVER_START_SECONDS), "start"],
                what="pg_ctl start",
                log=log,
                timeout=SERVER_START_SECONDS + 10,
            )  # fmt: skip
            server = Postgres(bindir, base, PG_PORT)
            assert server.socket_path.is_socket(), (
                f"no socket at {server.socket_path}:\n{_tail(log)}"
            )
            yield server
        finally:
            _postgres_stop(pg_ctl, datadir, as_postgres, log)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def pg_proxy(
    postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[RunningProxy]:
    async with _running_proxy("pg", f"unix:{postgres.socket_path}", caplog) as proxied:
        yield proxied


def _psql(postgres: Postgres, host: str, port: int, *commands: str) -> list[str]:
    argv = [postgres.psql, "-X", "-v", "ON_ERROR_STOP=1", "-h", host, "-p", str(port),
            "-U", "postgres", "-d", "postgres", "-At"]  # fmt: skip
    for command in commands:
        argv += ["-c", command]
    return argv


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


async def test_psql_writes_and_reads_through_proxy(
    postgres: Postgres, pg_proxy: RunningProxy
) -> None:
    env = _client_env()
    await _run(
        _psql(
            postgres, pg_proxy.host, pg_proxy.port,
            "drop table if exists proxied_rows",
            "create table proxied_rows (i int primary key, s text not null)",
            "insert into proxied_rows select i, md5(i::text) from generate_series(1, 1000) i",
        ),
        env=env,
    )  # fmt: skip
    # A second connection sees what the first one committed.
    result = await _run(
        _psql(postgres, pg_proxy.host, pg_proxy.port,
              "select count(*), md5(string_agg(s, ',' order by i)) from proxied_rows"),
        env=env,
    )  # fmt: skip
    expected = _md5(",".join(_md5(str(i)) for i in range(1, 1001)))
    assert result.stdout.decode().strip() == f"1000|{expected}"

    records = await pg_proxy.wait_for_records(2)
    assert len(records) == 2, records
    for record in records:
        _assert_ok(record, pg_proxy)


async def test_an_idle_psql_session_is_parked_and_woken_by_its_next_query(
    postgres: Postgres, pg_proxy: RunningProxy
) -> None:
    """One psql session, quiet for a second between two queries: the proxy parks the
    connection (no tasks) meanwhile and the next query wakes it."""
    parked_seen = False

    async def watch() -> None:
        nonlocal parked_seen
        while True:
            parked_seen |= pg_proxy.proxy.stats()["pg"].parked == 1
            await trio.sleep(0.02)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        result = await _run(
            _psql(postgres, pg_proxy.host, pg_proxy.port, "select 1", "\\! sleep 1", "select 2"),
            env=_client_env(),
        )
        nursery.cancel_scope.cancel()
    assert result.stdout.decode().split() == ["1", "2"]
    assert parked_seen
    (record,) = await pg_proxy.wait_for_records(1)
    _assert_ok(record, pg_proxy)


async def test_psql_large_result_matches_direct_connection(
    postgres: Postgres, pg_proxy: RunningProxy
) -> None:
    env = _client_env()
    query = "select string_agg(md5(i::text), '') from generate_series(1, 20000) i"
    expected = "".join(_md5(str(i)) for i in range(1, 20001))

    direct = await _run(_psql(postgres, str(postgres.socket_dir), postgres.port, query), env=env)
    assert direct.stdout.decode().strip() == expected

    clients = 4
    results: list[bytes] = []

    async def one_client() -> None:
        results.append(
            (await _run(_psql(postgres, pg_proxy.host, pg_proxy.port, query), env=env)).stdout
        )

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(one_client)
    assert len(results) == clients
    for stdout in results:
        assert stdout == direct.stdout

    records = await pg_proxy.wait_for_records(clients)
    assert len(records) == clients, records
    for record in records:
        _assert_ok(record, pg_proxy)
        assert record.bytes_to_client > len(expected), record


@pytest.mark.slow
async def test_pgbench_through_proxy(postgres: Postgres, pg_proxy: RunningProxy) -> None:
    env = _client_env()
    target = ["-h", pg_proxy.host, "-p", str(pg_proxy.port), "-U", "postgres", "postgres"]
    await _run([postgres.pgbench, "-i", "-q", "-s", "1", *target], env=env, timeout=120)
    run = await _run(
        [postgres.pgbench, "-c", "4", "-j", "2", "-t", "50", *target], env=env, timeout=120
    )
    output = run.stdout.decode(errors="replace")
    assert re.search(r"number of transactions actually processed: 200/200\b", output), output
    failed = re.search(r"number of failed transactions: (\d+)", output)
    assert failed is None or failed.group(1) == "0", output

    # -C: a new connection per transaction, so 100 more connections through the proxy.
    churn = await _run(
        [postgres.pgbench, "-C", "-n", "-c", "4", "-j", "2", "-t", "25", *target],
        env=env,
        timeout=120,
    )
    churn_output = churn.stdout.decode(errors="replace")
    assert re.search(r"number of transactions actually processed: 100/100\b", churn_output), (
        churn_output
    )

    # Each TPC-B transaction appends one history row (pgbench -i emptied the table).
    query = "select count(*) from pgbench_history"
    history = await _run(_psql(postgres, str(postgres.socket_dir), postgres.port, query), env=env)
    assert history.stdout.decode().strip() == "300"

    records = await pg_proxy.stop()
    # pgbench -i uses one connection; the first run one per client plus a setup
    # connection; the -C run one per transaction plus a setup connection.
    assert len(records) >= 1 + 4 + 100, records
    for record in records:
        _assert_ok(record, pg_proxy)
    # pgbench -i loads 100000 pgbench_accounts rows with COPY FROM STDIN through the proxy.
    assert max(record.bytes_to_backend for record in records) > 1_000_000, records


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A redis-server with no TCP listener and no persistence, on a Unix socket."""
    server = _require_binary("redis-server")
    directory = tmp_path_factory.mktemp("redis")
    socket_path, log = directory / "redis.sock", directory / "redis.log"
    argv = [server, "--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--dir", str(directory), "--daemonize", "no"]  # fmt: skip
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        trio.run(_wait_for_unix_socket, socket_path, process, log)
        yield socket_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@pytest.fixture
async def redis_proxy(
    redis_socket: Path, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[RunningProxy]:
    async with _running_proxy("redis", f"unix:{redis_socket}", caplog) as proxied:
        yield proxied


def _redis_cli(proxied: RunningProxy, *args: str) -> list[str]:
    return [_require_binary("redis-cli"), "-h", proxied.host, "-p", str(proxied.port), *args]


async def test_redis_set_get_through_proxy(redis_proxy: RunningProxy) -> None:
    key = f"l4proxy:test:{os.getpid()}:small"
    value = "hello through l4proxy"
    assert (await _run(_redis_cli(redis_proxy, "SET", key, value))).stdout == b"OK\n"
    assert (await _run(_redis_cli(redis_proxy, "GET", key))).stdout == value.encode() + b"\n"

    records = await redis_proxy.wait_for_records(2)
    assert len(records) == 2, records
    for record in records:
        _assert_ok(record, redis_proxy)


async def test_redis_one_mib_value_round_trip(redis_proxy: RunningProxy) -> None:
    key = f"l4proxy:test:{os.getpid()}:big"
    value = os.urandom(1 << 20)
    assert (await _run(_redis_cli(redis_proxy, "-x", "SET", key), stdin=value)).stdout == b"OK\n"
    assert (await _run(_redis_cli(redis_proxy, "STRLEN", key))).stdout == b"%d\n" % len(value)
    got = (await _run(_redis_cli(redis_proxy, "GET", key))).stdout
    assert len(got) == len(value) + 1
    assert got == value + b"\n"

    set_record, strlen_record, get_record = await redis_proxy.wait_for_records(3)
    for record in (set_record, strlen_record, get_record):
        _assert_ok(record, redis_proxy)
    assert set_record.bytes_to_backend > len(value), set_record
    assert get_record.bytes_to_client > len(value), get_record


@pytest.mark.slow
async def test_redis_benchmark_through_proxy(redis_proxy: RunningProxy) -> None:
    benchmark = _require_binary("redis-benchmark")
    argv = [benchmark, "-h", redis_proxy.host, "-p", str(redis_proxy.port), "-n", "2000", "-c", "10", "-q",
            "-t", "set,get"]  # fmt: skip
    output = (await _run(argv, timeout=120)).stdout.decode(errors="replace")
    # -q rewrites a progress line with \r, then prints the final line per test.
    lines = re.split(r"[\r\n]", output)
    for command in ("SET", "GET"):
        assert any(re.match(rf"{command}: [\d.]+ requests per second", line) for line in lines), (
            output
        )

    records = await redis_proxy.stop()
    assert len(records) >= 10, records
    for record in records:
        _assert_ok(record, redis_proxy)
    # 2000 SETs and 2000 GETs, each reply at least 5 bytes ("+OK\r\n", "$3\r\nxxx\r\n").
    assert sum(record.bytes_to_client for record in records) >= 4000 * 5, records
    assert sum(record.bytes_to_backend for record in records) >= 4000 * 20, records
