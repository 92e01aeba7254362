"""Active health checks (issue #11): every backend of every listener with
``health_check``, checked on a schedule, marked down and up by the results.

Theory of operation
-------------------
One :class:`HealthChecker` per :class:`~l4proxy.Proxy`, whose :meth:`~HealthChecker.run`
is a task of ``serve``. It keeps one *watch* per distinct check: a backend, what its
check does (:class:`~l4proxy.healthprobe.Probe`) and the schedule (interval, rise,
fall). A backend listed in several pools, or by several listeners with the same
settings, is one watch and so one check per interval; its results go to every pool
that lists it.

* **Task tree.** ``run`` holds a nursery with one task per watch; each sleeps until its
  next check, then runs it (:func:`~l4proxy.healthprobe.probe`) under a shared
  ``trio.CapacityLimiter`` (:data:`MAX_CONCURRENT` checks at once), so a thousand
  backends cannot open a thousand sockets in one instant. Nothing here runs in the
  accept loops or the connections' tasks: a slow backend delays only its own watch.
* **Spread.** A watch's first check comes at a random point of its first interval, and
  each later one an interval later give or take :data:`JITTER` (10%), so checks of many
  backends do not bunch up, nor drift back together. Due times are rounded up to a
  :data:`TICK` grid: the checks due in one tick wake together, in one pass of trio's
  loop, which halves the CPU of 100 checks a second (a wake-up each cost as much as
  the check itself).
* **Counting.** ``fall`` failed checks in a row *hold* the backend down
  (:meth:`~l4proxy.balancing.BackendPool.hold`): it is left out of every order, and no
  back-off ends that (no passive retry), until ``rise`` checks in a row pass while it is
  down and :meth:`~l4proxy.balancing.BackendPool.release` it. Passive health goes on as
  before: a failed connect marks a backend down for its back-off, and passing checks
  mark it up again just the same. Each change is one line on ``l4proxy.health``
  (``backend 10.0.0.6:5432 down: connection refused (3 checks)``, ``backend
  10.0.0.6:5432 up: 2 checks passed``).
* **Reloads.** Pools are rebuilt at each reload (their per-backend state carried
  over); :meth:`~HealthChecker.reconfigured` makes ``run`` read the proxy's runtimes
  again: watches whose backends remain keep their counts and get the new pools,
  watches of removed backends (or changed settings) are cancelled, with whatever
  check they had in flight, new ones start. A backend no watch covers any longer is
  no longer held: the next connection tries it (passive health again).
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

import attrs
import trio

from .connect import HEALTH
from .healthprobe import Probe, probe

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from .balancing import BackendPool
    from .connect import Connector, Target
    from .runtime import ListenerRuntime
    from .tls import BackendTLS

__all__ = ["JITTER", "MAX_CONCURRENT", "TICK", "HealthChecker"]

#: The most checks running at once, per proxy.
MAX_CONCURRENT = 32
#: How far a check may come before or after its interval, as a share of it.
JITTER = 0.1
#: Checks are due on a grid of this many seconds (a tenth of the interval when that is
#: shorter), so the checks due in one tick share one wake-up of the event loop.
TICK = 0.1

Member = tuple["BackendPool[Target]", "Target"]


@attrs.frozen
class _Schedule:
    interval: float
    rise: int
    fall: int


@attrs.define(eq=False)
class _Watch:
    """One distinct check: where its results go, and its counts."""

    probe: Probe
    schedule: _Schedule
    members: list[Member]
    backend_tls: BackendTLS | None
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    passes: int = 0  # in a row, while down
    fails: int = 0  # in a row


_Key = tuple[Probe, _Schedule]


class HealthChecker:
    """Runs the active health checks of one proxy's listeners.

    Args:
        runtimes: gives the proxy's current runtimes (the pools to check).
        connect: the proxy's connector (``None``: the default), so a check reaches a
            backend the way its connections do.
        concurrency: the most checks at once (default :data:`MAX_CONCURRENT`).
        rng: the jitter's randomness (tests pass a seeded one).
    """

    def __init__(
        self,
        runtimes: Callable[[], Mapping[str, ListenerRuntime]],
        connect: Connector | None = None,
        *,
        concurrency: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._runtimes = runtimes
        self._connect = connect
        self._concurrency = concurrency
        self._rng = rng or random.Random()
        self._watches: dict[_Key, _Watch] = {}
        self._changed: trio.Event | None = None

    def reconfigured(self) -> None:
        """The runtimes changed (a reload swapped them): check the new pools. From the
        trio thread; a no-op while :meth:`run` is not running."""
        if self._changed is not None:
            self._changed.set()

    @property
    def watched(self) -> int:
        """How many distinct checks run (one per backend and settings)."""
        return len(self._watches)

    async def run(self) -> None:
        """Check until cancelled (``serve`` cancels it when it ends). With no listener
        checking, it only waits for :meth:`reconfigured`."""
        limiter = trio.CapacityLimiter(self._concurrency or MAX_CONCURRENT)
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    self._changed = trio.Event()
                    self._sync(nursery, limiter)
                    await self._changed.wait()
        finally:
            self._changed = None
            self._watches.clear()  # a later run starts afresh (the pools keep their state)

    def _sync(self, nursery: trio.Nursery, limiter: trio.CapacityLimiter) -> None:
        """Make the watches those of the current runtimes."""
        wanted = _plan(self._runtimes())
        covered = {
            pool.identity(target) for members, _ in wanted.values() for pool, target in members
        }
        now = trio.current_time()
        for key in [key for key in self._watches if key not in wanted]:
            watch = self._watches.pop(key)
            watch.scope.cancel()  # and a check in flight: its result is not wanted
            for pool, target in watch.members:
                if pool.identity(target) not in covered:
                    pool.unhold(target, now)
        for key, (members, backend_tls) in wanted.items():
            kept = self._watches.get(key)
            if kept is not None:  # a reload kept it: new pools, the same counts
                kept.members, kept.backend_tls = members, backend_tls
                continue
            watch = self._watches[key] = _Watch(key[0], key[1], members, backend_tls)
            nursery.start_soon(
                self._check_forever, watch, limiter, name=f"l4proxy health check {key[0].target}"
            )

    async def _check_forever(self, watch: _Watch, limiter: trio.CapacityLimiter) -> None:
        """One watch's checks, each an interval (with jitter) after the last began."""
        interval = watch.schedule.interval
        with watch.scope:
            due = trio.current_time() + self._rng.uniform(0, interval)
            tick = min(TICK, interval / 10)
            while True:
                await trio.sleep_until(math.ceil(due / tick) * tick)
                try:
                    limiter.acquire_nowait()  # the usual case: no second wake-up
                except trio.WouldBlock:
                    await limiter.acquire()
                try:
                    problem = await probe(watch.probe, self._connect, watch.backend_tls)
                finally:
                    limiter.release()
                record(watch, problem, trio.current_time())
                spread = self._rng.uniform(1 - JITTER, 1 + JITTER)
                due = max(due + interval * spread, trio.current_time())


