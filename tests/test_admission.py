"""The admit step's decisions without I/O (issue #10): access lists and per-client
limits, including the bound on the per-client table."""

from __future__ import annotations

import ipaddress
import tracemalloc

import pytest
from hypothesis import given, strategies as st

from l4proxy.admission import AccessList, ClientLimits, client_key, parse_client
from l4proxy.record import Outcome


@pytest.mark.parametrize(
    ("allow", "deny", "address", "permitted"),
    [
        ((), (), "203.0.113.9", True),
        ((), ("203.0.113.0/24",), "203.0.113.9", False),
        ((), ("203.0.113.0/24",), "203.0.114.9", True),
        (("10.0.0.0/8",), (), "10.1.2.3", True),
        (("10.0.0.0/8",), (), "11.1.2.3", False),
        (("10.0.0.0/8",), ("10.9.0.0/16",), "10.9.1.1", False),  # deny wins
        (("10.0.0.0/8",), (), "::ffff:10.1.2.3", True),  # mapped IPv6 is matched as IPv4
        ((), ("10.0.0.0/8",), "::ffff:10.1.2.3", False),
        ((), ("::ffff:10.0.0.0/104",), "10.1.2.3", False),  # and a mapped CIDR too
        (("2001:db8::/32",), (), "2001:db8:1::5", True),
        (("2001:db8::/32",), (), "2001:db9::5", False),
        (("2001:db8::/32",), (), "10.1.2.3", False),
        (("10.0.0.0/8",), (), "fe80::1%eth0", False),
        (("127.0.0.1",), (), "127.0.0.1", True),  # a bare address is a /32
        (("0.0.0.0/0",), ("::/0",), "1.2.3.4", True),
        (("0.0.0.0/0",), ("::/0",), "2001:db8::1", False),
    ],
)
def test_access_list(
    allow: tuple[str, ...], deny: tuple[str, ...], address: str, permitted: bool
) -> None:
    assert AccessList(allow, deny).permits(address) is permitted


@given(st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 2**128 - 1)), st.booleans())
def test_parse_client_agrees_with_ipaddress(value: int, six: bool) -> None:
    """The fast parse (``inet_pton``) gives what ``ipaddress`` would, in the text forms
    the kernel reports: compressed IPv6, IPv4-mapped IPv6 matched as IPv4."""
    address = (
        ipaddress.IPv6Address(value) if six or value >= 2**32 else ipaddress.IPv4Address(value)
    )
    expected = (address.version == 6 and address.ipv4_mapped) or address
    bits = 32 if expected.version == 4 else 128
    assert parse_client(str(address)) == (bits, int(expected))


@pytest.mark.parametrize("junk", ["", "localhost", "1.2.3", "1.2.3.256", "::g", "01.2.3.4"])
def test_parse_client_refuses_what_is_not_an_address(junk: str) -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        parse_client(junk)


def test_ipv6_clients_are_grouped_by_prefix() -> None:
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9")
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
    assert client_key("2001:db8:1:2::1", 128) != client_key("2001:db8:1:2::2", 128)
    assert client_key("::ffff:192.0.2.1") == client_key("192.0.2.1")


def test_open_connections_per_client() -> None:
    limits = ClientLimits()
    a, b = client_key("192.0.2.1"), client_key("192.0.2.2")
    assert limits.admit(a, 0, 2, None) is None
    assert limits.admit(a, 0, 2, None) is None
    assert limits.admit(a, 0, 2, None) is Outcome.LIMIT_PER_IP
    assert limits.admit(b, 0, 2, None) is None  # another client is not affected
    limits.release(a, 0, None)
    assert limits.admit(a, 0, 2, None) is None
    assert limits.open(a) == 2
    for _ in range(2):
        limits.release(a, 0, None)
    limits.release(b, 0, None)
    assert len(limits) == 0  # nothing kept once a client has no open connections


def test_rate_is_a_token_bucket_with_burst_equal_to_the_rate() -> None:
    limits = ClientLimits()
    key = client_key("192.0.2.1")
    outcomes = [limits.admit(key, 0.0, None, 5) for _ in range(7)]
    assert outcomes == [None] * 5 + [Outcome.RATE_LIMITED] * 2
    assert limits.admit(key, 0.1, None, 5) is Outcome.RATE_LIMITED  # half a token back
    assert limits.admit(key, 0.2, None, 5) is None  # one token back
    for _ in range(6):
        limits.release(key, 0.2, 5)
    assert len(limits) == 1  # its bucket is not full yet: remembered
    limits.admit(client_key("192.0.2.2"), 1.5, None, 5)  # a later call forgets the refilled one
    assert len(limits) == 1


def test_a_client_is_forgotten_when_its_bucket_is_full_again() -> None:
    limits = ClientLimits()
    key = client_key("2001:db8::1")
    assert limits.admit(key, 0, 3, 10) is None
    limits.release(key, 0, 10)
    limits.release(key, 5, 10)  # a release of nothing open changes nothing
    limits.admit(client_key("2001:db8:0:1::1"), 5, 3, 10)
    assert len(limits) == 1


@pytest.mark.slow
def test_a_million_distinct_clients_stay_under_the_memory_cap() -> None:
    """A flood of distinct addresses (each one connection, then gone) through a limiter
    with both limits on: the table stays at its capacity and under 64 MiB."""
    limits = ClientLimits(capacity=100_000)
    tracemalloc.start()
    try:
        now = 0.0
        for number in range(1_000_000):
            key = number
            now += 1e-5  # 100,000 new clients a second: buckets never refill in time
            assert limits.admit(key, now, 4, 1) is None
            limits.release(key, now, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(limits) <= 100_000
    assert peak < 64 * 2**20, peak
