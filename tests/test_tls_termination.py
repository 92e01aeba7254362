"""TLS termination end to end: real loopback sockets, the in-process proxy, and stdlib
``ssl`` clients through ``trio.SSLStream`` (a second TLS stack, independent of the
proxy's pyOpenSSL).

Backends answer with their name (``identify``), so a test knows which pool a route
picked; the client checks which certificate it received by comparing DER bytes.
"""

from __future__ import annotations

import datetime
import logging
import ssl
import tomllib
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

import l4proxy
from l4proxy.config import CertKey, RouteConfig, TLSConfig

from .conftest import (
    AccessWatcher,
    identify,
    read_line,
    receive_all,
    receive_exactly,
    start_backend,
)
from .tlsfixtures import PKI, CertFiles, write_cert

#: Seconds allowed for any one step of a test (connect, handshake, a reply, a log line).
STEP = 5

#: Every test here runs on both byte movers of TLS connections (``tls_path``).
pytestmark = pytest.mark.usefixtures("tls_path")

TLS13_SUITES = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}


# --- helpers -------------------------------------------------------------------------------


def leaf_der(files: CertFiles) -> bytes:
    """The DER bytes of the first certificate in ``files.cert``."""
    pem = Path(files.cert).read_bytes()
    return x509.load_pem_x509_certificates(pem)[0].public_bytes(Encoding.DER)


def pair(files: CertFiles) -> CertKey:
    return CertKey(cert=files.cert, key=files.key)


def tls_config(*certs: CertFiles, **settings: object) -> TLSConfig:
    return TLSConfig(certs=[pair(files) for files in certs], **settings)  # type: ignore[arg-type]


def listener(
    tls: TLSConfig,
    backends: list[str] | None = None,
    routes: list[RouteConfig] | None = None,
    **settings: object,
) -> l4proxy.ListenerConfig:
    return l4proxy.ListenerConfig(
        name="tls",
        listen=["127.0.0.1:0"],
        backends=backends or [],
        routes=routes or [],
        tls=tls,
        **settings,  # type: ignore[arg-type]
    )


async def serve(nursery: trio.Nursery, config: l4proxy.Config) -> tuple[l4proxy.Proxy, int]:
    """Start ``config`` (one listener) in ``nursery``; return the proxy and its port."""
    proxy = l4proxy.Proxy(config)
    bound = await nursery.start(proxy.serve)
    port = bound[0].port
    assert port is not None
    return proxy, port


async def serve_listener(
    nursery: trio.Nursery,
    tls: TLSConfig,
    backends: list[str] | None = None,
    routes: list[RouteConfig] | None = None,
) -> tuple[l4proxy.Proxy, int]:
    return await serve(nursery, l4proxy.Config(listeners=[listener(tls, backends, routes)]))


