"""The sans-IO PROXY protocol codec (issue #10): round trips under hypothesis, the spec's
own examples, and hostile bytes (truncated, oversized, malformed) that must give a
ProxyHeaderError and nothing else."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

from l4proxy.errors import ProxyHeaderError
from l4proxy.protocols.proxyheader import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V1_MAX_SIZE,
    V2_MAX_SIZE,
    V2_SIGNATURE,
    Command,
    InetEndpoint,
    ProxyHeader,
    UnixEndpoint,
    crc32c,
    encode_v1,
    encode_v2,
    encode_v2_inet,
    parse_proxy_header,
    ssl_value,
    tlv,
)

ports = st.integers(0, 0xFFFF)
ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))
inet4 = st.builds(InetEndpoint, ipv4, ports)
inet6 = st.builds(InetEndpoint, ipv6, ports)
unix = st.builds(UnixEndpoint, st.binary(max_size=108).map(lambda b: b.replace(b"\0", b"x")))
pairs = st.one_of(
    st.tuples(inet4, inet4), st.tuples(inet6, inet6), st.tuples(unix, unix), st.just((None, None))
)
tlvs = st.lists(
    st.tuples(
        st.integers(0, 255).filter(lambda t: t not in (PP2_TYPE_CRC32C, PP2_TYPE_SSL)),
        st.binary(max_size=300),
    ),
    max_size=6,
).map(tuple)


def _parse_in_pieces(data: bytes, cuts: list[int]) -> ProxyHeader:
    """Feed growing prefixes as a reader would; every proper prefix must say "more"."""
    for cut in sorted({min(c, len(data) - 1) for c in cuts}):
        assert parse_proxy_header(data[:cut]) is None, cut
    parsed = parse_proxy_header(data)
    assert parsed is not None
    return parsed


@given(st.one_of(st.tuples(inet4, inet4), st.tuples(inet6, inet6)), st.binary(max_size=50))
def test_v1_round_trips(pair: tuple[InetEndpoint, InetEndpoint], payload: bytes) -> None:
    header = encode_v1(*pair)
    assert len(header) <= V1_MAX_SIZE
    parsed = parse_proxy_header(header + payload)
    assert parsed is not None
    assert (parsed.version, parsed.command, parsed.source, parsed.destination) == (
        1, Command.PROXY, *pair
    )  # fmt: skip
    assert parsed.size == len(header)


def test_v1_worst_case_is_107_bytes() -> None:
    """The spec's worst case is an UNKNOWN line carrying the longest addresses."""
    longest = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    header = encode_v1(InetEndpoint(longest, 65535), InetEndpoint(longest, 65535))
    assert len(header) == 104
    unknown = header.replace(b"TCP6", b"UNKNOWN")
    assert len(unknown) == V1_MAX_SIZE
    assert parse_proxy_header(unknown) == ProxyHeader(1, Command.PROXY, None, None, size=107)
    with pytest.raises(ProxyHeaderError, match="without CRLF"):
        parse_proxy_header(unknown.replace(b"65535 65535", b"65535 655355"))


