"""Who may connect, decided from the client's address alone (issue #10), without I/O.

The admit step asks two things before any byte is read or any task started:

* :class:`AccessList`: ``allow``/``deny`` CIDRs, IPv4 and IPv6; deny wins; without an
  allow list everything not denied is allowed; an IPv4-mapped IPv6 address
  (``::ffff:1.2.3.4``, what a dual-stack socket reports) is matched as IPv4.
* :class:`ClientLimits`: open connections per client and new connections per second
  per client (a token bucket whose burst is the rate), IPv6 clients grouped by a prefix
  (default /64: one subscriber usually has a whole /64).

Both work on integers, not ``ipaddress`` objects: an address is parsed once per
connection (:func:`parse_client`, with ``inet_pton``: a fifteenth of ``ipaddress``'s
cost) and each check is a few integer operations. The per-client table is
bounded: a client's entry goes when its last connection closes and its bucket is full
again, and past ``capacity`` entries the longest-idle ones without open connections
are dropped first (they lose only how far their bucket had refilled, in the client's
favour). Entries with open connections are bounded by the open connections.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import OrderedDict

from .record import Outcome

__all__ = ["AccessList", "ClientLimits", "client_key", "parse_client"]

_MAPPED_PREFIX = 0xFFFF << 32  # ::ffff:0:0/96
_V4_BITS, _V6_BITS = 32, 128
#: Default bound on tracked clients: an entry takes about 500 bytes at the peak (its key,
#: its state, its places in two dicts as they grow), so the table stays under 64 MiB
#: (tests/test_admission.py measures it).
DEFAULT_CAPACITY = 100_000


def parse_client(text: str) -> tuple[int, int]:
    """(bits, value) of an IP address as the kernel reports it, for
    :meth:`AccessList.permits_parsed` and :func:`key_of`; an IPv4-mapped IPv6 address
    comes back as IPv4, an IPv6 zone is dropped. Raises ``ValueError`` for what is not
    an IP address."""
    try:
        if ":" not in text:
            return _V4_BITS, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, text.partition("%")[0]), "big")
    except OSError:
        raise ValueError(f"not an IP address: {text!r}") from None
    if value >> 32 == 0xFFFF:
        return _V4_BITS, value & 0xFFFFFFFF
    return _V6_BITS, value


def key_of(parsed: tuple[int, int], ipv6_prefix: int = 64) -> int:
    """The key a client's limits are kept under: its IPv4 address, or its IPv6 address
    cut to ``ipv6_prefix`` bits (marked by bit 128, so the two never meet). One int, not
    a tuple: the table holds up to ``capacity`` of them."""
    bits, value = parsed
    if bits == _V6_BITS:
        return 1 << _V6_BITS | value >> (_V6_BITS - ipv6_prefix)
    return value


def client_key(text: str, ipv6_prefix: int = 64) -> int:
    """:func:`key_of` an address given as text."""
    return key_of(parse_client(text), ipv6_prefix)


class AccessList:
    """``allow``/``deny`` CIDRs (``"10.0.0.0/8"``, ``"2001:db8::/32"``, a bare address)."""

    __slots__ = ("_allow", "_deny", "allow_all")

    def __init__(self, allow: tuple[str, ...] = (), deny: tuple[str, ...] = ()) -> None:
        self._allow = _networks(allow)
        self._deny = _networks(deny)
        self.allow_all = not allow and not deny

    def permits(self, address: str) -> bool:
        return self.allow_all or self.permits_parsed(parse_client(address))

    def permits_parsed(self, parsed: tuple[int, int]) -> bool:
        """:meth:`permits` for an address :func:`parse_client` parsed."""
        if self.allow_all:
            return True
        bits, value = parsed
        if _matches(self._deny, bits, value):
            return False
        return (not self._allow[0] and not self._allow[1]) or _matches(self._allow, bits, value)


def _networks(cidrs: tuple[str, ...]) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per family (v4, v6): (mask, network) pairs. A mapped-IPv4 network counts as IPv4."""
    v4: list[tuple[int, int]] = []
    v6: list[tuple[int, int]] = []
    for cidr in cidrs:
        network = ipaddress.ip_network(cidr, strict=False)
        value, prefix = int(network.network_address), network.prefixlen
        if network.version == 6 and value >> 32 == 0xFFFF and prefix >= 96:
            value, prefix, network_bits = value & 0xFFFFFFFF, prefix - 96, _V4_BITS
        else:
            network_bits = network.max_prefixlen
        mask = ((1 << prefix) - 1) << (network_bits - prefix)
        (v4 if network_bits == _V4_BITS else v6).append((mask, value & mask))
    return tuple(v4), tuple(v6)


