"""Real TLS client programs against the real ``l4proxy`` command, and a ClientHello corpus.

``openssl s_client`` and ``curl`` talk to a terminating proxy started as a subprocess
(:class:`~tests.proxyprocess.ProxyProcess`) in front of small backends served in this
event loop. The corpus tests run a capture server that records the first bytes each real
client sends (``openssl``, ``curl``, Python's ``ssl``, ``psql``/libpq, which first sends
an 8-byte SSLRequest), then feed the bytes to the sans-IO ClientHello parser.

Only loopback addresses are used; names reach clients through ``--resolve``,
``-servername`` or ``/etc/hosts`` (``localhost``), so nothing is looked up in DNS. Every
wait is bounded. A missing program fails the test saying how to install it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio
from cryptography import x509

from l4proxy.protocols.clienthello import ClientHello, parse_client_hello

from .conftest import Handler, receive_exactly, start_backend
from .proxyprocess import ProxyProcess

if TYPE_CHECKING:
    from .tlsfixtures import PKI, CertFiles

INSTALL_HINT = "`make test` installs it"
CLIENT_SECONDS = 20  # one client program run
TEST_SECONDS = 90  # a whole test, proxy start and stop included
Client = Callable[[int], Awaitable["subprocess.CompletedProcess[bytes]"]]
SSL_REQUEST = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")  # PostgreSQL


# --------------------------------------------------------------------------- helpers


def require(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name!r} not found on PATH; these tests run it ({INSTALL_HINT})", pytrace=False
        )
    return path


def client_env() -> dict[str, str]:
    """The environment without proxy or PostgreSQL settings that could redirect a client."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.lower().endswith("_proxy") and not key.startswith("PG")
    }


