"""The ``ops`` scenario: what operations features cost (issue #11), l4proxy alone.

- **metrics on vs off**: new connections/s (wrk, ``Connection: close``) through
  l4proxy without ``--metrics`` and with ``--metrics`` while a scraper fetches
  ``/metrics`` once a second (15 times Prometheus' default rate), taking turns round
  after round. Issue #11's target: on / off >= 0.95.
- **health checks**: the proxy's CPU while idle for the measuring time, with 100
  backends (listening sockets in a helper process that accepts and closes) and
  ``--health-check 1``, against the same proxy without checks. Issue #11's target:
  checks of 100 backends every second cost at most 2% of one core.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from typing import TYPE_CHECKING, Self

import _load
from _procs import BenchError, cpu_seconds, free_port
from _report import Metric
from _servers import SMALL_FILE, start_proxy

if TYPE_CHECKING:
    import argparse

    from _procs import Proc
    from bench import Context

SCENARIO = "operations (issue #11)"
METRICS_TARGET = 0.95
HEALTH_TARGET = 2.0  # % of one core
HEALTH_BACKENDS = 100

METRICS = [
    Metric("ops_off_rate", SCENARIO, "new conns, no --metrics", "conn/s", True, 0, True),
    Metric("ops_on_rate", SCENARIO, "new conns, --metrics scraped 1/s", "conn/s", True, 0, True),
    Metric("ops_on_off", SCENARIO, "rate with metrics on / off", "x", True, 3, True),
    Metric("ops_idle_busy", SCENARIO, "idle, no health checks: proxy core", "%", False, 2, True),
    Metric("ops_health_busy", SCENARIO, "idle, 100 backends checked 1/s", "%", False, 2, True),
]

BACKENDS = f"""
import selectors, socket, sys
selector = selectors.DefaultSelector()
ports = []
for _ in range({HEALTH_BACKENDS}):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.setblocking(False)
    selector.register(sock, selectors.EVENT_READ)
    ports.append(sock.getsockname()[1])
print(" ".join(map(str, ports)), flush=True)
for _ in range(10_000_000):
    for key, _ in selector.select():
        try:
            conn, _ = key.fileobj.accept()
            conn.close()
        except OSError:
            pass
"""


class _Scraper:
    """Fetches ``/metrics`` once a second in a thread until stopped."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.stop = threading.Event()
        self.scrapes = 0
        self.failures = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    response.read()
                self.scrapes += 1
            except OSError:
                self.failures += 1

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def _metrics_on_off(ctx: Context) -> None:
    backend = ctx.nginx()
    metrics_port = free_port()
    started: dict[str, tuple[Proc, int]] = {}
    for variant, extra in (("off", ()), ("on", ("--metrics", f"127.0.0.1:{metrics_port}"))):
        proc, port = start_proxy(
            ctx.procs,
            "l4proxy",
            backend,
            l4proxy_args=[*ctx.args.l4proxy_arg, *extra],
            tag=f"ops-metrics-{variant}",
        )
        started[variant] = (proc, port)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for round_index in range(ctx.rounds):
            order = ["off", "on"] if round_index % 2 == 0 else ["on", "off"]
            for variant in order:
                proc, port = started[variant]
                before = cpu_seconds(proc.pid)
                start = time.monotonic()
                if variant == "on":
                    with _Scraper(metrics_port) as scraper:
                        result = _load.wrk(
                            f"http://127.0.0.1:{port}/{SMALL_FILE}",
                            connections=ctx.args.concurrency,
                            seconds=ctx.seconds,
                            close=True,
                        )
                    if scraper.failures or not scraper.scrapes:
                        raise BenchError(
                            f"scrapes: {scraper.scrapes} ok, {scraper.failures} failed"
                        )
                else:
                    result = _load.wrk(
                        f"http://127.0.0.1:{port}/{SMALL_FILE}",
                        connections=ctx.args.concurrency,
                        seconds=ctx.seconds,
                        close=True,
                    )
                wall = time.monotonic() - start
                cpu = cpu_seconds(proc.pid) - before
                if result.errors:
                    raise BenchError(f"wrk reported {result.error_text}")
                rates[variant].append(result.requests_per_s)
                ctx.results.add(f"ops_{variant}_rate", "l4proxy", result.requests_per_s)
                print(
                    f"  {'ops: metrics ' + variant:24} round {round_index + 1}/{ctx.rounds}  "
                    f"{result.requests_per_s:9.0f} conn/s  proxy core {100 * cpu / wall:3.0f}%",
                    flush=True,
                )
                time.sleep(0.5)
    finally:
        for proc, _ in started.values():
            ctx.procs.stop(proc)
    ratio = statistics.median(rates["on"]) / statistics.median(rates["off"])
    ctx.results.add("ops_on_off", "l4proxy", ratio)
    status = "met" if ratio >= METRICS_TARGET else "NOT met"
    ctx.results.note(
        f"ops (issue #11): new connections with --metrics scraped every second: {ratio:.3f}x "
        f"of without ({statistics.median(rates['on']):,.0f} vs "
        f"{statistics.median(rates['off']):,.0f} conn/s), target >= {METRICS_TARGET}x: {status}"
    )


