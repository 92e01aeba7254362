"""One client connection's life: connect a backend, pump bytes, write the access line.

:func:`serve_connection` is the per-connection orchestrator. It reads like a table of
contents; each step lives in its own module. It is also where per-connection failures
are contained: whatever one peer or backend does costs that connection only.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import TYPE_CHECKING

import attrs
import trio

from .accesslog import AccessRecord, AccessSink
from .backends import BackendPool, Connector, connect_pool, describe_os_error
from .errors import L4ProxyError, UpstreamConnectError
from .pump import Transfer, pump

if TYPE_CHECKING:
    from collections.abc import Callable

    from .config import ListenerConfig

LOGGER = logging.getLogger("l4proxy.connection")


@attrs.frozen(eq=False)
class ListenerRuntime:
    """What a listener needs at run time, built once from its config (and on reload)."""

    config: ListenerConfig
    pool: BackendPool
    access_log: AccessSink


async def serve_connection(
    stream: trio.abc.Stream,
    *,
    listener: ListenerRuntime,
    client: str,
    connection_id: int,
    connect: Connector,
    is_draining: Callable[[], bool],
) -> None:
    """Proxy one accepted connection to the listener's pool, then log it.

    Resource handling:
        Closes ``stream`` (and the backend stream) on every path, cancellation included.

    Error handling:
        Backend connect failures, resets and OS errors end this connection with an
        ``outcome`` in the access log. Anything unexpected is logged with a traceback and
        the connection's identity, and also ends only this connection. ``Cancelled`` is
        never swallowed; a connection cut by a drain deadline is logged as ``drained``.
    """
    config = listener.config
    started_wall = time.time()
    started = trio.current_time()
    transfer = Transfer()
    backend: str | None = None
    outcome: str | None = None
    error: str | None = None
    try:
        async with stream:
            try:
                upstream, address = await connect_pool(
                    listener.pool, connect, attempt_seconds=config.connect_timeout
                )
            except UpstreamConnectError as exc:
                outcome = "connect_failed"
                error = "; ".join(f"{a}: {reason}" for a, reason in exc.attempts)
                return
            backend = str(address)
            async with upstream:
                outcome = await pump(stream, upstream, transfer, idle_seconds=config.idle_timeout)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        outcome, error = "error:reset", str(exc) or None
    except OSError as exc:
        outcome = f"error:{errno.errorcode.get(exc.errno or 0, 'os_error').lower()}"
        error = describe_os_error(exc)
    except L4ProxyError as exc:
        outcome, error = "error:proxy", str(exc)
    except Exception as exc:
        LOGGER.exception(
            "connection %d from %s on listener %r failed unexpectedly",
            connection_id,
            client,
            config.name,
        )
        outcome, error = "error:internal", f"{type(exc).__name__}: {exc}"
    finally:
        if outcome is None:
            outcome = "drained" if is_draining() else "cancelled"
        listener.access_log.write(
            AccessRecord(
                time=started_wall,
                id=connection_id,
                listener=config.name,
                client=client,
                backend=backend,
                bytes_to_backend=transfer.to_backend,
                bytes_to_client=transfer.to_client,
                duration=trio.current_time() - started,
                outcome=outcome,
                error=error,
            ),
            config.log_format,
        )
