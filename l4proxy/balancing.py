"""Which backend to try next: pool state and the choice of backend (sans-IO).

A pool is plain synchronous state owned by the running proxy, not by the frozen config.
Connecting (sockets, timeouts, failover) is :mod:`l4proxy.connect`'s job; this module
only orders the candidates: :meth:`BackendPool.order` gives one connection's attempts,
the chosen backend first and every other one after it, each once, primaries before
backups (a backup is tried only when no primary took the connection).

The methods (``balance``, issue #11):

* ``round-robin``: in turn; with weights, nginx's smooth weighted round-robin (a
  backend of weight 3 gets 3 of every 4 connections next to one of weight 1, spread
  out rather than in a burst).
* ``least-conn``: the fewest open connections through this process for its weight,
  ties broken in turn.
* ``random``: the power of two choices: two backends drawn at random (by weight), the
  one with fewer open connections for its weight taken.
* ``source-hash``: rendezvous hashing of the client address: each client gets the
  backend with its highest score (weighted), so removing a backend moves only its
  clients, and the scores depend on the backends' names alone, so a client keeps its
  backend across reloads and processes. A client without an address (a Unix socket)
  goes round-robin.

The caller tells the pool when a connection to a backend opens and closes
(:meth:`BackendPool.opened`, :meth:`BackendPool.closed`), whatever the method: the
methods that balance on it read the count, and :meth:`Proxy.stats` reports it.

Passive health: the caller also reports each connect attempt
(:meth:`BackendPool.failed`, :meth:`BackendPool.succeeded`). A failed connect marks
the backend down for a back-off, 1 s at first and doubling each time the try after
its back-off fails too, up to 30 s (nginx's ``max_fails = 1``: a backend that drops SYNs
would otherwise cost each new client a whole connect timeout); a down backend is left
out of :meth:`~BackendPool.order` until its back-off has passed, then tried again by
the next connection; a successful connect marks it up and resets the back-off. When
every backend is down, ``order`` is empty: the connection fails at once.

Active health (:mod:`l4proxy.healthcheck`, which runs the checks): failed checks
*hold* a backend down (:meth:`BackendPool.hold`): left out with no passive retry,
whatever connects do, until passing checks :meth:`~BackendPool.release` it.
"""

from __future__ import annotations

import enum
import hashlib
import math
import random
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Container, Sequence

__all__ = [
    "BACKOFF_MAX",
    "BACKOFF_MIN",
    "BackendPool",
    "BackendState",
    "Balance",
    "HealthBoard",
    "stable_seed",
]

#: A failed backend's first back-off, and the most it doubles to.
BACKOFF_MIN = 1.0
BACKOFF_MAX = 30.0

#: ``down_until`` of a backend held down by failed health checks: no back-off ends it.
HELD = math.inf

T = TypeVar("T")

_M64 = (1 << 64) - 1


class Balance(enum.StrEnum):
    """How a pool picks the backend a connection tries first."""

    ROUND_ROBIN = "round-robin"
    LEAST_CONN = "least-conn"
    RANDOM = "random"
    SOURCE_HASH = "source-hash"


def stable_seed(name: str) -> int:
    """A backend's 64-bit hashing seed from its name: the same in every process and
    across reloads (Python's ``hash`` of a string is not)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")


def _mix(value: int) -> int:
    """splitmix64's finaliser: 64 well-mixed bits from 64 (the rendezvous score)."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _M64
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _M64
    return value ^ (value >> 31)


def _fold(client: int) -> int:
    """A client key (up to 129 bits: an IPv6 address is marked by bit 128) in 64."""
    return (client ^ (client >> 64) ^ (client >> 128) * 0x9E3779B97F4A7C15) & _M64


class HealthBoard:
    """How many backends are marked down, over every pool built on it: one per proxy.

    Pools built by a reload share their predecessors' per-backend state, and a backend
    goes down or up once whichever pool saw it, so one count stays true for all of
    them; while it is 0 no pool filters its order (the fast path).
    """

    __slots__ = ("down",)

    def __init__(self) -> None:
        self.down = 0


class _Cell:
    """One backend's state in a pool, shared with the pools that succeed it."""

    __slots__ = ("backoff", "current", "down_since", "down_until", "open", "reason", "retired")

    def __init__(self) -> None:
        self.open = 0  # connections open to it through the pool
        self.current = 0  # smooth weighted round-robin's running score
        self.down_until = 0.0  # 0: up; HELD: until health checks pass
        self.backoff = 0.0  # the last back-off; 0: none yet
        self.retired = False  # gone from the configuration: its health no longer counts
        self.down_since = 0.0  # while down: the clock when it went down
        self.reason = ""  # while down: why


