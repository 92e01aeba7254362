"""Load generators: wrk and iperf3 (C, on the load core), and the idle-connection opener."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from _procs import LOAD_CORE, BenchError, find_binary, pin

if TYPE_CHECKING:
    import ssl
    from collections.abc import Mapping, Sequence
    from pathlib import Path

_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_SIZE_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def run_load(
    argv: Sequence[str],
    *,
    timeout: float,
    what: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> str:
    """Run a load generator pinned to the load core; its standard output, or BenchError."""
    what = what or argv[0]
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=None if env is None else {**os.environ, **env},
            cwd=cwd,
            preexec_fn=lambda: pin(LOAD_CORE),
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"{what} did not finish within {timeout:g} s") from error
    if done.returncode != 0:
        raise BenchError(
            f"{what} ({shlex.join(argv)}) exited with {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()[-600:]}"
        )
    return done.stdout


@dataclass
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    bytes_per_s: float
    requests: int
    errors: int
    error_text: str


def _latency_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise BenchError(f"wrk: cannot read latency {text!r}")
    return float(match.group(1)) * _TIME_UNITS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if not match:
            raise BenchError(f"wrk: no {pattern!r} in its output:\n{output[-800:]}")
        return match

    requests = int(find(r"^\s*(\d+) requests in ").group(1))
    rate = float(find(r"^Requests/sec:\s*([\d.]+)").group(1))
    transfer = find(r"^Transfer/sec:\s*([\d.]+)(B|KB|MB|GB|TB)")
    errors = 0
    texts = []
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        counts = [int(value) for value in socket_errors.groups()]
        errors += sum(counts)
        texts.append(socket_errors.group(0))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
        texts.append(non_2xx.group(0))
    return WrkResult(
        requests_per_s=rate,
        p50_ms=_latency_ms(find(r"^\s*50%\s+(\S+)").group(1)),
        p99_ms=_latency_ms(find(r"^\s*99%\s+(\S+)").group(1)),
        bytes_per_s=float(transfer.group(1)) * _SIZE_UNITS[transfer.group(2)],
        requests=requests,
        errors=errors,
        error_text="; ".join(texts),
    )


def wrk(
    url: str, *, connections: int, seconds: int, close: bool = False, refused: bool = False
) -> WrkResult:
    """One wrk run (one thread), with the latency distribution.

    ``refused``: the target is expected to close every connection unanswered (wrk counts
    each as a socket error), so a run without a completed request is a result.
    """
    argv = [
        find_binary("wrk"),
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "--latency",
    ]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    result = parse_wrk(run_load(argv, timeout=seconds + 30))
    if result.requests == 0 and not refused:
        raise BenchError(f"wrk completed no request against {url} ({result.error_text})")
    return result


def iperf3(port: int, *, streams: int, seconds: int) -> float:
    """Bits per second received by the iperf3 server, client sending through ``port``."""
    argv = [
        find_binary("iperf3"),
        "-c",
        "127.0.0.1",
        "-p",
        str(port),
        "-t",
        str(seconds),
        "-P",
        str(streams),
        "--json",
    ]
    for attempt in range(3):
        try:
            report = json.loads(run_load(argv, timeout=seconds + 30))
        except BenchError as error:
            # The server answers "busy" for a moment after the previous test.
            if "busy" in str(error) and attempt < 2:
                time.sleep(1.0)
                continue
            raise
        except json.JSONDecodeError as error:
            raise BenchError(f"iperf3 printed no JSON: {error}") from error
        if "error" in report:
            if "busy" in report["error"] and attempt < 2:
                time.sleep(1.0)
                continue
            raise BenchError(f"iperf3: {report['error']}")
        return float(report["end"]["sum_received"]["bits_per_second"])
    raise BenchError("iperf3 server stayed busy")


def open_idle(
    port: int, count: int, deadline_s: float, tls: ssl.SSLContext | None = None
) -> list[socket.socket]:
    """Open ``count`` connections to 127.0.0.1:``port``, each pinged once, then idle;
    with ``tls``, each a TLS session (handshake done, the ping encrypted).

    The caller closes them. Raises (after closing what it opened) if one fails or the
    deadline passes.
    """
    opened: list[socket.socket] = []
    deadline = time.monotonic() + deadline_s
    try:
        for index in range(count):
            if time.monotonic() > deadline:
                raise BenchError(f"only {index} of {count} connections within {deadline_s:g} s")
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=10)
                if tls is not None:
                    conn = tls.wrap_socket(conn, server_hostname="bench.example")
            except OSError as error:
                raise BenchError(f"connection {index + 1} of {count}: {error}") from error
            opened.append(conn)
            try:
                conn.sendall(b"x")
                answer = conn.recv(1)
            except OSError as error:
                raise BenchError(f"connection {index + 1} of {count}: {error}") from error
            if answer != b"x":
                raise BenchError(f"connection {index + 1} of {count} closed by the proxy")
    except BaseException:
        close_all(opened)
        raise
    return opened


def close_all(connections: list[socket.socket]) -> None:
    for conn in connections:
        conn.close()
    connections.clear()


def _s_client(port: int, *extra: str) -> str:
    try:
        done = subprocess.run(
            [
                find_binary("openssl"),
                "s_client",
                "-connect",
                f"127.0.0.1:{port}",
                "-servername",
                "bench.example",
                *extra,
            ],
            input="GET / HTTP/1.0\r\n\r\n",
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (subprocess.TimeoutExpired, BenchError) as error:
        return f"probe failed: {error}"
    return done.stdout + done.stderr


def tls_probe(port: int, workdir: Path) -> str:
    """What ``openssl s_client`` negotiates with 127.0.0.1:``port`` (version, suite, key
    exchange) and whether a second connection resumes the first one's session."""
    session = workdir / f"session-{port}.pem"
    session.unlink(missing_ok=True)
    # -ign_eof: wait for the server to close after the response, so that the TLS 1.3
    # session tickets (sent after the handshake) are in before the session is saved.
    first = _s_client(port, "-brief", "-ign_eof", "-sess_out", str(session))
    wanted = ("Protocol version", "Ciphersuite", "Temp Key", "Signature type")
    facts = [
        " ".join(line.split()) for line in first.splitlines() if any(key in line for key in wanted)
    ]
    if session.exists():
        second = _s_client(port, "-ign_eof", "-sess_in", str(session))
        facts.append("resumes the session" if "Reused," in second else "no resumption")
    else:
        facts.append("no session to resume")
    return ", ".join(facts) or "probe printed nothing"


