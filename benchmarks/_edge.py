"""The ``edge`` scenario: what edge protection costs (issue #10), l4proxy against HAProxy.

Three measurements, each target started with its own configuration, all of them taking
turns round after round like the other scenarios:

- **checks on vs off**: new connections/s (wrk, ``Connection: close``) through a proxy
  with no checks, to nginx's plain port, and through the same proxy with an allow list,
  a per-IP connection limit and a PROXY v2 header to every backend connection, to
  nginx's ``proxy_protocol`` port. The limit is never reached: this is the cost of the
  checks and of the header on connections that pass. Issue #10's target: l4proxy with
  the checks on keeps at least 95% of its rate with them off. HAProxy does the same with
  ``acl``/``tcp-request connection reject``, a stick table tracking ``conn_cur`` and
  ``send-proxy-v2``.
- **refusals**: wrk against a proxy that denies its address (l4proxy ``--deny
  127.0.0.0/8``, HAProxy ``tcp-request connection reject``): every connection is closed
  at once, and wrk counts each as a socket error, so errors/s is how fast the proxy
  sheds a flood, and proxy CPU per refusal its cost.
- **a flood**: a client at 127.0.0.3 makes connections one after another (connect, a
  small HTTP request, its first byte back) while, in a second process, 127.0.0.2 opens
  connections as fast as it can, holding 50 (past its per-IP limit of 5). Its p99
  connect-to-first-byte is measured with and without the flood; issue #10's target is
  within 2x. The flooder shares the load core with that client, under ``SCHED_IDLE``
  so that it never delays the client itself; HAProxy under the same flood is the
  reference.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import _load
from _procs import LOAD_CORE, BenchError, cpu_seconds, pin
from _report import TITLES, Metric
from _servers import BASELINE, SMALL_FILE, start_proxy

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence

    from _procs import Proc
    from bench import Context

SCENARIO = "edge protection (issue #10)"
_KINDS = ("l4proxy", BASELINE, "haproxy")
#: Issue #10's targets: l4proxy's rate with the checks on / off, and its p99 under a
#: flood / quiet.
ON_OFF_TARGET = 0.95
FLOOD_TARGET = 2.0
#: The flood: the flooder's per-IP limit, the connections it holds, the sequential
#: requests measured in each phase.
FLOOD_LIMIT = 5
FLOOD_HELD = 50
FLOOD_REQUESTS = 1000
FLOODER_ADDRESS = "127.0.0.2"
CLIENT_ADDRESS = "127.0.0.3"

METRICS = [
    Metric("edge_off_rate", SCENARIO, "new conns, checks off", "conn/s", True, 0, True),
    Metric("edge_off_cpu", SCENARIO, "checks off: proxy CPU per conn", "µs", False, 0, True),
    Metric("edge_on_rate", SCENARIO, "new conns, checks + PROXY v2 on", "conn/s", True, 0, True),
    Metric("edge_on_cpu", SCENARIO, "checks on: proxy CPU per conn", "µs", False, 0, True),
    Metric("edge_on_off", SCENARIO, "rate with checks on / off", "x", True, 3, True),
    Metric("edge_reject_rate", SCENARIO, "refused conns (deny)", "conn/s", True, 0, True),
    Metric("edge_reject_cpu", SCENARIO, "proxy CPU per refused conn", "µs", False, 1, True),
    Metric("flood_quiet_p99", SCENARIO, "p99 connect to 1st byte, quiet", "ms", False, 2, True),
    Metric("flood_loud_p99", SCENARIO, "p99 connect to 1st byte, flood", "ms", False, 2, True),
    Metric("flood_ratio", SCENARIO, "p99 under flood / quiet", "x", False, 2, True),
    Metric("flood_rate", SCENARIO, "flood: connection attempts", "conn/s", None, 0, True),
]

#: The checks, for l4proxy and as HAProxy configuration. The limits are far above what
#: the load reaches: the cost of checking, not of refusing.
L4PROXY_ON = ("--allow", "127.0.0.0/8", "--max-connections-per-ip", "100000",
              "--proxy-protocol", "v2")  # fmt: skip
HAPROXY_ON = (
    "acl allowed src 127.0.0.0/8",
    "tcp-request connection reject unless allowed",
    "stick-table type ip size 1m expire 60s store conn_cur",
    "tcp-request connection track-sc0 src",
    "tcp-request connection reject if { sc0_conn_cur gt 100000 }",
)
L4PROXY_DENY = ("--deny", "127.0.0.0/8")
HAPROXY_DENY = ("tcp-request connection reject",)
L4PROXY_FLOOD = ("--max-connections-per-ip", str(FLOOD_LIMIT))
HAPROXY_FLOOD = (
    "stick-table type ip size 1m expire 60s store conn_cur",
    "tcp-request connection track-sc0 src",
    f"tcp-request connection reject if {{ sc0_conn_cur gt {FLOOD_LIMIT} }}",
)

FLOODER = f"""
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
held, attempts, deadline = [], 0, time.monotonic() + seconds
while time.monotonic() < deadline and attempts < 500_000:
    attempts += 1
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(({FLOODER_ADDRESS!r}, 0))
    try:
        sock.connect(("127.0.0.1", port))
    except OSError:
        sock.close()
        continue
    held.append(sock)
    if len(held) > {FLOOD_HELD}:
        held.pop(0).close()
