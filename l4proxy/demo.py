"""``python -m l4proxy.demo``: the proxy in front of two built-in demo backends.

Everything stays on 127.0.0.1. The two backends answer each line with the line and
their name, so round-robin and half-close are visible from ``nc``. Access lines are
printed as connections end; Ctrl-C drains and stops, like the real command.
"""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from typing import TYPE_CHECKING

import trio

from .config import Config, ListenerConfig
from .runner import configure_logging, run_proxy
from .server import Proxy

if TYPE_CHECKING:
    from .stats import BoundAddress


async def _line_service(
    name: str, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
) -> None:
    """A demo backend: greets, then answers each line with its own name."""

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await stream.send_all(
                    f"hello from {name}; type a line, Ctrl-D to finish\n".encode()
                )
                pending = b""
                async for data in stream:
                    pending += data
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        await stream.send_all(b"%s: %s\n" % (name.encode(), line))
                await stream.send_all(f"{name}: bye\n".encode())
                await stream.send_eof()
            except trio.BrokenResourceError:
                pass

    await trio.serve_tcp(serve, 0, host="127.0.0.1", task_status=task_status)


async def _main(port: int) -> int:
    backends: list[str] = []
    async with trio.open_nursery() as nursery:
        for name in ("backend-a", "backend-b"):
            listeners = await nursery.start(partial(_line_service, name))
            host, backend_port = listeners[0].socket.getsockname()[:2]
            backends.append(f"{host}:{backend_port}")
        config = Config(
            listeners=[
                ListenerConfig(
                    name="demo", listen=[f"127.0.0.1:{port}"], backends=backends, drain_timeout=5
                )
            ]
        )

        def explain(bound: list[BoundAddress]) -> None:
            address = bound[0]
            print(
                f"\nl4proxy demo: listening on {address}, round-robin to {' and '.join(backends)}\n"
                "Try it from another terminal:\n"
                f"  nc {address.host} {address.port}                      "
                "# type lines; each reply names the backend; Ctrl-D to finish\n"
                f"  for i in 1 2 3 4; do echo hi | nc -N {address.host} {address.port}; done"
                "   # watch the backends alternate\n"
                "One access-log line per connection appears below. Ctrl-C drains and stops.\n",
                file=sys.stderr,
                flush=True,
            )

        code = await run_proxy(Proxy(config, access_stream=sys.stderr), on_ready=explain)
        nursery.cancel_scope.cancel()
    return code


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m l4proxy.demo", description=__doc__)
    parser.add_argument(
        "--port", type=int, default=7000, help="port on 127.0.0.1 (default 7000; 0 = any)"
    )
    args = parser.parse_args(argv)
    configure_logging(logging.INFO)
    sys.exit(trio.run(_main, args.port))


if __name__ == "__main__":
    main()
