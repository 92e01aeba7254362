"""l4proxy against HAProxy, pproxy and a direct connection, in one invocation.

Usage: ``.venv/bin/python benchmarks/bench.py [--quick] [--only bulk,connrate,...]
[--markdown PATH] [--baseline DIR]`` (``make bench`` installs the tools and writes
docs/performance-results.md).

A/B against an earlier l4proxy in the same run: ``--baseline DIR``, where DIR is a source
tree of l4proxy (``mkdir -p /tmp/base && git archive <rev> | tar -x -C /tmp/base``), adds
the target ``l4proxy@base``: the same arguments, scenarios, core and CPU accounting as
l4proxy, run as ``python -m l4proxy`` on the l4proxy command's interpreter (this venv's,
with its dependencies) with ``PYTHONPATH=DIR``; the file it imports is checked and logged
at the start. The tables show it next to l4proxy, with the ratio l4proxy/l4proxy@base.

Scenarios (each measurement a few seconds; per scenario the targets take turns, round
after round, starting one later each round; the table shows the median of the rounds):

- ``bulk``: iperf3, 1 and 4 streams, client -> proxy -> iperf3 server (Gbit/s);
- ``connrate``: wrk with ``Connection: close`` for a 64-byte file from nginx: one new
  client connection and one new backend connection per request (conn/s, p50/p99);
- ``keepalive``: wrk on kept-alive connections, 1, 10 and 100: requests/s, p50/p99, what
  the proxy adds over direct, proxy CPU per request;
- ``tls``: the proxy terminates TLS (ECDSA P-256 certificate), nginx stays plain HTTP:
  bulk (wrk fetching 1 MiB over 4 kept-alive connections), full handshakes per second
  (parallel ``openssl s_time -new``: wrk resumes its TLS session on every reconnect),
  those resumed handshakes per second (wrk with ``Connection: close``) and small
  requests on 10 kept-alive TLS connections (requests/s, proxy CPU per request);
- ``edge``: new connections with allow/deny, a per-IP limit and PROXY v2 on vs off,
  refused connections/s of a denied address, another client's p99 under a flood from one
  address, against HAProxy's equivalents (benchmarks/_edge.py);
- ``ops``: new connections with ``--metrics`` scraped every second vs without, and the
  idle CPU of health checks of 100 backends every second (benchmarks/_ops.py);
- ``postgres``: pgbench -S through ``--preamble postgres`` against PostgreSQL's own TLS,
  on kept connections and with a new connection per transaction (benchmarks/_postgres.py);
- ``memory``: RSS of the proxy with 5,000 idle connections through it, per connection;
  then the same with TLS terminated (HAProxy and l4proxy).

Besides each tool's own figures, the table has the proxy's CPU time per unit of work
(from /proc, user + system) and how busy its core was: a proxy whose core was not busy
was not the bottleneck, and then the CPU per unit is the fairer comparison.

The proxy under test runs on core 0, everything else (wrk, iperf3, nginx, the iperf3
server, this script) on core 1. l4proxy is the real command with default settings
(splice on, access log to standard error, which goes to a file here); HAProxy runs
``mode tcp``, ``nbthread 1``, ``option splice-auto``; pproxy is a ``tunnel://``
forwarder. Only loopback addresses are used (127.0.0.1; the edge scenario's flood
also 127.0.0.2 and 127.0.0.3). Every process started here is stopped on exit,
also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Generic, NoReturn, TypeVar

import _edge
import _load
import _ops
import _postgres
import _procs
import trustme
from _procs import (
    LOAD_CORE,
    PROXY_CORE,
    BenchError,
    Proc,
    Procs,
    cpu_seconds,
    find_binary,
    machine_busy,
    open_fds,
    pin,
    raise_nofile,
    rss_kib,
    two_cores,
)
from _report import (
    REPO,
    TARGETS,
    TITLES,
    Metric,
    Results,
    header,
    machine,
    markdown_table,
    rows,
    target_rows,
    text_table,
)
from _servers import (
    BASELINE,
    LARGE_FILE,
    PROXIES,
    SMALL_FILE,
    SMALL_SIZE,
    check_baseline,
    current_l4proxy_file,
    l4proxy_python,
    start_holder,
    start_iperf3_server,
    start_nginx,
    start_proxy,
    tree_digest,
    venv_binary,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

T = TypeVar("T")

SCENARIOS = ("bulk", "connrate", "keepalive", "tls", "edge", "ops", "postgres", "memory")

METRICS = [
    Metric("bulk1", "bulk (iperf3)", "1 stream", "Gbit/s", True, 2),
    Metric("bulk1_cpu", "bulk (iperf3)", "1 stream: proxy CPU per GB", "ms", False, 0, True),
    Metric("bulk4", "bulk (iperf3)", "4 streams", "Gbit/s", True, 2),
    Metric("bulk4_cpu", "bulk (iperf3)", "4 streams: proxy CPU per GB", "ms", False, 0, True),
    Metric("conn_rate", "new connections", "rate", "conn/s", True, 0),
    Metric("conn_p50", "new connections", "p50 latency", "ms", False, 2),
    Metric("conn_p99", "new connections", "p99 latency", "ms", False, 2),
    Metric("conn_cpu", "new connections", "proxy CPU per connection", "µs", False, 0, True),
    Metric("conn_busy", "new connections", "proxy core busy", "%", None, 0, True),
    Metric("ka1_rps", "keep-alive, 1 conn", "requests", "req/s", True, 0),
    Metric("ka1_p50", "keep-alive, 1 conn", "p50 latency", "µs", False, 0),
    Metric("ka1_p99", "keep-alive, 1 conn", "p99 latency", "µs", False, 0),
    Metric("ka1_added_p50", "keep-alive, 1 conn", "added p50 over direct", "µs", False, 0, True),
    Metric("ka1_added_p99", "keep-alive, 1 conn", "added p99 over direct", "µs", False, 0, True),
    Metric("ka1_cpu", "keep-alive, 1 conn", "proxy CPU per request", "µs", False, 1, True),
    Metric("ka10_rps", "keep-alive, 10 conns", "requests", "req/s", True, 0),
    Metric("ka10_p50", "keep-alive, 10 conns", "p50 latency", "µs", False, 0),
    Metric("ka10_p99", "keep-alive, 10 conns", "p99 latency", "µs", False, 0),
    Metric("ka10_added_p50", "keep-alive, 10 conns", "added p50 over direct", "µs", False, 0, True),
    Metric("ka10_added_p99", "keep-alive, 10 conns", "added p99 over direct", "µs", False, 0, True),
    Metric("ka10_cpu", "keep-alive, 10 conns", "proxy CPU per request", "µs", False, 1, True),
    Metric("ka10_busy", "keep-alive, 10 conns", "proxy core busy", "%", None, 0, True),
    Metric("ka100_rps", "keep-alive, 100 conns", "requests", "req/s", True, 0),
    Metric("ka100_p50", "keep-alive, 100 conns", "p50 latency", "µs", False, 0),
    Metric("ka100_p99", "keep-alive, 100 conns", "p99 latency", "µs", False, 0),
    Metric("ka100_cpu", "keep-alive, 100 conns", "proxy CPU per request", "µs", False, 1, True),
    Metric("ka100_busy", "keep-alive, 100 conns", "proxy core busy", "%", None, 0, True),
    Metric("tls_bulk", "TLS termination", "bulk, 1 MiB responses", "Gbit/s", True, 2),
    Metric("tls_bulk_cpu", "TLS termination", "bulk: proxy CPU per GB", "ms", False, 0, True),
    Metric("tls_hs", "TLS termination", "full handshakes (s_time -new)", "conn/s", True, 0),
    Metric("tls_hs_cpu", "TLS termination", "proxy CPU per full handshake", "µs", False, 0, True),
    Metric(
        "tls_hs_busy", "TLS termination", "full handshakes: proxy core busy", "%", None, 0, True
    ),
    Metric("tls_res", "TLS termination", "resumed handshakes (wrk)", "conn/s", True, 0),
    Metric("tls_res_p50", "TLS termination", "resumed: p50 latency", "ms", False, 2),
    Metric("tls_res_cpu", "TLS termination", "proxy CPU per resumed conn", "µs", False, 0, True),
    Metric("tls_ka10_rps", "TLS termination", "kept-alive requests, 10 conns", "req/s", True, 0),
    Metric("tls_ka10_p50", "TLS termination", "kept-alive: p50 latency", "µs", False, 0),
    Metric(
        "tls_ka10_cpu", "TLS termination", "kept-alive: proxy CPU per request", "µs", False, 1, True
    ),
    Metric("tls_ka10_busy", "TLS termination", "kept-alive: proxy core busy", "%", None, 0, True),
    *_edge.METRICS,
    *_ops.METRICS,
    *_postgres.METRICS,
    Metric("mem_per_conn", "idle connections", "RSS per connection", "KiB", False, 2),
    Metric("mem_tls_per_conn", "idle connections", "RSS per idle TLS connection", "KiB", False, 2),
    Metric("mem_base", "idle connections", "RSS before (no connections)", "MiB", False, 1),
    Metric("mem_fds_per_conn", "idle connections", "fds per connection", "fds", False, 2),
    Metric("mem_pipes", "idle connections", "pipes held while idle", "pipes", False, 0),
    Metric("mem_setup", "idle connections", "open + 1-byte echo, one at a time", "ms", False, 2),
]


@dataclass
class Run(Generic[T]):
    """One measurement: what the tool reported, and the proxy's CPU time meanwhile."""

    result: T
    wall_s: float
    cpu_s: float | None  # None for direct

    def busy(self) -> float | None:
        return None if self.cpu_s is None else 100 * self.cpu_s / self.wall_s


