"""Telling systemd (or anything playing its part) what the process is doing.

The sd_notify protocol (``man 3 sd_notify``): each message is one datagram of
newline-separated ``KEY=VALUE`` lines, sent to the ``AF_UNIX`` ``SOCK_DGRAM`` socket
named in ``$NOTIFY_SOCKET``; a leading ``@`` there names a socket in Linux's abstract
namespace (a NUL byte in its place). The process manager reads the sender's pid from
the socket's credentials, so only the main process may send: ``--workers`` workers are
started without ``$NOTIFY_SOCKET``.

What l4proxy sends (see docs/operations.md and ``examples/l4proxy.service``):

* ``READY=1`` once every listener is bound (with ``--workers``: once every worker is);
* around a SIGHUP, ``RELOADING=1`` with ``MONOTONIC_USEC=`` (what ``Type=notify-reload``
  needs, systemd >= 253), then ``READY=1`` whether the reload succeeded or not (a
  failed one keeps the running configuration, which is ready);
* ``STOPPING=1`` when the drain starts;
* ``STATUS=`` lines saying the same for ``systemctl status``.

Sending never blocks the event loop: the socket is non-blocking and a datagram the
receiver has no room for is dropped (systemd reads them at once; a manager that does
not is not worth stalling connections for). Without ``$NOTIFY_SOCKET`` nothing is
sent. A socket that is missing or refuses is reported once (WARNING) and then left
alone: the proxy runs the same with or without a process manager.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

LOGGER = logging.getLogger("l4proxy.sdnotify")

#: The environment variable systemd sets for ``Type=notify`` services.
ENVIRONMENT_VARIABLE = "NOTIFY_SOCKET"


def socket_address(value: str) -> str | bytes | None:
    """The ``AF_UNIX`` address ``$NOTIFY_SOCKET`` names, or ``None`` if it names none
    that this module can use (empty, or another kind such as systemd's ``vsock:``).

    >>> socket_address("@l4proxy/notify")
    b'\\x00l4proxy/notify'
    >>> socket_address("/run/systemd/notify")
    '/run/systemd/notify'
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()  # the abstract namespace: no file, no permissions
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends sd_notify messages to one socket, or does nothing (no socket).

    Use :meth:`from_environment` in the process the service manager started; pass the
    result to :func:`l4proxy.runner.run_proxy` or :func:`l4proxy.workers.supervise`.

    Resource handling:
        The datagram socket is opened on the first message and kept; :meth:`close`
        closes it. It is never connected, so a manager that restarts its socket is
        still reached.

    Error handling:
        An ``OSError`` on sending (no such socket, refused, permissions) is logged once
        as a WARNING and turns the notifier off; a full receive queue drops that one
        message with a DEBUG line.
    """

    def __init__(self, address: str | bytes | None, *, description: str = "") -> None:
        self.address = address
        self.description = description or repr(address)
        self._socket: socket.socket | None = None
        self._stopping = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier for ``$NOTIFY_SOCKET`` (a no-op one when it is unset)."""
        value = (os.environ if environ is None else environ).get(ENVIRONMENT_VARIABLE, "")
        address = socket_address(value)
        if value and address is None:
            LOGGER.warning(
                "%s=%r: not a Unix socket path or @abstract name; not notifying",
                ENVIRONMENT_VARIABLE,
                value,
            )
        return cls(address, description=value)

    @property
    def enabled(self) -> bool:
        """Whether messages are sent at all."""
        return self.address is not None

    def notify(self, *lines: str) -> None:
        """Send one datagram of ``KEY=VALUE`` lines (never blocks)."""
        if self.address is None:
            return
        message = "\n".join(lines).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                self._socket.setblocking(False)
            self._socket.sendto(message, self.address)
        except BlockingIOError:
            LOGGER.debug("%s: receiver busy, dropped %r", self.description, message)
        except OSError as exc:
            LOGGER.warning(
                "cannot notify the service manager at %s (%s); not notifying any more",
                self.description,
                exc.strerror or exc,
            )
            self.close()
            self.address = None

    def ready(self, status: str) -> None:
        """Serving: listeners bound, or a reload over (``READY=1``)."""
        self.notify("READY=1", _status(status))

    def reloading(self) -> None:
        """A reload starts now (``RELOADING=1`` with the ``CLOCK_MONOTONIC`` time
        systemd ties it to, as ``Type=notify-reload`` requires)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self, status: str) -> None:
        """The drain starts (``STOPPING=1``, sent once)."""
        if not self._stopping:
            self._stopping = True
            self.notify("STOPPING=1", _status(status))

    def status(self, status: str) -> None:
        """Only a new ``STATUS=`` line (what ``systemctl status`` shows)."""
        self.notify(_status(status))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _status(text: str) -> str:
    return "STATUS=" + " ".join(text.split())  # one line, whatever text holds