def record(watch: _Watch, problem: str | None, now: float) -> None:
    """Count one check's result (``problem``: why it failed, ``None``: it passed) and
    mark the backend down or up in every pool that lists it, logging each change once."""
    address = watch.probe.target.address
    if problem is None:
        watch.fails = 0
        if not any(pool.is_down(target) for pool, target in watch.members):
            watch.passes = 0  # rise counts passes while down only
            return
        watch.passes += 1
        rise = watch.schedule.rise
        if watch.passes >= rise:
            watch.passes = 0
            released = [pool.release(target) for pool, target in watch.members]
            if any(released):
                HEALTH.warning("backend %s up: %d %s passed", address, rise, _checks(rise))
        return
    watch.passes = 0
    watch.fails += 1
    if watch.fails >= watch.schedule.fall:
        held = [pool.hold(target, now, problem) for pool, target in watch.members]
        if any(change is True for change in held):  # it was up (down for a back-off: said)
            fails = watch.fails
            HEALTH.warning("backend %s down: %s (%d %s)", address, problem, fails, _checks(fails))


def _checks(count: int) -> str:
    return "check" if count == 1 else "checks"


def _plan(
    runtimes: Mapping[str, ListenerRuntime],
) -> dict[_Key, tuple[list[Member], BackendTLS | None]]:
    """The watches the runtimes ask for, with the pools each one's results go to."""
    plan: dict[_Key, tuple[list[Member], BackendTLS | None]] = {}
    for runtime in runtimes.values():
        config = runtime.config
        check = config.health_check
        if check is None:
            continue
        schedule = _Schedule(check.interval, check.rise, check.fall)
        seconds = check.seconds(config.connect_timeout)
        send = check.send.encode() if check.send else b""
        expect = check.expect.encode() if check.expect else b""
        proxy_protocol = None if config.proxy_protocol is None else config.proxy_protocol.value
        # With a preamble, backend TLS starts inside the protocol's own dialogue
        # (STARTTLS, SSLRequest), which a check does not speak: it connects only.
        secured = config.backend_tls and config.preamble is None
        tls = (config.backend_ca, config.backend_sni) if secured else None
        backend_tls = runtime.backend_tls if secured else None
        for pool in runtime.pools.values():
            for target in dict.fromkeys(pool.backends):  # a backend listed twice: once
                check_of = Probe(
                    target, seconds, send, expect, config.source_address, proxy_protocol, tls
                )
                members, _ = plan.setdefault((check_of, schedule), ([], backend_tls))
                members.append((pool, target))
    return plan