def client_context(
    pki: PKI,
    *,
    check_hostname: bool = True,
    alpn: list[str] | None = None,
    client: CertFiles | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    context = pki.client_context(alpn=alpn, client=client)
    context.check_hostname = check_hostname  # verify_mode stays CERT_REQUIRED
    if maximum is not None:
        context.maximum_version = maximum
    return context


async def open_tls(
    port: int, context: ssl.SSLContext, server_hostname: str | None
) -> trio.SSLStream[trio.SocketStream]:
    """Connect to the proxy on loopback and finish the client's side of the handshake."""
    transport = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(transport, context, server_hostname=server_hostname)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def which_backend(
    port: int, context: ssl.SSLContext, server_hostname: str | None
) -> tuple[bytes, trio.SSLStream[trio.SocketStream]]:
    """Handshake, then read the backend's greeting. The caller closes the stream."""
    stream = await open_tls(port, context, server_hostname)
    try:
        return (await read_line(stream))[:-1], stream
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def handshake(port: int, context: ssl.SSLContext, server_hostname: str | None) -> None:
    """Handshake, then close: for clients expected to be refused (nothing leaks if not)."""
    stream = await open_tls(port, context, server_hostname)
    await stream.aclose()


async def handshake_and_read(
    port: int, context: ssl.SSLContext, server_hostname: str | None
) -> bytes:
    """Handshake and one read: whichever the refusal arrives on raises."""
    async with await open_tls(port, context, server_hostname) as stream:
        return bytes(await stream.receive_some())


async def answer_then_eof(stream: trio.SocketStream) -> None:
    """Echo one line, half-close, then read until the client's EOF (so the proxy's
    pump ends with both directions done and never writes to a closed client)."""
    async with stream:
        line = bytearray()
        while not line.endswith(b"\n"):
            chunk = await stream.receive_some()
            if not chunk:
                break
            line += chunk
        await stream.send_all(line)
        await stream.send_eof()
        await receive_all(stream)


# --- 1. the certificate for each SNI ---------------------------------------------------------


@pytest.mark.parametrize(
    ("order", "server_name", "expected"),
    [
        pytest.param("ac", "a.example", "a", id="exact-a"),
        pytest.param("ac", "c.example", "c", id="exact-c-second-cert"),
        pytest.param("ac", "x.b.example", "a", id="wildcard"),
        pytest.param("ca", "y.b.example", "a", id="wildcard-second-cert"),
        pytest.param("ac", "C.Example.", "c", id="case-and-trailing-dot"),
        pytest.param("ac", None, "a", id="no-sni-gets-first"),
        pytest.param("ca", None, "c", id="no-sni-gets-first-reordered"),
        pytest.param("ac", "unknown.example", "a", id="unknown-gets-first"),
        pytest.param("ca", "z.y.b.example", "c", id="wildcard-is-one-label-only"),
        pytest.param("ca", "b.example", "c", id="wildcard-needs-a-label"),
    ],
)
async def test_certificate_is_chosen_by_sni(
    nursery: trio.Nursery, pki: PKI, order: str, server_name: str | None, expected: str
) -> None:
    files = {"a": pki.a, "c": pki.c}
    backend = await start_backend(nursery, identify(b"backend"))
    _, port = await serve_listener(nursery, tls_config(*(files[k] for k in order)), [backend])
    # The name check is the proxy's choice under test here, so the client only verifies
    # the chain and the test compares the certificate itself.
    context = client_context(pki, check_hostname=False)
    with trio.fail_after(STEP):
        greeting, stream = await which_backend(port, context, server_name)
        async with stream:
            assert stream.getpeercert(binary_form=True) == leaf_der(files[expected])
    assert greeting == b"backend"


async def test_exact_certificate_beats_an_earlier_wildcard(
    nursery: trio.Nursery, pki: PKI, tmp_path: Path
) -> None:
    x = write_cert(pki.ca.issue_cert("x.b.example"), tmp_path, "x")
    backend = await start_backend(nursery, identify(b"backend"))
    _, port = await serve_listener(nursery, tls_config(pki.a, x), [backend])
    with trio.fail_after(STEP):
        # check_hostname on: the stdlib client itself agrees each cert fits its name.
        for name, files in [("x.b.example", x), ("y.b.example", pki.a)]:
            _, stream = await which_backend(port, client_context(pki), name)
            async with stream:
                assert stream.getpeercert(binary_form=True) == leaf_der(files), name


# --- 2. routing by SNI and ALPN ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("server_name", "pool", "logged_sni"),
    [
        ("a.example", b"alpha", "a.example"),
        ("x.b.example", b"exact-x", "x.b.example"),  # exact beats the wildcard listed first
        ("y.b.example", b"wild-b", "y.b.example"),
        ("c.example", b"default", "c.example"),  # no route: the default pool
        ("z.y.b.example", b"default", "z.y.b.example"),  # wildcards match one label
        ("A.EXAMPLE", b"alpha", "a.example"),
        ("a.example.", b"alpha", "a.example"),
        ("X.B.Example.", b"exact-x", "x.b.example"),
        (None, b"default", None),
    ],
)
async def test_sni_routes_to_pools(
    nursery: trio.Nursery,
    pki: PKI,
    access: AccessWatcher,
    server_name: str | None,
    pool: bytes,
    logged_sni: str | None,
) -> None:
    names = [b"alpha", b"wild-b", b"exact-x", b"default"]
    address = {name: await start_backend(nursery, identify(name)) for name in names}
    routes = [
        RouteConfig(sni=["a.example"], backends=[address[b"alpha"]]),
        RouteConfig(sni=["*.b.example"], backends=[address[b"wild-b"]]),
        RouteConfig(sni=["x.b.example"], backends=[address[b"exact-x"]]),
    ]
    _, port = await serve_listener(nursery, tls_config(pki.a, pki.c), [address[b"default"]], routes)
    with trio.fail_after(STEP):
        greeting, stream = await which_backend(
            port, client_context(pki, check_hostname=False), server_name
        )
        await stream.aclose()
        (record,) = await access.wait()
    assert greeting == pool
    assert str(record.backend) == address[pool]
    assert record.sni == logged_sni


