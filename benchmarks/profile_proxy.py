"""Where one l4proxy process spends its time under wrk: CPU per request, syscalls, a profile.

Usage: ``.venv/bin/python benchmarks/profile_proxy.py [--keep-alive] [--connections N]
[--tls | --full-handshakes] [--seconds S] [--py-spy PATH] [--strace] [-- L4PROXY-ARGS...]``

Starts nginx (core 1) and ``l4proxy -l ... -b nginx`` (core 0), warms up, then runs wrk
(``Connection: close`` unless ``--keep-alive``) and prints what follows. With ``--tls``
the proxy terminates TLS (an ECDSA P-256 certificate, as in ``make bench``) and wrk
speaks https: kept-alive TLS requests, or with ``Connection: close`` resumed
handshakes (wrk resumes its session); ``--full-handshakes`` runs two ``openssl s_time
-new`` instead (a full handshake per connection; "request" then means connection).

- requests per second and the proxy's CPU per request, user and system separately;
- with ``--strace``: the syscalls per request (``strace -c -f -p``; strace slows the
  proxy down, so this run's rate is not the real one);
- with ``--py-spy PATH`` (``pip install py-spy`` anywhere, it attaches by pid): the
  lines with the most samples while the event loop was busy (waits in ``epoll_wait``
  left out), as in docs/performance.md.

One l4proxy process (``--workers`` is refused: the figures are per process). strace
and py-spy attach by pid, which Yama's ``ptrace_scope`` may forbid unless root; a tool
that fails is reported, not ignored. Loopback only; every process is stopped on exit.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _load
import _procs
from _procs import LOAD_CORE, Procs, two_cores
from _servers import SMALL_FILE, start_nginx, start_proxy
from bench import _write_cert

from l4proxy import accesslog


def _user_system(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def _inclusive(raw: Path, top: int) -> list[tuple[float, str]]:
    """Busy samples per l4proxy function, callees included (each counted once per stack)."""
    functions: collections.Counter[str] = collections.Counter()
    total = 0
    for row in raw.read_text().splitlines():
        stack, _, count = row.rpartition(" ")
        frames = stack.split(";")
        if any(idle in frames[-1] for idle in _ASLEEP):
            continue
        total += int(count)
        names = {frame.split(" (")[0] + " (" + frame.split(" (")[1].split(":")[0] + ")"
                 for frame in frames if "(l4proxy/" in frame}  # fmt: skip
        for name in names:
            functions[name] += int(count)
    total = total or 1
    return [(count * 100 / total, name) for name, count in functions.most_common(top)]


def _busy_lines(raw: Path, top: int) -> list[tuple[float, str]]:
    """Self time per source line from py-spy's raw (collapsed) output."""
    lines: collections.Counter[str] = collections.Counter()
    for row in raw.read_text().splitlines():
        stack, _, count = row.rpartition(" ")
        leaf = stack.split(";")[-1]
        if any(idle in leaf for idle in _ASLEEP):
            continue  # the event loop or the access-log writer asleep
        lines[leaf] += int(count)
    total = sum(lines.values()) or 1
    return [(count * 100 / total, leaf) for leaf, count in lines.most_common(top)]


def _asleep() -> tuple[str, ...]:
    """Leaf frames of a thread that is waiting, not working: the event loop in
    ``epoll_wait``, the access-log writer in its wait or its batching sleep."""
    lines, first = inspect.getsourcelines(accesslog.FileSink._run)
    sleep = next(first + i for i, text in enumerate(lines) if "time.sleep(" in text)
    return ("get_events", "Condition.wait", "Event.wait", f"(l4proxy/accesslog.py:{sleep})")


_ASLEEP = _asleep()


