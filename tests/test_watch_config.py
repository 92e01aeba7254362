"""``--watch-config``: the real command reloads when its files change on disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio

import l4proxy
from l4proxy.watching import files_named, watch_config

from .conftest import identify, read_line, refused_port, start_backend
from .proxyprocess import ProxyProcess

if TYPE_CHECKING:
    from .tlsfixtures import PKI

WAIT = 30


def _toml(port: int, backend: str, extra: str = "") -> str:
    return (
        f'[[listeners]]\nname = "svc"\nlisten = ["127.0.0.1:{port}"]\n'
        f'backends = ["{backend}"]\n{extra}'
    )


async def _greeting(port: int) -> bytes:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        return await read_line(stream)


def _read(path: str) -> str:
    with open(path) as file:
        return file.read()


def _write_atomically(path: Path, text: str) -> None:
    """As editors and config managers do: a new file renamed over the old one."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text)
    os.replace(temporary, path)


async def test_a_changed_config_file_is_reloaded_and_an_unrelated_file_is_not(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    one = await start_backend(nursery, identify(b"one"))
    two = await start_backend(nursery, identify(b"two"))
    port = refused_port()
    config = tmp_path / "l4proxy.toml"
    config.write_text(_toml(port, one))
    with trio.fail_after(WAIT):
        async with ProxyProcess(nursery, ["--config", str(config), "--watch-config"]) as proc:
            await proc.listening()
            await proc.wait_for(r"l4proxy.watch: watching 1 files in ")
            assert await _greeting(port) == b"one\n"
            # A file beside it (an access log, say) changes: no reload.
            (tmp_path / "other.log").write_text("noise\n")
            await trio.sleep(1.0)  # longer than the watcher's debounce
            config.write_text(_toml(port, two))
            await proc.wait_for("configuration reloaded")
            assert await _greeting(port) == b"two\n"
            # A bad edit keeps the running configuration, and a good one after it applies.
            _write_atomically(config, _toml(port, two, "idle_timeout = -1\n"))
            await proc.wait_for(
                r"ERROR l4proxy.cli: --watch-config: reload failed, keeping the running "
                r"configuration: .*idle_timeout"
            )
            assert await _greeting(port) == b"two\n"
            _write_atomically(config, _toml(port, one))
            await proc.wait_for("configuration reloaded", count=2)
            assert await _greeting(port) == b"one\n"
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0
    reloads = [line for line in proc.stderr if "changed: reloading" in line]
    assert len(reloads) == 3
    assert all(str(config) in line and "other.log" not in line for line in reloads)


async def test_a_configmap_style_symlink_swap_is_seen(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Kubernetes updates a ConfigMap volume by writing a new directory and renaming
    the ``..data`` symlink over the old one; the file the proxy was given is a symlink
    through ``..data``, and never changes itself."""
    one = await start_backend(nursery, identify(b"one"))
    two = await start_backend(nursery, identify(b"two"))
    port = refused_port()
    volume = tmp_path / "volume"
    (volume / "..v1").mkdir(parents=True)
    (volume / "..v1" / "l4proxy.toml").write_text(_toml(port, one))
    os.symlink("..v1", volume / "..data")
    os.symlink("..data/l4proxy.toml", volume / "l4proxy.toml")
    with trio.fail_after(WAIT):
        async with ProxyProcess(
            nursery, ["--config", str(volume / "l4proxy.toml"), "--watch-config"]
        ) as proc:
            await proc.listening()
            await proc.wait_for("l4proxy.watch: watching")
            assert await _greeting(port) == b"one\n"
            (volume / "..v2").mkdir()
            (volume / "..v2" / "l4proxy.toml").write_text(_toml(port, two))
            os.symlink("..v2", volume / "..data_tmp")
            os.replace(volume / "..data_tmp", volume / "..data")
            await proc.wait_for("configuration reloaded")
            assert await _greeting(port) == b"two\n"
            proc.signal(signal.SIGINT)
            assert await proc.wait() == 0


async def test_a_renewed_certificate_is_put_into_service(
    nursery: trio.Nursery, tmp_path: Path, pki: PKI
) -> None:
    """cert-manager style: the certificate file named by the config changes (in another
    directory than the config); new handshakes present the new certificate."""
    backend = await start_backend(nursery, identify(b"svc"))
    port = refused_port()
    certs = tmp_path / "certs"
    certs.mkdir()
    site = certs / "site.pem"
    _write_atomically(site, _read(pki.a.combined))
    config = tmp_path / "l4proxy.toml"
    config.write_text(_toml(port, backend, f'tls = {{ certs = [{{ cert = "{site}" }}] }}\n'))
    with trio.fail_after(WAIT):
        async with ProxyProcess(nursery, ["--config", str(config), "--watch-config"]) as proc:
            await proc.listening()
            await proc.wait_for("l4proxy.watch: watching 2 files")
            assert "a.example" in await _subject(port, pki)
            _write_atomically(site, _read(pki.c.combined))
            await proc.wait_for(f"{site} changed: reloading")
            await proc.wait_for("configuration reloaded")
            assert "c.example" in await _subject(port, pki)
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0


async def _subject(port: int, pki: PKI) -> str:
    """The DNS names of the certificate the proxy presents."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    context = pki.client_context()
    context.check_hostname = False  # the names are what is looked at
    async with trio.SSLStream(tcp, context) as tls:
        await tls.do_handshake()
        names = tls.getpeercert()["subjectAltName"]
    return " ".join(value for kind, value in names if kind == "DNS")


async def test_the_workers_supervisor_watches_and_every_worker_reloads(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    one = await start_backend(nursery, identify(b"one"))
    two = await start_backend(nursery, identify(b"two"))
    port = refused_port()
    config = tmp_path / "l4proxy.toml"
    config.write_text("workers = 2\n" + _toml(port, one))
    with trio.fail_after(WAIT):
        async with ProxyProcess(nursery, ["--config", str(config), "--watch-config"]) as proc:
            await proc.wait_for("2 workers running")
            await proc.wait_for("l4proxy.watch: watching")
            _write_atomically(config, "workers = 2\n" + _toml(port, two))
            await proc.wait_for(r"\[worker \d\] l4proxy.server: configuration reloaded", count=2)
            assert {await _greeting(port) for _ in range(6)} == {b"two\n"}
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0
    assert (
        len([line for line in proc.stderr if "l4proxy.watch: watching" in line]) == 2
    )  # before and after


def test_watch_config_needs_a_config_file() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "l4proxy",
            "--listen",
            ":1",
            "--backend",
            "127.0.0.1:2",
            "--watch-config",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--watch-config needs --config" in result.stderr


def test_the_files_watched_are_the_inputs_the_config_names(pki: PKI) -> None:
    config = l4proxy.Config(
        listeners=[
            l4proxy.ListenerConfig(
                listen=["127.0.0.1:1"],
                backends=["127.0.0.1:2"],
                tls=l4proxy.TLSConfig(certs=[pki.a.combined], client_ca=pki.ca_file),
                backend_tls=True,
                backend_ca=pki.ca_file,
                access_log="/tmp/not-an-input.log",
            )
        ]
    )
    assert files_named(config) == {pki.a.combined, pki.ca_file}


async def test_a_change_made_while_a_reload_runs_is_reloaded_too(tmp_path: Path) -> None:
    """The watcher in process, with a reload that is slow: the file is saved again
    while it runs (the second save may not have been read by it), so a second reload
    follows, with no further event needed."""
    config = tmp_path / "l4proxy.toml"
    config.write_text(_toml(1, "127.0.0.1:2"))
    current = l4proxy.Config.load(str(config))
    reloads: list[str] = []
    second = trio.Event()

    async def reload(why: str) -> None:
        reloads.append(config.read_text())
        if len(reloads) == 1:
            _write_atomically(config, _toml(1, "127.0.0.1:3"))  # saved during the reload
            await trio.sleep(0.5)  # longer than the watcher's debounce
        else:
            second.set()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_config, str(config), lambda: current, reload)
            await trio.sleep(0.5)  # the watch is set up
            _write_atomically(config, _toml(1, "127.0.0.1:4"))
            await second.wait()
            nursery.cancel_scope.cancel()
    assert "127.0.0.1:4" in reloads[0]
    assert "127.0.0.1:3" in reloads[1]
