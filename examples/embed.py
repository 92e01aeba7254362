"""Embed l4proxy in a trio application.

The script starts a small echo server on 127.0.0.1 (port 0), puts the proxy in front
of it on 127.0.0.1 (port 0), sends one message through the proxy and prints the
reply. Then it calls ``proxy.close()``, waits for ``serve`` to return and exits 0.

Run it from the repository root::

    .venv/bin/python examples/embed.py

Everything binds to 127.0.0.1 with port 0, so the kernel picks free ports and the
script can run next to anything else.
"""

from __future__ import annotations

import logging
import sys
from functools import partial

import trio

import l4proxy


async def echo(stream: trio.SocketStream) -> None:
    """The backend: send every byte back, then close after the client's EOF."""
    async with stream:
        try:
            async for chunk in stream:
                await stream.send_all(chunk)
        except trio.BrokenResourceError:
            pass  # the client reset the connection; nothing left to do


class PrintAccess(logging.Handler):
    """Prints the structured access record that the proxy attaches to each line."""

    def emit(self, record: logging.LogRecord) -> None:
        access = getattr(record, "access", None)
        if isinstance(access, l4proxy.ConnectionRecord):
            print(
                f"access: listener={access.listener} backend={access.backend} "
                f"sent={access.bytes_to_backend} received={access.bytes_to_client} "
                f"outcome={access.outcome}"
            )


async def main() -> None:
    # The library adds no log handlers; the host application decides where lines go.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    access_logger = logging.getLogger("l4proxy.access")
    access_logger.setLevel(logging.INFO)
    access_logger.addHandler(PrintAccess())
    access_logger.propagate = False

    async with trio.open_nursery() as outer:
        # 1. A backend to proxy to: trio.serve_tcp on 127.0.0.1, port chosen by the kernel.
        backend_listeners = await outer.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
        backend_port = backend_listeners[0].socket.getsockname()[1]

        # 2. The proxy configuration, built in code. Strings are parsed and checked here;
        #    a mistake raises l4proxy.ConfigError before anything is bound.
        config = l4proxy.Config(
            listeners=[
                l4proxy.ListenerConfig(
                    name="echo",
                    listen=["127.0.0.1:0"],
                    backends=[f"127.0.0.1:{backend_port}"],
                    connect_timeout=2,
                    drain_timeout=5,
                )
            ]
        )
        proxy = l4proxy.Proxy(config)  # no I/O yet

        async with trio.open_nursery() as inner:
            # 3. serve() reports the bound addresses once every listener accepts.
            bound: list[l4proxy.BoundAddress] = await inner.start(proxy.serve)
            address = bound[0]
            print(f"proxy listening on {address}, forwarding to 127.0.0.1:{backend_port}")
            assert address.host is not None
            assert address.port is not None

            # 4. One client connection through the proxy.
            stream = await trio.open_tcp_stream(address.host, address.port)
            async with stream:
                await stream.send_all(b"hello through l4proxy\n")
                await stream.send_eof()  # half-close: the reply still comes back
                reply = b""
                async for chunk in stream:
                    reply += chunk
            print(f"reply: {reply.decode().rstrip()}")

            # 5. Stop accepting; established connections get up to drain_timeout.
            proxy.close()
        # serve() has returned: every connection has finished and been logged.

        outer.cancel_scope.cancel()  # stop the echo backend

    if reply != b"hello through l4proxy\n":
        sys.exit(f"unexpected reply: {reply!r}")


if __name__ == "__main__":
    trio.run(main)
