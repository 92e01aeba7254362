"""What each listener needs at run time, built once from its config (at start and on
reload): pools, routes, TLS contexts, the access sink.

Building reads certificate, key and CA files and may run in a worker thread (reload),
so it touches no state of a running proxy: the caller passes in the sinks and live
counters to reuse.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import attrs

from .accesslog import FileSink, LoggerSink
from .admission import AccessList, ClientLimits
from .balancing import BackendPool, Balance, HealthBoard
from .connect import Target, target
from .protocols.builtin import BUILTIN_PREAMBLES
from .protocols.dialogue import DialogueSettings, Preamble
from .routing import Route, Router
from .tally import Tally
from .tls import BackendTLS, build_server_tls

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .backends import Backend
    from .config import Config, ListenerConfig, LogFormat
    from .splice import PipePool
    from .tls import ServerTLS

Sink = LoggerSink | FileSink


class LiveCount:
    """Connections of one listener that are open right now, in all and per client, and
    the tally of those that ended, for the metrics (kept across reloads)."""

    __slots__ = ("clients", "tally", "value")

    def __init__(self) -> None:
        self.value = 0
        self.clients = ClientLimits()
        self.tally = Tally()


@attrs.frozen(eq=False)
class ListenerRuntime:
    """One listener's settings and the objects its connections use.

    Attributes:
        config: the frozen listener config.
        router: SNI (and ALPN) to a route and its pool.
        default_route: the route of a listener that reads no ClientHello (or ``None``).
        inspects_tls, log_format: the config's, read once per connection.
        access_log: where its connections are logged.
        server_tls: certificates and client-certificate checks when terminating TLS.
        backend_tls: the client context when re-encrypting to the backends.
        pipes: the splice pipe pool, when ``splice`` is on and the kernel has it.
        live: open connections, shared with the runtimes built by later reloads.
        preamble: the listener's preamble (a built-in one looked up by name), if any.
        dialogue_settings: what each of its dialogues is told.
    """

    config: ListenerConfig
    router: Router[BackendPool[Target]]
    access_log: Sink
    server_tls: ServerTLS | None = None
    backend_tls: BackendTLS | None = None
    pipes: PipePool | None = None
    live: LiveCount = attrs.field(factory=LiveCount)
    server_name: str = "l4proxy"  # the name mail greetings give: the host's, by default
    #: The pools behind the router, keyed as :func:`_pools` does (for reloads).
    pools: Mapping[str, BackendPool[Target]] = attrs.field(factory=dict)
    preamble: Preamble | None = attrs.field(init=False)
    dialogue_settings: DialogueSettings = attrs.field(init=False)
    default_route: Route[BackendPool[Target]] | None = attrs.field(init=False)
    #: Worked out once: read on every connection.
    inspects_tls: bool = attrs.field(init=False)
    log_format: LogFormat = attrs.field(init=False)
    #: The allow/deny lists, or ``None`` when the listener has neither (no check at all).
    access_list: AccessList | None = attrs.field(init=False)
    #: Whether the client socket stays raw to the data core (no TLS either side, no preamble,
    #: every backend reachable with a raw socket); with a custom connector they do not.
    raw_data_phase: bool = attrs.field(init=False)

    #: Peers whose connections open with a PROXY header (``None``: no listener's).
    trusted_proxies: AccessList | None = attrs.field(init=False)

    @trusted_proxies.default
    def _trusted_proxies(self) -> AccessList | None:
        cidrs = self.config.accept_proxy_protocol
        return AccessList(cidrs) if cidrs else None

    #: Whether the admit step has anything to check (lists or limits): read per accept.
    admits_all: bool = attrs.field(init=False)

    @admits_all.default
    def _admits_all(self) -> bool:
        config = self.config
        return (
            self.access_list is None
            and config.max_connections is None
            and config.max_connections_per_ip is None
            and config.rate_per_ip is None
        )

    @access_list.default
    def _access_list(self) -> AccessList | None:
        config = self.config
        return AccessList(config.allow, config.deny) if config.allow or config.deny else None

    @default_route.default
    def _default_route(self) -> Route[BackendPool[Target]] | None:
        return self.router.match(None, ())

    @inspects_tls.default
    def _inspects_tls(self) -> bool:
        return self.config.inspects_tls

    @preamble.default
    def _preamble(self) -> Preamble | None:
        preamble = self.config.preamble
        if isinstance(preamble, str):
            return BUILTIN_PREAMBLES[preamble]
        return preamble

    @dialogue_settings.default
    def _dialogue_settings(self) -> DialogueSettings:
        return DialogueSettings(
            server_name=self.server_name,
            backend_tls=self.config.backend_tls,
            allow_plaintext=self.config.allow_plaintext,
        )

    @raw_data_phase.default
    def _raw_data_phase(self) -> bool:
        default = self.default_route
        return (
            not self.inspects_tls
            and self.config.preamble is None
            and self.backend_tls is None
            and default is not None
            and all(t.sockaddr is not None for t in default.pool.backends)
        )

    @log_format.default
    def _log_format(self) -> LogFormat:
        return self.config.log_format


def build_runtimes(
    config: Config,
    *,
    default_sink: Sink,
    file_sinks: Mapping[str, FileSink],
    live: Mapping[str, LiveCount],
    pipes: PipePool | None,
    board: HealthBoard,
) -> dict[str, ListenerRuntime]:
    """A runtime per listener, by name.

    Sinks and live counters named in ``file_sinks`` / ``live`` are reused; missing ones
    are made new (the caller keeps them, see ``Proxy.__init__``).

    Error handling:
        Raises ``ConfigError`` naming the key and file when a certificate, key or CA
        file cannot be read or used.
    """
    runtimes = {}
    server_name = socket.gethostname() or "l4proxy"
    sinks = dict(file_sinks)  # listeners naming one file share one sink (and its thread)
    for index, listener in enumerate(config.listeners):
        pools = _pools(listener, board)
        runtimes[listener.name] = ListenerRuntime(
            listener,
            _router(listener, pools),
            _sink(listener, default_sink, sinks),
            server_tls=None
            if listener.tls is None
            else build_server_tls(
                listener.tls,
                session_id=f"l4proxy {listener.name}".encode()[:32],
                key_path=f"listeners[{index}].tls",
            ),
            backend_tls=BackendTLS(
                listener.backend_ca,
                server_name=listener.backend_sni,
                key_path=f"listeners[{index}].backend_ca",
            )
            if listener.backend_tls
            else None,
            pipes=pipes if listener.splice else None,
            live=live.get(listener.name) or LiveCount(),
            server_name=server_name,
            pools=pools,
        )
    return runtimes


def _pool(
    backends: tuple[Backend, ...], balance: Balance, board: HealthBoard
) -> BackendPool[Target]:
    return BackendPool(
        tuple(target(backend.address) for backend in backends),
        weights=[backend.weight for backend in backends],
        backups=[backend.backup for backend in backends],
        balance=balance,
        names=[str(backend.address) for backend in backends],
        board=board,
    )


def _pools(listener: ListenerConfig, board: HealthBoard) -> dict[str, BackendPool[Target]]:
    """The listener's pools, keyed by what identifies a pool across reloads: ``default``
    and each route's names and ALPN list."""
    pools = {
        f"sni={','.join(route.sni)} alpn={','.join(route.alpn)}": _pool(
            route.backends, route.balance or listener.balance, board
        )
        for route in listener.routes
    }
    if listener.backends:
        pools["default"] = _pool(listener.backends, listener.balance, board)
    return pools


def _router(
    listener: ListenerConfig, pools: Mapping[str, BackendPool[Target]]
) -> Router[BackendPool[Target]]:
    routes = [
        (route.sni, route.alpn, pools[f"sni={','.join(route.sni)} alpn={','.join(route.alpn)}"])
        for route in listener.routes
    ]
    return Router(routes, default=pools.get("default"))


def _sink(listener: ListenerConfig, default: Sink, files: dict[str, FileSink]) -> Sink:
    path = listener.access_log
    if path is None:
        return default
    sink = files.get(path)
    if sink is None:
        sink = files[path] = FileSink(path)
    return sink


def carry_over(new: ListenerRuntime, old: ListenerRuntime) -> None:
    """A reload's new runtime takes the old one's pool state (open counts, health,
    rotation) for the pools and backends both have. On the trio thread, at the swap."""
    for name, pool in new.pools.items():
        previous = old.pools.get(name)
        if previous is not None:
            pool.carry_over(previous)
    for name, previous in old.pools.items():
        if name not in new.pools:  # a route the reload removed
            previous.retire()