@dataclass
class Context:
    args: argparse.Namespace
    procs: Procs
    workdir: Path
    results: Results
    cert: Path
    proxies: list[str]
    nginx_port: int = 0
    nginx_proxied_port: int = 0  # expects a PROXY header (the edge scenario)
    tls_facts: dict[str, str] = field(default_factory=dict)
    pg_facts: dict[str, str] = field(default_factory=dict)

    @property
    def width(self) -> int:
        """Of the target column in progress lines (8, or more for l4proxy@base)."""
        return max(8, *(len(TITLES[kind]) for kind in self.proxies))

    @property
    def rounds(self) -> int:
        return int(self.args.rounds)

    @property
    def seconds(self) -> int:
        return int(self.args.seconds)

    def nginx(self) -> int:
        if not self.nginx_port:
            _, self.nginx_port, self.nginx_proxied_port = start_nginx(self.procs, self.workdir)
        return self.nginx_port

    def start_proxies(
        self, backend: int, tag: str, *, tls: bool = False, metrics: tuple[str, ...] = ()
    ) -> tuple[dict[str, int], dict[str, Proc]]:
        """Every selected proxy forwarding to ``backend``; ``direct`` is the backend itself."""
        ports: dict[str, int] = {} if tls else {"direct": backend}
        started: dict[str, Proc] = {}
        for kind in self.proxies:
            try:
                proc, port = start_proxy(
                    self.procs,
                    kind,
                    backend,
                    cert=self.cert if tls else None,
                    maxconn=self.args.idle_conns + 1000,
                    l4proxy_args=self.args.l4proxy_arg,
                    tag=tag,
                    baseline=self.args.baseline,
                )
            except BenchError as error:
                self.results.note(f"{tag}: {TITLES[kind]} did not start: {error}")
                for key in metrics:
                    self.results.mark_unsupported(key, kind, "did not start")
                continue
            ports[kind] = port
            started[kind] = proc
        return ports, started

    def stop(self, procs: dict[str, Proc]) -> None:
        for proc in procs.values():
            self.procs.stop(proc)

    def alternate(
        self,
        label: str,
        ports: dict[str, int],
        proxies: dict[str, Proc],
        measure: Callable[[int], tuple[T, str]],
        pause: float = 0.3,
    ) -> dict[str, dict[int, Run[T]]]:
        """Round-robin: each round every target once, the order rotated by one per round.

        ``measure(port)`` returns a result and a one-line summary. A target that fails is
        noted and left out of the remaining rounds.
        """
        targets = [target for target in TARGETS if target in ports]
        found: dict[str, dict[int, Run[T]]] = {target: {} for target in targets}
        failed: set[str] = set()
        for round_index in range(self.rounds):
            shift = round_index % len(targets)
            for target in targets[shift:] + targets[:shift]:
                if target in failed:
                    continue
                proc = proxies.get(target)
                try:
                    if proc is not None and not proc.alive():
                        raise BenchError(f"exited with {proc.popen.returncode}:\n{proc.tail()}")
                    cpu_before = cpu_seconds(proc.pid) if proc is not None else 0.0
                    start = time.monotonic()
                    result, summary = measure(ports[target])
                    wall = time.monotonic() - start
                    cpu = cpu_seconds(proc.pid) - cpu_before if proc is not None else None
                except BenchError as error:
                    failed.add(target)
                    self.results.note(f"{label}: {TITLES[target]} failed: {error}")
                    print(f"  {label:24} {TITLES[target]:{self.width}} FAILED: {error}", flush=True)
                    continue
                run = Run(result, wall, cpu)
                found[target][round_index] = run
                busy = run.busy()
                print(
                    f"  {label:24} round {round_index + 1}/{self.rounds}  "
                    f"{TITLES[target]:{self.width}} {summary}"
                    + (f"  proxy core {busy:3.0f}%" if busy is not None else ""),
                    flush=True,
                )
                time.sleep(pause)
        return found


