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

from .record import ConnectionRecord, Outcome

if TYPE_CHECKING:
    import socket

    from .addresses import Address
    from .connection import Shared
    from .runtime import ListenerRuntime

__all__ = ["refuse", "report_suppressed"]

LOGGER = logging.getLogger("l4proxy.server")
#: How often the suppressed refusals are summarised.
SUMMARY_SECONDS = 1.0


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