ALPN_TOML = """
[[listeners]]
name = "alpn"
listen = ["127.0.0.1:0"]
backends = ["{default}"]
tls = {{ certs = [{{ cert = "{cert}", key = "{key}" }}], alpn = ["h2", "http/1.1"] }}

[[listeners.routes]]
sni = ["a.example"]
alpn = ["h2"]
backends = ["{h2}"]

[[listeners.routes]]
sni = ["a.example"]
backends = ["{http}"]
"""


@pytest.mark.parametrize(
    ("offered", "pool", "negotiated"),
    [
        (["h2", "http/1.1"], b"h2-pool", "h2"),
        (["http/1.1", "h2"], b"h2-pool", "h2"),  # the route decides, not the client's order
        (["http/1.1"], b"http-pool", "http/1.1"),
        (None, b"http-pool", None),
    ],
)
async def test_alpn_routes_from_toml(
    nursery: trio.Nursery,
    pki: PKI,
    access: AccessWatcher,
    offered: list[str] | None,
    pool: bytes,
    negotiated: str | None,
) -> None:
    default = await start_backend(nursery, identify(b"default"))
    h2 = await start_backend(nursery, identify(b"h2-pool"))
    http = await start_backend(nursery, identify(b"http-pool"))
    text = ALPN_TOML.format(default=default, cert=pki.a.cert, key=pki.a.key, h2=h2, http=http)
    config = l4proxy.Config.from_mapping(tomllib.loads(text))
    _, port = await serve(nursery, config)
    with trio.fail_after(STEP):
        greeting, stream = await which_backend(port, client_context(pki, alpn=offered), "a.example")
        async with stream:
            assert stream.selected_alpn_protocol() == negotiated
        (record,) = await access.wait()
    assert greeting == pool
    assert record.alpn == negotiated
    assert record.sni == "a.example"