def _health_idle(ctx: Context) -> None:
    helper = ctx.procs.workdir / "ops-backends.out"
    with open(helper, "wb") as output:
        backends = subprocess.Popen(
            [sys.executable, "-c", BACKENDS], stdout=output, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 20
        while not helper.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        ports = [int(port) for port in helper.read_text().split()]
        if len(ports) != HEALTH_BACKENDS:
            raise BenchError(f"backend helper printed {helper.read_text()!r}")
        more = [arg for port in ports[1:] for arg in ("-b", f"127.0.0.1:{port}")]
        busy: dict[str, list[float]] = {"idle": [], "health": []}
        for variant, extra in (("idle", ()), ("health", ("--health-check", "1"))):
            proc, _ = start_proxy(
                ctx.procs,
                "l4proxy",
                ports[0],
                l4proxy_args=[*ctx.args.l4proxy_arg, *more, *extra],
                tag=f"ops-{variant}",
            )
            try:
                time.sleep(3)  # start-up and the checks' first, spread-out round
                for round_index in range(ctx.rounds):
                    before = cpu_seconds(proc.pid)
                    start = time.monotonic()
                    time.sleep(max(ctx.seconds, 5))
                    percent = 100 * (cpu_seconds(proc.pid) - before) / (time.monotonic() - start)
                    busy[variant].append(percent)
                    ctx.results.add(f"ops_{variant}_busy", "l4proxy", percent)
                    print(
                        f"  {'ops: ' + variant:24} round {round_index + 1}/{ctx.rounds}  "
                        f"proxy core {percent:5.2f}%",
                        flush=True,
                    )
            finally:
                ctx.procs.stop(proc)
    finally:
        backends.kill()
        backends.wait()
    cost = statistics.median(busy["health"]) - statistics.median(busy["idle"])
    status = "met" if cost <= HEALTH_TARGET else "NOT met"
    ctx.results.note(
        f"ops (issue #11): health checks of {HEALTH_BACKENDS} backends every second cost "
        f"{cost:.2f}% of one core over idle ({statistics.median(busy['health']):.2f}% vs "
        f"{statistics.median(busy['idle']):.2f}%), target <= {HEALTH_TARGET}%: {status}"
    )


def scenario_ops(ctx: Context) -> None:
    print("operations: metrics on/off, health checks of 100 backends (l4proxy)", flush=True)
    _metrics_on_off(ctx)
    _health_idle(ctx)


def method_lines(args: argparse.Namespace) -> list[str]:
    return [
        "Operations (issue #11): (1) new connections/s (wrk -c"
        f"{args.concurrency}, `Connection: close`) through l4proxy without `--metrics` and "
        "with `--metrics` while a thread fetches `/metrics` every second (target: on/off >= "
        f"{METRICS_TARGET}x). (2) the proxy's CPU while idle with {HEALTH_BACKENDS} backends "
        "(a helper process accepting and closing) and `--health-check 1`, minus the same "
        f"proxy's idle CPU without checks (target <= {HEALTH_TARGET}% of one core).",
    ]
