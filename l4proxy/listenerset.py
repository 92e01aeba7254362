"""The listeners of a serving proxy, and how a reload changes them without a gap.

Task tree while serving (every connection lives in a nursery)::

    ListenerSet.run                         (one nursery)
    ├── one task per listener name          drain scope: its deadline is the drain timeout
    │   └── handler nursery                 one task per connection while it sets up (and
    │       │                               for the data phase of streams)
    │       └── data core                   the data phase of raw connections, no task
    │                                       per connection (core.py)
    └── one accept loop per bound socket    its own cancel scope (accepting.py)

A reload (:meth:`ListenerSet.prepare`, then :meth:`ListenerSet.commit` with no
checkpoint in between, at the same moment the proxy swaps its runtimes):

* an address the new config still listens on keeps its socket and accept loop: the
  loop is pointed at the listener that names the address now, so renaming a listener
  or moving an address to another one refuses no connection;
* an address no listener names any more: its loop stops and its socket closes;
* a new address is bound in ``prepare`` (a failure is logged and the rest applies);
* a new listener name gets its handler task in ``prepare``; a name that is gone stops
  accepting and drains its connections for its ``drain_timeout``, as on ``close()``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs
import trio

from .accepting import Acceptor, ServingListener, accept_loop
from .addresses import Address, TCPAddress
from .core import Core
from .errors import ListenError
from .listening import bind_address, occurrences
from .stats import BoundAddress

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, MutableMapping, Sequence

    from .connection import Shared
    from .listening import Listening
    from .runtime import ListenerRuntime, LiveCount

LOGGER = logging.getLogger("l4proxy.server")

#: What makes a listening socket the same across a reload: its ``listen`` address, or
#: for port 0 (a port the kernel picked) the address, the listener's name and which of
#: that listener's equal ``HOST:0`` addresses it is.
_Identity = Address | tuple[str, Address, int]


def _identity(name: str, address: Address, occurrence: int) -> _Identity:
    if isinstance(address, TCPAddress) and address.port == 0:
        return (name, address, occurrence)
    return address


def _identities(name: str, listen: Sequence[Address]) -> list[tuple[Address, _Identity]]:
    return [
        (address, _identity(name, address, k))
        for address, k in zip(listen, occurrences(listen), strict=True)
    ]


def _blocked_by(acceptor: Acceptor, failed: list[tuple[str, TCPAddress]]) -> str | None:
    """The listener whose new address on this socket's port failed to bind (most
    likely because this socket holds the port), if any."""
    bound = acceptor.listening.address
    if not isinstance(bound, TCPAddress):
        return None
    for name, address in failed:
        if address.port == bound.port:
            return name
    return None


def _keys(name: str, listening: Listening) -> tuple[_Identity, ...]:
    """The identities a held socket answers to: the address it was configured with,
    and the address it is bound to (a config that now names the port the kernel
    picked for ``HOST:0`` keeps the socket)."""
    configured = _identity(name, listening.configured, listening.occurrence)
    if listening.address == listening.configured or not isinstance(listening.address, TCPAddress):
        return (configured,)
    return (configured, listening.address)


@attrs.define
class Plan:
    """What :meth:`ListenerSet.prepare` made ready for a reload's commit."""

    bound: dict[_Identity, list[Listening]] = attrs.field(factory=dict)  # newly bound
    started: dict[str, ServingListener] = attrs.field(factory=dict)  # new listener names
    #: TCP addresses that could not be bound, by the listener that names them.
    failed: list[tuple[str, TCPAddress]] = attrs.field(factory=list)

    def abandon(self) -> None:
        """Undo: close what was bound, end the handler tasks that were started."""
        for listenings in self.bound.values():
            for listening in listenings:
                listening.close()
        for serving in self.started.values():
            serving.stopped.set()


