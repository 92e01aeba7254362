"""One connection's life: named set-up steps, one data phase, one access line.

:func:`serve` is the only orchestrator. Every connection runs it, whether its socket came
from a listener's accept loop or its stream from ``Proxy.handle_stream``, and it reads
as the list of steps (docs/architecture.md, "One connection"):

1. **admit**: decide from the peer address alone, before any read (issue #10);
2. **PROXY header in**: the client address a trusted peer gives (issue #10);
3. **client preamble**: a cleartext dialogue before TLS, and what follows it once TLS
   is up (:mod:`l4proxy.preamble`; steps 4-6 run inside it when its dialogue asks);
4. **ClientHello**, 5. **route**, 6. **TLS termination**: under one deadline
   (:mod:`l4proxy.tlsfront`);
7. **connect** with failover (:mod:`l4proxy.connect`);
8. **backend preamble / PROXY header / TLS** (the dialogue's backend part with the
   TLS it asks for; the PROXY header is issue #10's);
9. **move bytes**: the data phase;
10. **log**: the access line, written by :func:`~l4proxy.connection.finish` and nowhere else.

Steps 1-2 and the PROXY header of 8 are empty today: a listener that uses none of them
pays nothing for them. A step that ends the connection raises :class:`~l4proxy.record.Ended` with
its outcome; anything else that escapes is judged by the :class:`~l4proxy.connection.Connection`, so whatever
one peer or backend does costs that connection only.

The hand-over to the data phase is the one boundary between set-up and moving bytes:
two ends that are sockets (raw sockets, trio socket streams, socket-bound TLS streams:
plain listeners, termination, passthrough, backend TLS) become a
:class:`~l4proxy.core.Link` in the listener's :class:`~l4proxy.core.Core`, and this
task ends (the core moves the bytes and writes the access line); anything else (an
embedder's streams, TLS over memory BIOs) goes to the copy loop,
:func:`~l4proxy.pump.pump`.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

import trio

from .addresses import TCPAddress
from .admission import key_of, parse_client
from .balancing import Balance
from .connect import HEALTH, connect_with_failover
from .connection import Connection, finish, prepare_socket, socket_stream
from .core import Link
from .eager import own_task
from .errors import UpstreamConnectError
from .preamble import backend_preamble, client_preamble
from .proxyin import accept_proxy_header
from .proxyout import send_proxy_header
from .pump import pump
from .record import ConnectionRecord, Ended, Outcome
from .tls.streams import SocketTLSStream, detach_socket
from .tlsfront import read_tls_front, secure_backend

if TYPE_CHECKING:
    from OpenSSL import SSL

    from .addresses import Address
    from .balancing import BackendPool
    from .connect import Dialed, Target
    from .connection import Shared
    from .core import Core
    from .runtime import ListenerRuntime
    from .tls import BackendTLS


async def serve(
    client: Dialed,
    peer: Address | None,
    local: Address | None,
    runtime: ListenerRuntime,
    shared: Shared,
    core: Core | None,
    client_key: int | None = None,
) -> None:
    """Proxy one connection, then log it.

    ``client`` is an accepted socket (non-blocking use is set up here) or a stream;
    ``core`` is the listener's data core, ``None`` for ``handle_stream``;
    ``client_key`` the key the admit step counted it under, if it did.

    Resource handling:
        Closes ``client`` and everything built on it or on the backend, on every path,
        cancellation included (after the hand-over to the data core, the core does).

    Error handling:
        Each failure ends this connection with an outcome in the access log; anything
        unexpected is also logged with a traceback. ``Cancelled`` is never swallowed;
        a connection cut by a drain is logged as ``drained``.
    """
    record = ConnectionRecord(
        next(shared.ids), runtime.config.name, peer, local, time=time.time(), started=trio.current_time()
    )  # fmt: skip
    runtime.live.value += 1
    shared.open += 1
    connection = Connection(client, record, runtime, shared)
    connection.client_key = client_key
    handed_over = False
    try:
        with connection:  # whatever ends it becomes its outcome
            # The set-up steps, in order; each either returns or raises Ended.
            # 1. admit: in the accept loop (admit.py), or after 2. for trusted peers.
            route, dialogue = runtime.default_route, None
            trusted = runtime.trusted_proxies
            if (
                trusted is not None
                and type(client) is socket.socket  # accepted here, not handed in
                and isinstance(peer, TCPAddress)
                and peer.host
                and trusted.permits(peer.host)
            ):
                await own_task()  # each step that may wait: see eager.py
                await accept_proxy_header(connection)  # 2. PROXY header in
            if (
                runtime.raw_data_phase
                and shared.connect is None
                and type(client) is socket.socket
                and client.getblocking()  # (not prepared by step 2)
            ):
                prepare_socket(client, type(peer) is TCPAddress)  # before the connect: cheaper
            if runtime.preamble is not None:  # 3. client preamble, with 4-6 if it starts TLS
                await own_task()
                dialogue, route = await client_preamble(connection)
            elif runtime.inspects_tls:  # 4-6. ClientHello, route, TLS termination
                route = await read_tls_front(connection)  # (it waits with eager.py's)
            if route is None:  # a cleartext preamble session on a listener with routes only
                raise Ended(Outcome.NO_ROUTE, _no_default(runtime.config.name))
            record.route = route.name
            held = False  # a PROXY header the kernel holds for the first splice
            if dialogue is None and runtime.backend_tls is not None:
                await own_task()
                await _connect_secured(connection, route.pool, runtime.backend_tls)  # 7-8
            else:
                await _connect(connection, route.pool)  # 7. (it calls own_task if it waits)
                # 8. backend PROXY header, then the backend preamble (with its TLS):
                if runtime.config.proxy_protocol is not None:
                    held = await send_proxy_header(
                        connection,
                        runtime.config.proxy_protocol,
                        splices_next=dialogue is None
                        and _is_tcp(connection)
                        and _for_core(connection, core),
                    )
                if dialogue is not None:
                    await own_task()
                    await backend_preamble(connection, dialogue)
            # 9. move bytes; 10. log (finish: here, or by the core when the link ends).
            if connection.replay:  # passthrough: what was read of the ClientHello
                await own_task()
                await connection.backend_stream().send_all(connection.replay)
                record.to_backend += len(connection.replay)
                connection.replay = b""
            link = _core_link(connection, core, held)
            if link is not None and core is not None and core.add(link):
                handed_over = True
            else:
                if link is not None:
                    _from_core(connection, link)
                await own_task()
                await _pump(connection)
    finally:
        if not handed_over:
            try:
                with connection:  # a failing close costs this connection only, too
                    await connection.aclose()
            finally:
                finish(connection)


def _no_default(listener: str) -> str:
    return f"a cleartext session has no SNI to route on and listener {listener!r} has no default backends"


async def _connect(
    connection: Connection,
    pool: BackendPool[Target],
    skip: frozenset[Target] = frozenset(),
    *,
    report_success: bool = True,
) -> None:
    """Step 7: the first backend of the pool that accepts, each tried at most once, in
    the order the pool's balancing gives; counted open at its backend."""
    client = _hash_key(connection) if pool.balance is Balance.SOURCE_HASH else None
    started = trio.current_time()  # for the connect latency histogram (metrics)
    try:
        backend, target = await connect_with_failover(
            pool,
            connection.shared.connect,
            attempt_seconds=connection.runtime.config.connect_timeout,
            source=connection.runtime.config.source_address,
            client=client,
            skip=skip,
            report_success=report_success,
        )
    except UpstreamConnectError as exc:
        if not exc.attempts and not skip:  # every backend down: fail fast, say so
            _report_all_down(connection, pool)
            raise Ended(Outcome.NO_BACKEND, "every backend of the pool is down") from None
        reasons = "; ".join(f"{address}: {reason}" for address, reason in exc.attempts)
        raise Ended(Outcome.CONNECT_FAILED, reasons) from None
    connection.backend = backend
    connection.target = target
    connection.record.backend = target.address
    connection.record.connect_seconds = trio.current_time() - started
    pool.opened(target)  # every method: Proxy.stats() reports open connections per backend
    connection.counted = pool


