"""The sans-IO ClientHello parser, fed real ClientHellos and hostile bytes."""

from __future__ import annotations

import contextlib
import ssl

import pytest
from hypothesis import given, settings, strategies as st

from l4proxy.errors import ClientHelloError
from l4proxy.protocols.clienthello import ClientHello, parse_client_hello


def python_client_hello(
    server_name: str | None = "db.example.com",
    alpn: list[str] | None = None,
    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
) -> bytes:
    """A real ClientHello from the stdlib ssl module (tcpproxy's trick: a memory BIO)."""
    context = ssl.create_default_context()
    context.minimum_version = minimum
    if server_name is None:
        context.check_hostname = False
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def split_into_records(hello: bytes, sizes: list[int]) -> bytes:
    """Re-frame one ClientHello's handshake bytes into several TLS records."""
    assert hello[0] == 22
    body = hello[5:]
    records = b""
    position = 0
    for size in [*sizes, len(body)]:
        piece = body[position : position + max(1, size)]
        if not piece:
            break
        records += bytes([22, 3, 1]) + len(piece).to_bytes(2, "big") + piece
        position += len(piece)
    return records


def test_sni_alpn_and_versions_of_a_real_client_hello() -> None:
    hello = python_client_hello("DB.Example.COM.", alpn=["h2", "http/1.1"])
    parsed = parse_client_hello(hello)
    assert parsed == ClientHello(
        server_name="db.example.com",
        alpn_protocols=(b"h2", b"http/1.1"),
        versions=parsed.versions if parsed else (),
        size=len(hello),
    )
    assert parsed is not None
    assert 0x0304 in parsed.versions
    assert "TLSv1.3" in parsed.version_names


def test_no_sni_and_no_alpn() -> None:
    parsed = parse_client_hello(python_client_hello(None))
    assert parsed is not None
    assert parsed.server_name is None
    assert parsed.alpn_protocols == ()


def test_every_prefix_needs_more_and_one_byte_at_a_time_still_parses() -> None:
    hello = python_client_hello()
    for end in range(len(hello)):
        assert parse_client_hello(hello[:end]) is None
    assert parse_client_hello(hello) is not None


def test_handshake_split_across_many_records() -> None:
    hello = python_client_hello(alpn=["postgresql"])
    split = split_into_records(hello, [1, 2, 3, 50, 7])
    parsed = parse_client_hello(split)
    assert parsed is not None
    assert (parsed.server_name, parsed.alpn_protocols, parsed.size) == (
        "db.example.com",
        (b"postgresql",),
        len(split),
    )
    for end in range(len(split)):
        assert parse_client_hello(split[:end]) is None


def test_bytes_after_the_hello_are_not_consumed() -> None:
    hello = python_client_hello()
    parsed = parse_client_hello(hello + b"\x17\x03\x03\x00\x05early")
    assert parsed is not None
    assert parsed.size == len(hello)


def test_a_large_client_hello_within_the_limit() -> None:
    hello = python_client_hello()
    padded = _with_extension(hello, 0xFFAA, b"\x00" * 20000)  # like a big PQ key share
    split = split_into_records(padded, [16000])
    parsed = parse_client_hello(split)
    assert parsed is not None
    assert parsed.server_name == "db.example.com"
    with pytest.raises(ClientHelloError, match="limit"):
        parse_client_hello(split[:100], limit=8000)  # fails early: the header says too big


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "not a TLS handshake record"),
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", "not a TLS handshake record"),  # Postgres SSLRequest
        (b"\x16\x07", "not a TLS record"),
        (b"\x16\x03\x01\x00\x00", "bad TLS record length 0"),
        (b"\x16\x03\x01\x48\x00", "bad TLS record length"),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "not ClientHello"),
        (b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x03", "truncated ClientHello"),
        (b"\x15\x03\x01\x00\x02\x02\x28", "not a TLS handshake record"),  # an alert
    ],
)
def test_garbage_is_classified_at_once(data: bytes, message: str) -> None:
    with pytest.raises(ClientHelloError, match=message):
        parse_client_hello(data)


def test_garbage_is_classified_from_the_first_byte() -> None:
    with pytest.raises(ClientHelloError):
        parse_client_hello(b"G")