async def test_route_alpn_is_negotiated_without_a_listener_alpn_list(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    """A route that selects on ``h2`` sends h2 clients to an h2 backend, so the client
    must also be told h2 was chosen (or it falls back to HTTP/1.1 and the backend
    sees the wrong protocol), even when ``tls.alpn`` lists nothing."""
    h2 = await start_backend(nursery, identify(b"h2-pool"))
    other = await start_backend(nursery, identify(b"other"))
    routes = [RouteConfig(sni=["a.example"], alpn=["h2"], backends=[h2])]
    _, port = await serve_listener(nursery, tls_config(pki.a), [other], routes)
    with trio.fail_after(STEP):
        greeting, stream = await which_backend(
            port, client_context(pki, alpn=["h2", "http/1.1"]), "a.example"
        )
        async with stream:
            selected = stream.selected_alpn_protocol()
        (record,) = await access.wait()
    assert greeting == b"h2-pool"
    assert selected == "h2"
    assert record.alpn == "h2"


# --- 3. no route, no default pool --------------------------------------------------------------


@pytest.mark.parametrize("server_name", ["unknown.example", "c.example", None])
async def test_no_route_and_no_default_is_an_unrecognized_name_alert(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, server_name: str | None
) -> None:
    backend = await start_backend(nursery, identify(b"alpha"))
    routes = [RouteConfig(sni=["a.example"], backends=[backend])]
    _, port = await serve_listener(nursery, tls_config(pki.a, pki.c), None, routes)
    with trio.fail_after(STEP):
        with pytest.raises(trio.BrokenResourceError) as caught:
            await handshake(port, client_context(pki, check_hostname=False), server_name)
        (record,) = await access.wait()
    cause = caught.value.__cause__
    assert isinstance(cause, ssl.SSLError), repr(cause)
    assert "UNRECOGNIZED_NAME" in str(cause)
    assert record.outcome == "no_route"
    assert record.backend is None
    assert record.sni == server_name
    assert record.error is not None
    assert "no route" in record.error
    assert (server_name or "without sni") in record.error


# --- 4. policy -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("maximum", "version"),
    [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")],
    ids=["tls1.2", "tls1.3"],
)
async def test_negotiated_version_and_cipher_follow_the_policy(
    nursery: trio.Nursery,
    pki: PKI,
    access: AccessWatcher,
    maximum: ssl.TLSVersion,
    version: str,
) -> None:
    backend = await start_backend(nursery, identify(b"backend"))
    _, port = await serve_listener(nursery, tls_config(pki.a), [backend])
    with trio.fail_after(STEP):
        greeting, stream = await which_backend(
            port, client_context(pki, maximum=maximum), "a.example"
        )
        async with stream:
            client_version = stream.version()
            cipher, _, bits = stream.cipher()
            compression = stream.compression()
        (record,) = await access.wait()
    assert greeting == b"backend"
    assert client_version == version
    assert compression is None
    if version == "TLSv1.2":
        assert cipher.startswith("ECDHE-"), cipher  # forward secrecy
        assert "GCM" in cipher or "CHACHA20-POLY1305" in cipher, cipher  # AEAD
    else:
        assert cipher in TLS13_SUITES
    assert bits >= 128
    assert (record.tls_version, record.cipher) == (version, cipher)


async def test_tls12_without_ecdhe_aead_ciphers_is_refused(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, tmp_path: Path
) -> None:
    """An RSA certificate would allow RSA key exchange, DHE and CBC suites; the policy
    must not."""
    rsa = write_cert(pki.ca.issue_cert("a.example", key_type=trustme.KeyType.RSA), tmp_path, "rsa")
    backend = await start_backend(nursery, identify(b"backend"))
    _, port = await serve_listener(nursery, tls_config(rsa), [backend])
    weak = client_context(pki, maximum=ssl.TLSVersion.TLSv1_2)
    weak.set_ciphers("AES128-GCM-SHA256:DHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-SHA")
    with trio.fail_after(STEP):
        with pytest.raises(trio.BrokenResourceError):
            await handshake(port, weak, "a.example")
        (record,) = await access.wait()
        # The same certificate with a default client: ECDHE-RSA with an AEAD.
        _, stream = await which_backend(
            port, client_context(pki, maximum=ssl.TLSVersion.TLSv1_2), "a.example"
        )
        async with stream:
            cipher = stream.cipher()[0]
    assert record.outcome == "tls_handshake_failed"
    assert record.route == "default"  # routed before the handshake failed: logged
    assert record.error is not None
    assert "cipher" in record.error
    assert cipher.startswith("ECDHE-RSA-")
    assert "GCM" in cipher or "CHACHA20" in cipher


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["tls1.0", "tls1.1"]
)
async def test_tls10_and_tls11_are_always_refused(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, version: ssl.TLSVersion
) -> None:
    backend = await start_backend(nursery, identify(b"backend"))
    _, port = await serve_listener(nursery, tls_config(pki.a), [backend])
    context = client_context(pki)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the stdlib frowns on TLS 1.0/1.1
        context.minimum_version = context.maximum_version = version
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer them at all
    with trio.fail_after(STEP):
        with pytest.raises(trio.BrokenResourceError) as caught:
            await handshake(port, context, "a.example")
        (record,) = await access.wait()
    assert "PROTOCOL_VERSION" in str(caught.value.__cause__)  # the server's alert
    assert record.outcome == "tls_handshake_failed"
    assert record.error == "unsupported protocol"


