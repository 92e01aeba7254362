"""The balancing methods without I/O (issue #11): every order a permutation with the
primaries first, weights honoured, least-conn and the two choices on open
connections, rendezvous hashing stable and minimal in what it moves."""

from __future__ import annotations

import doctest
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, strategies as st

import l4proxy.balancing
from l4proxy.admission import client_key
from l4proxy.balancing import BackendPool, Balance, HealthBoard

NAMES = tuple(f"10.0.0.{i}:5432" for i in range(1, 9))

pools = st.integers(1, 8).flatmap(
    lambda n: st.tuples(
        st.just(NAMES[:n]),
        st.lists(st.integers(1, 5), min_size=n, max_size=n),
        st.lists(st.booleans(), min_size=n, max_size=n),
        st.sampled_from(list(Balance)),
        st.lists(st.integers(0, 2**129 - 1), min_size=1, max_size=20),
    )
)


def test_the_docstring_examples() -> None:
    assert doctest.testmod(l4proxy.balancing).failed == 0


@given(pools)
def test_every_order_tries_each_backend_once_primaries_first(
    case: tuple[tuple[str, ...], list[int], list[bool], Balance, list[int]],
) -> None:
    backends, weights, backups, balance, clients = case
    pool = BackendPool(
        backends, weights=weights, backups=backups, balance=balance, rng=random.Random(7)
    )
    for client in clients:
        order = pool.order(client)
        assert sorted(order) == sorted(backends)
        kinds = [backups[backends.index(b)] for b in order]
        assert kinds == sorted(kinds)  # no primary after a backup
        pool.opened(order[0])


def _firsts(pool: BackendPool[str], count: int, client: int | None = None) -> Counter[str]:
    return Counter(pool.order(client)[0] for _ in range(count))


def test_round_robin_in_turn_and_weighted_smoothly() -> None:
    plain = BackendPool(("a", "b", "c"))
    assert "".join(plain.order()[0] for _ in range(6)) == "abcabc"
    pool = BackendPool(("a", "b", "c"), weights=(5, 1, 1))
    picks = "".join(pool.order()[0] for _ in range(7))
    assert picks == "aabacaa"  # nginx's example: spread, not aaaaabc
    assert _firsts(pool, 700) == {"a": 500, "b": 100, "c": 100}


def test_backups_only_after_every_primary() -> None:
    pool = BackendPool(("p1", "p2", "b1", "b2"), backups=(False, False, True, True))
    for _ in range(10):
        assert set(pool.order()[:2]) == {"p1", "p2"}
    assert {pool.order()[2] for _ in range(4)} == {"b1", "b2"}  # balanced among themselves


def test_least_conn_takes_the_fewest_open_for_its_weight_and_ties_in_turn() -> None:
    pool = BackendPool(("a", "b", "c"), balance=Balance.LEAST_CONN)
    assert {pool.order()[0] for _ in range(3)} == {"a", "b", "c"}  # all 0: in turn
    for _ in range(3):
        pool.opened("a")
    pool.opened("b")
    assert pool.order()[0] == "c"
    pool.opened("c")
    assert {pool.order()[0] for _ in range(4)} == {"b", "c"}
    for _ in range(3):
        pool.closed("a")
    assert pool.order()[0] == "a"
    assert pool.open_connections("a") == 0
    weighted = BackendPool(("a", "b"), weights=(4, 1), balance=Balance.LEAST_CONN)
    for _ in range(3):
        weighted.opened("a")  # 3/4 < 1/1
    weighted.opened("b")
    assert weighted.order()[0] == "a"


def test_two_choices_never_pick_the_loaded_one_of_the_pair() -> None:
    pool = BackendPool(("a", "b", "c"), balance=Balance.RANDOM, rng=random.Random(1))
    for _ in range(50):
        pool.opened("a")
    counts = _firsts(pool, 3000)
    assert counts["a"] == 0  # any pair that holds a has a less loaded other
    assert counts["b"] > 1000
    assert counts["c"] > 1000


def _clients(count: int) -> list[int]:
    return [client_key(f"198.51.{i // 250}.{i % 250}", 128) for i in range(count)]


def test_source_hash_keeps_a_client_and_moves_only_a_removed_backends_clients() -> None:
    clients = _clients(3000)
    whole = BackendPool(NAMES[:5], balance=Balance.SOURCE_HASH)
    before = {client: whole.order(client)[0] for client in clients}
    assert all(whole.order(client)[0] == before[client] for client in clients[:200])
    shares = Counter(before.values())
    assert min(shares.values()) > 450  # about 600 each
    gone = NAMES[2]
    smaller = BackendPool(tuple(n for n in NAMES[:5] if n != gone), balance=Balance.SOURCE_HASH)
    for client in clients:
        after = smaller.order(client)[0]
        if before[client] != gone:
            assert after == before[client]
        else:
            assert after == whole.order(client)[1]  # its next choice, as failover had it


