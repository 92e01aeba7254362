"""One access-log line per connection, written without blocking the event loop.

The per-connection cost is building one small frozen :class:`AccessRecord` and one
``deque.append`` (atomic under the GIL, no lock). Formatting (timestamps, JSON) and file
I/O happen in one writer thread per destination, woken once per batch (an
``Event.set`` only when the writer is not already due), which lets records gather for
:data:`BATCH_SECONDS` and writes each batch with a single ``write`` + ``flush``. If the
destination cannot keep up and :data:`QUEUE_LIMIT` records wait, lines are dropped and
counted rather than letting memory grow or the event loop stall; the count is reported
in the log.

Without an ``access_log`` destination, records go to the ``l4proxy.access`` logger
(``extra={"access": record}``), so an embedding application routes them with its own
logging configuration.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import re
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Protocol

import trio

from .config import LogFormat

if TYPE_CHECKING:
    from .record import AccessRecord

LOGGER = logging.getLogger("l4proxy.access")
DIAGNOSTIC_LOGGER = logging.getLogger("l4proxy.accesslog")

#: How many records may wait for the writer thread before new ones are dropped.
QUEUE_LIMIT = 65536
#: How long the writer lets records gather before writing them (the most a line waits).
BATCH_SECONDS = 0.05
#: The most records formatted and written at once.
BATCH_LIMIT = 1024


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


#: ".000Z" to ".999Z": the end of every timestamp, made once.
_MILLIS = tuple(f".{millis:03d}Z" for millis in range(1000))


def _timestamp(epoch: float) -> str:
    seconds = int(epoch)
    return _second(seconds) + _MILLIS[int((epoch - seconds) * 1000)]


def format_text(record: AccessRecord) -> str:
    """logfmt-style: ``key=value`` pairs, values quoted only when they contain spaces.

    Written out field by field: this runs once per connection (in the writer thread,
    but on the proxy's core), so the listener's and backends' texts are made once."""
    client, backend, outcome = record.client, record.backend, record.outcome
    via = None
    if record.proxied_client is not None:  # a trusted PROXY header named the client
        client, via = record.proxied_client, client
    line = (
        f"{_timestamp(record.time)} id={record.id} listener={_known_text(record.listener)} "
        f"client={'-' if client is None else _logfmt(str(client))} "
        f"backend={'-' if backend is None else _known_text(backend)} "
        f"bytes_to_backend={record.to_backend} bytes_to_client={record.to_client} "
        f"duration={record.duration:.3f} outcome={'-' if outcome is None else str(outcome)}"
    )
    if via is not None:
        line += f" via={_logfmt(str(via))}"
    # Written only when set (TLS listeners, failures); JSON always has them.
    if record.route is not None:
        line += f" route={_known_text(record.route)}"
    if record.sni is not None:
        line += f" sni={_logfmt(record.sni)}"
    if record.alpn is not None:
        line += f" alpn={_logfmt(record.alpn)}"
    if record.tls_version is not None:
        line += f" tls_version={_known_text(record.tls_version)}"
    if record.cipher is not None:
        line += f" cipher={_known_text(record.cipher)}"
    if record.client_subject is not None:
        line += f" client_subject={_logfmt(record.client_subject)}"
    if record.error is not None:
        line += f" error={_logfmt(record.error)}"
    return line


def _address(address: object) -> str:
    return "-" if address is None else str(address)


def format_json(record: AccessRecord) -> str:
    """One JSON object; ``time`` is ISO 8601 UTC, ``duration`` in seconds."""
    backend = record.backend
    return json.dumps(
        {
            "time": _timestamp(record.time),
            "id": record.id,
            "listener": record.listener,
            "client": _address(record.proxied_client or record.client),
            "via": None if record.proxied_client is None else _address(record.client),
            "backend": None if backend is None else str(backend),
            "bytes_to_backend": record.to_backend,
            "bytes_to_client": record.to_client,
            "duration": round(record.duration, 6),
            "outcome": None if record.outcome is None else str(record.outcome),
            "error": record.error,
            "route": record.route,
            "sni": record.sni,
            "alpn": record.alpn,
            "tls_version": record.tls_version,
            "cipher": record.cipher,
            "client_subject": record.client_subject,
        },
        separators=(",", ":"),
    )


_NEEDS_QUOTES = re.compile(r'[ "=\\]')


def _logfmt(value: str) -> str:
    if value and value.isprintable() and _NEEDS_QUOTES.search(value) is None:
        return value
    return json.dumps(value)


@functools.lru_cache(maxsize=1024)
def _known_text(value: object) -> str:
    """:func:`_logfmt` of ``str(value)`` for the values lines repeat (listener and
    route names, backends, TLS versions and ciphers): made once each."""
    return _logfmt(str(value))


FORMATTERS = {LogFormat.TEXT: format_text, LogFormat.JSON: format_json}


class _LazyText:
    """Defers formatting until a handler actually emits the record."""

    __slots__ = ("record",)

    def __init__(self, record: AccessRecord) -> None:
        self.record = record

    def __str__(self) -> str:
        return format_text(self.record)


class AccessSink(Protocol):
    """Where finished connections are reported."""

    def write(self, record: AccessRecord, log_format: LogFormat) -> None: ...


class LoggerSink:
    """Sends records to the ``l4proxy.access`` logger at INFO."""

    def write(self, record: AccessRecord, log_format: LogFormat) -> None:
        if LOGGER.isEnabledFor(logging.INFO):
            message = format_json(record) if log_format is LogFormat.JSON else _LazyText(record)
            LOGGER.info("%s", message, extra={"access": record})


class FileSink:
    """A file (or standard output for ``-``) fed by a writer thread.

    Resource handling:
        :meth:`open` starts the thread (opening the file in it, so the event loop never
        waits on the file system); :meth:`aclose` stops it after the queue is written.
        Both are idempotent (and ``open`` is safe to call from concurrent tasks). Lines
        are flushed after every batch, so a crash loses at most the batch being written.

    Error handling:
        :meth:`open` raises ``OSError`` when the file cannot be opened. Write errors
        later on are logged once and the sink keeps counting what it could not write.
    """

    def __init__(self, path: str, *, stream: IO[str] | None = None) -> None:
        """``path`` is a file, or ``-`` for standard output; ``stream`` (an already
        open text stream such as ``sys.stderr``, never closed here) overrides both."""
        self.path = path
        self._stream = stream
        self.dropped = 0
        self._pending: collections.deque[tuple[AccessRecord, LogFormat] | None] = (
            collections.deque()
        )
        self._wake = threading.Event()  # set: the writer has records to write
        self._thread: threading.Thread | None = None
        self._file: IO[str] | None = None
        self._opening = trio.Lock()

    @property
    def is_open(self) -> bool:
        return self._thread is not None

    async def open(self) -> None:
        async with self._opening:
            if self._thread is None:
                await self._open()

    async def _open(self) -> None:
        if self._stream is not None:
            self._file = self._stream
        elif self.path == "-":
            self._file = sys.stdout
        else:
            self._file = await trio.to_thread.run_sync(
                lambda: open(self.path, "a", encoding="utf-8", buffering=1 << 16)  # noqa: SIM115 - the writer thread owns it
            )
        self._thread = threading.Thread(
            target=self._run, name=f"l4proxy access log {self.path}", daemon=True
        )
        self._thread.start()

    def write(self, record: AccessRecord, log_format: LogFormat) -> None:
        if len(self._pending) >= QUEUE_LIMIT:
            self.dropped += 1
            return
        self._pending.append((record, log_format))
        if not self._wake.is_set():  # once per batch: the writer is asleep
            self._wake.set()

    async def aclose(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._thread = None
        # None tells the writer to stop. Abandonable: a writer stuck on a stream nobody
        # reads must not hold up shutdown beyond the caller's deadline.
        self._pending.append(None)
        self._wake.set()
        await trio.to_thread.run_sync(thread.join, abandon_on_cancel=True)
        if self.dropped:
            DIAGNOSTIC_LOGGER.warning(
                "access log %s: dropped %d lines (writer could not keep up)",
                self.path,
                self.dropped,
            )

    def _run(self) -> None:
        file = self._file
        assert file is not None
        failed = False
        reported_drops = 0
        try:
            pending = self._pending
            while True:
                self._wake.wait()
                if pending and len(pending) < BATCH_LIMIT and pending[-1] is not None:
                    # Let a batch gather: one wake-up (and GIL hand-over) per batch
                    # instead of per connection keeps this thread off the event loop's back.
                    # A full batch already waiting is written at once (no rate cap).
                    time.sleep(BATCH_SECONDS)
                self._wake.clear()  # records appended from now on set it again
                items = [pending.popleft() for _ in range(min(len(pending), BATCH_LIMIT))]
                if pending:
                    self._wake.set()  # more than a batch waited: go round again at once
                stop = None in items
                lines = [FORMATTERS[fmt](record) for record, fmt in filter(None, items)]
                try:
                    if lines:
                        file.write("\n".join(lines) + "\n")
                        file.flush()
                except (OSError, ValueError) as exc:
                    self.dropped += len(lines)
                    if not failed:
                        DIAGNOSTIC_LOGGER.error("access log %s: cannot write: %s", self.path, exc)
                        failed = True
                if self.dropped != reported_drops:
                    DIAGNOSTIC_LOGGER.warning(
                        "access log %s: %d lines dropped so far", self.path, self.dropped
                    )
                    reported_drops = self.dropped
                if stop:
                    return
        finally:
            if file is not sys.stdout and file is not self._stream:
                file.close()
