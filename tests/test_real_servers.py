"""End to end: real PostgreSQL and Redis servers behind the proxy, driven by their own clients.

The servers listen only on Unix sockets in temporary directories; the proxy listens on
127.0.0.1 with an ephemeral port and forwards to those sockets. ``psql``, ``pgbench``,
``redis-cli`` and ``redis-benchmark`` talk to the proxy over loopback TCP, so every byte
of their wire protocols (startup and SSL negotiation, COPY, pipelined commands,
concurrent connections, 1 MiB values) goes through :func:`l4proxy.pump.pump`.

The servers are session-scoped (started once, stopped at the end of the session); each
test gets its own proxy, whose access records are read from the ``l4proxy.access``
logger through ``caplog``. The servers are started as :mod:`tests.realservers` says
(nothing skipped, PostgreSQL as the ``postgres`` user when we are root).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

import l4proxy

from .realservers import (
    SERVER_START_SECONDS,
    Postgres,
    pg_client_env,
    pg_cluster,
    require_binary,
    run_client,
    tail,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

RECORD_WAIT_SECONDS = 10
PROXY_STOP_SECONDS = 15


# --------------------------------------------------------------------------- helpers


async def _wait_for_unix_socket(path: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll until ``path`` accepts a connection; fail early if the server died."""
    with trio.fail_after(SERVER_START_SECONDS):
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"server exited with {process.returncode} before listening on {path}\n{tail(log)}",
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


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster listening only on a Unix socket, trust auth."""
    with pg_cluster() as server:
        yield server


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
    env = pg_client_env()
    await run_client(
        _psql(
            postgres, pg_proxy.host, pg_proxy.port,
            "drop table if exists proxied_rows",
            "create table proxied_rows (i int primary key, s text not null)",
            "insert into proxied_rows select i, md5(i::text) from generate_series(1, 1000) i",
        ),
        env=env,
    )  # fmt: skip
    # A second connection sees what the first one committed.
    result = await run_client(
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
        result = await run_client(
            _psql(postgres, pg_proxy.host, pg_proxy.port, "select 1", "\\! sleep 1", "select 2"),
            env=pg_client_env(),
        )
        nursery.cancel_scope.cancel()
    assert result.stdout.decode().split() == ["1", "2"]
    assert parked_seen
    (record,) = await pg_proxy.wait_for_records(1)
    _assert_ok(record, pg_proxy)


async def test_psql_large_result_matches_direct_connection(
    postgres: Postgres, pg_proxy: RunningProxy
) -> None:
    env = pg_client_env()
    query = "select string_agg(md5(i::text), '') from generate_series(1, 20000) i"
    expected = "".join(_md5(str(i)) for i in range(1, 20001))

    direct = await run_client(
        _psql(postgres, str(postgres.socket_dir), postgres.port, query), env=env
    )
    assert direct.stdout.decode().strip() == expected

    clients = 4
    results: list[bytes] = []

    async def one_client() -> None:
        results.append(
            (await run_client(_psql(postgres, pg_proxy.host, pg_proxy.port, query), env=env)).stdout
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
    env = pg_client_env()
    target = ["-h", pg_proxy.host, "-p", str(pg_proxy.port), "-U", "postgres", "postgres"]
    await run_client([postgres.pgbench, "-i", "-q", "-s", "1", *target], env=env, timeout=120)
    run = await run_client(
        [postgres.pgbench, "-c", "4", "-j", "2", "-t", "50", *target], env=env, timeout=120
    )
    output = run.stdout.decode(errors="replace")
    assert re.search(r"number of transactions actually processed: 200/200\b", output), output
    failed = re.search(r"number of failed transactions: (\d+)", output)
    assert failed is None or failed.group(1) == "0", output

    # -C: a new connection per transaction, so 100 more connections through the proxy.
    churn = await run_client(
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
    history = await run_client(
        _psql(postgres, str(postgres.socket_dir), postgres.port, query), env=env
    )
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
    server = require_binary("redis-server")
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
    return [require_binary("redis-cli"), "-h", proxied.host, "-p", str(proxied.port), *args]


async def test_redis_set_get_through_proxy(redis_proxy: RunningProxy) -> None:
    key = f"l4proxy:test:{os.getpid()}:small"
    value = "hello through l4proxy"
    assert (await run_client(_redis_cli(redis_proxy, "SET", key, value))).stdout == b"OK\n"
    assert (await run_client(_redis_cli(redis_proxy, "GET", key))).stdout == value.encode() + b"\n"

    records = await redis_proxy.wait_for_records(2)
    assert len(records) == 2, records
    for record in records:
        _assert_ok(record, redis_proxy)


async def test_redis_one_mib_value_round_trip(redis_proxy: RunningProxy) -> None:
    key = f"l4proxy:test:{os.getpid()}:big"
    value = os.urandom(1 << 20)
    assert (
        await run_client(_redis_cli(redis_proxy, "-x", "SET", key), stdin=value)
    ).stdout == b"OK\n"
    assert (await run_client(_redis_cli(redis_proxy, "STRLEN", key))).stdout == b"%d\n" % len(value)
    got = (await run_client(_redis_cli(redis_proxy, "GET", key))).stdout
    assert len(got) == len(value) + 1
    assert got == value + b"\n"

    set_record, strlen_record, get_record = await redis_proxy.wait_for_records(3)
    for record in (set_record, strlen_record, get_record):
        _assert_ok(record, redis_proxy)
    assert set_record.bytes_to_backend > len(value), set_record
    assert get_record.bytes_to_client > len(value), get_record


@pytest.mark.slow
async def test_redis_benchmark_through_proxy(redis_proxy: RunningProxy) -> None:
    benchmark = require_binary("redis-benchmark")
    argv = [benchmark, "-h", redis_proxy.host, "-p", str(redis_proxy.port), "-n", "2000", "-c", "10", "-q",
            "-t", "set,get"]  # fmt: skip
    output = (await run_client(argv, timeout=120)).stdout.decode(errors="replace")
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