def _record_wrk(
    ctx: Context,
    found: dict[str, dict[int, Run[_load.WrkResult]]],
    prefix: str,
    scale: float,
    *,
    rate_key: str | None = None,
) -> None:
    """Store requests/s, p50, p99 (times ``scale`` from ms), proxy CPU per request, errors."""
    results = ctx.results
    rate_key = rate_key or f"{prefix}_rps"
    for target, by_round in found.items():
        for run in by_round.values():
            result = run.result
            results.add(rate_key, target, result.requests_per_s)
            results.add(f"{prefix}_p50", target, result.p50_ms * scale)
            results.add(f"{prefix}_p99", target, result.p99_ms * scale)
            if run.cpu_s is not None:
                results.add(f"{prefix}_cpu", target, run.cpu_s / result.requests * 1e6)
                results.add(f"{prefix}_busy", target, run.busy() or 0.0)
            results.add_errors(rate_key, target, result.errors)
            if result.errors:
                results.note(
                    f"{prefix}: {TITLES[target]}: wrk reported {result.error_text} "
                    f"(of {result.requests} requests)"
                )


def _wrk_summary(result: _load.WrkResult, *, micro: bool = False) -> str:
    unit, scale = ("µs", 1000.0) if micro else ("ms", 1.0)
    errors = f"  errors {result.errors}" if result.errors else ""
    return (
        f"{result.requests_per_s:9.0f}/s  p50 {result.p50_ms * scale:7.2f} {unit}  "
        f"p99 {result.p99_ms * scale:7.2f} {unit}{errors}"
    )