class ListenerSet:
    """Every listener name while the proxy serves, by name, and the accept loops."""

    def __init__(
        self,
        shared: Shared,
        live: MutableMapping[str, LiveCount],
        *,
        reuse_port: bool,
        configured: Callable[[str], bool],
    ) -> None:
        self._shared = shared
        #: The proxy's open counts by name; a name a reload removed drops out of it
        #: once its connections are gone (``configured`` says which names remain).
        self._live = live
        self._configured = configured
        self._reuse_port = reuse_port
        #: Accepting now, by name.
        self.servings: dict[str, ServingListener] = {}
        #: Removed by a reload or stopped by ``close()``, connections still draining.
        self.retiring: list[ServingListener] = []
        self._nursery: trio.Nursery | None = None
        self.closed = False

    # ------------------------------------------------------------------ reporting

    def addresses(self) -> list[BoundAddress]:
        """The sockets accepting right now, by listener."""
        return [
            BoundAddress(serving.name, acceptor.listening.address)
            for serving in self.servings.values()
            for acceptor in serving.acceptors
        ]

    def parked(self) -> dict[str, int]:
        """Connections in the data core (held without a task) per listener name,
        draining ones included."""
        counts: dict[str, int] = {}
        for serving in [*self.retiring, *self.servings.values()]:
            if hasattr(serving, "core"):
                counts[serving.name] = counts.get(serving.name, 0) + serving.core.link_count
        return counts

    # ------------------------------------------------------------------ serving

    async def run(
        self,
        opened: list[tuple[str, list[Listening]]],
        runtimes: Mapping[str, ListenerRuntime],
        task_status: trio.TaskStatus[list[BoundAddress]],
    ) -> None:
        """Serve ``opened`` (bound by ``bind_all``) until every listener has stopped
        accepting and drained. Reports the bound addresses once accept loops run."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for name, listenings in opened:
                    serving = ServingListener(name, runtimes[name])
                    await nursery.start(self._run_listener, serving)
                    self.servings[name] = serving
                    for listening in listenings:
                        self._start_acceptor(listening, serving)
                bound = self.addresses()
                for address in bound:
                    LOGGER.info("listener %r: accepting on %s", address.listener, address)
                task_status.started(bound)
                if self.closed:  # close() was called before serving
                    self.close()
        finally:
            self._nursery = None
            for serving in [*self.servings.values(), *self.retiring]:
                for acceptor in serving.acceptors:
                    acceptor.listening.close()

    def _start_acceptor(self, listening: Listening, serving: ServingListener) -> Acceptor:
        assert self._nursery is not None
        acceptor = Acceptor(listening, serving)
        serving.acceptors.append(acceptor)
        self._nursery.start_soon(
            accept_loop, acceptor, self._shared, name=f"l4proxy accept {listening.address}"
        )
        return acceptor

    async def _run_listener(
        self, serving: ServingListener, *, task_status: trio.TaskStatus[None]
    ) -> None:
        """One listener name's connections: its handler nursery, open until it stops
        accepting and its connections are done (or cut at the drain deadline)."""
        with serving.drain_scope:
            async with trio.open_nursery() as handlers:
                core = serving.core = Core(handlers)  # the data phase of raw connections
                handlers.start_soon(core.run, name=f"l4proxy data core {serving.name}")
                task_status.started()
                await serving.stopped.wait()
                core.stop()
                live = serving.runtime.live.value
                if live:
                    LOGGER.info("listener %r: draining %d connections", serving.name, live)
        if serving in self.retiring:
            self.retiring.remove(serving)
        self.forget_removed()

    def forget_removed(self) -> None:
        """Drop the open counts of names the config no longer has and no listener of
        that name still drains (``stats()`` stops listing them)."""
        draining = {serving.name for serving in self.retiring}
        for name in [name for name in self._live if not self._configured(name)]:
            if name not in draining:
                del self._live[name]

    def close(self, drain_timeout: float | None = None) -> None:
        """Stop accepting everywhere; give each listener its drain timeout (or
        ``drain_timeout``). A later call only shortens deadlines."""
        self.closed = True
        now = trio.current_time()
        for serving in self.servings.values():
            for acceptor in serving.acceptors:
                acceptor.stop()  # refuse new connections from now on
            serving.stopped.set()
            self.retiring.append(serving)
        self.servings = {}
        for serving in self.retiring:
            seconds = (
                drain_timeout if drain_timeout is not None else serving.runtime.config.drain_timeout
            )
            serving.drain_scope.deadline = min(serving.drain_scope.deadline, now + seconds)

    # ------------------------------------------------------------------ reloads

    async def prepare(self, runtimes: Mapping[str, ListenerRuntime]) -> Plan:
        """Bind the addresses ``runtimes`` add and start handler tasks for the names
        they add. A bind failure is logged (ERROR) and that address left out."""
        plan = Plan()
        if self._nursery is None or self.closed:
            return plan  # not serving: the runtimes alone change
        held = {
            key
            for serving in self.servings.values()
            for acceptor in serving.acceptors
            for key in _keys(serving.name, acceptor.listening)
        }
        try:
            for name, runtime in runtimes.items():
                listen = runtime.config.listen
                for (address, key), k in zip(
                    _identities(name, listen), occurrences(listen), strict=True
                ):
                    if key in held or key in plan.bound:
                        continue
                    try:
                        plan.bound[key] = await bind_address(
                            address, name, reuse_port=self._reuse_port, occurrence=k
                        )
                    except ListenError as exc:
                        LOGGER.error("reload: %s; the rest of the new configuration applies", exc)
                        if isinstance(address, TCPAddress):
                            plan.failed.append((name, address))
                if name not in self.servings and self._nursery is not None:
                    serving = ServingListener(name, runtime)
                    await self._nursery.start(self._run_listener, serving)
                    plan.started[name] = serving
        except BaseException:
            plan.abandon()
            raise
        return plan

    def commit(self, plan: Plan, runtimes: Mapping[str, ListenerRuntime]) -> None:
        """Switch to ``runtimes``' listeners (no checkpoint: at the runtime swap)."""
        if self._nursery is None or self.closed:  # closed or ended while preparing
            plan.abandon()
            for name, runtime in runtimes.items():  # draining ones log with the new settings
                if name in self.servings:
                    self.servings[name].runtime = runtime
            return
        by_address: dict[_Identity, list[Acceptor]] = {}
        for serving in self.servings.values():
            for acceptor in serving.acceptors:
                for key in _keys(serving.name, acceptor.listening):
                    by_address.setdefault(key, []).append(acceptor)
        previous = self.servings
        servings: dict[str, ServingListener] = {}
        kept: set[int] = set()
        for name, runtime in runtimes.items():
            serving = previous.get(name) or plan.started[name]
            serving.runtime = runtime
            acceptors: list[Acceptor] = []
            identities = _identities(name, runtime.config.listen)
            for _, key in identities:
                for acceptor in by_address.get(key, ()):
                    if id(acceptor) in kept:
                        continue  # claimed under its other key
                    acceptor.serving = serving  # the loop hands its next connection here
                    acceptors.append(acceptor)
                    kept.add(id(acceptor))
            serving.acceptors = acceptors
            for _, key in identities:
                for listening in plan.bound.pop(key, ()):
                    self._start_acceptor(listening, serving)
                    LOGGER.info("listener %r: accepting on %s", name, listening.address)
            servings[name] = serving
        plan.started.clear()
        plan.abandon()  # nothing should be left; close it if it is
        stopped: set[int] = set()
        for acceptors in by_address.values():
            for acceptor in acceptors:
                if id(acceptor) in kept or id(acceptor) in stopped:
                    continue
                heir = _blocked_by(acceptor, plan.failed)
                if heir is not None and heir in servings:  # keep the port served
                    LOGGER.warning(
                        "listener %r: keeping %s open, since its replacement could not be "
                        "bound; restart to change it",
                        heir, acceptor.listening.address,
                    )  # fmt: skip
                    acceptor.serving = servings[heir]
                    servings[heir].acceptors.append(acceptor)
                    kept.add(id(acceptor))
                else:
                    stopped.add(id(acceptor))
                    LOGGER.info(
                        "listener %r: no longer accepting on %s (reload)",
                        acceptor.serving.name, acceptor.listening.address,
                    )  # fmt: skip
                    acceptor.stop()
        now = trio.current_time()
        for name, serving in previous.items():
            if name not in servings:
                LOGGER.info("listener %r: removed by the reload; draining", name)
                serving.acceptors = []
                serving.stopped.set()
                serving.drain_scope.deadline = now + serving.runtime.config.drain_timeout
                self.retiring.append(serving)
        self.servings = servings