@pytest.mark.parametrize(
    ("group", "accepted"),
    [
        ("X25519", True),
        ("prime256v1", True),
        ("ffdhe2048", False),  # finite-field DH: the policy is ECDHE only
        ("X448", False),
        ("secp521r1", False),
    ],
)
async def test_key_exchange_groups_are_x25519_and_p256(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, group: str, accepted: bool
) -> None:
    """The issue's policy: "ECDHE only, X25519/P-256". Under TLS 1.3 the group is
    independent of the certificate, so a client offering one group shows whether the
    listener accepts it. (On OpenSSL 3, ``set_ecdh_curve`` sets the client's whole
    supported_groups list, finite-field groups included.)"""
    backend = await start_backend(nursery, identify(b"backend"))
    _, port = await serve_listener(nursery, tls_config(pki.a), [backend])
    context = client_context(pki)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_ecdh_curve(group)
    with trio.fail_after(STEP):
        if accepted:
            greeting, stream = await which_backend(port, context, "a.example")
            await stream.aclose()
            assert greeting == b"backend"
        else:
            with pytest.raises(trio.BrokenResourceError):
                await handshake_and_read(port, context, "a.example")
            (record,) = await access.wait()
            assert record.outcome == "tls_handshake_failed"
            assert record.backend is None


