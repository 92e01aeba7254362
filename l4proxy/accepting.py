"""Accept loops: one per listening socket, taking connections in batches and starting
each one's pipeline in its listener's nursery (or refusing it at the admit step).

A loop belongs to an :class:`Acceptor`, which says which listener it accepts for right
now (:class:`ServingListener`: the runtime, data core and drain scope of one listener
name). A reload changes that by assignment, so a listener can be renamed, or an address
moved to another listener, while its socket keeps listening: no connection is refused.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from typing import TYPE_CHECKING

import attrs
import trio

from . import eager
from .addresses import Address, TCPAddress, UnixAddress
from .admit import admit, refuse
from .pipeline import serve

if TYPE_CHECKING:
    from .connection import Shared
    from .core import Core
    from .listening import Listening
    from .runtime import ListenerRuntime

LOGGER = logging.getLogger("l4proxy.server")  # the lines operators know, from before the split

#: accept() errors that mean "out of a resource right now": back off, never die.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF_MIN = 0.005
ACCEPT_BACKOFF_MAX = 0.25
ACCEPT_RECOVERY_QUIET = 1.0
#: accept() errors that concern only the connection being accepted: take the next one.
ACCEPT_SKIP_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ECONNABORTED", "EPROTO", "EPERM", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN",
                 "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ETIMEDOUT", "ECONNRESET")
    if hasattr(errno, name)
)  # fmt: skip
#: Connections taken per wake-up of an accept loop before letting other tasks run.
ACCEPT_BATCH = 32


@attrs.define(eq=False)
class ServingListener:
    """One listener name while the proxy serves: what its accept loops hand connections to.

    Attributes:
        name: the listener's name.
        runtime: its current runtime; a reload replaces it (between two accepts).
        drain_scope: around its connections; its deadline becomes the drain timeout
            once it stops accepting.
        stopped: set when it stops accepting (``close()``, or a reload removed it).
        acceptors: its accept loops, one per listening socket.
        core: its data core (:mod:`l4proxy.core`), made when its handler nursery opens.
    """

    name: str
    runtime: ListenerRuntime
    drain_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    stopped: trio.Event = attrs.field(factory=trio.Event)
    acceptors: list[Acceptor] = attrs.field(factory=list)
    core: Core = attrs.field(init=False)  # set before any acceptor starts


@attrs.define(eq=False)
class Acceptor:
    """One listening socket's accept loop and the listener it accepts for right now."""

    listening: Listening
    serving: ServingListener
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    def stop(self) -> None:
        """Stop its loop and close its socket (new connections are refused)."""
        self.scope.cancel()
        self.listening.close()


async def accept_loop(acceptor: Acceptor, shared: Shared) -> None:
    """Accept forever; out-of-descriptor errors back off instead of spinning or dying.

    Accepts in batches: after a wake-up, every waiting connection is taken before
    waiting again (with a checkpoint every :data:`ACCEPT_BATCH`, so a flood cannot
    starve the connections already running).

    An "episode" of capacity errors is logged once when it starts and once when it
    ends, i.e. when an accept succeeds after ACCEPT_RECOVERY_QUIET seconds without
    a failure, so a proxy flapping at its descriptor limit does not flood the log.

    The listener it serves is looked up on each connection (``acceptor.serving``): a
    reload that renames a listener or moves an address to another one retargets the
    loop without a gap in accepting.
    """
    with acceptor.scope:
        await _accept(acceptor, shared)


async def _accept(acceptor: Acceptor, shared: Shared) -> None:
    backoff = 0.0
    failures = 0
    last_failure = -math.inf
    accepted = 0
    listening = acceptor.listening
    listener, local = listening.sock, listening.address
    accept = listener.accept
    while True:
        # The waits stay outside the except blocks (no exception kept alive).
        delay = 0.0
        skipped = False
        try:
            sock, peer = accept()
        except BlockingIOError:
            sock = None
        except OSError as exc:
            if listener.fileno() == -1:
                return  # close() closed the socket
            if exc.errno in ACCEPT_SKIP_ERRNOS:  # it died in the backlog
                sock, skipped = None, True
            elif exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            else:
                if not failures:
                    LOGGER.error(
                        "listener %r: accept failed on %s: %s; backing off until it works again",
                        acceptor.serving.name, local, os.strerror(exc.errno or 0).lower(),
                    )  # fmt: skip
                failures += 1
                last_failure = trio.current_time()
                backoff = min(max(backoff * 2, ACCEPT_BACKOFF_MIN), ACCEPT_BACKOFF_MAX)
                sock, delay = None, backoff
        if skipped:  # take the next; still a turn of the batch, so a flood yields too
            accepted += 1
            if accepted >= ACCEPT_BATCH:
                accepted = 0
                await trio.lowlevel.checkpoint()
            continue
        if sock is None:
            accepted = 0
            if delay:
                await trio.sleep(delay)
                continue
            try:
                await trio.lowlevel.wait_readable(listener)
            except trio.ClosedResourceError:
                return  # close() closed the socket
            continue
        if failures and trio.current_time() - last_failure >= ACCEPT_RECOVERY_QUIET:
            LOGGER.warning(
                "listener %r: accepting again on %s after %d failed accepts",
                acceptor.serving.name, local, failures,
            )  # fmt: skip
            failures = 0
            backoff = 0.0
        serving = acceptor.serving
        runtime, core = serving.runtime, serving.core
        trusted = runtime.trusted_proxies
        if (
            runtime.admits_all
            or type(peer) is not tuple
            or (trusted is not None and trusted.permits(peer[0]))  # admitted after step 2
        ):
            # Run here until its first wait (eager.py); positional arguments.
            eager.start(core, serve, sock, _peer_address(peer), local, runtime, shared, core)
        else:  # 1. admit: before any read, task or TLS work
            refusal, key = admit(runtime, shared, peer[0])
            if refusal is None:
                eager.start(
                    core,
                    serve,
                    sock,
                    _peer_address(peer),
                    local,
                    runtime,
                    shared,
                    core,
                    key,
                )
            else:
                refuse(sock, _peer_address(peer), peer[0], local, runtime, shared, refusal)
        accepted += 1
        if accepted >= ACCEPT_BATCH:
            accepted = 0
            await trio.lowlevel.checkpoint()


def _peer_address(peer: object) -> Address:
    """The client's address, from what ``accept`` returned."""
    if isinstance(peer, tuple):
        return TCPAddress(peer[0], peer[1])
    if isinstance(peer, bytes):
        peer = os.fsdecode(peer)
    return UnixAddress(peer if isinstance(peer, str) else "")
