"""The ``postgres`` scenario: pgbench through l4proxy's PostgreSQL preamble (issue #9).

A throwaway PostgreSQL 15 cluster (Debian's, /usr/lib/postgresql/15/bin) on 127.0.0.1,
trust auth, no durability, ``ssl = on`` with the same ECDSA P-256 certificate that
l4proxy gets. Two targets take turns, round after round, like the other scenarios:

- ``direct``: pgbench to the cluster with ``PGSSLMODE=require``: PostgreSQL's own TLS;
- ``l4proxy``: pgbench with ``PGSSLMODE=require`` to ``l4proxy --preamble postgres``,
  which answers the SSLRequest with 'S', terminates TLS and splices to the cluster's
  plain (non-TLS) port.

Measured: ``pgbench -S -c 8 -j 2 -T S -n`` on kept connections and with ``-C`` (a new
connection, so a full TLS handshake, per transaction: libpq 15 keeps no TLS sessions).
The issue's targets are on l4proxy/direct: at least 0.9x on kept connections, 0.8x
with a new connection per transaction. HAProxy and pproxy cannot speak the preamble
(their rows say n/a).

As root, initdb, postgres and pg_ctl run as the ``postgres`` user through ``runuser``;
the cluster lives in a ``tempfile.mkdtemp`` directory owned by that user (the work
directory is mode 0700 root's), removed at the end. The postmaster runs in the
foreground under ``Procs`` (its own session, pinned to the load core, logged), so it is
stopped on every path: ``pg_ctl stop -m fast`` first, then ``Procs.stop``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trustme
from _load import run_load
from _procs import LOAD_CORE, BenchError, find_binary, free_port, process_tree
from _report import TITLES, Metric
from _servers import BASELINE, start_proxy

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator, Mapping, Sequence

    from _procs import Proc, Procs
    from bench import Context, Run

BINDIR = Path("/usr/lib/postgresql/15/bin")
CLIENTS = 8
THREADS = 2
#: pgbench runs this many times ``--seconds`` per measurement (a transaction-rate tool
#: needs a little longer than wrk to settle; default 2 x 2 s, --quick 2 x 1 s).
SECONDS_FACTOR = 2
SCENARIO = "PostgreSQL (pgbench -S)"


@dataclass(frozen=True)
class Measurement:
    prefix: str  # of the metric keys
    what: str  # in the rate row and the notes
    short: str  # in the other rows
    label: str  # in the progress lines
    extra: tuple[str, ...]  # pgbench arguments besides -S -c -j -T -n
    target: float  # issue #9: l4proxy/direct at least this


MEASUREMENTS = (
    Measurement("pg_kept", "kept connections", "kept", "pgbench -S, kept", (), 0.9),
    Measurement(
        "pg_new", "a new connection per transaction", "-C", "pgbench -S -C, new conns", ("-C",), 0.8
    ),
)
METRICS = [
    metric
    for m in MEASUREMENTS
    for metric in (
        Metric(
            f"{m.prefix}_tps", SCENARIO, f"{m.what} (target >= {m.target}x direct)", "tps", True, 0
        ),
        Metric(f"{m.prefix}_lat", SCENARIO, f"{m.short}: latency average", "ms", False, 3),
        Metric(
            f"{m.prefix}_cpu",
            SCENARIO,
            f"{m.short}: proxy CPU per transaction",
            "µs",
            False,
            0,
            True,
        ),
        Metric(f"{m.prefix}_busy", SCENARIO, f"{m.short}: proxy core busy", "%", None, 0, True),
        Metric(
            f"{m.prefix}_server_cpu",
            SCENARIO,
            f"{m.short}: PostgreSQL CPU per transaction",
            "µs",
            False,
            0,
        ),
    )
]
_PROXY_KINDS = ("l4proxy", BASELINE)
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Pgbench:
    tps: float
    latency_ms: float
    transactions: int
    failed: int
    server_cpu_s: float = 0.0


@dataclass(frozen=True)
class Cluster:
    proc: Proc
    datadir: Path
    port: int
    runas: tuple[str, ...]

    def cpu_seconds(self) -> float:
        """User plus system time of the cluster: live processes and the exited (reaped)
        backends that ``-C`` leaves behind, which count in the postmaster's cutime/cstime."""
        ticks = 0
        for member in process_tree(self.proc.pid):
            with contextlib.suppress(OSError), open(f"/proc/{member}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
                ticks += sum(int(value) for value in fields[11:15])
        return ticks / _TICKS


def _program(name: str) -> str:
    path = BINDIR / name
    if not path.is_file():
        raise BenchError(f"{path} not found (Debian's postgresql-15 package has it)")
    return str(path)


def _runas() -> tuple[tuple[str, ...], pwd.struct_passwd | None]:
    """PostgreSQL refuses root: as root, run its programs as ``postgres`` via runuser."""
    if os.geteuid() != 0:
        return (), None
    try:
        owner = pwd.getpwnam("postgres")
    except KeyError as error:
        raise BenchError("running as root but there is no 'postgres' user") from error
    return (find_binary("runuser"), "-u", "postgres", "--"), owner


def write_cert(workdir: Path) -> tuple[Path, Path]:
    """An ECDSA P-256 certificate and its key in two files, as PostgreSQL wants them."""
    authority = trustme.CA(key_type=trustme.KeyType.ECDSA)
    issued = authority.issue_cert("bench.example", "127.0.0.1")
    cert, key = workdir / "pg-cert.pem", workdir / "pg-key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


def _settings(port: int) -> str:
    return "\n".join(
        [
            "",
            "# l4proxy benchmark",
            "listen_addresses = '127.0.0.1'",
            f"port = {port}",
            "unix_socket_directories = ''",
            "max_connections = 200",
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
            "ssl = on",
            "ssl_cert_file = 'server.crt'",
            "ssl_key_file = 'server.key'",
            "",
        ]
    )


def _wait_ready(cluster: Cluster, deadline_s: float = 30.0) -> None:
    """``pg_isready`` until the cluster accepts connections (it listens before that)."""
    argv = [_program("pg_isready"), "-h", "127.0.0.1", "-p", str(cluster.port), "-t", "2"]
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if not cluster.proc.alive():
            raise BenchError(f"postgres exited:\n{cluster.proc.tail()}")
        done = subprocess.run(argv, capture_output=True, timeout=10, check=False)
        if done.returncode == 0:
            return
        time.sleep(0.1)
    raise BenchError(f"postgres not ready after {deadline_s:g} s:\n{cluster.proc.tail()}")


@contextlib.contextmanager
def cluster(procs: Procs, cert: Path, key: Path) -> Iterator[Cluster]:
    """A throwaway cluster on 127.0.0.1 with ``ssl = on``; stopped and removed on exit."""
    runas, owner = _runas()
    initdb, postgres, pg_ctl = _program("initdb"), _program("postgres"), _program("pg_ctl")
    base = Path(tempfile.mkdtemp(prefix="l4proxy-bench-pg-"))
    try:
        if owner is not None:
            os.chown(base, owner.pw_uid, owner.pw_gid)
        datadir = base / "data"
        run_load(
            [*runas, initdb, "-D", str(datadir), "-A", "trust", "-U", "postgres",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            what="initdb",
            timeout=120,
            cwd="/",  # the postgres user may not be able to read the current directory
        )  # fmt: skip
        for source, name in ((cert, "server.crt"), (key, "server.key")):
            shutil.copyfile(source, datadir / name)
            (datadir / name).chmod(0o600)
            if owner is not None:
                os.chown(datadir / name, owner.pw_uid, owner.pw_gid)
        port = free_port()
        with open(datadir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(_settings(port))
        proc = procs.start(
            "postgres", [*runas, postgres, "-D", str(datadir)], core=LOAD_CORE, cwd=Path("/")
        )
        found = Cluster(proc, datadir, port, runas)
        try:
            proc.wait_listening(port, timeout=30)
            _wait_ready(found)
            yield found
        finally:
            with contextlib.suppress(BenchError, OSError):
                run_load(
                    [*runas, pg_ctl, "-D", str(datadir), "-m", "fast", "-w", "-t", "20", "stop"],
                    what="pg_ctl stop",
                    timeout=40,
                    cwd="/",
                )
            procs.stop(proc)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _client_env(sslmode: str) -> dict[str, str]:
    # GSSAPI encryption off for both targets: libpq would try it first with credentials.
    return {"PGSSLMODE": sslmode, "PGGSSENCMODE": "disable", "PGCONNECT_TIMEOUT": "10"}


def _find(pattern: str, output: str) -> re.Match[str]:
    match = re.search(pattern, output, re.MULTILINE)
    if match is None:
        raise BenchError(f"pgbench: no {pattern!r} in its output:\n{output[-800:]}")
    return match


def parse_pgbench(output: str) -> Pgbench:
    """pgbench 15's summary: ``tps = N (without initial connection time)``, or with -C
    ``tps = N (including reconnection times)``; transactions, failures, latency."""
    tps = _find(
        r"^tps = ([\d.]+) \((?:without initial connection time|including reconnection times)\)",
        output,
    )
    processed = _find(r"^number of transactions actually processed: (\d+)", output)
    failed = re.search(r"^number of failed transactions: (\d+)", output, re.MULTILINE)
    latency = _find(r"^latency average = ([\d.]+) ms", output)
    return Pgbench(
        tps=float(tps.group(1)),
        latency_ms=float(latency.group(1)),
        transactions=int(processed.group(1)),
        failed=int(failed.group(1)) if failed else 0,
    )


def pgbench(port: int, extra: Sequence[str], *, seconds: int) -> Pgbench:
    """``pgbench -S`` with ``extra`` for ``seconds`` against 127.0.0.1:``port``, TLS required."""
    argv = [
        _program("pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
        "-S", *extra, "-c", str(CLIENTS), "-j", str(THREADS), "-T", str(seconds), "-n",
        "postgres",
    ]  # fmt: skip
    return parse_pgbench(
        run_load(argv, what="pgbench", timeout=seconds + 60, env=_client_env("require"), cwd="/")
    )


def _tls_probe(port: int) -> str:
    """What ``openssl s_client -starttls postgres`` negotiates (version, suite, key exchange)."""
    argv = [find_binary("openssl"), "s_client", "-connect", f"127.0.0.1:{port}",
            "-starttls", "postgres", "-brief"]  # fmt: skip
    try:
        done = subprocess.run(
            argv, input="", capture_output=True, text=True, timeout=10, check=False
        )
    except subprocess.TimeoutExpired:
        return "probe timed out"
    wanted = ("Protocol version", "Ciphersuite", "Temp Key", "Signature type")
    output = done.stdout + done.stderr
    facts = [" ".join(line.split()) for line in output.splitlines() if line.startswith(wanted)]
    return ", ".join(facts) or "probe printed nothing"


def _start_proxies(
    ctx: Context, backend: int, cert: Path, key: Path
) -> tuple[dict[str, int], dict[str, Proc]]:
    ports: dict[str, int] = {"direct": backend}
    started: dict[str, Proc] = {}
    extra = [*ctx.args.l4proxy_arg, "--tls-key", str(key), "--preamble", "postgres"]
    for kind in ctx.proxies:
        if kind not in _PROXY_KINDS:
            for m in MEASUREMENTS:
                ctx.results.mark_unsupported(f"{m.prefix}_tps", kind, "no PostgreSQL preamble")
            continue
        try:
            proc, port = start_proxy(
                ctx.procs,
                kind,
                backend,
                cert=cert,
                l4proxy_args=extra,
                tag="postgres",
                baseline=ctx.args.baseline,
            )
        except BenchError as error:
            ctx.results.note(f"postgres: {TITLES[kind]} did not start: {error}")
            for m in MEASUREMENTS:
                ctx.results.mark_unsupported(f"{m.prefix}_tps", kind, "did not start")
            continue
        ports[kind], started[kind] = port, proc
    return ports, started


def _record(ctx: Context, prefix: str, found: dict[str, dict[int, Run[Pgbench]]]) -> None:
    for target, by_round in found.items():
        for run in by_round.values():
            result = run.result
            ctx.results.add(f"{prefix}_tps", target, result.tps)
            ctx.results.add(f"{prefix}_lat", target, result.latency_ms)
            if result.transactions:
                per = 1e6 / result.transactions
                ctx.results.add(f"{prefix}_server_cpu", target, result.server_cpu_s * per)
                if run.cpu_s is not None:
                    ctx.results.add(f"{prefix}_cpu", target, run.cpu_s * per)
                    ctx.results.add(f"{prefix}_busy", target, run.busy() or 0.0)
            ctx.results.add_errors(f"{prefix}_tps", target, result.failed)
            if result.failed:
                ctx.results.note(
                    f"postgres: {TITLES[target]}: pgbench reported {result.failed} failed "
                    f"transactions (of {result.transactions})"
                )


def _judge(ctx: Context, m: Measurement) -> None:
    """A note per target of the issue: l4proxy/direct against it, met or not."""
    l4 = ctx.results.median(f"{m.prefix}_tps", "l4proxy")
    direct = ctx.results.median(f"{m.prefix}_tps", "direct")
    if l4 is None or direct is None or direct <= 0:
        ctx.results.note(f"postgres: {m.what}: target >= {m.target}x direct not measured")
        return
    ratio = l4 / direct
    status = "met" if ratio >= m.target else "NOT met"
    ctx.results.note(
        f"postgres (issue #9): {m.what}: l4proxy/direct = {ratio:.2f}x "
        f"({l4:,.0f} vs {direct:,.0f} tps), target >= {m.target}x: {status}"
    )


def scenario_postgres(ctx: Context) -> None:
    print(
        f"PostgreSQL through the preamble (pgbench -S -c{CLIENTS} -j{THREADS}; direct is "
        "PostgreSQL's own TLS)",
        flush=True,
    )
    seconds = ctx.seconds * SECONDS_FACTOR
    cert, key = write_cert(ctx.workdir)
    with cluster(ctx.procs, cert, key) as pg:
        init = [_program("pgbench"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
                "-i", "-s", "1", "-q", "postgres"]  # fmt: skip
        run_load(init, what="pgbench -i", timeout=120, env=_client_env("disable"), cwd="/")
        ports, proxies = _start_proxies(ctx, pg.port, cert, key)
        try:
            for kind, port in ports.items():
                facts = _tls_probe(port)
                ctx.pg_facts[kind] = facts
                print(f"  {TITLES[kind]:{ctx.width}} negotiates: {facts}", flush=True)
            for port in ports.values():  # warm-up: caches, the proxy's first connections
                pgbench(port, (), seconds=1)
            for m in MEASUREMENTS:

                def measure(port: int, extra: Sequence[str] = m.extra) -> tuple[Pgbench, str]:
                    before = pg.cpu_seconds()
                    result = pgbench(port, extra, seconds=seconds)
                    result.server_cpu_s = pg.cpu_seconds() - before
                    failed = f"  failed {result.failed}" if result.failed else ""
                    summary = (
                        f"{result.tps:9.0f} tps  latency {result.latency_ms:7.3f} ms  "
                        f"PostgreSQL CPU {result.server_cpu_s / seconds * 100:3.0f}%{failed}"
                    )
                    return result, summary

                found = ctx.alternate(m.label, ports, proxies, measure, 0.5)
                _record(ctx, m.prefix, found)
                _judge(ctx, m)
        finally:
            ctx.stop(proxies)


def method_lines(args: argparse.Namespace, facts: Mapping[str, str]) -> list[str]:
    """The method section's lines for this scenario."""
    seconds = int(args.seconds) * SECONDS_FACTOR
    lines = [
        "PostgreSQL (issue #9): a throwaway PostgreSQL 15 cluster on 127.0.0.1 (trust auth, "
        "`fsync = off`, `ssl = on` with the same ECDSA P-256 certificate as l4proxy, "
        "`max_connections = 200`), `pgbench -i -s 1`; then "
        f"`pgbench -S -c{CLIENTS} -j{THREADS} -T {seconds} -n` (select-only on kept "
        "connections) and the same with `-C` (a new connection, so a full TLS handshake, "
        "per transaction), both with `PGSSLMODE=require`. direct is PostgreSQL's own TLS; "
        "l4proxy is `--preamble postgres --tls-cert --tls-key` (SSLRequest answered 'S', "
        "TLS terminated, spliced to the cluster's plain port). The cluster and pgbench run "
        "on the load core, so direct does client and server TLS there, while through "
        "l4proxy the server side's TLS runs on the proxy core. 'PostgreSQL's CPU' counts "
        "the postmaster's tree including exited backends. HAProxy and pproxy cannot speak "
        "the preamble. Targets: l4proxy/direct >= 0.9x kept, >= 0.8x new connections.",
    ]
    lines += [
        f"PostgreSQL TLS as negotiated by `openssl s_client -starttls postgres` with "
        f"{TITLES.get(kind, kind)}: {text}."
        for kind, text in facts.items()
    ]
    return lines
