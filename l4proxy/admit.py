"""Step 1, admit: who may connect, decided in the accept loop from the client's address
alone, before any byte is read, any TLS work is done or any task is started.

A refused connection is closed at once (the client sees its connection closed) and
counted; :class:`~l4proxy.rejections.RejectionLog` decides whether it also gets an
access line, so a flood cannot fill the disk. The suppressed ones are summarised once
a second in the process log (:func:`report_suppressed`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from .admission import key_of, parse_client
from .record import ConnectionRecord, Outcome

if TYPE_CHECKING:
    import socket

    from .addresses import Address
    from .connection import Shared
    from .runtime import ListenerRuntime

__all__ = ["admit", "refuse", "report_suppressed"]

LOGGER = logging.getLogger("l4proxy.server")
#: How often the suppressed refusals are summarised.
SUMMARY_SECONDS = 1.0


def admit(runtime: ListenerRuntime, shared: Shared, host: str) -> tuple[Outcome | None, int | None]:
    """The admit step's decision for a client at ``host``: ``(None, key)`` to let it in
    (counted under ``key`` when per-client limits apply: release it when it ends), or
    the refusal. Cheapest checks first; nothing is counted for a refused connection."""
    access_list, config = runtime.access_list, runtime.config
    per_ip = config.max_connections_per_ip is not None or config.rate_per_ip is not None
    parsed = None  # the address, parsed once for the list and the limits
    if access_list is not None or per_ip:
        parsed = parse_client(host)
        if access_list is not None and not access_list.permits_parsed(parsed):
            return Outcome.DENIED, None
    if (shared.max_open is not None and shared.open >= shared.max_open) or (
        config.max_connections is not None and runtime.live.value >= config.max_connections
    ):
        return Outcome.LIMIT_TOTAL, None
    if parsed is None or not per_ip:
        return None, None
    key = key_of(parsed, config.per_ip_ipv6_prefix)
    refusal = runtime.live.clients.admit(
        key, trio.current_time(), config.max_connections_per_ip, config.rate_per_ip
    )
    return refusal, (None if refusal else key)


def refuse(
    sock: socket.socket,
    peer: Address,
    host: str,
    local: Address,
    runtime: ListenerRuntime,
    shared: Shared,
    outcome: Outcome,
) -> None:
    """Close a connection the admit step turned away; log it if the budget allows."""
    sock.close()
    runtime.live.tally.refused(outcome)  # every refusal counted, logged or not
    now = trio.current_time()
    if shared.rejections.refused(outcome, host, now):
        record = ConnectionRecord(
            next(shared.ids), runtime.config.name, peer, local, time=time.time(), started=now
        )
        record.outcome = outcome
        runtime.access_log.write(record, runtime.log_format)


async def report_suppressed(shared: Shared) -> None:
    """Forever: one line per reason for the refusals that got no access line."""
    while True:
        await trio.sleep(SUMMARY_SECONDS)
        for line in shared.rejections.summaries():
            LOGGER.warning("%s in the last %gs", line, SUMMARY_SECONDS)