async def run_client(argv: Sequence[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(CLIENT_SECONDS):
        return await trio.run_process(
            list(argv),
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=client_env(),
        )


def describe(result: subprocess.CompletedProcess[bytes]) -> str:
    return (
        f"{result.args} exited {result.returncode}\nstdout:\n"
        f"{result.stdout.decode(errors='replace')}\nstderr:\n{result.stderr.decode(errors='replace')}"
    )


def leaf(cert: CertFiles) -> x509.Certificate:
    with open(cert.cert, "rb") as file:
        return x509.load_pem_x509_certificates(file.read())[0]


def dns_names(certificate: x509.Certificate) -> set[str]:
    extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return set(extension.value.get_values_for_type(x509.DNSName))


async def proxy_port(proc: ProxyProcess) -> int:
    ((host, port),) = await proc.listening()
    assert host == "127.0.0.1"
    return port


async def access_records(proc: ProxyProcess, count: int) -> list[dict[str, object]]:
    """The proxy's JSON access lines (``--access-log - --log-format json``)."""
    await proc.wait_for(r"^\{", count=count, where="stdout")
    return [json.loads(line) for line in proc.stdout if line.startswith("{")]


def tls_args(*certs: CertFiles, combined: bool = False) -> list[str]:
    args = []
    for cert in certs:
        if combined:  # the key in the certificate's PEM: no --tls-key
            args += ["--tls-cert", cert.combined]
        else:
            args += ["--tls-cert", cert.cert, "--tls-key", cert.key]
    return [*args, "--access-log", "-", "--log-format", "json"]


async def echo_line(stream: trio.SocketStream) -> None:
    """Read one line, answer ``echo:LINE``, close (so ``s_client -quiet`` ends)."""
    async with stream:
        line = b""
        try:
            while not line.endswith(b"\n"):
                chunk = await stream.receive_some(1024)
                if not chunk:
                    return
                line += chunk
            await stream.send_all(b"echo:" + line)
        except trio.BrokenResourceError:
            pass


def http_backend(name: bytes) -> Handler:
    """A tiny HTTP/1.1 server: one response naming the backend, then close."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            try:
                while b"\r\n\r\n" not in request:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    request += chunk
                body = b"backend " + name + b"\n"
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
                )
            except trio.BrokenResourceError:
                pass

    return handler


# --------------------------------------------------------------------------- openssl s_client


def s_client(port: int, *options: str) -> list[str]:
    return [require("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", *options]


PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def served_certificate(result: subprocess.CompletedProcess[bytes]) -> x509.Certificate:
    """The leaf certificate ``s_client -showcerts`` printed."""
    blocks = PEM_CERTIFICATE.findall(result.stdout)
    assert blocks, describe(result)
    return x509.load_pem_x509_certificate(blocks[0])


async def test_s_client_servername_picks_the_certificate(nursery: trio.Nursery, pki: PKI) -> None:
    backend = await start_backend(nursery, echo_line)
    cases = [
        (["-servername", "a.example"], pki.a),
        (["-servername", "c.example"], pki.c),
        (["-servername", "C.EXAMPLE."], pki.c),  # case and a trailing dot are ignored
        (["-servername", "x.b.example"], pki.a),  # the *.b.example wildcard
        (["-servername", "unknown.example"], pki.a),  # unknown: the first certificate
        (["-noservername"], pki.a),  # no SNI: the first certificate
    ]
    with trio.fail_after(TEST_SECONDS):
        args = ["-l", "127.0.0.1:0", "-b", backend, *tls_args(pki.a, pki.c)]
        async with ProxyProcess(nursery, args) as proc:
            port = await proxy_port(proc)
            for options, expected in cases:
                result = await run_client(
                    s_client(port, *options, "-CAfile", pki.ca_file, "-showcerts")
                )
                assert result.returncode == 0, describe(result)
                output = result.stdout.decode()
                assert "Verify return code: 0 (ok)" in output, describe(result)
                served = served_certificate(result)
                assert served == leaf(expected), f"{options}: wrong certificate"
                assert dns_names(served) == dns_names(leaf(expected))
                # The subject line names the expected certificate (trustme: a unique OU).
                unit = (
                    leaf(expected)
                    .subject.get_attributes_for_oid(x509.NameOID.ORGANIZATIONAL_UNIT_NAME)[0]
                    .value
                )
                (subject,) = re.findall(r"^subject=(.*)$", output, re.M)
                assert str(unit) in subject
            records = await access_records(proc, len(cases))
    assert [record["sni"] for record in records] == [
        "a.example",
        "c.example",
        "c.example",
        "x.b.example",
        "unknown.example",
        None,
    ]
    assert {record["outcome"] for record in records} == {"ok"}


async def test_s_client_old_protocols_and_weak_ciphers_are_refused(
    nursery: trio.Nursery, pki: PKI
) -> None:
    backend = await start_backend(nursery, echo_line)
    # SECLEVEL=0 lets this OpenSSL build offer TLS 1.0/1.1 at all, so the proxy decides.
    old = "DEFAULT@SECLEVEL=0"
    with trio.fail_after(TEST_SECONDS):
        args = ["-l", "127.0.0.1:0", "-b", backend, *tls_args(pki.a, pki.c, combined=True)]
        async with ProxyProcess(nursery, args) as proc:
            port = await proxy_port(proc)
            refused = [
                (["-tls1", "-cipher", old], "alert protocol version"),
                (["-tls1_1", "-cipher", old], "alert protocol version"),
                (["-tls1_2", "-cipher", "AES128-SHA"], "alert handshake failure"),  # no ECDHE
                (["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA"], "alert handshake failure"),
            ]
            for options, alert in refused:
                result = await run_client(
                    s_client(port, "-servername", "a.example", "-CAfile", pki.ca_file, *options)
                )
                assert result.returncode != 0, describe(result)
                assert alert in result.stderr.decode(), describe(result)
            accepted = await run_client(
                s_client(
                    port,
                    "-servername",
                    "a.example",
                    "-CAfile",
                    pki.ca_file,
                    "-tls1_2",
                    "-cipher",
                    "ECDHE-ECDSA-AES128-GCM-SHA256",
                )
            )
            assert accepted.returncode == 0, describe(accepted)
            output = accepted.stdout.decode()
            assert re.search(r"Protocol\s*: TLSv1\.2$", output, re.M), describe(accepted)
            assert re.search(r"Cipher\s*: ECDHE-ECDSA-AES128-GCM-SHA256$", output, re.M)
            assert "Compression: NONE" in output
            records = await access_records(proc, len(refused) + 1)
    failed = records[: len(refused)]
    assert [record["outcome"] for record in failed] == ["tls_handshake_failed"] * len(refused)
    assert [record["error"] for record in failed] == [
        "unsupported protocol",
        "unsupported protocol",
        "no shared cipher",
        "no shared cipher",
    ]
    assert records[-1]["outcome"] == "ok"
    assert records[-1]["tls_version"] == "TLSv1.2"
    assert records[-1]["cipher"] == "ECDHE-ECDSA-AES128-GCM-SHA256"


@pytest.mark.parametrize(
    "options",
    [["-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384"], ["-tls1_3"]],
    ids=["tls1.2-ecdhe", "tls1.3"],
)
async def test_s_client_data_flows_to_the_backend(
    nursery: trio.Nursery, pki: PKI, options: list[str]
) -> None:
    backend = await start_backend(nursery, echo_line)
    with trio.fail_after(TEST_SECONDS):
        args = ["-l", "127.0.0.1:0", "-b", backend, *tls_args(pki.a, pki.c)]
        async with ProxyProcess(nursery, args) as proc:
            port = await proxy_port(proc)
            command = s_client(
                port, "-servername", "c.example", "-CAfile", pki.ca_file, "-quiet", *options
            )
            command += ["-verify_return_error"]
            result = await run_client(command, stdin=b"through the proxy\n")
            assert result.returncode == 0, describe(result)
            assert result.stdout == b"echo:through the proxy\n", describe(result)
            (record,) = await access_records(proc, 1)
    assert record["outcome"] == "ok"
    assert record["sni"] == "c.example"
    assert record["tls_version"] == ("TLSv1.3" if options == ["-tls1_3"] else "TLSv1.2")
    assert (record["bytes_to_backend"], record["bytes_to_client"]) == (18, 23)


# --------------------------------------------------------------------------- curl


def curl(port: int, name: str, ca_file: str | None, *options: str) -> list[str]:
    return [
        require("curl"),
        "-q",  # no ~/.curlrc
        "--silent",
        "--show-error",
        "--verbose",
        "--max-time",
        "10",
        "--noproxy",
        "*",
        "--resolve",
        f"{name}:{port}:127.0.0.1",
        *(["--cacert", ca_file] if ca_file else []),
        *options,
        f"https://{name}:{port}/",
    ]


async def test_curl_sni_routes_pick_the_http_backend_and_alpn_is_negotiated(
    nursery: trio.Nursery, pki: PKI
) -> None:
    a = await start_backend(nursery, http_backend(b"A"))
    c = await start_backend(nursery, http_backend(b"C"))
    args = [
        "-l",
        "127.0.0.1:0",
        "--route",
        f"a.example={a}",
        "--route",
        f"C.Example.={c}",  # routes ignore case and a trailing dot
        "--alpn",
        "http/1.1",
        *tls_args(pki.a, pki.c),
    ]
    with trio.fail_after(TEST_SECONDS):
        async with ProxyProcess(nursery, args) as proc:
            port = await proxy_port(proc)
            for name, body in (("a.example", b"backend A\n"), ("c.example", b"backend C\n")):
                result = await run_client(curl(port, name, pki.ca_file))
                assert result.returncode == 0, describe(result)
                assert result.stdout == body
                verbose = result.stderr.decode()
                assert "ALPN: offers h2,http/1.1" in verbose, describe(result)
                assert "ALPN: server accepted http/1.1" in verbose, describe(result)
                assert f'host "{name}" matched cert\'s "{name}"' in verbose, describe(result)
            # No route for this name and no default pool: a TLS unrecognized_name alert.
            refused = await run_client(curl(port, "x.b.example", pki.ca_file))
            assert refused.returncode == 35, describe(refused)  # CURLE_SSL_CONNECT_ERROR
            assert "unrecognized name" in refused.stderr.decode(), describe(refused)
            records = await access_records(proc, 3)
    assert [(r["sni"], r["backend"], r["alpn"], r["outcome"]) for r in records] == [
        ("a.example", a, "http/1.1", "ok"),
        ("c.example", c, "http/1.1", "ok"),
        ("x.b.example", None, "h2,http/1.1", "no_route"),  # as offered: never negotiated
    ]


async def test_curl_http2_is_not_offered_back_without_alpn_configured(
    nursery: trio.Nursery, pki: PKI
) -> None:
    """Without ``--alpn`` the proxy selects no protocol; curl falls back to HTTP/1.1."""
    backend = await start_backend(nursery, http_backend(b"plain"))
    with trio.fail_after(TEST_SECONDS):
        args = ["-l", "127.0.0.1:0", "-b", backend, *tls_args(pki.a)]
        async with ProxyProcess(nursery, args) as proc:
            port = await proxy_port(proc)
            result = await run_client(curl(port, "x.b.example", pki.ca_file))
            assert result.returncode == 0, describe(result)
            assert result.stdout == b"backend plain\n"
            assert "ALPN: server did not agree on a protocol" in result.stderr.decode()
            (record,) = await access_records(proc, 1)
    assert record["alpn"] is None
    assert record["sni"] == "x.b.example"


# --------------------------------------------------------------------------- corpus


class CaptureServer:
    """Records the first ClientHello each connecting client sends, then hangs up.

    With ``postgres`` it first expects PostgreSQL's SSLRequest and answers ``S``
    (willing to do TLS), as a server would.
    """

    def __init__(self, *, postgres: bool = False) -> None:
        self.postgres = postgres
        self.captured: list[bytes] = []
        self.arrived = trio.Event()

    async def handler(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self.postgres:
                assert await receive_exactly(stream, 8) == SSL_REQUEST
                await stream.send_all(b"S")
            buffer = bytearray()
            while parse_client_hello(buffer) is None:
                chunk = await stream.receive_some(65536)
                assert chunk, f"client closed after {len(buffer)} bytes of a ClientHello"
                buffer += chunk
            self.captured.append(bytes(buffer))
            self.arrived.set()

    async def capture(self, nursery: trio.Nursery, client: Client) -> bytes:
        """Serve on 127.0.0.1:0, run ``client(port)``, return the first ClientHello."""
        listeners = await nursery.start(partial(trio.serve_tcp, self.handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        result = await client(port)
        with trio.move_on_after(CLIENT_SECONDS):
            await self.arrived.wait()
        for listener in listeners:
            await listener.aclose()
        assert self.captured, f"no ClientHello captured; {describe(result)}"
        return self.captured[0]


def libpq_version() -> int:
    """libpq's own version (e.g. 150018): ALPN is a libpq feature, not a psql one."""
    name = ctypes.util.find_library("pq")
    assert name, f"libpq not found ({INSTALL_HINT})"
    return int(ctypes.CDLL(name).PQlibVersion())


PYTHON_CLIENT = """
import socket, ssl, sys
context = ssl.create_default_context()
context.set_alpn_protocols(["h2", "http/1.1"])
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as sock:
    try:
        context.wrap_socket(sock, server_hostname="x.example")
    except (ssl.SSLError, OSError) as exc:
        print("handshake ended:", exc)
"""


def psql(host: str) -> Client:
    async def run(port: int) -> subprocess.CompletedProcess[bytes]:
        return await run_client(
            [
                require("psql"),
                f"host={host} port={port} sslmode=require gssencmode=disable dbname=x user=y "
                "connect_timeout=5",
            ]
        )

    return run


CORPUS: dict[str, tuple[Client, bool, str | None, tuple[bytes, ...] | str]] = {
    # name: (client, postgres, server_name, alpn)
    "openssl": (
        lambda port: run_client(s_client(port, "-servername", "x.example")),
        False,
        "x.example",
        (),
    ),
    "openssl-alpn": (
        lambda port: run_client(s_client(port, "-servername", "x.example", "-alpn", "h2,http/1.1")),
        False,
        "x.example",
        (b"h2", b"http/1.1"),
    ),
    "curl": (
        lambda port: run_client(curl(port, "x.example", None)),
        False,
        "x.example",
        (b"h2", b"http/1.1"),
    ),
    "python": (
        lambda port: run_client([sys.executable, "-c", PYTHON_CLIENT, str(port)]),
        False,
        "x.example",
        (b"h2", b"http/1.1"),
    ),
    # libpq sends SNI only for host names (sslsni=1 is the default), never for addresses.
    "psql-address": (psql("127.0.0.1"), True, None, "libpq"),
    "psql-localhost": (psql("localhost"), True, "localhost", "libpq"),
}


@pytest.mark.parametrize("name", list(CORPUS))
async def test_real_client_hellos_parse(nursery: trio.Nursery, name: str) -> None:
    client, postgres, server_name, alpn = CORPUS[name]
    if alpn == "libpq":
        # libpq 17 offers ALPN "postgresql"; older ones (Debian 12 ships 15) offer none.
        alpn = (b"postgresql",) if libpq_version() >= 170000 else ()
    with trio.fail_after(TEST_SECONDS):
        hello = await CaptureServer(postgres=postgres).capture(nursery, client)
    parsed = parse_client_hello(hello)
    assert isinstance(parsed, ClientHello)
    assert parsed.size == len(hello)  # the client sent nothing more before our reply
    assert parsed.server_name == server_name
    assert parsed.alpn_protocols == alpn
    assert 0x0304 in parsed.versions  # every one of these clients offers TLS 1.3
    assert 0x0303 in parsed.versions
    # Arriving one byte at a time, every proper prefix is "need more", never an error.
    assert all(parse_client_hello(hello[:end]) is None for end in range(len(hello)))


async def test_s_client_renegotiation_is_refused(nursery: trio.Nursery, pki: PKI) -> None:
    """TLS 1.2 renegotiation (s_client's "R" command) is refused by the server."""
    backend = await start_backend(nursery, echo_line)
    with trio.fail_after(TEST_SECONDS):
        args = ["-l", "127.0.0.1:0", "-b", backend, *tls_args(pki.a)]
        async with ProxyProcess(nursery, args) as proc:
            port = await proxy_port(proc)
            command = s_client(port, "-servername", "a.example", "-CAfile", pki.ca_file, "-tls1_2")
            result = await run_client(command, stdin=b"R\n")
            output = (result.stdout + result.stderr).decode(errors="replace")
            assert "RENEGOTIATING" in output, describe(result)
            assert "no renegotiation" in output, describe(result)
            (record,) = await access_records(proc, 1)
    assert record["tls_version"] == "TLSv1.2"
    assert record["bytes_to_backend"] == 0  # nothing got through the refused renegotiation