def scenario_bulk(ctx: Context) -> None:
    print("bulk throughput (iperf3)", flush=True)
    server, port = start_iperf3_server(ctx.procs)
    ports, proxies = ctx.start_proxies(port, "bulk", metrics=("bulk1", "bulk4"))
    try:
        for streams in (1, 4):

            def measure(proxy_port: int, streams: int = streams) -> tuple[float, str]:
                bits = _load.iperf3(proxy_port, streams=streams, seconds=ctx.seconds)
                return bits, f"{bits / 1e9:6.2f} Gbit/s"

            found = ctx.alternate(f"bulk, {streams} stream(s)", ports, proxies, measure, 0.5)
            for target, by_round in found.items():
                for run in by_round.values():
                    ctx.results.add(f"bulk{streams}", target, run.result / 1e9)
                    if run.cpu_s is not None:
                        gigabytes = run.result * ctx.seconds / 8 / 1e9
                        ctx.results.add(f"bulk{streams}_cpu", target, run.cpu_s / gigabytes * 1e3)
    finally:
        ctx.stop(proxies)
        ctx.procs.stop(server)


def scenario_connrate(ctx: Context) -> None:
    print(f"new connections/s (wrk -c{ctx.args.concurrency}, Connection: close)", flush=True)
    backend = ctx.nginx()
    ports, proxies = ctx.start_proxies(backend, "connrate", metrics=("conn_rate",))
    try:

        def measure(port: int) -> tuple[_load.WrkResult, str]:
            result = _load.wrk(
                f"http://127.0.0.1:{port}/{SMALL_FILE}",
                connections=ctx.args.concurrency,
                seconds=ctx.seconds,
                close=True,
            )
            return result, _wrk_summary(result)

        found = ctx.alternate("new connections", ports, proxies, measure, pause=1.0)
        _record_wrk(ctx, found, "conn", 1.0, rate_key="conn_rate")
    finally:
        ctx.stop(proxies)


def scenario_keepalive(ctx: Context) -> None:
    print("keep-alive request/response latency (wrk)", flush=True)
    backend = ctx.nginx()
    ports, proxies = ctx.start_proxies(
        backend, "keepalive", metrics=("ka1_p50", "ka10_rps", "ka100_rps")
    )
    try:
        for connections in (1, 10, 100):

            def measure(port: int, connections: int = connections) -> tuple[_load.WrkResult, str]:
                result = _load.wrk(
                    f"http://127.0.0.1:{port}/{SMALL_FILE}",
                    connections=connections,
                    seconds=ctx.seconds,
                )
                return result, _wrk_summary(result, micro=True)

            prefix = f"ka{connections}"
            found = ctx.alternate(f"keep-alive, {connections} conn(s)", ports, proxies, measure)
            _record_wrk(ctx, found, prefix, 1000.0)
            direct = found.get("direct", {})
            for target in found:
                if target == "direct":
                    continue
                for round_index, run in found[target].items():
                    if round_index in direct:
                        base = direct[round_index].result
                        added_p50 = (run.result.p50_ms - base.p50_ms) * 1000
                        added_p99 = (run.result.p99_ms - base.p99_ms) * 1000
                        ctx.results.add(f"{prefix}_added_p50", target, added_p50)
                        ctx.results.add(f"{prefix}_added_p99", target, added_p99)
    finally:
        ctx.stop(proxies)


def scenario_tls(ctx: Context) -> None:
    print("TLS termination (nginx behind the proxy stays plain http)", flush=True)
    backend = ctx.nginx()
    ports, proxies = ctx.start_proxies(
        backend, "tls", tls=True, metrics=("tls_bulk", "tls_hs", "tls_res", "tls_ka10_rps")
    )
    try:
        for kind, port in ports.items():
            facts = _load.tls_probe(port, ctx.workdir)
            ctx.tls_facts[kind] = facts
            print(f"  {TITLES[kind]:{ctx.width}} negotiates: {facts}", flush=True)

        def bulk(port: int) -> tuple[_load.WrkResult, str]:
            result = _load.wrk(
                f"https://127.0.0.1:{port}/{LARGE_FILE}",
                connections=ctx.args.tls_bulk_conns,
                seconds=ctx.seconds,
            )
            return result, f"{result.bytes_per_s * 8 / 1e9:6.2f} Gbit/s  {_wrk_summary(result)}"

        found = ctx.alternate("TLS bulk", ports, proxies, bulk)
        for target, by_round in found.items():
            for run in by_round.values():
                result = run.result
                ctx.results.add("tls_bulk", target, result.bytes_per_s * 8 / 1e9)
                if run.cpu_s is not None:
                    gigabytes = result.bytes_per_s * run.wall_s / 1e9
                    ctx.results.add("tls_bulk_cpu", target, run.cpu_s / gigabytes * 1e3)
                ctx.results.add_errors("tls_bulk", target, result.errors)
                if result.errors:
                    ctx.results.note(
                        f"TLS bulk: {TITLES[target]}: wrk reported {result.error_text}"
                    )

        def full(port: int) -> tuple[tuple[int, float], str]:
            count, wall = _load.full_handshakes(
                port, f"/{SMALL_FILE}", processes=ctx.args.tls_clients, seconds=ctx.seconds
            )
            return (count, wall), f"{count / wall:9.0f}/s full handshakes"

        handshakes = ctx.alternate("TLS full handshakes", ports, proxies, full, pause=1.0)
        for target, runs in handshakes.items():
            for handshake_run in runs.values():
                count, wall = handshake_run.result
                ctx.results.add("tls_hs", target, count / wall)
                if handshake_run.cpu_s is not None:
                    ctx.results.add("tls_hs_cpu", target, handshake_run.cpu_s / count * 1e6)
                    ctx.results.add("tls_hs_busy", target, handshake_run.busy() or 0.0)

        def resumed(port: int) -> tuple[_load.WrkResult, str]:
            result = _load.wrk(
                f"https://127.0.0.1:{port}/{SMALL_FILE}",
                connections=ctx.args.concurrency,
                seconds=ctx.seconds,
                close=True,
            )
            return result, _wrk_summary(result)

        found = ctx.alternate("TLS resumed handshakes", ports, proxies, resumed, pause=1.0)
        _record_wrk(ctx, found, "tls_res", 1.0, rate_key="tls_res")

        def kept_alive(port: int) -> tuple[_load.WrkResult, str]:
            result = _load.wrk(
                f"https://127.0.0.1:{port}/{SMALL_FILE}", connections=10, seconds=ctx.seconds
            )
            return result, _wrk_summary(result, micro=True)

        found = ctx.alternate("TLS kept-alive, 10 conns", ports, proxies, kept_alive)
        _record_wrk(ctx, found, "tls_ka10", 1000.0)
    finally:
        ctx.stop(proxies)