def _matches(networks: tuple[tuple[tuple[int, int], ...], ...], bits: int, value: int) -> bool:
    return any(value & mask == network for mask, network in networks[bits == _V6_BITS])


class _Client:
    __slots__ = ("open", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.open = 0
        self.tokens = tokens
        self.stamp = stamp


class ClientLimits:
    """Open connections and new connections per second, per client key.

    ``admit(key, now, max_open, rate)`` returns ``None`` and counts the connection as
    open, or the refusal; ``release(key, now, rate)`` when an admitted connection ends.
    The limits come with each call (from the listener's current config), so a reload
    changes them while the counts and buckets carry over. ``now`` is any monotonic
    clock in seconds (trio's in the proxy, a number in tests).
    """

    __slots__ = ("_clients", "_idle", "capacity")

    def __init__(self, *, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._clients: dict[int, _Client] = {}
        #: Clients without open connections, oldest first: dropped when their bucket
        #: is full again, or first when the table is at its capacity.
        self._idle: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def open(self, key: int) -> int:
        """Connections of this client open right now."""
        client = self._clients.get(key)
        return 0 if client is None else client.open

    def admit(self, key: int, now: float, max_open: int | None, rate: int | None) -> Outcome | None:
        self._forget_refilled(now, rate)
        client = self._clients.get(key)
        if client is None:
            if len(self._clients) >= self.capacity:
                self._make_room()
            client = _Client(float(rate or 0), now)
            self._clients[key] = client
        elif rate is not None:
            client.tokens = min(rate, client.tokens + (now - client.stamp) * rate)
            client.stamp = now
        if max_open is not None and client.open >= max_open:
            return Outcome.LIMIT_PER_IP
        if rate is not None:
            if client.tokens < 1:
                self._keep_if_idle(key, client, rate)
                return Outcome.RATE_LIMITED
            client.tokens -= 1
        client.open += 1
        self._idle.pop(key, None)
        return None

    def release(self, key: int, now: float, rate: int | None) -> None:
        client = self._clients.get(key)
        if client is None or client.open == 0:
            return
        client.open -= 1
        if client.open == 0:
            self._keep_if_idle(key, client, rate)
            self._forget_refilled(now, rate)

    def _keep_if_idle(self, key: int, client: _Client, rate: int | None) -> None:
        if client.open == 0:
            if rate is None:  # nothing to remember
                del self._clients[key]
                self._idle.pop(key, None)
            else:
                self._idle[key] = None
                self._idle.move_to_end(key)

    def _forget_refilled(self, now: float, rate: int | None) -> None:
        """Drop idle clients whose bucket is full again, oldest first, a few per call."""
        idle, clients = self._idle, self._clients
        for _ in range(4):
            if not idle:
                return
            key = next(iter(idle))
            client = clients[key]
            if rate is not None and client.tokens + (now - client.stamp) * rate < rate:
                return  # stop at the first that is not: the order is when they went idle
            del idle[key]
            del clients[key]

    def _make_room(self) -> None:
        """At capacity: drop the longest-idle client (its bucket refills, a leniency)."""
        if self._idle:
            key, _ = self._idle.popitem(last=False)
            del self._clients[key]
