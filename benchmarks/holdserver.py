"""Backend for the idle-connection memory scenario: ``python holdserver.py PORT``.

Listens on 127.0.0.1:PORT; on each connection echoes the first byte (so the client knows
the whole path through the proxy exists), then holds the connection open, idle, until
the peer closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sys


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        first = await reader.read(1)
        if first:
            writer.write(first)
            await writer.drain()
            while await reader.read(4096):
                pass
    except OSError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _serve(port: int) -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
