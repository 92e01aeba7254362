"""Which refusals get an access line (l4proxy/rejections.py): the first of an address
after a quiet period always, then a budget per reason per second, the rest summarised."""

from __future__ import annotations

from l4proxy.rejections import MAX_ADDRESSES, RejectionLog


def test_a_flood_from_one_address_is_logged_within_the_budget_and_summarised() -> None:
    log = RejectionLog(budget=3, quiet_seconds=60)
    logged = [log.refused("denied", "203.0.113.9", 10.0 + i / 1000) for i in range(100)]
    assert logged == [True] * 3 + [False] * 97
    assert log.counts["denied"] == 100
    assert log.summaries() == ["suppressed 97 denied from 203.0.113.9"]
    assert log.summaries() == []  # said once
    assert log.refused("denied", "203.0.113.9", 11.0)  # a new second, a new budget


def test_a_new_address_is_always_logged_at_once() -> None:
    log = RejectionLog(budget=1, quiet_seconds=60)
    assert log.refused("denied", "203.0.113.9", 0.0)
    assert not log.refused("denied", "203.0.113.9", 0.1)
    assert log.refused("denied", "198.51.100.7", 0.2)  # over budget, but new
    assert log.refused("denied", "203.0.113.9", 61.0)  # quiet for a minute: new again


def test_budgets_are_per_reason_and_summaries_name_the_top_address() -> None:
    log = RejectionLog(budget=1, quiet_seconds=60)
    for address in ("a", "a", "a", "b", "b", "c"):
        log.refused("rate_limited", address, 5.0)
        log.refused("rate_limited", address, 5.0)
    assert log.refused("limit_per_ip", "a", 5.0)  # another reason's budget (a, b, c were new)
    assert log.summaries() == ["suppressed 9 rate_limited from a and 2 other addresses"]


def test_the_address_table_is_bounded() -> None:
    log = RejectionLog(budget=0, quiet_seconds=60)
    for number in range(MAX_ADDRESSES * 3):
        log.refused("denied", f"10.{number >> 16}.{(number >> 8) & 255}.{number & 255}", 1.0)
    assert len(log._recent) == MAX_ADDRESSES
