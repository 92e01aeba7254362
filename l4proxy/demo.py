"""``python -m l4proxy.demo``: the proxy in front of two built-in demo backends.

Everything stays on 127.0.0.1. The two backends answer each line with the line and
their name, so round-robin and half-close are visible from ``nc``. A second listener
terminates TLS with a certificate for two names, made at start by a throwaway CA
(:mod:`l4proxy.democerts`), and routes each name to one backend by SNI: ``openssl
s_client -servername`` shows it. Prometheus metrics are served on 127.0.0.1:9100
(``/metrics``, ``/healthz``, ``/readyz``). Access lines are printed as connections end; Ctrl-C
drains and stops, like the real command.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from functools import partial
from typing import TYPE_CHECKING

import trio

from .config import CertKey, Config, ListenerConfig, RouteConfig, TLSConfig
from .democerts import DemoCertificates, write_certificates
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


async def _main(port: int, tls_port: int, metrics_port: int, certs: DemoCertificates) -> int:
    backends: list[str] = []
    async with trio.open_nursery() as nursery:
        for name in ("backend-a", "backend-b"):
            listeners = await nursery.start(partial(_line_service, name))
            host, backend_port = listeners[0].socket.getsockname()[:2]
            backends.append(f"{host}:{backend_port}")
        config = Config(
            metrics=f"127.0.0.1:{metrics_port}",
            listeners=[
                ListenerConfig(
                    name="demo", listen=[f"127.0.0.1:{port}"], backends=backends, drain_timeout=5
                ),
                # No default pool: a client without one of the two names is refused
                # (TLS alert unrecognized_name), which shows that SNI alone routes.
                ListenerConfig(
                    name="demo-tls",
                    listen=[f"127.0.0.1:{tls_port}"],
                    tls=TLSConfig(certs=[CertKey(cert=certs.cert, key=certs.key)]),
                    routes=[
                        RouteConfig(sni=[server_name], backends=[backend])
                        for server_name, backend in zip(certs.names, backends, strict=True)
                    ],
                    drain_timeout=5,
                ),
            ],
        )

        proxy = Proxy(config, access_stream=sys.stderr)

        def explain(bound: list[BoundAddress]) -> None:
            address = next(b for b in bound if b.listener == "demo")
            secure = next(b for b in bound if b.listener == "demo-tls")
            (metrics,) = proxy.metrics.addresses
            try_tls = "".join(
                f"  openssl s_client -connect {secure} -servername {server_name} "
                f"-CAfile {certs.ca} -brief   # to {backend_name}\n"
                for server_name, backend_name in zip(
                    certs.names, ("backend-a", "backend-b"), strict=True
                )
            )
            print(
                f"\nl4proxy demo: listening on {address}, round-robin to {' and '.join(backends)}\n"
                "Try it from another terminal:\n"
                f"  nc {address.host} {address.port}                      "
                "# type lines; each reply names the backend; Ctrl-D to finish\n"
                f"  for i in 1 2 3 4; do echo hi | nc -N {address.host} {address.port}; done"
                "   # watch the backends alternate\n"
                f"\nl4proxy demo: TLS on {secure}, terminated with one certificate for "
                f"{' and '.join(certs.names)}; SNI picks the backend:\n"
                f"{try_tls}"
                f"\nl4proxy demo: Prometheus metrics (and /healthz, /readyz) at "
                f"http://{metrics}/metrics\n"
                f"  curl -s http://{metrics}/metrics | grep ^l4proxy_connections\n"
                "\nOne access-log line per connection appears below. Ctrl-C drains and stops.\n",
                file=sys.stderr,
                flush=True,
            )

        code = await run_proxy(proxy, on_ready=explain)
        nursery.cancel_scope.cancel()
    return code


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m l4proxy.demo", description=__doc__)
    parser.add_argument(
        "--port", type=int, default=7000, help="port on 127.0.0.1 (default 7000; 0 = any)"
    )
    parser.add_argument(
        "--tls-port",
        type=int,
        default=7443,
        help="TLS port on 127.0.0.1 (default 7443; 0 = any)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=9100,
        help="metrics port on 127.0.0.1 (default 9100; 0 = any)",
    )
    args = parser.parse_args(argv)
    configure_logging(logging.INFO)
    # Made before the event loop starts; removed when the demo ends.
    directory = tempfile.mkdtemp(prefix="l4proxy-demo-")
    try:
        certs = write_certificates(directory)
        code = trio.run(_main, args.port, args.tls_port, args.metrics_port, certs)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