async def _connect_secured(
    connection: Connection, pool: BackendPool[Target], backend_tls: BackendTLS
) -> None:
    """Steps 7 and 8 for backend TLS: a backend whose TLS handshake fails (or does not
    verify) counts as one that did not connect: it is marked down as a refused connect
    would be, and the next backend is tried; each backend at most once."""
    failed: list[str] = []
    skip: frozenset[Target] = frozenset()
    while True:
        try:
            await _connect(connection, pool, skip, report_success=False)
        except Ended as ended:
            if not failed:
                raise
            reasons = "; ".join([*failed, *([ended.error] if ended.error else [])])
            raise Ended(Outcome.BACKEND_TLS_FAILED, reasons) from None
        target = connection.target
        assert target is not None
        if connection.runtime.config.proxy_protocol is not None:
            await send_proxy_header(
                connection, connection.runtime.config.proxy_protocol, splices_next=False
            )
        try:
            await secure_backend(connection, backend_tls)
        except Ended as ended:
            failed.append(f"{target.address}: {ended.error}")
            await trio.aclose_forcefully(connection.backend_stream())
            connection.backend = None  # the record keeps naming it until the next connects
            if connection.counted is not None:
                connection.counted.closed(target)
                connection.counted = None
            backoff = pool.failed(
                target, trio.current_time(), f"TLS handshake failed: {ended.error}"
            )
            if backoff is not None:
                HEALTH.warning(
                    "backend %s down: TLS handshake failed: %s (left out for %gs)",
                    target.address,
                    ended.error,
                    backoff,
                )
            skip |= {target}
            continue
        if pool.down and pool.succeeded(target):  # up only once its TLS works too
            HEALTH.warning("backend %s up: connected, TLS verified", target.address)
        return


