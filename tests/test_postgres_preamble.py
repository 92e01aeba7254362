"""``preamble = "postgres"`` end to end: two real PostgreSQL clusters (no TLS of their own)
behind one proxy port that terminates TLS and routes by SNI, driven by ``psql`` and by
psycopg (whose binary wheel bundles libpq >= 17: direct TLS, ``PQcancelConn``).

Cluster A is the listener's default backend and the route for ``a.example``; cluster B
is the route for ``*.b.example``. ``SHOW port`` says which cluster answered. psycopg is
blocking, so its calls run in threads (``trio.to_thread``); every wait is bounded.
"""

from __future__ import annotations

import hashlib
import ssl
import sys
from typing import TYPE_CHECKING

import psycopg
import pytest
import trio

import l4proxy

from .realservers import Postgres, pg_client_env, pg_cluster, run_client

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .conftest import AccessWatcher
    from .tlsfixtures import PKI

PSYCOPG_SECONDS = 30


@pytest.fixture(scope="session")
def cluster_a() -> Iterator[Postgres]:
    with pg_cluster(tcp=True) as server:
        yield server


@pytest.fixture(scope="session")
def cluster_b(pki: PKI) -> Iterator[Postgres]:
    """Has ``ssl = on`` too (certificate for c.example), for the backend-TLS test; the
    other tests reach it without TLS, as the proxy's backends normally are."""
    with pg_cluster(tcp=True, tls=(pki.c.cert, pki.c.key)) as server:
        yield server


async def _proxy(
    nursery: trio.Nursery, pki: PKI, a: Postgres, b: Postgres, **settings: object
) -> int:
    """A ``postgres`` listener on 127.0.0.1: a.example (and no SNI) → A, *.b.example → B."""
    listener = l4proxy.ListenerConfig(
        name="pg",
        listen=["127.0.0.1:0"],
        backends=[a.address],
        tls=l4proxy.TLSConfig(certs=[l4proxy.CertKey(cert=pki.a.combined)]),
        routes=[
            l4proxy.RouteConfig(sni=["a.example"], backends=[a.address]),
            l4proxy.RouteConfig(sni=["*.b.example"], backends=[b.address]),
        ],
        preamble="postgres",
        **settings,  # type: ignore[arg-type]
    )
    bound = await nursery.start(l4proxy.Proxy(l4proxy.Config(listeners=[listener])).serve)
    port: int = bound[0].port
    return port


def _conninfo(pki: PKI, port: int, host: str | None = None, **options: str) -> str:
    """A libpq connection string to the proxy: ``host`` is the name verified and sent as
    SNI, while the connection itself always goes to 127.0.0.1."""
    parts = {
        "hostaddr": "127.0.0.1",
        "port": str(port),
        "user": "postgres",
        "dbname": "postgres",
        "connect_timeout": "10",
        "gssencmode": "disable",
        "sslrootcert": pki.ca_file,
        **({"host": host} if host else {}),
        **options,
    }
    return " ".join(f"{key}={value}" for key, value in parts.items())