def scenario_memory(ctx: Context) -> None:
    count = ctx.args.idle_conns
    print(f"memory with {count} idle connections, then {count} idle TLS ones", flush=True)
    holder, backend = start_holder(ctx.procs)
    client_tls = ssl.create_default_context()
    client_tls.check_hostname = False
    client_tls.verify_mode = ssl.CERT_NONE  # the proxy's memory is measured, not trust
    try:
        for tls in (False, True):
            for kind in ctx.proxies:
                if tls and kind == "pproxy":
                    continue  # no TLS termination
                _idle_memory(ctx, kind, backend, count, client_tls if tls else None)
    finally:
        ctx.procs.stop(holder)


def _idle_memory(
    ctx: Context, kind: str, backend: int, count: int, tls: ssl.SSLContext | None
) -> None:
    """One proxy's RSS, descriptors and pipes with ``count`` idle connections through it."""
    key = "mem_tls_per_conn" if tls is not None else "mem_per_conn"
    try:
        proc, port = start_proxy(
            ctx.procs,
            kind,
            backend,
            cert=ctx.cert if tls is not None else None,
            maxconn=count + 1000,
            l4proxy_args=ctx.args.l4proxy_arg,
            tag="memory",
            baseline=ctx.args.baseline,
        )
    except BenchError as error:
        ctx.results.note(f"memory: {TITLES[kind]} did not start: {error}")
        ctx.results.mark_unsupported(key, kind, "did not start")
        return
    try:
        # Warm up (lazy imports, pools, first-connection allocations), then measure.
        _load.close_all(_load.open_idle(port, 50, deadline_s=30, tls=tls))
        time.sleep(1.0)
        before = rss_kib(proc.pid)
        fds_before, pipes_before = open_fds(proc.pid)
        start = time.monotonic()
        connections = _load.open_idle(port, count, deadline_s=120, tls=tls)
        opened_in = time.monotonic() - start
        try:
            time.sleep(1.0)
            after = rss_kib(proc.pid)
            fds_after, pipes_after = open_fds(proc.pid)
        finally:
            _load.close_all(connections)
    except BenchError as error:
        ctx.results.note(f"memory: {TITLES[kind]} failed: {error}")
        ctx.results.mark_unsupported(key, kind, "failed")
        print(f"  {TITLES[kind]:{ctx.width}} FAILED: {error}", flush=True)
        return
    finally:
        ctx.procs.stop(proc)
    per_conn = (after - before) / count
    ctx.results.add(key, kind, per_conn)
    if tls is None:
        ctx.results.add("mem_base", kind, before / 1024)
        ctx.results.add("mem_fds_per_conn", kind, (fds_after - fds_before) / count)
        ctx.results.add("mem_pipes", kind, pipes_after - pipes_before)
        ctx.results.add("mem_setup", kind, opened_in / count * 1e3)
    print(
        f"  {TITLES[kind]:{ctx.width}} {'TLS ' if tls else ''}RSS {before / 1024:7.1f} MiB -> "
        f"{after / 1024:7.1f} MiB  = {per_conn:5.2f} KiB/conn  fds +{fds_after - fds_before}  "
        f"pipes +{pipes_after - pipes_before}  ({count} opened one at a time in "
        f"{opened_in:.1f} s)",
        flush=True,
    )


RUNNERS: dict[str, Callable[[Context], None]] = {
    "bulk": scenario_bulk,
    "connrate": scenario_connrate,
    "keepalive": scenario_keepalive,
    "tls": scenario_tls,
    "edge": _edge.scenario_edge,
    "ops": _ops.scenario_ops,
    "postgres": _postgres.scenario_postgres,
    "memory": scenario_memory,
}


