"""Run the real ``l4proxy`` command in a subprocess and follow what it logs."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Self

import trio


class ProxyProcess:
    """``python -m l4proxy ARGS`` with its standard output and error collected as lines.

    Use as ``async with ProxyProcess(nursery, [...]) as proc:``; the process is killed on
    exit if it is still running.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        args: Sequence[str],
        *,
        preexec_fn: Callable[[], None] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.nursery = nursery
        self.args = [sys.executable, "-m", "l4proxy", *args]
        self.preexec_fn = preexec_fn
        self.cwd = cwd
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._changed = trio.Event()
        self._streams_open = 2  # standard output and error, until their EOF
        self.process: trio.Process | None = None

    async def __aenter__(self) -> Self:
        self.process = await trio.lowlevel.open_process(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=self.preexec_fn,
            cwd=self.cwd,
        )
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self.nursery.start_soon(self._collect, self.process.stdout, self.stdout)
        self.nursery.start_soon(self._collect, self.process.stderr, self.stderr)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.kill()
        with trio.move_on_after(5) as cleanup:
            cleanup.shield = True
            await self.process.wait()

    async def _collect(self, stream: trio.abc.ReceiveStream, lines: list[str]) -> None:
        buffer = b""
        async for chunk in stream:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            lines.extend(line.decode(errors="replace") for line in complete)
            self._notify()
        if buffer:
            lines.append(buffer.decode(errors="replace"))
        self._streams_open -= 1
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(
        self, pattern: str, *, count: int = 1, where: str = "stderr"
    ) -> list[re.Match[str]]:
        """Wait (bounded by the caller's deadline) until ``pattern`` matched ``count`` lines."""
        lines = self.stderr if where == "stderr" else self.stdout
        regex = re.compile(pattern)
        while True:
            matches = [m for m in map(regex.search, lines) if m]
            if len(matches) >= count:
                return matches
            assert self.process is not None
            if self._streams_open == 0 and self.process.poll() is not None:  # nothing more comes
                raise AssertionError(
                    f"exited {self.process.returncode} before {pattern!r}; stderr:\n"
                    + "\n".join(self.stderr)
                )
            with trio.move_on_after(0.1):  # also notice the process exiting
                await self._changed.wait()

    async def listening(self, count: int = 1) -> list[tuple[str, int]]:
        """The (host, port) pairs the proxy logged as bound."""
        matches = await self.wait_for(r"accepting on \[?([^\]\s]+?)\]?:(\d+)$", count=count)
        return [(m.group(1), int(m.group(2))) for m in matches]

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self) -> int:
        assert self.process is not None
        return await self.process.wait()
