"""Prometheus metrics (issue #11): real connections through a real proxy, scraped over
a real socket and read with prometheus-client's own parser; the endpoint's HTTP; the
``metrics`` key and ``--metrics`` flag; one port per worker."""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

import l4proxy
from l4proxy.metrics import config_hash, pool_label
from l4proxy.metricserver import MAX_HEAD, BadRequest, parse_request
from l4proxy.tally import Histogram

from .conftest import echo, receive_exactly, start_backend
from .proxyprocess import ProxyProcess

if TYPE_CHECKING:
    from .conftest import AccessWatcher
    from .tlsfixtures import PKI

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def http(address: tuple[str, int], request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection; the status, headers and body of the answer."""
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split(" ")[1]), headers, body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode()


def endpoint(proxy: l4proxy.Proxy) -> tuple[str, int]:
    address = proxy.metrics.addresses[0]
    assert address.host is not None
    return address.host, address.port


async def scrape(address: tuple[str, int]) -> Samples:
    """``/metrics``, parsed by prometheus-client: each sample by name and labels."""
    status, headers, body = await http(address, get("/metrics"))
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    assert int(headers["Content-Length"]) == len(body)
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        assert family.name.startswith("l4proxy_")
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


async def round_trip(port: int, payload: bytes) -> None:
    """Send ``payload``, read it back from the echo backend, half-close, see EOF."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(payload)
        assert await receive_exactly(stream, len(payload)) == payload
        await stream.send_eof()
        assert await stream.receive_some() == b""


async def closed_at_once(port: int) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        with contextlib.suppress(trio.BrokenResourceError):
            assert await stream.receive_some() == b""


def refusing_address() -> tuple[socket.socket, str]:
    """A loopback port that refuses connections (bound, never listening) while held."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    return holder, f"127.0.0.1:{holder.getsockname()[1]}"


async def test_families_count_real_connections(
    nursery: trio.Nursery, access: AccessWatcher, pki: PKI
) -> None:
    backend = await start_backend(nursery, echo)
    holder, dead = refusing_address()
    with holder:
        listeners = [
            l4proxy.ListenerConfig(
                name="plain", listen=["127.0.0.1:0"], backends=[backend], balance="least-conn"
            ),
            l4proxy.ListenerConfig(name="dead", listen=["127.0.0.1:0"], backends=[dead]),
            l4proxy.ListenerConfig(
                name="guarded", listen=["127.0.0.1:0"], backends=[backend], deny=["127.0.0.0/8"]
            ),
            l4proxy.ListenerConfig(
                name="tls",
                listen=["127.0.0.1:0"],
                backends=[backend],
                tls=l4proxy.TLSConfig(certs=[l4proxy.CertKey(cert=pki.a.cert, key=pki.a.key)]),
            ),
        ]
        config = l4proxy.Config(metrics="127.0.0.1:0", listeners=listeners)
        proxy = l4proxy.Proxy(config)
        bound = await nursery.start(proxy.serve)
        port = {address.listener: address.port for address in bound}
        with trio.fail_after(20):
            await round_trip(port["plain"], b"x" * 1000)
            await round_trip(port["plain"], b"y" * 234)
            await closed_at_once(port["dead"])  # connect refused: connect_failed
            await closed_at_once(port["guarded"])  # denied in the accept loop
            await closed_at_once(port["guarded"])
            transport = await trio.open_tcp_stream("127.0.0.1", port["tls"])
            async with trio.SSLStream(
                transport, pki.client_context(), server_hostname="a.example"
            ) as tls:
                await tls.send_all(b"over tls")
                assert await receive_exactly(tls, 8) == b"over tls"
            await access.wait(6)
            held = await trio.open_tcp_stream("127.0.0.1", port["plain"])
            async with held:
                await held.send_all(b"open")
                assert await receive_exactly(held, 4) == b"open"
                samples = await scrape(endpoint(proxy))

    def of(name: str, **labels: str) -> float:
        return value(samples, name, **labels)

    # Accepted = closed + open, refusals included.
    assert of("l4proxy_connections_accepted_total", listener="plain") == 3
    assert of("l4proxy_connections_open", listener="plain") == 1
    assert of("l4proxy_connections_parked", listener="plain") in (0, 1)
    assert of("l4proxy_connections_closed_total", listener="plain", outcome="ok") == 2
    assert of("l4proxy_forwarded_bytes_total", listener="plain", direction="to_backend") == 1234
    assert of("l4proxy_forwarded_bytes_total", listener="plain", direction="to_client") == 1234
    assert of("l4proxy_connect_duration_seconds_count", listener="plain") == 2
    assert of("l4proxy_connect_duration_seconds_bucket", listener="plain", le="10.0") == 2
    assert 0 < of("l4proxy_connect_duration_seconds_sum", listener="plain") < 20
    # The open connection is counted at its backend (least-conn counts open ones).
    assert (
        of("l4proxy_backend_open_connections", listener="plain", pool="default", backend=backend)
        == 1
    )
    assert of("l4proxy_backend_up", listener="plain", pool="default", backend=backend) == 1

    assert of("l4proxy_connections_closed_total", listener="dead", outcome="connect_failed") == 1
    assert of("l4proxy_connections_closed_total", listener="dead", outcome="ok") == 0
    assert of("l4proxy_connect_duration_seconds_count", listener="dead") == 0
    assert of("l4proxy_backend_up", listener="dead", pool="default", backend=dead) == 0

    assert of("l4proxy_connections_accepted_total", listener="guarded") == 2
    assert of("l4proxy_connections_closed_total", listener="guarded", outcome="denied") == 2
    assert of("l4proxy_rejections_total", listener="guarded", reason="denied") == 2
    assert of("l4proxy_rejections_total", listener="guarded", reason="rate_limited") == 0
    assert of("l4proxy_rejections_total", listener="plain", reason="denied") == 0

    assert of("l4proxy_tls_handshake_duration_seconds_count", listener="tls") == 1
    assert of("l4proxy_connections_closed_total", listener="tls", outcome="ok") == 1
    assert (
        "l4proxy_tls_handshake_duration_seconds_count",
        frozenset({("listener", "plain")}),
    ) not in samples
    leaf = x509.load_pem_x509_certificate(await trio.Path(pki.a.cert).read_bytes())
    expiry = of(
        "l4proxy_tls_certificate_expiry_timestamp_seconds", listener="tls", certificate=pki.a.cert
    )
    assert expiry == leaf.not_valid_after_utc.timestamp()

    assert of("l4proxy_reloads_total", result="success") == 0
    assert of("l4proxy_reloads_total", result="failure") == 0
    assert of("l4proxy_config_hash") == config_hash(config)
    assert of("l4proxy_build_info", version=l4proxy.__version__) == 1
    # No worker label on a proxy of its own, no per-client label anywhere.
    assert not any(dict(labels).keys() & {"worker", "client", "peer"} for _, labels in samples)


async def test_readyz_turns_503_when_a_drain_starts_and_healthz_stays_200(
    nursery: trio.Nursery,
) -> None:
    backend = await start_backend(nursery, echo)
    config = l4proxy.Config(
        metrics="127.0.0.1:0",
        listeners=[l4proxy.ListenerConfig(listen=["127.0.0.1:0"], backends=[backend])],
    )
    proxy = l4proxy.Proxy(config)
    done = trio.Event()

    async def serve_then_note(task_status: trio.TaskStatus[list[l4proxy.BoundAddress]]) -> None:
        await proxy.serve(task_status=task_status)
        done.set()

    (bound,) = await nursery.start(serve_then_note)
    address = endpoint(proxy)
    with trio.fail_after(20):
        assert (await http(address, get("/readyz")))[::2] == (200, b"ready\n")
        assert (await http(address, get("/healthz")))[::2] == (200, b"ok\n")
        async with await trio.open_tcp_stream("127.0.0.1", bound.port) as client:
            await client.send_all(b"ping")
            assert await receive_exactly(client, 4) == b"ping"
            proxy.close()  # the drain starts; this connection keeps it running
            assert (await http(address, get("/readyz")))[::2] == (503, b"draining\n")
            assert (await http(address, get("/healthz")))[::2] == (200, b"ok\n")
            samples = await scrape(address)
            assert value(samples, "l4proxy_connections_open", listener=bound.listener) == 1
            await client.send_all(b"still")  # the drained connection still works
            assert await receive_exactly(client, 5) == b"still"
        await done.wait()
    assert proxy.metrics.addresses == ()
    with pytest.raises(OSError, match="all attempts to connect"):  # gone with serve
        await trio.open_tcp_stream(*address)


@pytest.mark.parametrize(
    ("request_bytes", "status", "body"),
    [
        pytest.param(get("/nowhere"), 404, b"not found", id="404"),
        pytest.param(b"POST /metrics HTTP/1.1\r\n\r\n", 405, b"only GET and HEAD", id="405"),
        pytest.param(b"GET /metrics\r\n\r\n", 400, b"expected a request line", id="400"),
        pytest.param(b"\x16\x03\x01\x02\x00\r\n\r\n", 400, b"expected a request line", id="tls"),
        pytest.param(b"GET /healthz?probe=1 HTTP/1.0\n\n", 200, b"ok", id="bare-newlines"),
        pytest.param(
            b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_HEAD, 431, b"request head over", id="431"
        ),
    ],
)
async def test_the_endpoint_answers_other_requests_plainly(
    nursery: trio.Nursery, request_bytes: bytes, status: int, body: bytes
) -> None:
    config = l4proxy.Config(
        metrics="127.0.0.1:0",
        listeners=[l4proxy.ListenerConfig(listen=["127.0.0.1:0"], backends=["127.0.0.1:9"])],
    )
    proxy = l4proxy.Proxy(config)
    await nursery.start(proxy.serve)
    answered, headers, content = await http(endpoint(proxy), request_bytes)
    assert (answered, headers["Connection"]) == (status, "close")
    assert content.startswith(body)
    if status == 405:
        assert headers["Allow"] == "GET, HEAD"
    # ... and the endpoint still serves the next one.
    assert (await http(endpoint(proxy), get("/healthz")))[0] == 200


async def test_head_gets_the_headers_of_get_and_no_body(nursery: trio.Nursery) -> None:
    config = l4proxy.Config(
        metrics="127.0.0.1:0",
        listeners=[l4proxy.ListenerConfig(listen=["127.0.0.1:0"], backends=["127.0.0.1:9"])],
    )
    proxy = l4proxy.Proxy(config)
    await nursery.start(proxy.serve)
    status, headers, body = await http(endpoint(proxy), b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert (status, body) == (200, b"")
    _, got, full = await http(endpoint(proxy), get("/metrics"))
    assert headers["Content-Type"] == got["Content-Type"]
    assert 1000 < int(headers["Content-Length"]) == len(full)  # same families; the
    # scrapes themselves are not counted anywhere, so the length matches exactly


async def test_a_stalled_or_broken_scrape_costs_only_itself(nursery: trio.Nursery) -> None:
    config = l4proxy.Config(
        metrics="127.0.0.1:0",
        listeners=[l4proxy.ListenerConfig(listen=["127.0.0.1:0"], backends=["127.0.0.1:9"])],
    )
    proxy = l4proxy.Proxy(config)
    await nursery.start(proxy.serve)
    address = endpoint(proxy)
    with trio.fail_after(10):
        stalled = await trio.open_tcp_stream(*address)  # half a request, then nothing
        await stalled.send_all(b"GET /metr")
        reset = await trio.open_tcp_stream(*address)  # half a request, then a reset
        await reset.send_all(b"GET /metrics HTTP/1.1\r\n")
        reset.socket.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        await reset.aclose()
        samples = await scrape(address)  # served while the stalled one waits
        assert value(samples, "l4proxy_reloads_total", result="failure") == 0
        await stalled.aclose()


async def test_reloads_are_counted_and_the_hash_follows_the_config(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo)
    listener = l4proxy.ListenerConfig(name="svc", listen=["127.0.0.1:0"], backends=[backend])
    config = l4proxy.Config(metrics="127.0.0.1:0", listeners=[listener])
    proxy = l4proxy.Proxy(config)
    await nursery.start(proxy.serve)
    address = endpoint(proxy)
    before = value(await scrape(address), "l4proxy_config_hash")
    changed = l4proxy.Config(
        metrics="127.0.0.1:0",
        listeners=[
            l4proxy.ListenerConfig(
                name="svc", listen=["127.0.0.1:0"], backends=[backend], idle_timeout=5
            )
        ],
    )
    await proxy.reload(changed)
    unusable = l4proxy.Config(
        metrics="127.0.0.1:0",
        listeners=[
            l4proxy.ListenerConfig(
                name="svc",
                listen=["127.0.0.1:0"],
                backends=[backend],
                source_address="192.0.2.1",  # TEST-NET-1: not an address of this machine
            )
        ],
    )
    with pytest.raises(l4proxy.ConfigError, match="source_address"):
        await proxy.reload(unusable)
    samples = await scrape(address)
    assert value(samples, "l4proxy_reloads_total", result="success") == 1
    assert value(samples, "l4proxy_reloads_total", result="failure") == 1
    after = value(samples, "l4proxy_config_hash")
    assert after == config_hash(proxy.config)
    assert after != before
    assert config_hash(changed) == config_hash(
        l4proxy.Config.from_mapping(
            {
                "metrics": "127.0.0.1:0",
                "listeners": [
                    {
                        "name": "svc",
                        "listen": "127.0.0.1:0",
                        "backends": [backend],
                        "idle_timeout": 5,
                    }
                ],
            }
        )
    )  # the same configuration, however it was built


async def test_a_reload_adds_moves_and_removes_the_endpoint(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    backend = await start_backend(nursery, echo)

    def with_metrics(metrics: str | None) -> l4proxy.Config:
        listener = l4proxy.ListenerConfig(
            name="svc", listen=["127.0.0.1:0"], backends=[backend], idle_timeout=5
        )
        return l4proxy.Config(metrics=metrics, listeners=[listener])

    proxy = l4proxy.Proxy(with_metrics(None))
    await nursery.start(proxy.serve)
    assert proxy.metrics.addresses == ()
    with trio.fail_after(20):
        await proxy.reload(with_metrics("127.0.0.1:0"))  # added: bound by the reload
        first = endpoint(proxy)
        assert value(await scrape(first), "l4proxy_reloads_total", result="success") == 1
        # A port free on every interface, not only on 127.0.0.1: a socket elsewhere on
        # the port (another test's client on 127.0.0.2, in TIME_WAIT) would refuse the
        # move to 0.0.0.0 below (which the proxy logs, keeping the old endpoint).
        with socket.socket() as probe:
            probe.bind(("0.0.0.0", 0))
            port = probe.getsockname()[1]
        await proxy.reload(with_metrics(f"127.0.0.1:{port}"))  # moved: new bound, old closed
        assert endpoint(proxy) == ("127.0.0.1", port)
        assert value(await scrape(("127.0.0.1", port)), "l4proxy_reloads_total", result="success")
        with pytest.raises(OSError, match="all attempts to connect"):
            await trio.open_tcp_stream(*first)
        # The same port on every interface: the old socket holds it, so it goes first.
        await proxy.reload(with_metrics(f"0.0.0.0:{port}"))
        assert [str(a) for a in proxy.metrics.addresses] == [f"0.0.0.0:{port}"]
        assert value(await scrape(("127.0.0.1", port)), "l4proxy_reloads_total", result="success")
        # A new address in use: logged, the reload applies, the old endpoint stays.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            with caplog.at_level(logging.ERROR, "l4proxy.metrics"):
                await proxy.reload(with_metrics(f"127.0.0.1:{busy}"))
            assert f"cannot serve metrics on 127.0.0.1:{busy}: address already in use" in (
                caplog.text
            )
            assert f"the metrics endpoint stays on 0.0.0.0:{port}" in caplog.text
            samples = await scrape(("127.0.0.1", port))
            assert value(samples, "l4proxy_reloads_total", result="success") == 4
        await proxy.reload(with_metrics(None))  # removed: the endpoint closes
        assert proxy.metrics.addresses == ()
        with pytest.raises(OSError, match="all attempts to connect"):
            await trio.open_tcp_stream("127.0.0.1", port)
        await proxy.reload(with_metrics(f"127.0.0.1:{port}"))  # and back
        assert value(await scrape(("127.0.0.1", port)), "l4proxy_reloads_total", result="success")
    proxy.close()


async def test_a_metrics_address_in_use_is_a_listen_error(nursery: trio.Nursery) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = l4proxy.Config(
            metrics=f"127.0.0.1:{port}",
            listeners=[l4proxy.ListenerConfig(listen=["127.0.0.1:0"], backends=["127.0.0.1:9"])],
        )
        with pytest.raises(l4proxy.ListenError, match=rf"cannot serve metrics on 127.0.0.1:{port}"):
            await nursery.start(l4proxy.Proxy(config).serve)


def test_the_metrics_key_is_checked_at_load_naming_it(tmp_path: Path) -> None:
    listener = {"listen": ":1", "backends": ["127.0.0.1:9"]}
    for bad, message in [
        ("unix:/run/m.sock", "metrics: expected HOST:PORT, [IPV6]:PORT or :PORT"),
        (9100, "metrics: expected an address string HOST:PORT, got an integer"),
        ("localhost", "metrics: expected HOST:PORT, got 'localhost'"),
        ("::1:9100", "metrics: IPv6 addresses need brackets"),
        ("127.0.0.1:99999", "metrics: port must be 0-65535"),
    ]:
        with pytest.raises(l4proxy.ConfigError, match=re.escape(f"f.toml: {message}")):
            l4proxy.Config.from_mapping({"metrics": bad, "listeners": [listener]}, source="f.toml")
    config = l4proxy.Config.from_mapping({"metrics": "[::1]:9100", "listeners": [listener]})
    assert config.metrics == l4proxy.TCPAddress("::1", 9100)
    assert l4proxy.Config.from_mapping({"metrics": ":9100", "listeners": [listener]}).metrics == (
        l4proxy.TCPAddress(None, 9100)
    )
    with pytest.raises(l4proxy.ConfigError, match="metrics: port 65535 leaves no port"):
        l4proxy.Config.from_mapping({"metrics": ":65535", "workers": 2, "listeners": [listener]})


def test_the_request_line_and_histogram_cores() -> None:
    assert parse_request(b"HEAD /readyz HTTP/1.0\r\n\r\n") == ("HEAD", "/readyz")
    for bad in (b"GET / HTTP/2\r\n\r\n", b"GET  / HTTP/1.1\r\n\r\n", b"GET * HTTP/1.1\r\n\r\n"):
        with pytest.raises(BadRequest):
            parse_request(bad)
    histogram = Histogram((0.001, 0.01))
    for seconds in (0.001, 0.0011, 0.01, 5.0, 0.0):
        histogram.observe(seconds)
    assert histogram.cumulative() == [2, 4, 5]  # a value on a bound counts in its bucket
    assert pool_label("default") == "default"
    assert pool_label("sni=a.example,*.b.example alpn=") == "a.example,*.b.example"
    assert pool_label("sni=db.example alpn=postgresql") == "db.example alpn=postgresql"


async def test_the_command_serves_metrics_and_counts_a_file_that_fails_to_reload(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = await start_backend(nursery, echo)
    path = tmp_path / "l4proxy.toml"
    path.write_text(
        f'metrics = "127.0.0.1:0"\n[[listeners]]\nname = "svc"\n'
        f'listen = ["127.0.0.1:0"]\nbackends = ["{backend}"]\n'
    )
    with trio.fail_after(30):
        async with ProxyProcess(nursery, ["--config", str(path)]) as proc:
            (match,) = await proc.wait_for(r"serving metrics on http://127\.0\.0\.1:(\d+)/metrics")
            address = ("127.0.0.1", int(match.group(1)))
            ((_, port),) = await proc.listening()
            await round_trip(port, b"hello")
            await proc.wait_for("outcome=ok")
            path.write_text("metrics = [oops\n")  # not TOML: never reaches Proxy.reload
            proc.signal(signal.SIGHUP)
            await proc.wait_for("reload failed")
            samples = await scrape(address)
            assert (
                value(samples, "l4proxy_connections_closed_total", listener="svc", outcome="ok")
                == 1
            )
            assert value(samples, "l4proxy_reloads_total", result="failure") == 1
            assert value(samples, "l4proxy_reloads_total", result="success") == 0
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0


async def test_the_flag_is_checked_like_its_key(nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        async with ProxyProcess(
            nursery, ["-l", "127.0.0.1:0", "-b", "127.0.0.1:9", "--metrics", "unix:/tmp/m"]
        ) as proc:
            assert await proc.wait() == 2
            await proc.wait_for(r"^l4proxy: error: --metrics: expected HOST:PORT")


def _two_free_ports() -> int:
    """A port P with P + 1 free as well, just now (bounded tries). The workers bind
    them a moment later: a tiny window in which another program could take one."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no two consecutive free ports on 127.0.0.1")


async def test_each_worker_serves_its_own_port_with_a_worker_label(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo)
    base = _two_free_ports()
    with trio.fail_after(60):
        async with ProxyProcess(
            nursery,
            [
                "-l",
                "127.0.0.1:0",
                "-b",
                backend,
                "--workers",
                "2",
                "--metrics",
                f"127.0.0.1:{base}",
            ],
        ) as proc:
            await proc.wait_for("2 workers running")
            ((_, port), _) = await proc.listening(count=2)
            for index in range(20):
                await round_trip(port, f"hello {index}".encode())
            await proc.wait_for("outcome=ok", count=20)
            served = 0.0
            for worker, metrics_port in (("1", base), ("2", base + 1)):
                samples = await scrape(("127.0.0.1", metrics_port))
                assert all(dict(labels).get("worker") == worker for _, labels in samples)
                listener = "127.0.0.1:0"  # named after its listen address as given
                served += value(
                    samples,
                    "l4proxy_connections_closed_total",
                    worker=worker,
                    listener=listener,
                    outcome="ok",
                )
            assert served == 20  # each counts its own; together, every connection
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0