def _csv(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(choices)}, got {text!r}"
            )
        return names

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        type=_csv(SCENARIOS),
        default=list(SCENARIOS),
        help=f"scenarios to run, comma-separated (default: {','.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--proxies",
        type=_csv(PROXIES),
        default=list(PROXIES),
        help="proxies to compare (default: l4proxy,haproxy,pproxy)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 round of 1 s per measurement (about 2.5 minutes in all; default: about 6.5)",
    )
    parser.add_argument("--rounds", type=int, help="rounds per measurement (default 3; --quick: 1)")
    parser.add_argument(
        "--seconds", type=int, help="seconds per measurement (default 2; --quick: 1)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=32,
        help="wrk connections for the connection-rate and handshake scenarios (default 32)",
    )
    parser.add_argument(
        "--tls-clients",
        type=int,
        default=8,
        help="parallel openssl s_time processes for full TLS handshakes (default 8)",
    )
    parser.add_argument(
        "--tls-bulk-conns",
        type=int,
        default=4,
        help="kept-alive wrk connections for TLS bulk (default 4)",
    )
    parser.add_argument(
        "--idle-conns",
        type=int,
        default=5000,
        help="idle connections for the memory scenario (default 5000)",
    )
    parser.add_argument(
        "--l4proxy-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for l4proxy, repeatable (e.g. --l4proxy-arg=--workers=2)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help=f"also run {BASELINE}: l4proxy from the source tree DIR (e.g. made by "
        "'git archive REV | tar -x -C DIR'), same arguments and measurements, with the "
        f"ratio l4proxy/{BASELINE}",
    )
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the report here")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every sample here")
    parser.add_argument(
        "--keep-workdir", action="store_true", help="keep the temporary directory and its logs"
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="pin nothing: every process may use every core (to compare --workers runs)",
    )
    args = parser.parse_args(argv)
    _procs.PINNING = not args.no_pin
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.seconds is None:
        args.seconds = 1 if args.quick else 2
    if args.rounds < 1 or args.seconds < 1 or args.idle_conns < 1 or args.concurrency < 1:
        parser.error("--rounds, --seconds, --idle-conns and --concurrency must be >= 1")
    if "l4proxy" not in args.proxies:
        parser.error("--proxies must include l4proxy")
    if args.baseline is not None:
        args.baseline = args.baseline.expanduser().resolve()
        if not (args.baseline / "l4proxy" / "__init__.py").is_file():
            parser.error(f"--baseline {args.baseline}: no l4proxy/__init__.py there")
    return args


def _preflight(args: argparse.Namespace) -> list[str]:
    """Check the tools the selected scenarios need; return the proxies to compare."""
    needed = {"wrk"} if {"connrate", "keepalive", "tls", "edge"} & set(args.only) else set()
    if {"connrate", "keepalive", "tls", "edge"} & set(args.only):
        needed.add("nginx")
    if "bulk" in args.only:
        needed.add("iperf3")
    if "haproxy" in args.proxies:
        needed.add("haproxy")
    for name in sorted(needed):
        find_binary(name)
    venv_binary("l4proxy")
    proxies = list(args.proxies)
    if args.baseline is not None:
        imported, version = check_baseline(args.baseline)
        print(f"l4proxy imports {current_l4proxy_file()}", flush=True)
        print(
            f"{BASELINE} imports {imported} ({version}; {l4proxy_python()} -m l4proxy "
            f"with PYTHONPATH={args.baseline})",
            flush=True,
        )
        proxies.insert(proxies.index("l4proxy") + 1, BASELINE)
        args.baseline_facts = f"imports {imported}, {version}"
    if "pproxy" in proxies:
        try:
            venv_binary("pproxy")
        except BenchError:
            print("pproxy is not installed (pip install pproxy); leaving it out", flush=True)
            proxies.remove("pproxy")
    return proxies


def _write_cert(workdir: Path) -> Path:
    authority = trustme.CA(key_type=trustme.KeyType.ECDSA)  # ECDSA P-256
    cert = workdir / "bench.pem"
    issued = authority.issue_cert("bench.example", "127.0.0.1")
    issued.private_key_and_cert_chain_pem.write_to_path(str(cert))
    cert.chmod(0o644)
    return cert