def _with_extension(hello: bytes, kind: int, payload: bytes) -> bytes:
    """Append one extension to a single-record ClientHello, fixing every length."""
    body = bytearray(hello[9:])  # after record header and handshake header
    position = 2 + 32
    position += 1 + body[position]
    position += 2 + int.from_bytes(body[position : position + 2], "big")
    position += 1 + body[position]
    extensions_length = int.from_bytes(body[position : position + 2], "big")
    extension = kind.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload
    body[position : position + 2] = (extensions_length + len(extension)).to_bytes(2, "big")
    body += extension
    handshake = b"\x01" + len(body).to_bytes(3, "big") + bytes(body)
    return b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake


def test_duplicate_extensions_are_rejected() -> None:
    hello = python_client_hello()
    with pytest.raises(ClientHelloError, match="duplicate extension 0"):
        parse_client_hello(_with_extension(hello, 0, b"\x00\x04\x00\x00\x01x"))


@given(st.binary(max_size=2000))
@settings(max_examples=500, deadline=None)
def test_arbitrary_bytes_never_raise_anything_else(data: bytes) -> None:
    with contextlib.suppress(ClientHelloError):
        parse_client_hello(data, limit=1000)


_HELLO = python_client_hello(alpn=["h2"])


@given(st.data())
@settings(deadline=None)
def test_mutated_client_hellos_never_raise_anything_else(data: st.DataObject) -> None:
    hello = bytearray(_HELLO)
    for _ in range(data.draw(st.integers(1, 8))):
        index = data.draw(st.integers(0, len(hello) - 1))
        hello[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(hello)))
    try:
        result = parse_client_hello(bytes(hello[:cut]))
    except ClientHelloError:
        return
    assert result is None or result.size <= cut


@given(st.lists(st.integers(1, 300), max_size=20))
@settings(deadline=None)  # CPU-bound: a busy CI core must not make it flaky
def test_any_record_framing_gives_the_same_result(sizes: list[int]) -> None:
    expected = parse_client_hello(_HELLO)
    assert expected is not None
    split = split_into_records(_HELLO, sizes)
    parsed = parse_client_hello(split)
    assert parsed is not None
    assert (parsed.server_name, parsed.alpn_protocols, parsed.versions) == (
        expected.server_name,
        expected.alpn_protocols,
        expected.versions,
    )


@given(st.integers(10, 4000))
@settings(deadline=None)
def test_never_asks_for_more_than_the_limit(limit: int) -> None:
    """Feeding a prefix that is still "need more" must stay within the cap."""
    split = split_into_records(_with_extension(_HELLO, 0xFFAA, b"\x00" * 5000), [700])
    for end in range(0, len(split), 97):
        try:
            result = parse_client_hello(split[:end], limit=limit)
        except ClientHelloError:
            continue
        assert result is None
        assert end <= limit


def test_too_many_records_is_refused() -> None:
    from l4proxy.protocols.clienthello import MAX_RECORDS

    hello = _with_extension(python_client_hello(), 0xFFAA, b"\x00" * 2000)
    within = split_into_records(hello, [10] * (MAX_RECORDS - 2))
    assert parse_client_hello(within) is not None
    beyond = split_into_records(hello, [1] * (MAX_RECORDS + 1))
    with pytest.raises(ClientHelloError, match=f"more than {MAX_RECORDS} records"):
        parse_client_hello(beyond)


@given(st.lists(st.integers(1, 300), max_size=20), st.integers(1, 400))
@settings(deadline=None)
def test_next_size_never_skips_the_completing_byte(sizes: list[int], cut: int) -> None:
    """Parsing only at next_size() finds the ClientHello exactly when it is complete."""
    from l4proxy.protocols.clienthello import next_size

    framed = split_into_records(_HELLO, sizes)
    prefix = framed[: min(cut, len(framed) - 1)]
    assert parse_client_hello(prefix) is None
    assert len(prefix) < next_size(prefix) <= len(framed)


@pytest.mark.parametrize("sent", [b"/var/run/pgsql", b"under score!!!", b"cafe\xc3\xa9.example"])
def test_a_server_name_that_is_not_a_host_name_counts_as_none(sent: bytes) -> None:
    """libpq < 18 given only ``hostaddr=`` sends its socket directory as SNI; OpenSSL and
    PostgreSQL ignore such a name, and so do we (no SNI: default certificate and route)."""
    hello = python_client_hello("db.example.com")
    assert len(sent) == len(b"db.example.com")  # the same length: no lengths to patch
    patched = hello.replace(b"db.example.com", sent)
    parsed = parse_client_hello(patched)
    assert parsed is not None
    assert parsed.server_name is None