def test_source_hash_is_the_same_in_every_process() -> None:
    """Seeds come from the backends' names (blake2b), not Python's per-process hash:
    other processes with other hash seeds order every client the same way."""
    script = (
        "from l4proxy.balancing import BackendPool, Balance\n"
        "from l4proxy.admission import client_key\n"
        f"pool = BackendPool({NAMES[:4]!r}, balance=Balance.SOURCE_HASH)\n"
        "print([pool.order(client_key(f'203.0.113.{i}', 128)) for i in range(50)])\n"
    )
    pool = BackendPool(NAMES[:4], balance=Balance.SOURCE_HASH)
    here = repr([pool.order(client_key(f"203.0.113.{i}", 128)) for i in range(50)])
    for seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert done.stdout.strip() == here


def test_source_hash_weights_share_clients() -> None:
    pool = BackendPool(("a", "b"), weights=(3, 1), balance=Balance.SOURCE_HASH)
    shares = Counter(pool.order(client)[0] for client in _clients(4000))
    assert 2700 < shares["a"] < 3300


def test_a_client_without_an_address_goes_round_robin() -> None:
    pool = BackendPool(("a", "b"), balance=Balance.SOURCE_HASH)
    assert [pool.order(None)[0] for _ in range(4)] == ["a", "b", "a", "b"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"weights": (1,)}, "parallel"),
        ({"weights": (0, 1)}, "at least 1"),
        ({"backups": (True,)}, "parallel"),
    ],
)
def test_bad_pools_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BackendPool(("a", "b"), **settings)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one backend"):
        BackendPool(())


def test_a_failed_backend_is_left_out_for_a_doubling_back_off() -> None:
    pool = BackendPool(("a", "b", "c"))
    assert pool.failed("b", 100.0) == 1.0  # marked down: the back-off
    assert pool.failed("b", 100.2) is None  # an attempt that started before: no change
    assert not pool.is_up("b")
    for _ in range(6):
        assert "b" not in pool.order(now=100.5)
    assert "b" in pool.order(now=101.0)  # the back-off passed: tried again
    assert pool.failed("b", 101.0) is None  # failed again: down for longer
    assert "b" not in pool.order(now=102.5)
    assert "b" in pool.order(now=103.0)
    backoffs = []
    now = 103.0
    for _ in range(6):
        pool.failed("b", now)
        backoff = next(
            t for t in (0.5 * k for k in range(1, 200)) if "b" in pool.order(now=now + t)
        )
        backoffs.append(backoff)
        now += backoff
    assert backoffs == [4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert pool.succeeded("b") is True  # up, the back-off reset
    assert pool.succeeded("b") is False
    assert pool.failed("b", now) == 1.0


def test_all_down_is_an_empty_order_and_backups_stand_in() -> None:
    pool = BackendPool(("p", "s"), backups=(False, True), balance=Balance.LEAST_CONN)
    pool.failed("p", 10.0)
    assert pool.order(now=10.1) == ("s",)
    pool.failed("s", 10.1)
    assert pool.order(now=10.2) == ()
    pool.succeeded("p")
    assert pool.order(now=10.3) == ("p",)


def test_a_reloaded_pool_carries_over_counts_health_and_rotation() -> None:
    board = HealthBoard()
    old = BackendPool(("a", "b", "c"), balance=Balance.LEAST_CONN, board=board)
    old.opened("a")
    old.opened("a")
    old.failed("c", 50.0)
    assert board.down == 1
    new = BackendPool(("b", "a", "d"), balance=Balance.LEAST_CONN, board=board)
    new.carry_over(old)
    assert new.open_connections("a") == 2
    old.closed("a")  # a connection opened before the reload ends on the old pool
    assert new.open_connections("a") == 1
    assert board.down == 0  # c is gone: its health no longer counts
    assert old.failed("c", 60.0) is None  # an attempt in flight on the old pool
    assert board.down == 0
    new.failed("b", 70.0)
    third = BackendPool(("b", "a"), board=board)
    third.carry_over(new)
    assert not third.is_up("b")  # still down after another reload
    assert third.order(now=70.5) == ("a",)
    assert third.succeeded("b") is True
    assert board.down == 0
    with pytest.raises(ValueError, match="one health board"):
        BackendPool(("a",)).carry_over(third)


def test_a_pool_a_reload_dropped_stops_counting_as_down() -> None:
    board = HealthBoard()
    gone = BackendPool(("a", "b"), board=board)
    gone.failed("a", 1.0)
    assert board.down == 1
    gone.retire()
    assert board.down == 0
    assert gone.failed("b", 2.0) is None  # an attempt in flight changes nothing now
    assert board.down == 0


def test_a_backend_listed_twice_has_one_state() -> None:
    """Two entries of the order (as before weights existed), one health and one count."""
    board = HealthBoard()
    pool = BackendPool(("a", "a", "b"), balance=Balance.LEAST_CONN, board=board)
    pool.failed("a", 1.0)
    assert pool.order(now=1.5) == ("b",)
    pool.succeeded("a")
    pool.opened("a")
    assert [pool.order()[0] for _ in range(2)] == ["b", "b"]  # both copies count a's 1
    reloaded = BackendPool(("b", "a", "a"), balance=Balance.LEAST_CONN, board=board)
    reloaded.carry_over(pool)
    assert reloaded.open_connections("a") == 1
    reloaded.failed("a", 5.0)
    assert reloaded.order(now=5.5) == ("b",)
    assert board.down == 1
