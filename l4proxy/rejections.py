"""How many refused connections get an access line (issue #10), without I/O.

A flood must not fill the disk, yet an operator must see who is refused. So:

* every refusal is counted, per reason;
* the first refusal of an address after :attr:`RejectionLog.quiet_seconds` without one
  is always logged, at once (someone new is being refused);
* otherwise at most :attr:`RejectionLog.budget` lines per reason per second are logged;
* the rest are only counted, and :meth:`RejectionLog.summaries` gives one line per
  reason per interval for them ("suppressed N denied from 203.0.113.9 and 12 other
  addresses").

The table of recently refused addresses is bounded (:data:`MAX_ADDRESSES`, oldest
forgotten first): a flood from many addresses can make the proxy log a few more lines
than the budget, never hold more memory.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

__all__ = ["MAX_ADDRESSES", "RejectionLog"]

#: Addresses remembered as recently refused (for the "first after a quiet period" rule).
MAX_ADDRESSES = 10_000


class RejectionLog:
    """Decides which refusals are written; keeps the counts of all of them."""

    __slots__ = (
        "_recent",
        "_second",
        "_spent",
        "_suppressed",
        "_suppressed_from",
        "budget",
        "counts",
        "quiet_seconds",
    )

    def __init__(self, *, budget: int = 10, quiet_seconds: float = 60.0) -> None:
        self.budget = budget
        self.quiet_seconds = quiet_seconds
        #: Every refusal since start, per reason (what ``Proxy.stats`` and metrics show).
        self.counts: Counter[str] = Counter()
        self._recent: OrderedDict[str, float] = OrderedDict()  # address: last refusal
        self._second = -1.0  # the whole second the budget is being spent in
        self._spent: Counter[str] = Counter()
        self._suppressed: Counter[str] = Counter()
        self._suppressed_from: dict[str, Counter[str]] = {}

    def refused(self, reason: str, address: str, now: float) -> bool:
        """Count a refusal; ``True`` if it gets its own access line."""
        self.counts[reason] += 1
        recent = self._recent
        last = recent.pop(address, None)
        recent[address] = now
        if len(recent) > MAX_ADDRESSES:
            recent.popitem(last=False)
        second = now // 1
        if second != self._second:
            self._second = second
            self._spent.clear()
        if last is None or now - last >= self.quiet_seconds:
            self._spent[reason] += 1
            return True
        if self._spent[reason] < self.budget:
            self._spent[reason] += 1
            return True
        self._suppressed[reason] += 1
        by_address = self._suppressed_from.setdefault(reason, Counter())
        if address in by_address or len(by_address) < MAX_ADDRESSES:
            by_address[address] += 1
        return False

    def summaries(self) -> list[str]:
        """One line per reason for the refusals not logged since the last call."""
        lines = []
        for reason, count in sorted(self._suppressed.items()):
            by_address = self._suppressed_from.get(reason, Counter())
            top, _ = by_address.most_common(1)[0] if by_address else ("?", 0)
            others = len(by_address) - 1
            more = f" and {others} other address{'es' if others > 1 else ''}" if others > 0 else ""
            lines.append(f"suppressed {count} {reason} from {top}{more}")
        self._suppressed.clear()
        self._suppressed_from.clear()
        return lines
