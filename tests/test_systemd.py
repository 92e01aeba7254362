"""systemd's side of ``$NOTIFY_SOCKET``, played for real: a datagram socket receiving
what the real ``l4proxy`` command sends, with the sender's pid from the kernel's
credentials (``SO_PASSCRED``, as systemd reads them); and ``examples/l4proxy.service``
checked by ``systemd-analyze verify``."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest
import trio

from l4proxy.sdnotify import Notifier, socket_address

from .conftest import echo, receive_exactly, start_backend
from .proxyprocess import ProxyProcess
from .realservers import require_binary

UNIT = Path(__file__).parent.parent / "examples" / "l4proxy.service"
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@attrs.frozen
class Message:
    pid: int
    fields: dict[str, str]


class ServiceManager:
    """The receiving end of ``$NOTIFY_SOCKET``: one message per datagram, with the
    sender's pid from the kernel, as systemd reads it."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)

    def _read(self) -> Message:
        data, ancillary, _flags, _address = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        pids = [
            _UCRED.unpack(payload[: _UCRED.size])[0]
            for level, kind, payload in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
        ]
        assert len(pids) == 1, ancillary
        return Message(pids[0], dict(line.split("=", 1) for line in data.decode().split("\n")))

    async def receive(self) -> Message:
        await trio.lowlevel.wait_readable(self.sock)
        return self._read()

    def pending(self) -> list[Message]:
        """What arrived and was not received yet (bounded: the queue is)."""
        messages = []
        for _ in range(1000):
            try:
                messages.append(self._read())
            except BlockingIOError:
                break
        return messages


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _config(path: Path, listen: str, backend: str) -> Path:
    path.write_text(
        f'[[listeners]]\nname = "front"\nlisten = ["{listen}"]\nbackends = ["{backend}"]\n'
        "drain_timeout = 5\n"
    )
    return path