async def _psql(conninfo: str, *commands: str, check: bool = True) -> tuple[int, str, str]:
    argv = ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", conninfo]
    for command in commands:
        argv += ["-c", command]
    result = await run_client(argv, env=pg_client_env(), check=check)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def _query(conninfo: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(conninfo) as conn:
        return conn.execute(sql).fetchall()


async def _in_thread_query(conninfo: str, sql: str) -> list[tuple[object, ...]]:
    with trio.fail_after(PSYCOPG_SECONDS):
        return await trio.to_thread.run_sync(_query, conninfo, sql)


def test_psycopg_bundles_a_libpq_with_direct_tls() -> None:
    assert psycopg.pq.version() >= 170000, psycopg.pq.version()


async def test_psql_sslmode_require_and_verify_full_route_by_sni(
    nursery: trio.Nursery, pki: PKI, cluster_a: Postgres, cluster_b: Postgres, access: AccessWatcher
) -> None:
    port = await _proxy(nursery, pki, cluster_a, cluster_b)
    # require, no host name (so no SNI): the listener's default backend, A.
    _, out, _ = await _psql(_conninfo(pki, port, sslmode="require"), "show port")
    assert out.split() == [str(cluster_a.port)]
    # verify-full checks the proxy's certificate against the name and sends it as SNI.
    for name, cluster in (("a.example", cluster_a), ("db1.b.example", cluster_b)):
        _, out, _ = await _psql(
            _conninfo(pki, port, name, sslmode="verify-full"),
            "show port",
            "select count(*), sum(i) from generate_series(1, 1000) i",
        )
        assert out.split() == [str(cluster.port), "1000|500500"]
    records = await access.wait(3)
    assert [record.outcome for record in records] == ["ok"] * 3
    assert [record.sni for record in records] == [None, "a.example", "db1.b.example"]
    assert all(record.tls_version for record in records)


@pytest.mark.parametrize("negotiation", ["direct", "postgres"])
async def test_psycopg_sslnegotiation_with_sni_routing(
    nursery: trio.Nursery,
    pki: PKI,
    cluster_a: Postgres,
    cluster_b: Postgres,
    access: AccessWatcher,
    negotiation: str,
) -> None:
    port = await _proxy(nursery, pki, cluster_a, cluster_b)
    for name, cluster in (("a.example", cluster_a), ("x.b.example", cluster_b)):
        conninfo = _conninfo(pki, port, name, sslmode="verify-full", sslnegotiation=negotiation)
        rows = await _in_thread_query(
            conninfo, "select current_setting('port')::int, i from generate_series(1, 3) i"
        )
        assert rows == [(cluster.port, 1), (cluster.port, 2), (cluster.port, 3)]
    for record in await access.wait(2):
        assert record.outcome == "ok", record
        assert record.alpn == "postgresql", record  # libpq >= 17 sends it both ways


def _copy_round_trip(conninfo: str, payload: bytes) -> bytes:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("create temporary table copied (i int, s text)")
        with conn.cursor() as cursor:
            with cursor.copy("copy copied from stdin") as copy:
                for start in range(0, len(payload), 1 << 16):
                    copy.write(payload[start : start + (1 << 16)])
            received = bytearray()
            with cursor.copy("copy (select i, s from copied order by i) to stdout") as copy:
                for chunk in copy:
                    received += chunk
    return bytes(received)


@pytest.mark.slow
async def test_copy_of_ten_megabytes_round_trips_byte_exact(
    nursery: trio.Nursery, pki: PKI, cluster_a: Postgres, cluster_b: Postgres
) -> None:
    port = await _proxy(nursery, pki, cluster_a, cluster_b)
    payload = b"".join(
        b"%d\t%s\n" % (i, hashlib.sha256(b"%d" % i).hexdigest().encode() * 2) for i in range(80_000)
    )
    assert len(payload) > 10_000_000
    conninfo = _conninfo(pki, port, "copy.b.example", sslmode="verify-full")
    with trio.fail_after(PSYCOPG_SECONDS):
        received = await trio.to_thread.run_sync(_copy_round_trip, conninfo, payload)
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()


#: The cancel test's client, in a process of its own: libpq's PQcancel (``cancel()``)
#: blocks holding the GIL, which would freeze the proxy running in this process.
CANCEL_CLIENT = """
import sys, threading, time
import psycopg
conninfo, watch, how = sys.argv[1:]
conn = psycopg.connect(conninfo)
ended = []
def sleep():
    try:
        conn.execute("select pg_sleep(30)")
        ended.append("not cancelled")
    except psycopg.errors.QueryCanceled:
        ended.append("cancelled")
threading.Thread(target=sleep, daemon=True).start()
sleeping = (
    "select count(*) from pg_stat_activity where state = 'active' "
    "and query = 'select pg_sleep(30)'"
)
# The cluster itself, over its Unix socket; autocommit, or every poll would read the
# statistics snapshot its transaction took first (stats_fetch_consistency = cache).
with psycopg.connect(watch, autocommit=True) as watcher:
    deadline = time.monotonic() + 20
    while watcher.execute(sleeping).fetchone() != (1,):
        assert time.monotonic() < deadline, "the query never showed in pg_stat_activity"
        time.sleep(0.05)
start = time.monotonic()
getattr(conn, how)()
while not ended and time.monotonic() - start < 10:
    time.sleep(0.02)
print(ended[0] if ended else "still sleeping", round(time.monotonic() - start, 2))
"""


@pytest.mark.parametrize("how", ["cancel", "cancel_safe"])
async def test_cancel_reaches_the_cluster_that_runs_the_query(
    nursery: trio.Nursery,
    pki: PKI,
    cluster_a: Postgres,
    cluster_b: Postgres,
    access: AccessWatcher,
    how: str,
) -> None:
    """``cancel()`` is PQcancel: a new cleartext connection, no SNI, routed by the session
    key the proxy noted; ``cancel_safe()`` is PQcancelConn: TLS with SNI, routed by the
    key too. B is not the default backend, so only the key can lead there."""
    port = await _proxy(nursery, pki, cluster_a, cluster_b)
    for name, cluster in (("x.b.example", cluster_b), ("a.example", cluster_a)):
        conninfo = _conninfo(pki, port, name, sslmode="verify-full")
        watch = f"host={cluster.socket_dir} port={cluster.port} user=postgres dbname=postgres"
        result = await run_client([sys.executable, "-c", CANCEL_CLIENT, conninfo, watch, how])
        ended, seconds = result.stdout.decode().split()
        assert ended == "cancelled", result
        assert float(seconds) < 5, result  # pg_sleep(30): only the cancel ends it this soon
    records = await access.wait(4)
    cancels = [record for record in records if record.outcome == "cancel_forwarded"]
    assert [str(record.backend) for record in cancels] == [cluster_b.address, cluster_a.address]
    expected_sni = ["x.b.example", "a.example"] if how == "cancel_safe" else [None, None]
    assert [record.sni for record in cancels] == expected_sni


async def test_an_unknown_cancel_key_is_dropped_without_reply(
    nursery: trio.Nursery, pki: PKI, cluster_a: Postgres, cluster_b: Postgres, access: AccessWatcher
) -> None:
    port = await _proxy(nursery, pki, cluster_a, cluster_b)
    cancel_request = (16).to_bytes(4, "big") + (80877102).to_bytes(4, "big") + bytes(8)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(cancel_request)
        with trio.fail_after(5):
            assert await stream.receive_some() == b""
    (record,) = await access.wait(1)
    assert record.outcome == "cancel_unknown"
    assert record.backend is None


async def test_a_cleartext_startup_is_refused_and_the_proxy_keeps_serving(
    nursery: trio.Nursery, pki: PKI, cluster_a: Postgres, cluster_b: Postgres, access: AccessWatcher
) -> None:
    port = await _proxy(nursery, pki, cluster_a, cluster_b)
    code, _, err = await _psql(_conninfo(pki, port, sslmode="disable"), "select 1", check=False)
    assert code == 2
    assert "SSL/TLS required" in err, err
    # prefer: libpq asks for TLS first, so it gets it.
    _, out, _ = await _psql(_conninfo(pki, port, sslmode="prefer"), "select 'still here'")
    assert out.strip() == "still here"
    first, second = await access.wait(2)
    assert first.outcome == "tls_required"
    assert first.backend is None
    assert second.outcome == "ok"


async def test_allow_plaintext_splices_a_cleartext_startup(
    nursery: trio.Nursery, pki: PKI, cluster_a: Postgres, cluster_b: Postgres, access: AccessWatcher
) -> None:
    port = await _proxy(nursery, pki, cluster_a, cluster_b, allow_plaintext=True)
    _, out, _ = await _psql(
        _conninfo(pki, port, sslmode="disable"),
        "show port",
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
    )
    assert out.split() == [str(cluster_a.port), "f"]
    (record,) = await access.wait(1)
    assert record.outcome == "ok"
    assert record.tls_version is None


async def test_a_direct_tls_hello_without_the_postgresql_alpn_is_refused(
    nursery: trio.Nursery, pki: PKI, cluster_a: Postgres, cluster_b: Postgres, access: AccessWatcher
) -> None:
    port = await _proxy(nursery, pki, cluster_a, cluster_b)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(stream, pki.client_context(alpn=["h2"]), server_hostname="a.example")
    async with stream:
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as caught:
            await tls.do_handshake()
    assert isinstance(caught.value.__cause__, ssl.SSLError)
    assert "NO APPLICATION PROTOCOL" in str(caught.value.__cause__).upper()
    (record,) = await access.wait(1)
    assert record.outcome == "bad_preamble"
    assert record.backend is None


async def test_backend_tls_sends_sslrequest_and_verifies_the_cluster(
    nursery: trio.Nursery, pki: PKI, cluster_a: Postgres, cluster_b: Postgres, access: AccessWatcher
) -> None:
    listener = l4proxy.ListenerConfig(
        name="pg-tls",
        listen=["127.0.0.1:0"],
        backends=[cluster_b.address],
        tls=l4proxy.TLSConfig(certs=[l4proxy.CertKey(cert=pki.a.combined)]),
        preamble="postgres",
        backend_tls=True,
        backend_ca=pki.ca_file,
        backend_sni="c.example",
    )
    bound = await nursery.start(l4proxy.Proxy(l4proxy.Config(listeners=[listener])).serve)
    conninfo = _conninfo(pki, bound[0].port, "a.example", sslmode="verify-full")
    rows = await _in_thread_query(
        conninfo,
        "select current_setting('port')::int, ssl from pg_stat_ssl where pid = pg_backend_pid()",
    )
    assert rows == [(cluster_b.port, True)]
    (record,) = await access.wait(1)
    assert record.outcome == "ok"


async def test_bytes_pipelined_after_sslrequest_are_refused_not_fed_to_tls(
    nursery: trio.Nursery, pki: PKI, cluster_a: Postgres, cluster_b: Postgres, access: AccessWatcher
) -> None:
    """CVE-2021-23214: bytes that did not wait for the proxy's ``S`` (here the start of
    a ClientHello) would be read as if they had come over TLS."""
    port = await _proxy(nursery, pki, cluster_a, cluster_b)
    ssl_request = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(ssl_request + b"\x16\x03\x01\x02\x00\x01")
        answer = bytearray()
        with trio.fail_after(5):
            while chunk := await stream.receive_some():
                answer += chunk
    assert answer[:1] == b"E", answer  # an ErrorResponse, never the "S" that starts TLS
    assert b"received unencrypted data after SSL request" in answer
    (record,) = await access.wait(1)
    assert record.outcome == "bad_preamble"
    assert record.backend is None
