"""Access-line formatting and the file sink's writer thread (batching, order, drops)."""

from __future__ import annotations

import io
import json
import logging
import threading
from typing import TYPE_CHECKING

import trio

from l4proxy import AccessRecord, LogFormat, Outcome, TCPAddress, accesslog
from l4proxy.accesslog import FileSink, format_json, format_text

if TYPE_CHECKING:
    import pytest


def _record(index: int = 1, **fields: object) -> AccessRecord:
    values: dict[str, object] = {
        "time": 1_790_000_000.25,
        "id": index,
        "listener": "db",
        "client": TCPAddress("127.0.0.1", 40000),
        "backend": TCPAddress("127.0.0.1", 5432),
        "to_backend": 10,
        "to_client": 20,
        "duration": 0.5,
        "outcome": Outcome.OK,
    }
    values.update(fields)
    return AccessRecord(**values)  # type: ignore[arg-type]


def test_text_lines_quote_only_what_needs_it() -> None:
    line = format_text(_record(listener="my db", error='say "hi"', sni="a=b", backend=None))
    assert line.startswith('2026-09-21T14:13:20.250Z id=1 listener="my db" ')
    assert " backend=- " in line
    assert ' sni="a=b"' in line
    assert ' error="say \\"hi\\""' in line
    assert " client=127.0.0.1:40000 " in line  # plain values stay bare
    assert " alpn=" not in line  # optional fields only when set
    assert 'listener="tab\\there"' in format_text(_record(listener="tab\there"))
    assert 'listener=""' in format_text(_record(listener=""))
    assert "listener=bücher" in format_text(_record(listener="bücher"))  # printable: bare


def test_json_lines_have_every_field() -> None:
    fields = json.loads(format_json(_record()))
    assert fields["time"] == "2026-09-21T14:13:20.250Z"
    assert fields["sni"] is None
    assert (fields["outcome"], fields["duration"]) == ("ok", 0.5)
    assert (fields["client"], fields["backend"]) == ("127.0.0.1:40000", "127.0.0.1:5432")
    assert list(fields) == [
        "time", "id", "listener", "client", "via", "backend", "bytes_to_backend",
        "bytes_to_client", "duration", "outcome", "error", "route", "sni", "alpn",
        "tls_version", "cipher", "client_subject",
    ]  # fmt: skip
    assert fields["via"] is None  # set when a trusted PROXY header named the client


def test_the_route_name_is_on_the_line_when_there_is_one() -> None:
    assert " outcome=ok route=db.example " in format_text(_record(route="db.example", sni="x"))
    assert " route=" not in format_text(_record())
    assert json.loads(format_json(_record(route="default")))["route"] == "default"
    line = format_text(_record(client=None, outcome=Outcome.CONNECT_FAILED, backend=None))
    assert " client=- backend=- " in line
    assert " outcome=connect_failed" in line


async def test_the_file_sink_writes_every_record_in_order() -> None:
    stream = io.StringIO()
    sink = FileSink("<test>", stream=stream)
    await sink.open()
    for index in range(3000):  # several batches
        sink.write(_record(index), LogFormat.TEXT if index % 2 else LogFormat.JSON)
        if index % 500 == 0:
            await trio.sleep(0.01)
    with trio.fail_after(5):  # written without aclose's help: the writer was woken
        while stream.getvalue().count("\n") < 3000:  # noqa: ASYNC110 - another thread writes
            await trio.sleep(accesslog.BATCH_SECONDS / 5)
    await sink.aclose()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3000
    assert json.loads(lines[0])["id"] == 0
    assert lines[1].split()[1] == "id=1"
    assert lines[2999].split()[1] == "id=2999"
    assert sink.dropped == 0


class _StuckStream(io.StringIO):
    """A destination whose writes block until released, like a full pipe."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        self.release.wait(10)
        return super().write(text)


async def test_a_stuck_destination_drops_and_counts_lines_instead_of_growing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(accesslog, "QUEUE_LIMIT", 10)
    stream = _StuckStream()
    sink = FileSink("<stuck>", stream=stream)
    await sink.open()
    sink.write(_record(0), LogFormat.TEXT)
    await trio.to_thread.run_sync(stream.entered.wait, 10)  # the writer is stuck
    for index in range(1, 31):
        sink.write(_record(index), LogFormat.TEXT)
    assert sink.dropped == 20  # 10 wait, the rest are dropped and counted
    stream.release.set()
    with caplog.at_level(logging.WARNING, "l4proxy.accesslog"):
        await sink.aclose()
    ids = [line.split()[1] for line in stream.getvalue().splitlines()]
    assert ids == [f"id={index}" for index in range(11)]
    assert "dropped 20 lines" in caplog.text