print(attempts)
"""


@dataclass
class Target:
    """One proxy under one configuration."""

    kind: str
    variant: str
    port: int
    proc: Proc


def _start(
    ctx: Context, variant: str, backend: int, l4proxy: Sequence[str], haproxy: Sequence[str],
    haproxy_server: str = "",
) -> list[Target]:  # fmt: skip
    targets = []
    for kind in ctx.proxies:
        if kind not in _KINDS:
            continue
        try:
            proc, port = start_proxy(
                ctx.procs,
                kind,
                backend,
                l4proxy_args=[*ctx.args.l4proxy_arg, *l4proxy],
                tag=f"edge-{variant}",
                maxconn=ctx.args.idle_conns + 1000,
                baseline=ctx.args.baseline,
                haproxy_frontend=haproxy,
                haproxy_server=haproxy_server,
            )
        except BenchError as error:
            ctx.results.note(f"edge: {TITLES[kind]} ({variant}) did not start: {error}")
            continue
        targets.append(Target(kind, variant, port, proc))
    return targets


def _turns(
    ctx: Context,
    label: str,
    targets: list[Target],
    measure: Callable[[Target], tuple[float, str]],
    record: Callable[[Target, float, float, float], None],
) -> None:
    """Each round every target once, the order rotated by one per round.

    ``measure`` returns a result and a summary; ``record(target, result, wall s, proxy CPU
    s)`` stores it. A target that fails is noted and left out of the remaining rounds.
    """
    failed: set[int] = set()
    width = max(len(f"{TITLES[t.kind]} {t.variant}") for t in targets) if targets else 8
    for round_index in range(ctx.rounds):
        shift = round_index % max(1, len(targets))
        for target in targets[shift:] + targets[:shift]:
            if id(target) in failed:
                continue
            name = f"{TITLES[target.kind]} {target.variant}"
            try:
                if not target.proc.alive():
                    raise BenchError(f"exited:\n{target.proc.tail()}")
                before = cpu_seconds(target.proc.pid)
                start = time.monotonic()
                result, summary = measure(target)
                wall = time.monotonic() - start
                cpu = cpu_seconds(target.proc.pid) - before
            except BenchError as error:
                failed.add(id(target))
                ctx.results.note(f"{label}: {name} failed: {error}")
                print(f"  {label:24} {name:{width}} FAILED: {error}", flush=True)
                continue
            record(target, result, wall, cpu)
            print(
                f"  {label:24} round {round_index + 1}/{ctx.rounds}  {name:{width}} {summary}  "
                f"proxy core {100 * cpu / wall:3.0f}%",
                flush=True,
            )
            time.sleep(0.5)


def _new_connections(ctx: Context, target: Target, *, refused: bool = False) -> _load.WrkResult:
    """wrk with ``Connection: close``: one new connection per request."""
    return _load.wrk(
        f"http://127.0.0.1:{target.port}/{SMALL_FILE}",
        connections=ctx.args.concurrency,
        seconds=ctx.seconds,
        close=True,
        refused=refused,
    )


def _on_off(ctx: Context) -> None:
    plain, proxied = ctx.nginx(), ctx.nginx_proxied_port
    targets = _start(ctx, "off", plain, (), ())
    targets += _start(ctx, "on", proxied, L4PROXY_ON, HAPROXY_ON, "send-proxy-v2")
    targets.sort(key=lambda t: (_KINDS.index(t.kind), t.variant != "off"))
    rates: dict[tuple[str, str], list[float]] = {}

    def measure(target: Target) -> tuple[float, str]:
        result = _new_connections(ctx, target)
        if result.errors:
            raise BenchError(f"wrk reported {result.error_text}")
        return result.requests_per_s, f"{result.requests_per_s:9.0f} conn/s"

    def record(target: Target, rate: float, wall: float, cpu: float) -> None:
        ctx.results.add(f"edge_{target.variant}_rate", target.kind, rate)
        ctx.results.add(f"edge_{target.variant}_cpu", target.kind, cpu / (rate * wall) * 1e6)
        rates.setdefault((target.kind, target.variant), []).append(rate)

    try:
        _turns(ctx, "edge: checks on/off", targets, measure, record)
    finally:
        for target in targets:
            ctx.procs.stop(target.proc)
    for kind in _KINDS:
        on, off = rates.get((kind, "on")), rates.get((kind, "off"))
        if not on or not off:
            continue
        ratio = statistics.median(on) / statistics.median(off)
        ctx.results.add("edge_on_off", kind, ratio)
        if kind == "l4proxy":
            status = "met" if ratio >= ON_OFF_TARGET else "NOT met"
            ctx.results.note(
                f"edge (issue #10): new connections with --allow, --max-connections-per-ip and "
                f"--proxy-protocol v2 on: {ratio:.3f}x of all off ({statistics.median(on):,.0f} "
                f"vs {statistics.median(off):,.0f} conn/s), target >= {ON_OFF_TARGET}x: {status}"
            )


def _refusals(ctx: Context) -> None:
    targets = _start(ctx, "deny", ctx.nginx(), L4PROXY_DENY, HAPROXY_DENY)

    def measure(target: Target) -> tuple[float, str]:
        result = _new_connections(ctx, target, refused=True)
        if result.requests:
            raise BenchError(f"{result.requests} requests were answered: nothing was refused")
        rate = result.errors / ctx.seconds
        return rate, f"{rate:9.0f} refused/s"

    def record(target: Target, rate: float, wall: float, cpu: float) -> None:
        ctx.results.add("edge_reject_rate", target.kind, rate)
        ctx.results.add("edge_reject_cpu", target.kind, cpu / (rate * ctx.seconds) * 1e6)

    try:
        _turns(ctx, "edge: refusals", targets, measure, record)
    finally:
        for target in targets:
            ctx.procs.stop(target.proc)


def _first_bytes(port: int, count: int) -> list[float]:
    """``count`` connections from CLIENT_ADDRESS one after another: seconds from connect
    to the first byte of the response. Any failure is a BenchError (the success rate must
    stay 100%)."""
    request = f"GET /{SMALL_FILE} HTTP/1.0\r\nHost: bench\r\n\r\n".encode()
    times = []
    for index in range(count):
        start = time.perf_counter()
        try:
            with socket.create_connection(
                ("127.0.0.1", port), timeout=5, source_address=(CLIENT_ADDRESS, 0)
            ) as sock:
                sock.sendall(request)
                if not sock.recv(1):
                    raise BenchError(f"request {index + 1} of {count}: closed without a byte")
        except OSError as error:
            raise BenchError(f"request {index + 1} of {count}: {error}") from error
        times.append(time.perf_counter() - start)
    return times


def _flooder_setup() -> None:
    """On the load core under ``SCHED_IDLE``: it runs whenever the client and nginx
    wait (most of the time: they wait for the proxy), and yields the core the moment
    either wakes. The flood is meant to load the proxy; with only two cores the client
    shares the load core with it, and should wait for the proxy, not for the flooder's
    time slice (with plain nice 19 the client's p99 doubled under HAProxy too)."""
    pin(LOAD_CORE)
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _p99(times: list[float]) -> float:
    return statistics.quantiles(times, n=100)[98]


def _flood(ctx: Context) -> None:
    targets = _start(ctx, "flood", ctx.nginx(), L4PROXY_FLOOD, HAPROXY_FLOOD)
    ratios: dict[str, list[float]] = {}

    def measure(target: Target) -> tuple[float, str]:
        quiet = _p99(_first_bytes(target.port, FLOOD_REQUESTS))
        seconds = 30.0  # a bound: it is stopped as soon as the loud phase ends
        flooder = subprocess.Popen(
            [sys.executable, "-c", FLOODER, str(target.port), str(seconds)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            preexec_fn=_flooder_setup,
        )
        started = time.monotonic()
        try:
            time.sleep(0.5)  # the flood is under way
            loud = _p99(_first_bytes(target.port, FLOOD_REQUESTS))
        finally:
            flooder.terminate()
            out, _ = flooder.communicate(timeout=10)
        attempts = int(out or 0) if flooder.returncode == 0 else 0
        flood_rate = attempts / (time.monotonic() - started) if attempts else 0.0
        ctx.results.add("flood_quiet_p99", target.kind, quiet * 1e3)
        ctx.results.add("flood_loud_p99", target.kind, loud * 1e3)
        if flood_rate:
            ctx.results.add("flood_rate", target.kind, flood_rate)
        ratios.setdefault(target.kind, []).append(loud / quiet)
        ctx.results.add("flood_ratio", target.kind, loud / quiet)
        return loud / quiet, (
            f"p99 {quiet * 1e3:6.2f} ms quiet, {loud * 1e3:6.2f} ms under a flood "
            f"({loud / quiet:.2f}x)"
        )

    try:
        _turns(ctx, "edge: flood", targets, measure, lambda *_: None)
    finally:
        for target in targets:
            ctx.procs.stop(target.proc)
    if ratios.get("l4proxy"):
        ratio = statistics.median(ratios["l4proxy"])
        status = "met" if ratio <= FLOOD_TARGET else "NOT met"
        haproxy = ratios.get("haproxy")
        reference = (
            f"; HAProxy under the same flood: {statistics.median(haproxy):.2f}x" if haproxy else ""
        )
        ctx.results.note(
            f"edge (issue #10): another client's p99 connect-to-first-byte under a flood from "
            f"one address: {ratio:.2f}x of quiet, target <= {FLOOD_TARGET}x: {status}{reference}"
        )


def scenario_edge(ctx: Context) -> None:
    print("edge protection: checks on/off, refusals, a flood (l4proxy and HAProxy)", flush=True)
    _on_off(ctx)
    _refusals(ctx)
    _flood(ctx)


def method_lines(args: argparse.Namespace) -> list[str]:
    return [
        "Edge protection (issue #10): (1) new connections/s (wrk -c"
        f"{args.concurrency}, `Connection: close`) with the checks off, and on: l4proxy "
        f"`{' '.join(L4PROXY_ON)}` to nginx's `proxy_protocol` port, HAProxy "
        "`acl src` + `tcp-request connection reject unless` + a stick table tracking "
        "`conn_cur` + `send-proxy-v2`; the limits are never reached. Target: on/off >= "
        f"{ON_OFF_TARGET}x. (2) refused connections/s: wrk against l4proxy "
        "`--deny 127.0.0.0/8` and HAProxy `tcp-request connection reject`; each refusal is "
        "one wrk socket error. (3) a flood: "
        f"{FLOOD_REQUESTS} sequential connections from {CLIENT_ADDRESS} (connect, a small "
        "HTTP request, the first byte back), p99, quiet and while a second process opens "
        f"connections from {FLOODER_ADDRESS} as fast as it can holding {FLOOD_HELD} (per-IP "
        f"limit {FLOOD_LIMIT}: l4proxy `--max-connections-per-ip`, HAProxy `sc0_conn_cur`). "
        f"Target: under flood / quiet <= {FLOOD_TARGET}x. The flooder shares the load core "
        "with the client, under `SCHED_IDLE` (it yields the core whenever the client or "
        "nginx wakes).",
    ]
