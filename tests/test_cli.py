"""The ``l4proxy`` command: argument errors in-process, signals and limits in a subprocess."""

from __future__ import annotations

import inspect
import json
import re
import resource
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from l4proxy import CertKey, ListenerConfig, TLSConfig
from l4proxy.cli import cli, main
from l4proxy.config import top_level_keys
from l4proxy.configkeys import keys_of

from .badcerts import write_unparsable_san_cert
from .conftest import echo, identify, receive_all, receive_exactly, start_backend
from .proxyprocess import ProxyProcess

if TYPE_CHECKING:
    import trustme

    from .tlsfixtures import PKI


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    code = info.value.code
    return (code if isinstance(code, int) else 1), out, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--listen", "5432", "--backend", "a:1"],
            "Invalid value for '-l' / '--listen': expected HOST:PORT",
        ),
        (
            ["--listen", ":1", "--backend", ":5432"],
            "Invalid value for '-b' / '--backend': a backend needs a host",
        ),
        (["--listen", ":1"], "--backend is required with --listen"),
        (["--backend", "a:1"], "--listen is required with --backend"),
        ([], "nothing to proxy"),
        (["--lisen", ":1"], "No such option '--lisen'."),
        (["--listn", ":1"], "'--listen'"),
        (
            ["-l", ":1", "-b", "a:1", "--connect-timeout", "0"],
            "'--connect-timeout': expected a number of seconds > 0",
        ),
        (
            ["-l", ":1", "-b", "a:1", "--idle-timeout", "soon"],
            "'--idle-timeout': expected a number of seconds",
        ),
        (["-l", ":1", "-b", "a:1", "--log-format", "xml"], "'--log-format'"),
        (["-l", ":1", "-b", "a:1", "--deny", "10.0.0.1/8"], "--deny: bad CIDR '10.0.0.1/8'"),
        (["-l", ":1", "-b", "a:1", "--allow", "db.example"], "--allow: bad CIDR 'db.example'"),
        (["-l", ":1", "-b", "a:1", "--rate-per-ip", "0"], "'--rate-per-ip': 0 is not in the range"),
        (["-l", ":1", "-b", "a:1", "--per-ip-ipv6-prefix", "129"], "'--per-ip-ipv6-prefix'"),
        (["-l", ":1", "-b", "a:1", "--proxy-protocol", "v3"], "'--proxy-protocol'"),
        (
            ["-l", ":1", "-b", "a:1", "--source-address", "proxy"],
            "--source-address: expected an IP address, got 'proxy'",
        ),
        (
            ["-l", ":1", "-b", "[::1]:5", "--source-address", "127.0.0.1"],
            "cannot reach backend [::1]:5 (IPv6)",
        ),
        (["-l", ":1", "-l", ":1", "-b", "a:1"], "--listen: duplicate listen address ':1'"),
        (["-c", "x.toml", "-l", ":1"], "--listen cannot be combined with --config"),
        (
            ["-c", "x.toml", "--tls-cert", "a.pem", "--route", "a.example=b:1"],
            "--tls-cert/--route cannot be combined with --config",
        ),
        (["-l", ":1", "-b", "a:1", "--tls-key", "k.pem"], "got 0 --tls-cert and 1 --tls-key"),
        (["-l", ":1", "-b", "a:1", "--alpn", "h2"], "--alpn need --tls-cert"),
        (["-l", ":1", "--route", "nope"], "expected NAME=ADDR"),
        (["-l", ":1", "--route", "a..b=c:1"], "is not a valid host name"),
        (["-l", ":1", "--route", "*.example.com=c"], "expected HOST:PORT"),
        (["-l", ":1", "--route", "a.example=c:1"], "--route: need tls"),
        (
            ["-l", ":1", "-b", "a:1", "--tls-cert", "/nonexistent.pem"],
            "--tls-cert: cannot read certificate '/nonexistent.pem'",
        ),
        (
            ["-l", ":1", "-b", "a:1", "--backend-sni", "x.example"],
            "--backend-sni: needs backend_tls = true",
        ),
        (["-c", "/nonexistent/l4proxy.toml"], "/nonexistent/l4proxy.toml: cannot read config file"),
        (
            ["-l", ":1", "-b", "a:1", "--preamble", "postgres"],
            "--preamble: 'postgres' needs certificates (tls.certs, --tls-cert)",
        ),
        (["-l", ":1", "-b", "a:1", "--preamble", "mysql"], "Invalid value for '--preamble'"),
        (["-l", ":1", "-b", "a:1", "--allow-plaintext"], "--allow-plaintext: needs a preamble"),
        (["-c", "x.toml", "--preamble", "smtp"], "--preamble cannot be combined with --config"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(args, capsys)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("l4proxy: error: ")
    assert message in err


def test_settings_flags_are_the_flags_of_the_key_table() -> None:
    """Options the command's function does not name go to the configuration through the
    key table: each must be a key's flag, and each key's flag must be an option."""
    named = set(inspect.signature(cli.callback).parameters) - {"settings_flags"}  # type: ignore[arg-type]
    unnamed = {
        opt
        for param in cli.params
        if param.expose_value and param.name not in named
        for opt in param.opts
        if opt.startswith("--")
    }
    table = {spec.flag for spec in top_level_keys().values() if spec.flag}
    assert unnamed == table
    every_flag = {opt for param in cli.params for opt in param.opts}
    for cls in (ListenerConfig, TLSConfig, CertKey):
        for spec in keys_of(cls).values():
            assert spec.flag is None or spec.flag in every_flag, spec


def test_an_empty_file_flag_is_refused_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run_main(["-l", ":1", "-b", "a:1", "--access-log", "", "--check"], capsys)
    assert code == 2
    assert err == "l4proxy: error: --access-log: expected a file path or '-', got ''\n"


def test_config_errors_name_the_key_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "l4proxy.toml"
    config.write_text(
        '[[listeners]]\nlisten = [":1"]\nbackends = ["a:1"]\n'
        '[[listeners]]\nlisten = [":2"]\nbackends = ["db1"]\nidel_timeout = 3\n'
    )
    code, _, err = run_main(["--config", str(config), "--check"], capsys)
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith(f"l4proxy: error: {config}: listeners[1].")
    assert "listeners[1].backends[0]: expected HOST:PORT" in err
    assert "listeners[1].idel_timeout: unknown key (did you mean 'idle_timeout'?)" in err


def test_a_config_file_that_is_not_utf8_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "l4proxy.toml"
    config.write_bytes(
        '[[listeners]]\nname = "caf\xe9"\nlisten = ["127.0.0.1:0"]\nbackends = ["a:1"]\n'.encode(
            "latin-1"
        )
    )
    code, out, err = run_main(["--config", str(config)], capsys)
    assert (code, out) == (2, "")
    assert err == (
        f"l4proxy: error: {config}: invalid TOML: not UTF-8 (invalid continuation byte at line 2)\n"
    )


def test_a_certificate_whose_extensions_cannot_be_parsed_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert = tmp_path / "bad.pem"
    write_unparsable_san_cert(cert)
    code, _, err = run_main(["-l", ":1", "-b", "a:1", "--tls-cert", str(cert), "--check"], capsys)
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith(
        f"l4proxy: error: --tls-cert: {str(cert)!r}: cannot parse its extensions: "
    )


def test_check_accepts_a_good_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "l4proxy.toml"
    config.write_text(
        '[[listeners]]\nname = "pg"\nlisten = [":5432"]\nbackends = ["127.0.0.1:5433"]\n'
    )
    code, out, err = run_main(["--config", str(config), "--check"], capsys)
    assert (code, err) == (0, "")
    assert out == f"{config}: ok (1 listener: pg)\n"


def test_check_accepts_a_preamble_listener(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pki: PKI
) -> None:
    config = tmp_path / "l4proxy.toml"
    config.write_text(
        '[[listeners]]\nname = "pg"\nlisten = [":5432"]\nbackends = ["127.0.0.1:5433"]\n'
        'preamble = "postgres"\nallow_plaintext = true\n'
        f'tls = {{ certs = [{{ cert = "{pki.a.combined}" }}] }}\n'
        '[[listeners]]\nname = "smtp"\nlisten = [":587"]\nbackends = ["127.0.0.1:2525"]\n'
        f'preamble = "smtp"\ntls = {{ certs = [{{ cert = "{pki.a.combined}" }}] }}\n'
    )
    code, out, err = run_main(["--config", str(config), "--check"], capsys)
    assert (code, err) == (0, "")
    assert out == f"{config}: ok (2 listeners: pg, smtp)\n"
    bad = tmp_path / "bad.toml"
    bad.write_text(
        config.read_text().replace('preamble = "smtp"', 'preamble = "smtp"\nallow_plaintext = true')
    )
    code, out, err = run_main(["--config", str(bad), "--check"], capsys)
    assert code == 2
    assert err == (
        f"l4proxy: error: {bad}: listeners[1].allow_plaintext: only with preamble 'postgres', not 'smtp'\n"
    )


def test_check_accepts_flags_and_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("L4PROXY_LISTEN", "127.0.0.1:7000 unix:/tmp/x.sock")
    monkeypatch.setenv("L4PROXY_BACKEND", "127.0.0.1:7001")
    code, out, _ = run_main(["--check"], capsys)
    assert code == 0
    assert out == "command line: ok (1 listener: 127.0.0.1:7000)\n"


def test_version_flag_is_not_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("L4PROXY_VERSION", "1")
    code, out, _ = run_main(["-l", ":1", "-b", "a:1", "--check"], capsys)
    assert (code, out) == (0, "command line: ok (1 listener: :1)\n")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from l4proxy import __version__

    code, out, _ = run_main(["--version"], capsys)
    assert (code, out) == (0, f"l4proxy {__version__}\n")


# --- the real command in a subprocess --------------------------------------------------


async def test_sigterm_drains_then_exits_0(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery)
    with trio.fail_after(20):
        async with ProxyProcess(
            nursery, ["-l", "127.0.0.1:0", "-b", backend, "--access-log", "-"]
        ) as proc:
            ((host, port),) = await proc.listening()
            client = await trio.open_tcp_stream(host, port)
            await client.send_all(b"before")
            assert await receive_exactly(client, 6) == b"before"
            proc.signal(signal.SIGTERM)
            await proc.wait_for("SIGTERM: no longer accepting")
            with pytest.raises(OSError, match="all attempts to connect"):
                await trio.open_tcp_stream(host, port)
            await client.send_all(b"during drain")
            assert await receive_exactly(client, 12) == b"during drain"
            await client.send_eof()
            assert await receive_all(client) == b""
            await client.aclose()
            assert await proc.wait() == 0
            (line,) = [line for line in proc.stdout if line]
            assert "outcome=ok" in line
            assert "bytes_to_backend=18 bytes_to_client=18" in line


async def test_drain_timeout_cuts_connections_then_exits_0(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery)
    args = [
        "-l",
        "127.0.0.1:0",
        "-b",
        backend,
        "--drain-timeout",
        "0.5",
        "--access-log",
        "-",
        "--log-format",
        "json",
    ]
    with trio.fail_after(20):
        async with ProxyProcess(nursery, args) as proc:
            ((host, port),) = await proc.listening()
            async with await trio.open_tcp_stream(host, port) as client:
                await client.send_all(b"x")
                await receive_exactly(client, 1)
                proc.signal(signal.SIGINT)
                assert await receive_all(client) == b""  # cut at the deadline
                assert await proc.wait() == 0
            (record,) = [json.loads(line) for line in proc.stdout if line]
            assert record["outcome"] == "drained"


async def test_a_second_signal_stops_at_once(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery)
    with trio.fail_after(20):
        async with ProxyProcess(
            nursery, ["-l", "127.0.0.1:0", "-b", backend, "--drain-timeout", "600"]
        ) as proc:
            ((host, port),) = await proc.listening()
            async with await trio.open_tcp_stream(host, port) as client:
                await client.send_all(b"x")
                await receive_exactly(client, 1)
                proc.signal(signal.SIGINT)
                await proc.wait_for("SIGINT: no longer accepting")
                proc.signal(signal.SIGINT)
                assert await receive_all(client) == b""
                assert await proc.wait() == 0
            await proc.wait_for("outcome=drained")


async def test_quiet_hides_diagnostics_but_not_access_lines(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = await start_backend(nursery)
    path = tmp_path / "front.sock"
    with trio.fail_after(20):
        async with ProxyProcess(nursery, ["-l", f"unix:{path}", "-b", backend, "-q"]) as proc:
            # Another process, and -q hides "accepting on": try until it listens (the file
            # exists from bind(), a moment before listen()).
            while True:
                try:
                    client = await trio.open_unix_socket(str(path))
                except (FileNotFoundError, ConnectionRefusedError):
                    await trio.sleep(0.02)
                    continue
                break
            async with client:
                await client.send_all(b"q")
                assert await receive_exactly(client, 1) == b"q"
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0
            await proc.wait_for("outcome=ok")
            assert not [line for line in proc.stderr if " INFO " in line]


async def test_port_in_use_exits_1_naming_the_address(nursery: trio.Nursery) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with trio.fail_after(20):
            async with ProxyProcess(
                nursery, ["-l", f"127.0.0.1:{port}", "-b", "127.0.0.1:1"]
            ) as proc:
                assert await proc.wait() == 1
                await proc.wait_for(
                    f"l4proxy: error: cannot listen on 127.0.0.1:{port} .*address already in use"
                )


async def test_sighup_reloads_the_config_file(nursery: trio.Nursery, tmp_path: Path) -> None:
    first = await start_backend(nursery, identify(b"first"))
    second = await start_backend(nursery, identify(b"second"))
    config = tmp_path / "l4proxy.toml"
    template = '[[listeners]]\nname = "svc"\nlisten = ["127.0.0.1:0"]\nbackends = ["{}"]\n'
    config.write_text(template.format(first))
    with trio.fail_after(20):
        async with ProxyProcess(nursery, ["--config", str(config)]) as proc:
            ((host, port),) = await proc.listening()
            async with await trio.open_tcp_stream(host, port) as client:
                assert await receive_exactly(client, 6) == b"first\n"
            config.write_text("not toml [")
            proc.signal(signal.SIGHUP)
            await proc.wait_for(
                "SIGHUP: reload failed, keeping the running configuration: .*invalid TOML"
            )
            config.write_text(template.format(second))
            proc.signal(signal.SIGHUP)
            await proc.wait_for("configuration reloaded")
            async with await trio.open_tcp_stream(host, port) as client:
                assert await receive_exactly(client, 7) == b"second\n"
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0


async def test_sighup_with_a_file_that_is_not_utf8_keeps_serving(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = await start_backend(nursery, identify(b"first"))
    config = tmp_path / "l4proxy.toml"
    text = '[[listeners]]\nname = "{}"\nlisten = ["127.0.0.1:0"]\nbackends = ["{}"]\n'
    config.write_text(text.format("svc", backend))
    with trio.fail_after(20):
        async with ProxyProcess(nursery, ["--config", str(config)]) as proc:
            ((host, port),) = await proc.listening()
            config.write_bytes(text.format("caf\xe9", backend).encode("latin-1"))
            proc.signal(signal.SIGHUP)
            await proc.wait_for(
                "SIGHUP: reload failed, keeping the running configuration: "
                ".*invalid TOML: not UTF-8"
            )
            async with await trio.open_tcp_stream(host, port) as client:
                assert await receive_exactly(client, 6) == b"first\n"
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0
    assert not [line for line in proc.stderr if "Traceback" in line]


def _few_file_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))


@pytest.mark.slow
async def test_accept_survives_running_out_of_file_descriptors(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo)
    with trio.fail_after(30):
        async with ProxyProcess(
            nursery, ["-l", "127.0.0.1:0", "-b", backend], preexec_fn=_few_file_descriptors
        ) as proc:
            ((host, port),) = await proc.listening()
            # Five connections fully set up (backend included) before the flood: an
            # accept batch could otherwise take the descriptors their backends need.
            clients = [await trio.open_tcp_stream(host, port) for _ in range(5)]
            for client in clients:
                await client.send_all(b"hello")
                assert await receive_exactly(client, 5) == b"hello"
            # Far more connections than 48 descriptors allow, at 2 per connection.
            clients += [await trio.open_tcp_stream(host, port) for _ in range(35)]
            await proc.wait_for("accept failed on .*too many open files")
            for client in clients[:5]:  # the first ones still work
                await client.send_all(b"alive")
                assert await receive_exactly(client, 5) == b"alive"
            for client in clients:
                await client.aclose()
            for _ in range(50):  # new connections work; after a quiet second it says so
                async with await trio.open_tcp_stream(host, port) as fresh:
                    await fresh.send_all(b"after")
                    assert await receive_exactly(fresh, 5) == b"after"
                if any("accepting again" in line for line in proc.stderr):
                    break
                await trio.sleep(0.1)
            await proc.wait_for(r"accepting again on .* after \d+ failed accepts")
            assert proc.process is not None
            assert proc.process.returncode is None
            assert len([line for line in proc.stderr if "accept failed" in line]) == 1
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
async def test_memory_stays_flat_while_a_client_reads_slowly(nursery: trio.Nursery) -> None:
    sent = [0]

    async def firehose(stream: trio.SocketStream) -> None:
        chunk = b"\xab" * 65536
        async with stream:
            try:
                for _ in range(4096):  # at most 256 MiB; the slow client takes far less
                    await stream.send_all(chunk)
                    sent[0] += len(chunk)
            except trio.BrokenResourceError:
                pass

    backend = await start_backend(nursery, firehose)
    with trio.fail_after(30):
        async with ProxyProcess(nursery, ["-l", "127.0.0.1:0", "-b", backend]) as proc:
            assert proc.process is not None
            ((host, port),) = await proc.listening()
            client = await trio.open_tcp_stream(host, port)
            client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            await receive_exactly(client, 65536)
            baseline = _rss_kib(proc.process.pid)
            received = 65536
            peak = baseline
            for _ in range(150):  # ~1.5 s of slow reading, 16 KiB every 10 ms
                received += len(await client.receive_some(16384))
                await trio.sleep(0.01)
                peak = max(peak, _rss_kib(proc.process.pid))
            await client.aclose()
    # The backend could write far more than the client read, but only socket buffers and
    # one chunk in the proxy hold it: the proxy's memory must not follow the backlog.
    assert sent[0] - received < 32 * 1024 * 1024
    print(
        f"backend sent {sent[0]} bytes, client read {received}; proxy RSS {baseline} -> {peak} KiB"
    )
    assert peak - baseline < 8 * 1024, f"RSS grew from {baseline} KiB to {peak} KiB"


async def _served_certificate(host: str, port: int, pki: PKI) -> bytes:
    """The DER of the certificate the proxy serves for a.example."""
    stream = trio.SSLStream(
        await trio.open_tcp_stream(host, port), pki.client_context(), server_hostname="a.example"
    )
    async with stream:
        await stream.do_handshake()
        der = stream.getpeercert(binary_form=True)
    assert der is not None
    return der


async def test_sighup_re_reads_certificates_given_as_flags(
    nursery: trio.Nursery, tmp_path: Path, pki: PKI
) -> None:
    backend = await start_backend(nursery)
    cert = trio.Path(tmp_path / "site.pem")
    await cert.write_bytes(await trio.Path(pki.a.combined).read_bytes())
    with trio.fail_after(20):
        async with ProxyProcess(
            nursery, ["-l", "127.0.0.1:0", "-b", backend, "--tls-cert", str(cert)]
        ) as proc:
            ((host, port),) = await proc.listening()
            first = await _served_certificate(host, port, pki)
            renewed = pki.ca.issue_cert("a.example", "*.b.example")
            await cert.write_bytes(renewed.private_key_and_cert_chain_pem.bytes())
            proc.signal(signal.SIGHUP)
            await proc.wait_for("configuration reloaded")
            second = await _served_certificate(host, port, pki)
            assert second != first
            assert second == x509_der(renewed)
            await cert.write_text("not a certificate")
            proc.signal(signal.SIGHUP)
            await proc.wait_for(
                "SIGHUP: reload failed, keeping the running configuration: .*holds no PEM certificate"
            )
            assert await _served_certificate(host, port, pki) == second
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0


async def test_sighup_with_an_unusable_certificate_keeps_serving(
    nursery: trio.Nursery, tmp_path: Path, pki: PKI
) -> None:
    """A certificate whose extension cannot be parsed (cryptography raises ValueError
    when its names are read) fails the reload with one line naming the file, and the
    proxy keeps serving."""
    backend = await start_backend(nursery)
    cert = tmp_path / "site.pem"
    await trio.Path(cert).write_bytes(await trio.Path(pki.a.combined).read_bytes())
    with trio.fail_after(20):
        async with ProxyProcess(
            nursery, ["-l", "127.0.0.1:0", "-b", backend, "--tls-cert", str(cert)]
        ) as proc:
            ((host, port),) = await proc.listening()
            served = await _served_certificate(host, port, pki)
            write_unparsable_san_cert(cert)
            proc.signal(signal.SIGHUP)
            await proc.wait_for(
                "SIGHUP: reload failed, keeping the running configuration: "
                r"listeners\[0\]\.tls\.certs\[0\]\.cert: .*cannot parse its extensions"
            )
            assert await _served_certificate(host, port, pki) == served
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0
    # One line, no traceback: every line is a log record or an access line.
    assert all(re.match(r"\d{4}-\d\d-\d\d[ T]", line) for line in proc.stderr), proc.stderr


def x509_der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


async def test_bad_certificate_files_exit_2_naming_the_file(tmp_path: Path, pki: PKI) -> None:
    with trio.fail_after(20):
        result = await trio.run_process(
            [
                sys.executable,
                "-m",
                "l4proxy",
                "-l",
                "127.0.0.1:0",
                "-b",
                "127.0.0.1:1",
                "--tls-cert",
                pki.a.cert,
                "--tls-key",
                pki.c.key,
            ],
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 2
    message = result.stderr.decode()
    assert message.count("\n") == 1
    assert f"--tls-key: {pki.c.key!r} does not match the certificate {pki.a.cert!r}" in message


async def test_flag_paths_stay_relative_to_the_working_directory(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Relative paths in a config file are relative to the file; on the command line,
    to the working directory, even when the flag sits next to --config."""
    backend = await start_backend(nursery)
    sub = trio.Path(tmp_path / "sub")
    await sub.mkdir()
    await (sub / "l4proxy.toml").write_text(
        f'[[listeners]]\nlisten = ["127.0.0.1:0"]\nbackends = ["{backend}"]\n'
    )
    with trio.fail_after(20):
        args = ["--config", "sub/l4proxy.toml", "--access-log", "access.log"]
        async with ProxyProcess(nursery, args, cwd=str(tmp_path)) as proc:
            ((host, port),) = await proc.listening()
            async with await trio.open_tcp_stream(host, port) as client:
                await client.send_all(b"x")
                await receive_exactly(client, 1)
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0
    assert "outcome=" in await trio.Path(tmp_path / "access.log").read_text()
    assert not await (sub / "access.log").exists()