def _method(ctx: Context) -> list[str]:
    args = ctx.args
    extra = f" {shlex.join(args.l4proxy_arg)}" if args.l4proxy_arg else ""
    pinning = (
        f"the proxy under test pinned to core {PROXY_CORE}; wrk, iperf3, nginx, the iperf3 "
        f"server and the idle-connection client/server pinned to core {LOAD_CORE}"
        if two_cores()
        else "single core: nothing pinned"
    )
    lines = [
        f"{pinning}; 127.0.0.1 only.",
        f"{args.rounds} round(s) of {args.seconds} s per measurement; within a scenario the "
        "targets take turns (the order rotates each round); each figure is the median of "
        "the rounds.",
        "l4proxy: the `l4proxy` command, one process, default settings (splice on, "
        f"access log to standard error, redirected to a file){extra}; TLS with "
        "`--tls-cert` (ECDSA P-256 certificate, key in the same PEM).",
        "HAProxy: `mode tcp`, `nbthread 1`, `option splice-auto`, no logging; TLS with "
        "`bind ... ssl crt` on the same PEM, `ssl-default-bind-ciphersuites "
        "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256`.",
        "pproxy: `pproxy -l tunnel{BACKEND}://127.0.0.1:PORT` (asyncio streams); TLS with "
        "`tunnel{BACKEND}+ssl://` and `--ssl` on the same PEM.",
        "direct: the client talks to the backend itself (the physical limit of the "
        "setup, with client and backend sharing core 1).",
        "bulk: `iperf3 -c ... -t "
        f"{args.seconds} -P 1|4` through the proxy to `iperf3 -s` (received bits/s).",
        f"new connections: `wrk -t1 -c{args.concurrency} -H 'Connection: close'` for a "
        f"{SMALL_SIZE}-byte file from nginx (1 worker, access_log off): every request a "
        "new client and backend connection.",
        "keep-alive: `wrk -t1 -c1` and `-c10` on kept-alive connections for the same "
        "file; 'added' is proxy minus direct of the same round.",
        f"TLS bulk: `wrk -t1 -c{args.tls_bulk_conns}` over https fetching a 1 MiB file "
        "(Transfer/sec in Gbit/s). Full handshakes: "
        f"{args.tls_clients} parallel `openssl s_time -new -www /{SMALL_FILE}` (a new "
        "session, one HTTP/1.0 request and a close per connection). Resumed handshakes: "
        f"`wrk -t1 -c{args.concurrency} -H 'Connection: close'` over https; wrk keeps its "
        "TLS session across reconnects, so these are TLS 1.3 resumptions (wrk cannot "
        "measure full handshakes). nginx behind the proxy stays plain HTTP. HAProxy gets "
        "`ssl-default-bind-ciphersuites` in the order of Debian's packaged haproxy.cfg, so "
        "that it negotiates the same suite as l4proxy.",
        "proxy CPU: user plus system time of the proxy's process tree (/proc) during the "
        "measurement, per unit of work; 'proxy core busy' is that time over the wall "
        "time. A proxy well below 100% busy was not the bottleneck: then the rate is the "
        "client's limit and the CPU per unit is the fairer comparison.",
        f"memory: {args.idle_conns} connections through the proxy to a Python asyncio "
        "server that echoes one byte per connection and then holds it idle; RSS (the "
        "proxy's process tree, /proc VmRSS) after the connections are up minus before, "
        f"over {args.idle_conns}, after a warm-up of 50 connections.",
    ]
    if args.baseline is not None:
        lines.insert(
            3,
            f"{BASELINE}: l4proxy from the source tree `{args.baseline}` (l4proxy package "
            f"digest {tree_digest(args.baseline)}), started as `python -m l4proxy` on the "
            "l4proxy command's interpreter with `PYTHONPATH` set to that tree (and "
            "`PYTHONSAFEPATH=1`, so that the current directory is not searched first) and "
            "otherwise exactly like l4proxy: the same arguments, core, scenarios and CPU "
            "accounting, taking its turn in every round.",
        )
    for kind, facts in ctx.tls_facts.items():
        lines.append(f"TLS as negotiated by `openssl s_client` with {TITLES[kind]}: {facts}.")
    if "edge" in args.only:
        lines += _edge.method_lines(args)
    if "ops" in args.only:
        lines += _ops.method_lines(args)
    if "postgres" in args.only:
        lines += _postgres.method_lines(args, ctx.pg_facts)
    return lines


BUSY_CHECKS = (
    ("conn_busy", "conn_rate", "conn_cpu", "new connections"),
    ("tls_hs_busy", "tls_hs", "tls_hs_cpu", "TLS full handshakes"),
    ("tls_res_busy", "tls_res", "tls_res_cpu", "TLS resumed handshakes"),
    ("ka10_busy", "ka10_rps", "ka10_cpu", "keep-alive, 10 conns"),
    ("ka100_busy", "ka100_rps", "ka100_cpu", "keep-alive, 100 conns"),
    ("tls_ka10_busy", "tls_ka10_rps", "tls_ka10_cpu", "TLS kept-alive, 10 conns"),
)


def _findings(results: Results) -> None:
    """Notes on figures that need care: a proxy that was not the bottleneck."""
    for busy_key, rate_key, cpu_key, label in BUSY_CHECKS:
        for kind in ("haproxy", "l4proxy", BASELINE):
            busy = results.median(busy_key, kind)
            if busy is None or busy >= 75:
                continue
            other = BASELINE if kind == BASELINE else "haproxy"
            l4_cpu = results.median(cpu_key, "l4proxy")
            other_cpu = results.median(cpu_key, other)
            compare = (
                f"; per unit of work l4proxy used {l4_cpu / other_cpu:.2f}x {TITLES[other]}'s CPU"
                if l4_cpu and other_cpu
                else ""
            )
            results.note(
                f"{label}: {TITLES[kind]}'s core was only {busy:.0f}% busy, so its "
                f"{results.metric(rate_key).unit} figure is the load generator's limit "
                f"(core {LOAD_CORE}), not {TITLES[kind]}'s{compare}."
            )
    for prefix, label in (("ka1", "keep-alive, 1 conn"), ("ka10", "keep-alive, 10 conns")):
        added = results.median(f"{prefix}_added_p50", "haproxy")
        if added is not None and added < 25:
            l4 = results.median(f"{prefix}_p50", "l4proxy")
            ha = results.median(f"{prefix}_p50", "haproxy")
            absolute = f": l4proxy/HAProxy = {l4 / ha:.2f}x" if l4 and ha else ""
            results.note(
                f"{label}: HAProxy adds only {added:.0f} µs at p50 over direct, within the "
                f"noise of direct's own p50 (client and nginx share core {LOAD_CORE}), so the "
                f"ratio of added latencies is unstable; compare the absolute p50 instead{absolute}."
            )


