"""Results: samples per metric and target, the machine description, text and Markdown tables."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from _procs import BenchError, find_binary
from _servers import BASELINE

TARGETS = ("direct", "l4proxy", BASELINE, "haproxy", "pproxy")
TITLES = {
    "direct": "direct",
    "l4proxy": "l4proxy",
    BASELINE: BASELINE,
    "haproxy": "HAProxy",
    "pproxy": "pproxy",
}
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Metric:
    key: str
    scenario: str
    label: str
    unit: str
    higher_is_better: bool | None  # None: information only, no ratios
    digits: int
    proxy_only: bool = False  # no figure for direct (added latency, proxy CPU)


@dataclass
class Results:
    metrics: list[Metric]
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    errors: dict[str, dict[str, int]] = field(default_factory=dict)
    unsupported: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def metric(self, key: str) -> Metric:
        for metric in self.metrics:
            if metric.key == key:
                return metric
        raise KeyError(key)

    def add(self, key: str, target: str, value: float) -> None:
        self.samples.setdefault(key, {}).setdefault(target, []).append(value)

    def add_errors(self, key: str, target: str, count: int) -> None:
        if count:
            bucket = self.errors.setdefault(key, {})
            bucket[target] = bucket.get(target, 0) + count

    def mark_unsupported(self, key: str, target: str, why: str) -> None:
        self.unsupported.setdefault(key, {})[target] = why

    def median(self, key: str, target: str) -> float | None:
        values = self.samples.get(key, {}).get(target)
        return statistics.median(values) if values else None

    def note(self, text: str) -> None:
        text = " / ".join(line.strip() for line in text.splitlines() if line.strip())
        if text not in self.notes:
            self.notes.append(text)


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator <= 0 or numerator < 0:
        return "—"
    return f"{numerator / denominator:.2f}x"


def _value(results: Results, metric: Metric, target: str) -> str:
    value = results.median(metric.key, target)
    if value is None:
        why = results.unsupported.get(metric.key, {}).get(target)
        return "n/a" if why else "—"
    text = f"{value:,.{metric.digits}f}"
    if results.errors.get(metric.key, {}).get(target):
        text += " (!)"
    return text


HEADER = (
    "scenario",
    "metric",
    "unit",
    "direct",
    "l4proxy",
    "HAProxy",
    "pproxy",
    "l4proxy/HAProxy",
    "l4proxy/direct",
    "l4proxy/pproxy",
)
# With --baseline: its figures next to l4proxy's, and the A/B ratio first among the ratios.
HEADER_BASELINE = (
    *HEADER[:5],
    BASELINE,
    *HEADER[5:7],
    f"l4proxy/{BASELINE}",
    *HEADER[7:],
)


def header(baseline: bool) -> tuple[str, ...]:
    return HEADER_BASELINE if baseline else HEADER


def rows(results: Results, baseline: bool = False) -> list[list[str]]:
    table = []
    for metric in results.metrics:
        if metric.key not in results.samples and metric.key not in results.unsupported:
            continue
        l4 = results.median(metric.key, "l4proxy")
        informative = metric.higher_is_better is not None
        direct = None if metric.proxy_only else results.median(metric.key, "direct")
        arrow = {True: " ↑", False: " ↓", None: ""}[metric.higher_is_better]
        row = [
            metric.scenario,
            metric.label,
            f"{metric.unit}{arrow}",
            "—" if metric.proxy_only else _value(results, metric, "direct"),
            _value(results, metric, "l4proxy"),
            _value(results, metric, "haproxy"),
            _value(results, metric, "pproxy"),
            _ratio(l4, results.median(metric.key, "haproxy")) if informative else "",
            _ratio(l4, direct) if informative else "",
            _ratio(l4, results.median(metric.key, "pproxy")) if informative else "",
        ]
        if baseline:
            row[5:5] = [_value(results, metric, BASELINE)]
            row[8:8] = [_ratio(l4, results.median(metric.key, BASELINE)) if informative else ""]
        table.append(row)
    return table


@dataclass(frozen=True)
class Target:
    text: str
    key: str
    limit: float  # on l4proxy/HAProxy: at least this when higher is better, else at most


# Issue #12's targets (the data core).
TARGETS_OF_ISSUE = (
    Target("kept-alive requests/s, 10 conns >= 0.9x HAProxy", "ka10_rps", 0.9),
    Target("kept-alive CPU per request, 10 conns <= 1.2x HAProxy's", "ka10_cpu", 1.2),
    Target("kept-alive requests/s, 100 conns >= 0.9x HAProxy", "ka100_rps", 0.9),
    Target("kept-alive CPU per request, 100 conns <= 1.2x HAProxy's", "ka100_cpu", 1.2),
    Target("TLS kept-alive requests/s, 10 conns >= 0.8x HAProxy", "tls_ka10_rps", 0.8),
    Target("new connections/s >= 0.7x HAProxy", "conn_rate", 0.7),
    Target("TLS resumed handshakes/s >= 0.8x HAProxy", "tls_res", 0.8),
    Target("CPU per full TLS handshake <= 1.3x HAProxy's", "tls_hs_cpu", 1.3),
    Target("bulk throughput, 1 stream >= 1.0x HAProxy", "bulk1", 1.0),
    Target("bulk throughput, 4 streams >= 1.0x HAProxy", "bulk4", 1.0),
    Target("TLS bulk >= 1.0x HAProxy", "tls_bulk", 1.0),
    Target("RSS per idle connection <= 1.0x HAProxy's", "mem_per_conn", 1.0),
    Target("added p50 latency, 1 conn <= 1.3x HAProxy's", "ka1_added_p50", 1.3),
)

# The figures compared with pproxy for "ahead of pproxy in every scenario".
HEADLINE = (
    "bulk1",
    "bulk4",
    "conn_rate",
    "ka1_p50",
    "ka10_p50",
    "ka100_rps",
    "tls_bulk",
    "tls_hs",
    "tls_res",
    "tls_ka10_rps",
    "mem_per_conn",
)


def target_rows(results: Results) -> list[list[str]]:
    table = []
    for target in TARGETS_OF_ISSUE:
        if target.key not in results.samples:
            continue
        metric = results.metric(target.key)
        l4 = results.median(target.key, "l4proxy")
        ha = results.median(target.key, "haproxy")
        if l4 is None or ha is None:
            table.append([target.text, "—", "not measured"])
            continue
        if ha <= 0:
            # HAProxy adds nothing measurable here, so there is no ratio to judge.
            table.append(
                [
                    target.text,
                    "—",
                    f"no ratio: HAProxy adds {ha:.0f} {metric.unit}, l4proxy {l4:.0f} {metric.unit}",
                ]
            )
            continue
        ratio = l4 / ha
        met = ratio >= target.limit if metric.higher_is_better else ratio <= target.limit
        table.append([target.text, f"{ratio:.2f}x", "met" if met else "NOT met"])
    behind = []
    compared = 0
    for key in HEADLINE:
        if key not in results.samples:
            continue
        metric = results.metric(key)
        l4 = results.median(key, "l4proxy")
        pp = results.median(key, "pproxy")
        if l4 is None or pp is None:
            continue
        compared += 1
        ahead = l4 >= pp if metric.higher_is_better else l4 <= pp
        if not ahead:
            behind.append(f"{metric.scenario}: {metric.label}")
    if compared:
        table.append(
            [
                "ahead of pproxy in every scenario",
                f"ahead in {compared - len(behind)} of {compared}",
                "met" if not behind else f"NOT met ({len(behind)} behind, see the notes)",
            ]
        )
        if behind:
            results.note("l4proxy is behind pproxy in: " + "; ".join(behind) + ".")
    return table


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _grep(argv: list[str], pattern: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    match = re.search(pattern, done.stdout + done.stderr, re.MULTILINE)
    return match.group(1).strip() if match else ""


def _binary(name: str) -> list[str]:
    try:
        return [find_binary(name)]
    except BenchError:
        return [name]


def machine(l4proxy_bin: str, python_bin: str) -> list[tuple[str, str]]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
                break
    distro = ""
    with contextlib.suppress(OSError), open("/etc/os-release") as release:
        for line in release:
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip().strip('"')
    commit = _first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    try:
        pproxy = importlib.metadata.version("pproxy")
    except importlib.metadata.PackageNotFoundError:
        pproxy = "not installed"
    haproxy = _binary("haproxy")
    return [
        ("CPU", f"{cpu}, {os.cpu_count()} cores, {memory} RAM"),
        ("OS", f"{distro}, Linux {platform.release()} {platform.machine()}"),
        ("Python", _first_line([python_bin, "-c", "import sys; print(sys.version.split()[0])"])),
        ("l4proxy", f"{_first_line([l4proxy_bin, '--version'])} (git {commit})"),
        (
            "l4proxy OpenSSL",
            _first_line(
                [
                    python_bin,
                    "-c",
                    "import OpenSSL.SSL as S; print(S.OpenSSL_version(S.OPENSSL_VERSION).decode())",
                ]
            ),
        ),
        (
            "HAProxy",
            _grep([*haproxy, "-v"], r"^(HAProxy version \S+)")
            + ", running on "
            + _grep([*haproxy, "-vv"], r"^Running on OpenSSL version : (.*)$"),
        ),
        ("nginx", _first_line([*_binary("nginx"), "-v"])),
        ("pproxy", f"{pproxy} (asyncio; uvloop not used unless installed)"),
        ("wrk", _first_line([*_binary("wrk"), "-v"])),
        ("iperf3", _first_line([*_binary("iperf3"), "--version"])),
        ("system OpenSSL (wrk)", _first_line([*_binary("openssl"), "version"])),
    ]


def text_table(header: list[str] | tuple[str, ...], body: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [list(header), *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(header)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    lines.extend(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in body
    )
    return "\n".join(lines)


def markdown_table(header: list[str] | tuple[str, ...], body: list[list[str]]) -> str:
    def line(cells: list[str] | tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(row) for row in body)])