@pytest.fixture(params=["path", "abstract"])
def notify_address(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """``$NOTIFY_SOCKET`` as systemd sets it: a socket file, or ``@name`` (abstract)."""
    if request.param == "path":
        return str(tmp_path / "notify")
    return f"@l4proxy-test/{os.getpid()}/{tmp_path.name}"


async def test_ready_reload_and_stop_are_notified(
    nursery: trio.Nursery, tmp_path: Path, notify_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = await start_backend(nursery, echo)
    front = tmp_path / "front.sock"
    config = _config(tmp_path / "l4proxy.toml", f"unix:{front}", backend)
    manager = ServiceManager(socket_address(notify_address) or "")
    monkeypatch.setenv("NOTIFY_SOCKET", notify_address)
    with manager.sock, trio.fail_after(30):
        async with ProxyProcess(nursery, ["--config", str(config)]) as proc:
            assert proc.process is not None
            ready = await manager.receive()
            assert ready.pid == proc.process.pid
            assert ready.fields == {"READY": "1", "STATUS": "accepting on 1 addresses"}
            # READY=1 means serving: connect at once, no retry, no log to wait for.
            async with await trio.open_unix_socket(str(front)) as client:
                await client.send_all(b"ready")
                assert await receive_exactly(client, 5) == b"ready"

            # A reload: RELOADING=1 stamped with the time it started, then READY=1.
            before = _monotonic_usec()
            proc.signal(signal.SIGHUP)
            reloading = await manager.receive()
            after = _monotonic_usec()
            assert reloading.fields.keys() == {"RELOADING", "MONOTONIC_USEC", "STATUS"}
            assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= after
            reloaded = await manager.receive()
            assert reloaded.fields == {"READY": "1", "STATUS": "reloaded"}

            # A reload that fails keeps the running configuration, which is ready.
            config.write_text("[[listeners]]\nlisten = 7\n")
            proc.signal(signal.SIGHUP)
            assert (await manager.receive()).fields["RELOADING"] == "1"
            refused = await manager.receive()
            assert refused.fields["READY"] == "1"
            assert refused.fields["STATUS"].startswith(
                "reload failed, running configuration kept: "
            )
            assert "listen" in refused.fields["STATUS"]

            async with await trio.open_unix_socket(str(front)) as client:  # held over the drain
                await client.send_all(b"x")
                assert await receive_exactly(client, 1) == b"x"
                proc.signal(signal.SIGTERM)
                stopping = await manager.receive()
                assert stopping.fields == {"STOPPING": "1", "STATUS": "draining 1 connections"}
                assert stopping.pid == proc.process.pid
            assert await proc.wait() == 0
            assert manager.pending() == []


async def test_workers_notify_from_the_supervisor_only(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = await start_backend(nursery, echo)
    address = str(tmp_path / "notify")
    manager = ServiceManager(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    with manager.sock, trio.fail_after(40):
        async with ProxyProcess(
            nursery, ["-l", "127.0.0.1:0", "-b", backend, "--workers", "2"]
        ) as proc:
            assert proc.process is not None
            supervisor = proc.process.pid
            ready = await manager.receive()
            assert ready == Message(supervisor, {"READY": "1", "STATUS": "2 workers running"})
            # Both workers log "accepting on" before they tell the supervisor, which sent
            # READY=1 only after hearing from both. (Their lines come through a pipe this
            # process reads in another task, so they may arrive after the datagram: wait.)
            host, port = (await proc.listening(count=2))[0]
            assert len([line for line in proc.stderr if "accepting on" in line]) == 2
            for index in range(10):
                async with await trio.open_tcp_stream(host, port) as client:
                    await client.send_all(b"%d" % index)
                    assert await receive_exactly(client, 1) == b"%d" % index

            before = _monotonic_usec()
            proc.signal(signal.SIGHUP)
            reloading = await manager.receive()
            assert reloading.pid == supervisor
            assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= _monotonic_usec()
            reloaded = await manager.receive()
            assert reloaded == Message(
                supervisor, {"READY": "1", "STATUS": "reloaded; 2 workers running"}
            )
            await proc.wait_for(r"\[worker \d\] l4proxy.server: configuration reloaded", count=2)

            proc.signal(signal.SIGTERM)
            stopping = await manager.receive()
            assert stopping == Message(
                supervisor, {"STOPPING": "1", "STATUS": "draining 2 workers"}
            )
            assert await proc.wait() == 0
            # The workers drained and exited; none of them (nor the supervisor again) sent.
            assert manager.pending() == []
            await proc.wait_for(r"\[worker 2\] l4proxy.cli: shut down cleanly")


def test_the_abstract_namespace_and_paths_are_told_apart() -> None:
    assert socket_address("@l4proxy") == b"\0l4proxy"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("") is None
    assert socket_address("@") is None
    assert socket_address("vsock:2:1234") is None  # systemd >= 254 may say this; not ours


def test_no_socket_is_reported_once_then_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    with caplog.at_level(logging.DEBUG, logger="l4proxy.sdnotify"):
        notifier.ready("up")
        notifier.status("still up")
        notifier.stopping("down")
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    assert "cannot notify the service manager" in caplog.records[0].getMessage()
    assert not notifier.enabled


def test_unusable_addresses_and_none_send_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="l4proxy.sdnotify"):
        assert not Notifier.from_environment({}).enabled
        assert not Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:9"}).enabled
    assert [record.levelname for record in caplog.records] == ["WARNING"]


def test_a_manager_that_does_not_read_never_blocks_the_sender(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The kernel's queue for a datagram socket fills; a blocking send would then
    wait for the reader (stalling the event loop). Ours drops the message instead."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        receiver.bind(path)
        notifier = Notifier(path)
        with caplog.at_level(logging.DEBUG, logger="l4proxy.sdnotify"):
            try:
                for index in range(10_000):  # bounded; the queue holds far fewer
                    notifier.status(f"message {index}")
                    if caplog.records:
                        break
            finally:
                notifier.close()
        messages = [record.getMessage() for record in caplog.records]
        assert len(messages) == 1
        assert "receiver busy, dropped b'STATUS=message " in messages[0]
        assert notifier.enabled  # a busy receiver is no reason to stop notifying
        assert receiver.recv(4096) == b"STATUS=message 0"


# --- examples/l4proxy.service -------------------------------------------------------


def _systemd_version() -> int:
    output = subprocess.run(
        ["systemd-analyze", "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.match(r"systemd (\d+)", output)
    assert match, output
    return int(match.group(1))


def _verify(unit_text: str, directory: Path) -> list[str]:
    """``systemd-analyze verify`` on ``unit_text`` with ExecStart pointing at this
    checkout's ``l4proxy`` (verify checks that the program exists); its complaints."""
    program = Path(sys.executable).parent / "l4proxy"
    assert program.exists()
    text = unit_text.replace("/usr/local/bin/l4proxy", str(program))
    unit = directory / "l4proxy.service"
    unit.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 0 or lines, result
    return lines


def _older_systemd_variant(text: str) -> str:
    """The unit as its comments say to change it for systemd < 253."""
    assert text.count("\nType=notify-reload\n") == 1
    assert text.count("\n#ExecReload=kill -HUP $MAINPID\n") == 1
    return text.replace("\nType=notify-reload\n", "\nType=notify\n").replace(
        "\n#ExecReload=kill -HUP $MAINPID\n", "\nExecReload=kill -HUP $MAINPID\n"
    )


def test_the_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    require_binary("systemd-analyze")  # Debian's systemd; make test installs it
    text = UNIT.read_text()
    complaints = _verify(text, tmp_path)
    if _systemd_version() >= 253:
        assert complaints == []
    else:  # e.g. Debian 12's 252: everything but the newer type is understood
        assert len(complaints) == 1, complaints
        assert "notify-reload" in complaints[0]
    assert _verify(_older_systemd_variant(text), tmp_path) == []


def test_the_unit_file_says_what_the_proxy_does() -> None:
    """What systemd-analyze cannot judge: that the unit matches the program."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    assert settings["Type"] == ["notify-reload"]
    assert "ReloadSignal" not in settings  # systemd's default, SIGHUP: what runner.py reloads on
    assert settings["ExecStart"] == ["/usr/local/bin/l4proxy --config /etc/l4proxy/l4proxy.toml"]
    assert settings["NotifyAccess"] == ["main"]  # workers never notify; see workers.py
    assert settings["KillMode"] == ["mixed"]
    assert settings["KillSignal"] == ["SIGTERM"]
    assert settings["DynamicUser"] == ["yes"]
    assert settings["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert settings["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["NoNewPrivileges"] == ["yes"]
    assert int(settings["LimitNOFILE"][0]) >= 65536
    # Stopping waits for the drain: systemd must not SIGKILL before the proxy is done
    # (the example config's drain_timeout, plus workers.STOP_MARGIN).
    assert int(settings["TimeoutStopSec"][0].rstrip("s")) > 30 + 10