def _render(
    ctx: Context, machine_facts: list[tuple[str, str]], started: datetime, elapsed: float
) -> tuple[str, str]:
    _findings(ctx.results)
    baseline = ctx.args.baseline is not None
    columns = header(baseline)
    table = rows(ctx.results, baseline)
    targets = target_rows(ctx.results)
    legend = (
        "↑ higher is better, ↓ lower is better. Ratios are l4proxy divided by the other "
        "(for ↓ rows a ratio below 1 favours l4proxy). (!) marks a figure whose runs "
        "reported errors (see the notes); n/a: not supported or failed; —: not measured."
    )
    command = "benchmarks/bench.py " + shlex.join(sys.argv[1:])
    date = started.strftime("%Y-%m-%d %H:%M UTC")
    text = [
        f"l4proxy benchmark, {date}, {elapsed / 60:.1f} min  ({command})",
        "",
        *(f"{name:22} {value}" for name, value in machine_facts),
        "",
        text_table(columns, table),
        "",
        legend,
    ]
    if targets:
        text += ["", text_table(("target (issue 12)", "l4proxy/HAProxy", "status"), targets)]
    if ctx.results.notes:
        text += ["", "Notes:", *(f"- {note}" for note in ctx.results.notes)]
    markdown = [
        "# Benchmark results",
        "",
        f"Measured {date} by `{command}` ({elapsed / 60:.1f} minutes).",
        "",
        "## Machine",
        "",
        markdown_table(("", "version / value"), [[name, value] for name, value in machine_facts]),
        "",
        "## Method",
        "",
        *(f"- {line}" for line in _method(ctx)),
        "",
        "## Results",
        "",
        markdown_table(columns, table),
        "",
        legend,
    ]
    if targets:
        markdown += [
            "",
            "## Targets",
            "",
            markdown_table(("target (issue 12)", "l4proxy/HAProxy", "status"), targets),
        ]
    if ctx.results.notes:
        markdown += ["", "## Notes", "", *(f"- {note}" for note in ctx.results.notes)]
    return "\n".join(text) + "\n", "\n".join(markdown) + "\n"


def _revision() -> str:
    """The checkout's commit and whether it has changes (files and their mtimes)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    changed = []
    for line in done.stdout.splitlines():
        path = REPO / line[3:]
        if path.parts[-2:-1] != ("benchmarks",) and path.suffix == ".py":
            with contextlib.suppress(OSError):
                changed.append(f"{line[3:]}@{path.stat().st_mtime_ns}")
    if not changed:
        return head
    digest = hashlib.sha1("\n".join(sorted(changed)).encode()).hexdigest()[:8]
    return f"{head}+changes:{digest}"


def _on_sigterm(signum: int, frame: FrameType | None) -> NoReturn:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    pin(LOAD_CORE)
    limit = raise_nofile()
    if "memory" in args.only and limit < 3 * args.idle_conns:
        raise SystemExit(
            f"RLIMIT_NOFILE hard limit {limit} is too low for --idle-conns {args.idle_conns}"
        )
    try:
        proxies = _preflight(args)
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    busy = machine_busy()
    facts = machine(venv_binary("l4proxy"), sys.executable)
    facts.append(("CPU busy before the run", f"{busy:.0f}% (all cores, 1 s sample)"))
    revision = _revision()
    base_digest = ""
    if args.baseline is not None:
        base_digest = tree_digest(args.baseline)
        facts.insert(
            4,
            (
                BASELINE,
                f"source tree {args.baseline}: {args.baseline_facts} "
                f"(l4proxy package digest {base_digest})",
            ),
        )
    started = datetime.now(UTC)
    clock = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="l4proxy-bench-"))
    results = Results(METRICS)
    try:
        with Procs(workdir) as procs:
            ctx = Context(args, procs, workdir, results, _write_cert(workdir), proxies)
            for name in SCENARIOS:
                if name not in args.only:
                    continue
                try:
                    RUNNERS[name](ctx)
                except BenchError as error:
                    results.note(f"{name}: aborted: {error}")
                    print(f"{name}: ABORTED: {error}", flush=True)
    finally:
        if args.keep_workdir:
            print(f"work directory kept: {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - clock
    if busy > 10:
        results.note(
            f"the machine was not idle when the benchmark started ({busy:.0f}% CPU busy): "
            "other work may have disturbed the figures"
        )
    if _revision() != revision:
        results.note(
            f"the l4proxy checkout changed during the run ({revision} at the start, "
            f"{_revision()} at the end): scenarios may have run different code"
        )
    if args.baseline is not None and tree_digest(args.baseline) != base_digest:
        results.note(
            f"the {BASELINE} tree {args.baseline} changed during the run: scenarios may have "
            "run different baseline code"
        )
    text, markdown = _render(ctx, facts, started, elapsed)
    print()
    print(text, end="")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown)
        print(f"\nwrote {args.markdown}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "started": started.isoformat(),
                    "elapsed_s": elapsed,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "machine": dict(facts),
                    "metrics": [asdict(metric) for metric in METRICS],
                    "samples": results.samples,
                    "errors": results.errors,
                    "notes": results.notes,
                    "tls": ctx.tls_facts,
                },
                indent=2,
                ensure_ascii=False,
            )
        )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