def full_handshakes(port: int, path: str, *, processes: int, seconds: int) -> tuple[int, float]:
    """``processes`` parallel ``openssl s_time -new``: a full TLS handshake, one HTTP/1.0
    request and a close per connection, no session ever resumed (wrk resumes its TLS
    session on reconnect, so it cannot measure full handshakes).

    Returns (connections completed, wall-clock seconds).
    """
    argv = [
        find_binary("openssl"),
        "s_time",
        "-connect",
        f"127.0.0.1:{port}",
        "-new",
        "-time",
        str(seconds),
        "-www",
        path,
    ]
    runs = []
    start = time.monotonic()
    try:
        for _ in range(processes):
            runs.append(  # noqa: PERF401 (one by one: a failure kills those started)
                subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    preexec_fn=lambda: pin(LOAD_CORE),
                )
            )
        outputs = [run.communicate(timeout=seconds + 30)[0] for run in runs]
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"openssl s_time did not finish within {seconds + 30} s") from error
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    wall = time.monotonic() - start
    total = 0
    for output in outputs:
        match = re.search(r"^(\d+) connections in [\d.]+s", output, re.MULTILINE)
        if not match:
            raise BenchError(f"openssl s_time: no connection count in:\n{output[-600:]}")
        total += int(match.group(1))
    if total == 0:
        raise BenchError("openssl s_time completed no connection")
    return total, wall