def test_v1_unknown_and_mixed_families() -> None:
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert encode_v1(InetEndpoint("1.2.3.4", 1), InetEndpoint("::1", 2)) == b"PROXY UNKNOWN\r\n"
    parsed = parse_proxy_header(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nGET /")
    assert parsed == ProxyHeader(1, Command.PROXY, None, None, size=35)


def test_the_specs_v1_example() -> None:
    parsed = parse_proxy_header(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1")
    assert parsed is not None
    assert parsed.source == InetEndpoint("192.168.0.1", 56324)
    assert parsed.destination == InetEndpoint("192.168.0.11", 443)
    assert parsed.size == 47


@given(pairs, tlvs, st.booleans(), st.booleans(), st.lists(st.integers(0, 600), max_size=5))
@settings(max_examples=300)
def test_v2_round_trips_in_any_pieces(
    pair: tuple[object, object],
    extensions: tuple[tuple[int, bytes], ...],
    local: bool,
    checksum: bool,
    cuts: list[int],
) -> None:
    source, destination = pair
    command = Command.LOCAL if local else Command.PROXY
    header = encode_v2(source, destination, extensions, command=command, checksum=checksum)  # type: ignore[arg-type]
    parsed = _parse_in_pieces(header + b"payload", [c for c in cuts if c < len(header)])
    assert parsed.version == 2
    assert parsed.command is command
    assert parsed.size == len(header)
    if source is None:
        assert (parsed.source, parsed.destination, parsed.tlvs) == (None, None, ())
        return
    expected = (None, None) if local else (source, destination)
    assert (parsed.source, parsed.destination) == expected
    assert parsed.tlvs[: len(extensions)] == extensions
    assert len(parsed.tlvs) == len(extensions) + checksum


def test_v2_typed_tlvs() -> None:
    value = ssl_value(
        version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", common_name="alice",
        client_certificate=True,
    )  # fmt: skip
    header = encode_v2(
        InetEndpoint("2001:db8::1", 40000),
        InetEndpoint("2001:db8::2", 5432),
        ((PP2_TYPE_ALPN, b"postgresql"), (PP2_TYPE_AUTHORITY, b"db1.example"),
         (PP2_TYPE_SSL, value), (PP2_TYPE_UNIQUE_ID, b"\x01" * 16)),
        checksum=True,
    )  # fmt: skip
    parsed = parse_proxy_header(header)
    assert parsed is not None
    assert parsed.alpn == b"postgresql"
    assert parsed.authority == "db1.example"
    assert parsed.unique_id == b"\x01" * 16
    ssl = parsed.ssl
    assert ssl is not None
    assert (ssl.client, ssl.verify, ssl.version, ssl.cipher, ssl.common_name) == (
        0x03, 0, "TLSv1.3", "TLS_AES_128_GCM_SHA256", "alice"
    )  # fmt: skip


def test_a_v2_local_health_check() -> None:
    """What a load balancer's health check sends: LOCAL, UNSPEC, nothing else."""
    header = V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert parse_proxy_header(header) == ProxyHeader(2, Command.LOCAL, None, None, size=16)


def test_crc32c_known_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value


def _v2(fixed: bytes, body: bytes) -> bytes:
    return V2_SIGNATURE + fixed + len(body).to_bytes(2, "big") + body


_INET4_BODY = bytes(4) + bytes(4) + bytes(4)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "not a PROXY protocol header"),
        (b"PROXX TCP4", "not a PROXY protocol header"),
        (b"\r\n\r\n\x00\r\nQUIX\n", "not a PROXY protocol header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "without CRLF"),
        (b"PROXY " + b"A" * 200, "without CRLF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "malformed"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "malformed"),
        (b"PROXY TCP4 ::1 ::2 1 2\r\n", "bad address"),
        (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "bad address"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n", "not ASCII"),
        (_v2(b"\x11\x11", _INET4_BODY), "version 1"),
        (_v2(b"\x22\x11", _INET4_BODY), "command 2"),
        (_v2(b"\x21\x41", _INET4_BODY), "family byte"),
        (_v2(b"\x21\x13", _INET4_BODY), "family byte"),
        (_v2(b"\x21\x11", bytes(11)), "too short for its addresses"),
        (_v2(b"\x21\x21", bytes(12)), "too short for its addresses"),
        (_v2(b"\x21\x11", _INET4_BODY + b"\x01\x00"), "truncated"),
        (_v2(b"\x21\x11", _INET4_BODY + b"\x01\x00\x05abc"), "longer than the header"),
        (_v2(b"\x21\x11", _INET4_BODY + b"\x03\x00\x04abcd"), "fails its CRC32C"),
        (_v2(b"\x21\x11", _INET4_BODY + b"\x03\x00\x02ab"), "CRC32C TLV not 4 bytes"),
        (_v2(b"\x21\x11", _INET4_BODY + b"\x20\x00\x02ab"), "SSL TLV shorter"),
        (_v2(b"\x21\x11", _INET4_BODY + b"\x20\x00\x06\x01\x00\x00\x00\x00\x21"), "sub-TLV"),
        (V2_SIGNATURE + b"\x21\x11\x10\x00", "over the 4096 cap"),
    ],
)
def test_malformed_headers_are_refused_with_their_own_error(data: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=message):
        parse_proxy_header(data)


def test_an_oversized_v2_length_is_refused_from_its_first_16_bytes() -> None:
    """No waiting for (and buffering) a header that would be over the cap."""
    fixed = V2_SIGNATURE + b"\x21\x11" + (V2_MAX_SIZE - 15).to_bytes(2, "big")
    with pytest.raises(ProxyHeaderError, match="over the"):
        parse_proxy_header(fixed)
    at_cap = V2_SIGNATURE + b"\x21\x11" + (V2_MAX_SIZE - 16).to_bytes(2, "big")
    assert parse_proxy_header(at_cap) is None  # exactly at the cap: wait for the rest


@given(st.one_of(st.tuples(inet4, inet4), st.tuples(inet6, inet6)), tlvs)
def test_the_fast_inet_encoder_writes_what_encode_v2_writes(
    pair: tuple[InetEndpoint, InetEndpoint], extensions: tuple[tuple[int, bytes], ...]
) -> None:
    source, destination = pair
    fast = encode_v2_inet(
        ipaddress.ip_address(source.host).packed,
        ipaddress.ip_address(destination.host).packed,
        source.port,
        destination.port,
        b"".join(tlv(kind, value) for kind, value in extensions),
    )
    assert fast == encode_v2(source, destination, extensions)


def test_encoding_refuses_what_it_could_not_send() -> None:
    with pytest.raises(ValueError, match="cap"):
        encode_v2(None, None, ((PP2_TYPE_UNIQUE_ID, bytes(V2_MAX_SIZE)),))
    with pytest.raises(ValueError, match="cap"):
        encode_v2_inet(bytes(4), bytes(4), 1, 2, tlv(PP2_TYPE_UNIQUE_ID, bytes(V2_MAX_SIZE)))
    with pytest.raises(ValueError, match="both 4"):
        encode_v2_inet(bytes(4), bytes(16), 1, 2)
    with pytest.raises(ValueError, match="108"):
        encode_v2(UnixEndpoint(b"x" * 109), UnixEndpoint(b"y"))


@given(st.binary(max_size=300))
@settings(max_examples=1000)
def test_any_bytes_give_a_header_more_or_our_error(data: bytes) -> None:
    _check_contract(data)


@given(
    st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE]),
    st.binary(max_size=300),
)
@settings(max_examples=1000)
def test_valid_starts_then_any_bytes_keep_the_contract(start: bytes, rest: bytes) -> None:
    _check_contract(start + rest)


def _check_contract(data: bytes) -> None:
    try:
        parsed = parse_proxy_header(data)
    except ProxyHeaderError:
        return
    if parsed is None:  # "more" is only said while under the caps
        assert len(data) < (V1_MAX_SIZE if data[:1] == b"P" else V2_MAX_SIZE)
    else:
        assert 0 < parsed.size <= len(data)
        _ = parsed.ssl  # cannot fail once parsed