#: The least time between two "every backend down" lines of one pool.
ALL_DOWN_REPORT_SECONDS = 10.0


def _report_all_down(connection: Connection, pool: BackendPool[Target]) -> None:
    now = trio.current_time()
    if now - pool.empty_reported >= ALL_DOWN_REPORT_SECONDS:
        pool.empty_reported = now
        HEALTH.error(
            "listener %r route %s: every backend is down (%s); connections fail at once "
            "until one is back (said at most every %gs)",
            connection.runtime.config.name,
            connection.record.route or "default",
            ", ".join(str(target.address) for target in pool.backends),
            ALL_DOWN_REPORT_SECONDS,
        )


def _hash_key(connection: Connection) -> int | None:
    """The key ``source-hash`` hashes: the client's whole address (the one a trusted
    PROXY header named, if any); ``None`` for a client without one (a Unix socket)."""
    record = connection.record
    client = record.proxied_client or record.client
    if not isinstance(client, TCPAddress) or not client.host:
        return None
    try:
        return key_of(parse_client(client.host), 128)
    except ValueError:
        return None


def _core_link(connection: Connection, core: Core | None, held: bool = False) -> Link | None:
    """Step 9's choice: a :class:`Link` for the data core when both ends are sockets it
    can drive (see :func:`_for_core`): raw sockets, trio socket streams (their
    descriptors taken over) and socket-bound TLS streams (their ``SSL.Connection``
    with them). The connection's ends become the raw sockets."""
    if not _for_core(connection, core):
        return None
    client, client_tls = _core_end(connection.client)
    if connection.client_tls is not None:  # OpenSSL on the accepted socket (step 6)
        client_tls, connection.client_tls = connection.client_tls, None
    backend, backend_tls = _core_end(connection.backend)
    connection.client, connection.backend = client, backend
    runtime = connection.runtime
    return Link(
        client,
        backend,
        connection.record,
        runtime.pipes,
        runtime.config.idle_timeout,
        connection.link_done,
        held,
        client_tls,
        backend_tls,
    )


def _for_core(connection: Connection, core: Core | None) -> bool:
    """Whether the data phase will be a core :class:`Link`: the listener's core, the
    default connector (an embedder's ``connect=`` streams go to the copy loop) and two
    ends the core can drive."""
    return (
        core is not None
        and connection.shared.connect is None
        and _drivable(connection.client)
        and _drivable(connection.backend)
    )


def _drivable(end: object) -> bool:
    kind = type(end)
    if kind is socket.socket or kind is trio.SocketStream:
        return True
    return kind is SocketTLSStream and end.can_hand_over  # type: ignore[attr-defined]


def _core_end(end: object) -> tuple[socket.socket, SSL.Connection | None]:
    """One end as the core takes it: the socket (non-blocking), and its TLS."""
    if type(end) is socket.socket:
        if end.getblocking():  # not prepared before the connect
            prepare_socket(end, end.family != socket.AF_UNIX)
        return end, None
    if type(end) is trio.SocketStream:
        return detach_socket(end.socket), None
    assert isinstance(end, SocketTLSStream)
    return end.hand_over()


def _from_core(connection: Connection, link: Link) -> None:
    """The core did not take ``link``: its ends become streams again, for the copy loop."""
    if link.held:  # kernel-held bytes for a first write that will not come from the core
        link.push_held()
    connection.client = _stream(link.client, link.client_tls)
    connection.backend = _stream(link.backend, link.backend_tls)


def _stream(sock: socket.socket, tls: SSL.Connection | None) -> trio.abc.Stream:
    stream = socket_stream(sock)
    return stream if tls is None else SocketTLSStream(stream, tls)


def _is_tcp(connection: Connection) -> bool:
    """A TCP socket to the backend: where ``MSG_MORE`` holds bytes and ``TCP_NODELAY``
    pushes them. (The target's family: ``socket.family`` costs an enum lookup.)"""
    target = connection.target
    return (
        type(connection.backend) is socket.socket
        and target is not None
        and target.family != socket.AF_UNIX
    )


async def _pump(connection: Connection) -> None:
    """Step 9 for what the core cannot drive: the copy loop over trio streams."""
    client, backend = connection.client_stream(), connection.backend_stream()
    record = connection.record
    record.outcome = await pump(
        client, backend, record, idle_seconds=connection.runtime.config.idle_timeout
    )