class BackendState(Generic[T]):
    """One backend of a pool as :meth:`BackendPool.states` reports it (a snapshot)."""

    __slots__ = ("backend", "backup", "down_since", "down_until", "open", "reason", "weight")

    def __init__(self, backend: T, weight: int, backup: bool, cell: _Cell) -> None:
        self.backend = backend
        self.weight = weight
        self.backup = backup
        self.open = cell.open
        #: 0.0 while up; ``math.inf`` while held down by health checks.
        self.down_until = cell.down_until
        self.down_since = cell.down_since
        self.reason = cell.reason


class BackendPool(Generic[T]):
    """A pool's backends and the state its balancing method keeps.

    Example:
        >>> pool = BackendPool(("a", "b", "c"))
        >>> pool.order(), pool.order()
        (('a', 'b', 'c'), ('b', 'c', 'a'))
        >>> weighted = BackendPool(("a", "b"), weights=(3, 1))
        >>> "".join(weighted.order()[0] for _ in range(8))
        'aabaaaba'
    """

    __slots__ = (
        "_backups",
        "_cells",
        "_cursor",
        "_equal",
        "_index",
        "_names",
        "_primaries",
        "_random",
        "_seeds",
        "_weights",
        "backends",
        "balance",
        "board",
        "empty_reported",
    )

    def __init__(
        self,
        backends: tuple[T, ...],
        *,
        weights: Sequence[int] | None = None,
        backups: Sequence[bool] | None = None,
        balance: Balance = Balance.ROUND_ROBIN,
        names: Sequence[str] | None = None,
        rng: random.Random | None = None,
        board: HealthBoard | None = None,
    ) -> None:
        """``weights`` (default 1 each), ``backups`` (default none) and ``names`` (the
        hashing identity, default ``str`` of each backend) run parallel to ``backends``."""
        count = len(backends)
        if not count:
            raise ValueError("a backend pool needs at least one backend")
        self.backends = backends
        self.balance = Balance(balance)
        self._weights = tuple(weights) if weights is not None else (1,) * count
        flags = tuple(backups) if backups is not None else (False,) * count
        if len(self._weights) != count or len(flags) != count:
            raise ValueError("weights and backups must run parallel to the backends")
        if any(weight < 1 for weight in self._weights):
            raise ValueError("weights must be at least 1")
        self._primaries = tuple(i for i in range(count) if not flags[i])
        self._backups = tuple(i for i in range(count) if flags[i])
        self._equal = len(set(self._weights)) == 1 and not self._backups
        # A backend listed twice is two entries of the order sharing one state.
        self._index: dict[T, int] = {}
        for i, backend in enumerate(backends):
            self._index.setdefault(backend, i)
        self._cells = [_Cell() for _ in range(count)]
        for i, backend in enumerate(backends):
            self._cells[i] = self._cells[self._index[backend]]
        self._cursor = 0
        #: Counts the backends marked down, of every pool sharing it (the proxy's).
        self.board = board if board is not None else HealthBoard()
        #: When a connection last found every backend down and it was logged.
        self.empty_reported = -math.inf
        self._random = rng or random.Random()
        self._names = tuple(names if names is not None else [str(b) for b in backends])
        self._seeds = tuple(stable_seed(label) for label in self._names)

    # ------------------------------------------------------------------ choosing

    def order(self, client: int | None = None, now: float = 0.0) -> tuple[T, ...]:
        """The backends in the order this connection should try them, down ones left
        out (empty when all are down). ``client``: the client's key
        (:func:`l4proxy.admission.key_of` with a full-length prefix), for
        ``source-hash``; ``now``: the clock :meth:`failed` was given."""
        balance = self.balance
        if balance is Balance.ROUND_ROBIN and self._equal and not self.board.down:  # cheaply
            start = self._cursor
            backends = self.backends
            self._cursor = (start + 1) % len(backends)
            return backends if start == 0 else backends[start:] + backends[:start]
        primaries, backups = self._primaries, self._backups
        if self.board.down:
            cells = self._cells
            primaries = tuple(i for i in primaries if cells[i].down_until <= now)
            backups = tuple(i for i in backups if cells[i].down_until <= now)
        indexes = self._ranked(primaries, client)
        if backups:
            indexes += self._ranked(backups, client)
        backends = self.backends
        return tuple(backends[i] for i in indexes)

    def _ranked(self, group: tuple[int, ...], client: int | None) -> list[int]:
        """``group``'s indexes: the chosen one first, then the rest to fail over to."""
        if not group:
            return []
        balance = self.balance
        if balance is Balance.SOURCE_HASH and client is not None:
            return self._by_score(group, client)
        if len(group) == 1:
            return [group[0]]
        if balance is Balance.LEAST_CONN:
            first = self._least_loaded(group)
        elif balance is Balance.RANDOM:
            first = self._two_choices(group)
        else:
            first = self._smooth_weighted(group)
        at = group.index(first)
        return [*group[at:], *group[:at]]

    def _smooth_weighted(self, group: tuple[int, ...]) -> int:
        """nginx's smooth weighted round-robin: add each weight to its score, take the
        highest score, take the group's total weight off the one taken."""
        cells, weights = self._cells, self._weights
        best, total = group[0], 0
        for i in group:
            cells[i].current += weights[i]
            total += weights[i]
            if cells[i].current > cells[best].current:
                best = i
        cells[best].current -= total
        return best

    def _load(self, i: int) -> float:
        return self._cells[i].open / self._weights[i]

    def _least_loaded(self, group: tuple[int, ...]) -> int:
        """The fewest open connections for its weight; ties in turn."""
        size = len(group)
        start = self._cursor % size
        self._cursor = start + 1
        best = group[start]
        best_load = self._load(best)
        for step in range(1, size):
            i = group[(start + step) % size]
            load = self._load(i)
            if load < best_load:
                best, best_load = i, load
        return best

    def _two_choices(self, group: tuple[int, ...]) -> int:
        """Two distinct backends drawn by weight; the less loaded of the two."""
        weights = [self._weights[i] for i in group]
        first = self._random.choices(range(len(group)), weights)[0]
        rest = [j for j in range(len(group)) if j != first]
        second = self._random.choices(rest, [weights[j] for j in rest])[0]
        a, b = group[first], group[second]
        return b if self._load(b) < self._load(a) else a

    def _by_score(self, group: tuple[int, ...], client: int) -> list[int]:
        """Rendezvous (highest random weight) hashing, weighted: every backend's score
        for this client, highest first. With equal weights the 64-bit hash is the
        score; otherwise ``-weight / ln(u)`` with ``u`` the hash in (0, 1), which gives
        each backend its weight's share of clients."""
        key = _fold(client)
        seeds, weights = self._seeds, self._weights
        if len({weights[i] for i in group}) == 1:
            return sorted(group, key=lambda i: _mix(key ^ seeds[i]), reverse=True)

        def score(i: int) -> float:
            unit = ((_mix(key ^ seeds[i]) >> 11) + 0.5) / 2.0**53
            return -weights[i] / math.log(unit)

        return sorted(group, key=score, reverse=True)

    # ------------------------------------------------------------------ health

    def failed(self, backend: T, now: float, reason: str = "") -> float | None:
        """A connect to ``backend`` failed at ``now`` (for ``reason``): down for its
        back-off (doubled if this was the try after a back-off). Returns the back-off if
        this marked it down (it was up), else ``None``."""
        i = self._index.get(backend)
        if i is None:
            return None
        cell = self._cells[i]
        if cell.retired or cell.down_until > now:
            return None  # down already: an attempt that started before it was marked
        was_up = cell.down_until == 0.0
        cell.backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, 2 * cell.backoff))
        cell.down_until = now + cell.backoff
        cell.reason = reason
        if was_up:
            cell.down_since = now
            self.board.down += 1
            return cell.backoff
        return None

    def succeeded(self, backend: T) -> bool:
        """A connect to ``backend`` succeeded: up, its back-off reset. ``True`` if this
        marked it up (it was down). A backend held down by health checks stays down:
        only checks release it (a connect that started before the hold may still work,
        and a check may ask more of a backend than accepting connections)."""
        i = self._index.get(backend)
        if i is None:
            return False
        cell = self._cells[i]
        cell.backoff = 0.0
        if cell.down_until == 0.0 or cell.down_until == HELD or cell.retired:
            return False
        cell.down_until = 0.0
        self.board.down -= 1
        return True

    def hold(self, backend: T, now: float, reason: str) -> bool | None:
        """Health checks failed: ``backend`` is down until :meth:`release`, with no
        passive retry. ``True`` if it was up, ``False`` if it was down for a back-off
        (now held), ``None`` if nothing changed (held already, retired or unknown)."""
        i = self._index.get(backend)
        if i is None:
            return None
        cell = self._cells[i]
        if cell.retired or cell.down_until == HELD:
            return None
        was_up = cell.down_until == 0.0
        cell.down_until = HELD
        cell.reason = reason
        if was_up:
            cell.down_since = now
            self.board.down += 1
        return was_up

    def release(self, backend: T) -> bool:
        """Health checks passed: ``backend`` is up, whether checks held it down or a
        failed connect did. ``True`` if it was down."""
        i = self._index.get(backend)
        if i is None:
            return False
        cell = self._cells[i]
        if cell.retired or cell.down_until == 0.0:
            return False
        cell.down_until = cell.backoff = 0.0
        self.board.down -= 1
        return True

    def unhold(self, backend: T, now: float) -> None:
        """Health checks of ``backend`` stopped (a reload turned them off): a hold
        becomes an ended back-off, so the next connection tries it (passive health)."""
        i = self._index.get(backend)
        if i is not None and self._cells[i].down_until == HELD:
            self._cells[i].down_until = now

    def is_down(self, backend: T) -> bool:
        """Whether ``backend`` is marked down (held, or in or after a back-off)."""
        i = self._index.get(backend)
        return i is not None and self._cells[i].down_until != 0.0

    def identity(self, backend: T) -> object:
        """What stands for ``backend``'s state: equal (``is``) for the pools that share
        it (after a reload) and for a backend listed twice in this pool."""
        return self._cells[self._index[backend]]

    def states(self) -> list[BackendState[T]]:
        """Each entry's state right now, in configuration order."""
        return [
            BackendState(backend, self._weights[i], i in self._backups, self._cells[i])
            for i, backend in enumerate(self.backends)
        ]

    def is_up(self, backend: T) -> bool:
        """Whether ``backend`` is up (not marked down by a failed connect)."""
        i = self._index.get(backend)
        return i is None or self._cells[i].down_until == 0.0

    @property
    def down(self) -> int:
        """How many backends are marked down, of every pool sharing this one's board
        (0: none of this pool's either)."""
        return self.board.down

    def carry_over(self, old: BackendPool[T]) -> None:
        """After a reload: take ``old``'s state for the backends both have (by name):
        open connections (connections opened on ``old`` release them on the same
        state), health and back-off, the weighted round-robin's scores; and its
        rotation. The state of backends that are gone is retired (no longer down)."""
        if old.board is not self.board:
            raise ValueError("pools carry state over only on one health board")
        found = {name: j for j, name in reversed(list(enumerate(old._names)))}
        kept = set()
        for i, name in enumerate(self._names):
            j = found.get(name)
            if j is not None:  # every copy of a backend listed twice: its one state
                kept.add(j)
                self._cells[i] = old._cells[j]
        carried = {id(old._cells[j]) for j in kept}  # and their other copies in ``old``
        kept = {j for j, cell in enumerate(old._cells) if id(cell) in carried}
        old.retire(keep=kept)
        self._cursor = old._cursor % len(self.backends)
        self.empty_reported = old.empty_reported

    def retire(self, keep: Container[int] = ()) -> None:
        """A reload dropped this pool (or, with ``keep``, the backends at indexes not in
        it): their health no longer counts on the board."""
        for j, cell in enumerate(self._cells):
            if j not in keep:
                if cell.down_until and not cell.retired:
                    self.board.down -= 1
                cell.down_until, cell.retired = 0.0, True

    # ------------------------------------------------------------------ counting

    def opened(self, backend: T) -> None:
        """A connection to ``backend`` opened (after its connect succeeded)."""
        i = self._index.get(backend)
        if i is not None:
            self._cells[i].open += 1

    def closed(self, backend: T) -> None:
        """A connection :meth:`opened` to ``backend`` ended."""
        i = self._index.get(backend)
        if i is not None and self._cells[i].open:
            self._cells[i].open -= 1

    def open_connections(self, backend: T) -> int:
        """Connections open to ``backend`` through this pool right now."""
        i = self._index.get(backend)
        return 0 if i is None else self._cells[i].open