async def test_min_version_13_refuses_a_tls12_client(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    backend = await start_backend(nursery, identify(b"backend"))
    _, port = await serve_listener(nursery, tls_config(pki.a, min_version="1.3"), [backend])
    with trio.fail_after(STEP):
        with pytest.raises(trio.BrokenResourceError):
            await handshake(port, client_context(pki, maximum=ssl.TLSVersion.TLSv1_2), "a.example")
        greeting, stream = await which_backend(port, client_context(pki), "a.example")
        async with stream:
            assert stream.version() == "TLSv1.3"
        records = await access.wait(2)
    assert greeting == b"backend"
    (refused,) = [record for record in records if record.tls_version is None]
    assert refused.outcome == "tls_handshake_failed"
    assert refused.error is not None
    assert "protocol" in refused.error
    assert refused.backend is None


@pytest.mark.parametrize(
    "maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
async def test_sessions_resume_with_tickets(
    nursery: trio.Nursery, pki: PKI, maximum: ssl.TLSVersion
) -> None:
    backend = await start_backend(nursery, identify(b"backend"))
    _, port = await serve_listener(nursery, tls_config(pki.a), [backend])
    context = client_context(pki, maximum=maximum)
    with trio.fail_after(STEP):
        # Under TLS 1.3 the ticket arrives after the handshake: read the greeting first.
        greeting, first = await which_backend(port, context, "a.example")
        async with first:
            assert not first.session_reused
            session = first.session
        assert session is not None
        assert session.has_ticket
        transport = await trio.open_tcp_stream("127.0.0.1", port)
        second = trio.SSLStream(transport, context, server_hostname="a.example")
        second.session = session
        async with second:
            await second.do_handshake()
            assert await read_line(second) == b"backend\n"
            assert second.session_reused
    assert greeting == b"backend"


# --- 5. client certificates (mTLS) ------------------------------------------------------------


@pytest.mark.parametrize("who", ["nobody", "mallory"])
async def test_mtls_refuses_missing_or_foreign_client_certificates(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, who: str
) -> None:
    reached = trio.Event()

    async def backend_handler(stream: trio.SocketStream) -> None:
        reached.set()
        await stream.aclose()

    backend = await start_backend(nursery, backend_handler)
    _, port = await serve_listener(nursery, tls_config(pki.a, client_ca=pki.ca_file), [backend])
    client = None if who == "nobody" else pki.mallory
    with trio.fail_after(STEP):
        # TLS 1.3: the client's handshake may finish before the server judges its
        # certificate, so the refusal can arrive on the first read.
        with pytest.raises(trio.BrokenResourceError):
            await handshake_and_read(port, client_context(pki, client=client), "a.example")
        (record,) = await access.wait()
    assert record.outcome == "tls_handshake_failed"
    assert record.error is not None
    assert "certificate" in record.error
    assert record.client_subject is None
    assert record.backend is None
    assert not reached.is_set()


def _alice_subject(pki: PKI) -> str:
    pem = Path(pki.alice.cert).read_bytes()
    return x509.load_pem_x509_certificates(pem)[0].subject.rfc4514_string()


@pytest.mark.parametrize(
    "allow",
    [
        pytest.param({}, id="any-cert-from-the-ca"),
        pytest.param({"allow_sans": ["alice@example.com"]}, id="allowed-san"),
        pytest.param({"allow_subjects": ["<alice>"]}, id="allowed-subject"),
    ],
)
async def test_mtls_accepts_allowed_client_and_logs_its_subject(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, allow: dict[str, list[str]]
) -> None:
    allow = {
        key: [_alice_subject(pki) if v == "<alice>" else v for v in values]
        for key, values in allow.items()
    }
    backend = await start_backend(nursery, identify(b"backend"))
    tls = tls_config(pki.a, client_ca=pki.ca_file, **allow)
    _, port = await serve_listener(nursery, tls, [backend])
    with trio.fail_after(STEP):
        greeting, stream = await which_backend(
            port, client_context(pki, client=pki.alice), "a.example"
        )
        async with stream:
            await stream.send_all(b"hello\n")
            assert await receive_exactly(stream, 6) == b"hello\n"
        (record,) = await access.wait()
    assert greeting == b"backend"
    assert record.client_subject is not None
    assert record.client_subject.startswith("CN=alice,")
    assert record.client_subject == _alice_subject(pki)


@pytest.mark.parametrize(
    "allow",
    [
        pytest.param({"allow_subjects": ["CN=bob"]}, id="subject"),
        pytest.param({"allow_subjects": ["CN=alice"]}, id="subject-needs-all-of-it"),
        pytest.param({"allow_sans": ["bob@example.com"]}, id="san"),
    ],
)
async def test_mtls_rejects_a_client_not_on_the_allow_list(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher, allow: dict[str, list[str]]
) -> None:
    reached = trio.Event()

    async def backend_handler(stream: trio.SocketStream) -> None:
        reached.set()
        await stream.aclose()

    backend = await start_backend(nursery, backend_handler)
    tls = tls_config(pki.a, client_ca=pki.ca_file, **allow)
    _, port = await serve_listener(nursery, tls, [backend])
    with trio.fail_after(STEP):
        stream = await open_tls(port, client_context(pki, client=pki.alice), "a.example")
        async with stream:
            try:
                data = await stream.receive_some()
            except trio.BrokenResourceError:
                data = b""
        (record,) = await access.wait()
    assert data == b""  # closed, never connected to a backend
    assert record.outcome == "client_cert_rejected"
    assert record.error is not None
    assert "alice" in record.error
    assert record.backend is None
    assert not reached.is_set()


# --- 6. the access log's TLS fields ------------------------------------------------------------


async def test_access_log_has_tls_fields_and_plaintext_byte_counts(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    backend = await start_backend(nursery, answer_then_eof)
    _, port = await serve_listener(nursery, tls_config(pki.a, pki.c, alpn=["h2"]), [backend])
    payload = b"x" * 100_000 + b"\n"  # several TLS records each way
    with trio.fail_after(STEP):
        stream = await open_tls(port, client_context(pki, alpn=["h2"]), "c.example")
        async with stream:
            await stream.send_all(payload)
            assert await receive_exactly(stream, len(payload)) == payload
            assert await stream.receive_some() == b""  # close_notify after the backend's EOF
            cipher = stream.cipher()[0]
        (record,) = await access.wait()
    assert record.outcome == "ok"
    assert (record.sni, record.alpn, record.tls_version) == ("c.example", "h2", "TLSv1.3")
    assert record.cipher == cipher
    assert record.cipher in TLS13_SUITES
    assert record.client_subject is None
    assert (record.bytes_to_backend, record.bytes_to_client) == (len(payload), len(payload))


# --- 7. reload --------------------------------------------------------------------------------


async def test_reload_swaps_certificates_for_new_handshakes_only(
    nursery: trio.Nursery, pki: PKI, tmp_path: Path
) -> None:
    backend = await start_backend(nursery, identify(b"backend"))

    def config(*certs: CertKey) -> l4proxy.Config:
        tls = TLSConfig(certs=list(certs))
        return l4proxy.Config(listeners=[listener(tls, [backend])])

    fresh = write_cert(pki.ca.issue_cert("a.example"), tmp_path, "fresh")
    assert leaf_der(fresh) != leaf_der(pki.a)
    proxy, port = await serve(nursery, config(pair(pki.a)))
    context = client_context(pki)
    with trio.fail_after(STEP):
        _, established = await which_backend(port, context, "a.example")
        async with established:
            assert established.getpeercert(binary_form=True) == leaf_der(pki.a)

            await proxy.reload(config(pair(fresh)))
            await established.send_all(b"still here\n")
            assert await read_line(established) == b"still here\n"
            _, after = await which_backend(port, context, "a.example")
            async with after:
                assert after.getpeercert(binary_form=True) == leaf_der(fresh)

            bad_key = tmp_path / "bad.key"
            bad_key.write_bytes(
                b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"
            )
            with pytest.raises(l4proxy.ConfigError) as caught:
                await proxy.reload(config(CertKey(cert=fresh.cert, key=str(bad_key))))
            assert "listeners[0].tls.certs[0].key" in str(caught.value)
            assert str(bad_key) in str(caught.value)

            await established.send_all(b"and still\n")
            assert await read_line(established) == b"and still\n"
            _, later = await which_backend(port, context, "a.example")
            async with later:
                assert later.getpeercert(binary_form=True) == leaf_der(fresh)


# --- 8. certificate problems at start ----------------------------------------------------------


def _start(tls: TLSConfig) -> l4proxy.Proxy:
    return l4proxy.Proxy(l4proxy.Config(listeners=[listener(tls, ["127.0.0.1:9"])]))


@pytest.mark.parametrize(
    ("make", "path", "words"),
    [
        pytest.param(
            lambda pki, tmp: CertKey(cert=pki.a.cert, key=pki.c.key),
            "listeners[0].tls.certs[1].key",
            ["does not match", "{pki.c.key}", "{pki.a.cert}"],
            id="mismatched-key",
        ),
        pytest.param(
            lambda pki, tmp: CertKey(cert=str(tmp / "missing.pem"), key=pki.a.key),
            "listeners[0].tls.certs[1].cert",
            ["cannot read", "{tmp}/missing.pem"],
            id="missing-cert",
        ),
        pytest.param(
            lambda pki, tmp: CertKey(cert=pki.a.cert, key=str(tmp / "missing.key")),
            "listeners[0].tls.certs[1].key",
            ["cannot read", "{tmp}/missing.key"],
            id="missing-key",
        ),
        pytest.param(
            lambda pki, tmp: CertKey(cert=pki.a.key, key=pki.a.key),
            "listeners[0].tls.certs[1].cert",
            ["no PEM certificate", "{pki.a.key}"],
            id="key-given-as-cert",
        ),
        pytest.param(
            lambda pki, tmp: CertKey(cert=pki.a.cert),
            "listeners[0].tls.certs[1]",
            ["private key", "{pki.a.cert}"],
            id="no-key-anywhere",
        ),
    ],
)
def test_bad_certificate_files_are_config_errors_naming_key_and_file(
    pki: PKI,
    tmp_path: Path,
    make: Callable[[PKI, Path], CertKey],
    path: str,
    words: list[str],
) -> None:
    # A good pair first: the message must name the index of the bad one.
    with pytest.raises(l4proxy.ConfigError) as caught:
        _start(TLSConfig(certs=[pair(pki.c), make(pki, tmp_path)]))
    message = str(caught.value)
    assert path in message
    for word in words:
        assert word.format(pki=pki, tmp=tmp_path) in message


async def test_certificate_with_its_key_in_the_same_pem(nursery: trio.Nursery, pki: PKI) -> None:
    backend = await start_backend(nursery, identify(b"backend"))
    _, port = await serve_listener(
        nursery, TLSConfig(certs=[CertKey(cert=pki.a.combined)]), [backend]
    )
    with trio.fail_after(STEP):
        greeting, stream = await which_backend(port, client_context(pki), "a.example")
        async with stream:
            assert stream.getpeercert(binary_form=True) == leaf_der(pki.a)
    assert greeting == b"backend"


async def test_expired_certificate_warns_at_start_and_is_served(
    nursery: trio.Nursery, pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    old = pki.ca.issue_cert(
        "a.example",
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    expired = write_cert(old, tmp_path, "expired")
    backend = await start_backend(nursery, identify(b"backend"))
    with caplog.at_level(logging.WARNING, logger="l4proxy.tls"):
        _, port = await serve_listener(nursery, tls_config(expired), [backend])
    (logged,) = [r for r in caplog.records if r.name == "l4proxy.tls"]
    assert logged.levelno == logging.WARNING
    assert "expired" in logged.getMessage()
    assert expired.cert in logged.getMessage()
    # Legal to serve (the operator was warned); a verifying client refuses it.
    with trio.fail_after(STEP):
        with pytest.raises(trio.BrokenResourceError) as caught:
            await handshake(port, client_context(pki), "a.example")
    assert "expired" in str(caught.value.__cause__)


# --- 9. half-close through TLS -----------------------------------------------------------------


async def test_backend_half_close_is_close_notify_and_the_client_can_still_send(
    nursery: trio.Nursery, pki: PKI, access: AccessWatcher
) -> None:
    received: list[bytes] = []
    done = trio.Event()

    async def banner_then_read(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"banner")
            await stream.send_eof()  # shutdown(SHUT_WR)
            received.append(await receive_all(stream))
            done.set()

    backend = await start_backend(nursery, banner_then_read)
    _, port = await serve_listener(nursery, tls_config(pki.a), [backend])
    context = client_context(pki)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with trio.fail_after(STEP):
        stream = await open_tls(port, context, "a.example")
        async with stream:
            assert await receive_exactly(stream, 6) == b"banner"
            assert await stream.receive_some() == b""  # a close_notify, not a broken stream
            await stream.send_all(b"after your eof")
        # Our close_notify (from aclose) is the client's EOF, passed on as SHUT_WR.
        await done.wait()
        (record,) = await access.wait()
    assert received == [b"after your eof"]
    assert record.outcome == "ok"
    assert (record.bytes_to_backend, record.bytes_to_client) == (14, 6)
