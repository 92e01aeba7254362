"""Process plumbing for the benchmark: pinning, ports, start/stop, RSS.

Every process is started in its own session (so its process group is its own and a
stubborn one can be killed as a group without touching anything else), pinned to a
core before it runs, and logged to a file in the work directory. ``Procs`` stops
everything it started, newest first, also when the benchmark fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from types import TracebackType

PROXY_CORE = 0
LOAD_CORE = 1


class BenchError(Exception):
    """A measurement or a process it needs failed; the message says which and why."""


def two_cores() -> bool:
    return hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2


#: Off with ``bench.py --no-pin``: every process may use every core (``--workers`` runs).
PINNING = True


def pin(core: int) -> None:
    """Pin the calling process (and what it forks later) to ``core``, when there are two."""
    if PINNING and two_cores():
        os.sched_setaffinity(0, {core})


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; children inherit it. Returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def find_binary(name: str) -> str:
    """``name`` on PATH, or in the sbin directories a non-root PATH may lack."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise BenchError(f"{name} not found (make bench installs it)")


def _listening_ports() -> set[int]:
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines, None)
            for line in lines:
                fields = line.split()
                if len(fields) > 3 and fields[3] == "0A":
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class Proc:
    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_listening(self, port: int, timeout: float = 20.0) -> None:
        """Wait until something listens on ``port`` (read from /proc: no test connection)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port in _listening_ports():
                return
            if not self.alive():
                raise BenchError(
                    f"{self.name} exited with {self.popen.returncode} before listening on "
                    f"{port}:\n{self.tail()}"
                )
            time.sleep(0.02)
        raise BenchError(f"{self.name} not listening on {port} after {timeout:g} s:\n{self.tail()}")


class Procs:
    """Starts processes and stops every one of them on ``close`` (a context manager)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._procs: list[Proc] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        core: int,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Proc:
        """Start ``argv``; ``env`` adds to (or overrides) this process's environment."""
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as output:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=None if env is None else {**os.environ, **env},
                start_new_session=True,
                preexec_fn=lambda: pin(core),
            )
        proc = Proc(name, popen, log)
        self._procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        """SIGTERM (twice: l4proxy's second signal skips the drain), then SIGKILL the group."""
        if proc in self._procs:
            self._procs.remove(proc)
        for grace in (3.0, 2.0):
            if not proc.alive():
                break
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(grace)
        # The group is the process's own session: this reaches its children (nginx's
        # worker, l4proxy's workers) and nothing else.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(5)

    def close(self) -> None:
        while self._procs:
            self.stop(self._procs[-1])


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def process_tree(pid: int) -> list[int]:
    tree = _children()
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` and all its descendants, in KiB."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{member}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def open_fds(pid: int) -> tuple[int, int]:
    """(open file descriptors, of which pipes) of ``pid`` and its descendants."""
    fds = pipes = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for entry in os.scandir(f"/proc/{member}/fd"):
                fds += 1
                with contextlib.suppress(OSError):
                    if os.readlink(entry.path).startswith("pipe:"):
                        pipes += 1
    return fds, pipes


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` (all threads) and its descendants, in seconds."""
    ticks = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{member}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / _TICKS


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]), idle


def machine_busy(seconds: float = 1.0) -> float:
    """How busy all cores together were over the next ``seconds``, in percent."""
    try:
        total_before, idle_before = _cpu_times()
        time.sleep(seconds)
        total_after, idle_after = _cpu_times()
    except (OSError, ValueError, IndexError):
        return 0.0
    total = total_after - total_before
    return 100.0 * (total - (idle_after - idle_before)) / total if total else 0.0