def _stop(tool: subprocess.Popen[bytes]) -> int:
    """Stop an attached tool (SIGINT: strace and py-spy write their output) and reap it."""
    if tool.poll() is None:
        tool.send_signal(2)
        try:
            return tool.wait(15)
        except subprocess.TimeoutExpired:
            tool.kill()
    return tool.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep-alive", action="store_true", help="kept-alive connections")
    parser.add_argument("--connections", type=int, default=None, help="wrk -c (32 or 10)")
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--py-spy", type=Path, metavar="PATH", help="py-spy binary to sample with")
    parser.add_argument("--strace", action="store_true", help="count syscalls per request")
    parser.add_argument("--tls", action="store_true", help="the proxy terminates TLS")
    parser.add_argument(
        "--full-handshakes", action="store_true", help="TLS, openssl s_time -new instead of wrk"
    )
    parser.add_argument("l4proxy_args", nargs="*", help="extra l4proxy arguments, after --")
    args = parser.parse_args()
    if any(arg.startswith("--workers") or arg == "-w" for arg in args.l4proxy_args):
        parser.error("--workers: profile one process (the figures are per process)")
    if args.py_spy and not os.access(args.py_spy, os.X_OK):
        parser.error(f"--py-spy: {args.py_spy} is not an executable (pip install py-spy)")
    if args.strace and shutil.which("strace") is None:
        parser.error("--strace: strace is not installed (apt-get install strace)")
    connections = args.connections or (10 if args.keep_alive else 32)
    _procs.raise_nofile()
    with tempfile.TemporaryDirectory() as tmp, Procs(Path(tmp)) as procs:
        _, backend, _ = start_nginx(procs, Path(tmp))
        tls = args.tls or args.full_handshakes
        cert = _write_cert(Path(tmp)) if tls else None
        proxy, port = start_proxy(
            procs, "l4proxy", backend, cert=cert, l4proxy_args=args.l4proxy_args
        )
        url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/{SMALL_FILE}"

        def run_wrk() -> _load.WrkResult:
            if args.full_handshakes:
                count, wall = _load.full_handshakes(
                    port, f"/{SMALL_FILE}", processes=2, seconds=args.seconds
                )
                return _load.WrkResult(count / wall, 0.0, 0.0, 0.0, count, 0, "")
            return _load.wrk(
                url, connections=connections, seconds=args.seconds, close=not args.keep_alive
            )

        if not args.full_handshakes:
            _load.wrk(url, connections=connections, seconds=1, close=not args.keep_alive)
        user0, system0 = _user_system(proxy.pid)
        result = run_wrk()
        user1, system1 = _user_system(proxy.pid)
        requests = result.requests or 1
        print(
            f"{result.requests_per_s:,.0f} requests/s; proxy CPU per request "
            f"{(user1 - user0 + system1 - system0) / requests * 1e6:.1f} µs "
            f"(user {(user1 - user0) / requests * 1e6:.1f}, "
            f"system {(system1 - system0) / requests * 1e6:.1f})"
        )
        if args.strace:
            out = Path(tmp) / "strace.txt"
            log = Path(tmp) / "strace.log"
            with log.open("wb") as errors:
                tracer = subprocess.Popen(
                    ["strace", "-f", "-c", "-o", str(out), "-p", str(proxy.pid)], stderr=errors
                )
                try:
                    time.sleep(0.5)
                    traced = run_wrk()
                finally:
                    status = _stop(tracer)
            if not out.exists() or not out.read_text().strip():
                raise SystemExit(f"strace failed (status {status}): {log.read_text().strip()}")
            count = traced.requests or 1
            print(f"\nsyscalls per request (strace, {traced.requests:,} requests):")
            for row in out.read_text().splitlines()[2:]:
                parts = row.split()
                if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                    calls = int(parts[3])
                    failed = int(parts[4]) if len(parts) == 6 else 0
                    if calls / count >= 0.05:
                        note = f"  ({failed / count:.2f} failed)" if failed else ""
                        print(f"  {parts[-1]:16} {calls / count:6.2f}{note}")
        if args.py_spy:
            raw = Path(tmp) / "py-spy.txt"
            log = Path(tmp) / "py-spy.log"
            with log.open("wb") as errors:
                spy = subprocess.Popen(
                    [str(args.py_spy), "record", "-p", str(proxy.pid), "-r", "200",
                     "-d", str(args.seconds), "-f", "raw", "-o", str(raw), "--nonblocking"],
                    stdout=errors, stderr=errors,
                )  # fmt: skip
                try:
                    if two_cores():
                        os.sched_setaffinity(spy.pid, {LOAD_CORE})
                    run_wrk()
                    status = spy.wait(args.seconds + 30)
                finally:
                    _stop(spy)
            if status != 0 or not raw.exists():
                raise SystemExit(f"py-spy failed (status {status}): {log.read_text().strip()}")
            print("\nbusiest lines (py-spy, share of busy samples):")
            for share, leaf in _busy_lines(raw, 30):
                print(f"  {share:5.1f}%  {leaf}")
            print("\nbusiest l4proxy functions, inclusive (share of busy samples):")
            for share, name in _inclusive(raw, 25):
                print(f"  {share:5.1f}%  {name}")


if __name__ == "__main__":
    sys.exit(main())
