"""The TLS streams: an ``SSL.Connection`` as a trio stream, with two ways to move bytes.

Theory of operation
-------------------
*Two streams, one contract.* The proxy peeks at the ClientHello. When the whole of it
arrived in the first segment (nearly always), it is still in the socket, and
:class:`SocketTLSStream` lets OpenSSL read and write the socket itself, so no records
are copied through Python (1.65x the decryption throughput of memory BIOs measured
by ``benchmarks/tls_transport.py``). Otherwise, and over any other trio stream,
:class:`TLSStream` drives OpenSSL through memory BIOs, in the shape of trio's own
``SSLStream``.

*One loop.* Every operation is tried on the ``SSL.Connection``; on ``WantReadError``
or ``WantWriteError`` the stream does the I/O OpenSSL asked for and tries again. That
I/O is the only thing that differs between the two, and each has one method for it,
``_more_io``:

* memory BIOs: send what OpenSSL wrote (``_flush``), then feed it exactly one
  ``receive_some`` of the transport (``b""`` becomes ``bio_shutdown()``);
* socket-bound: ``trio.lowlevel.wait_readable``/``wait_writable`` on the socket.

``_flush`` (send what OpenSSL queued) is the other per-transport method: the
socket-bound stream has nothing queued, so it only checkpoints. The handshake and
close_notify go through the one ``_retry`` loop, and so do their errors: a peer that
goes away during the handshake reads the same from both streams ("peer closed the
connection during the handshake", or "peer reset ..."). ``receive_some`` and sending
spell the same loop out, see ``_retry``.

*Buffers* stay bounded: plaintext is encrypted 64 KiB at a time and flushed before the
next piece; bytes the proxy already read while peeking at the ClientHello are fed in
first (``initial``).

*EOF.* ``send_eof`` sends close_notify and keeps reading, which is how TLS 1.3
half-closes (RFC 8446 §6.1) and what OpenSSL allows under TLS 1.2 too. A received
close_notify, or a transport EOF without one (common in practice; OpenSSL's
``IGNORE_UNEXPECTED_EOF``, set by :mod:`.policy`), reads as EOF.

*Errors.* ``SSL.Error`` becomes ``trio.BrokenResourceError(reason) from exc`` at this
boundary; :func:`~.policy.describe_ssl_error` gives the short reason the access log
shows. Errors of the transport itself (a reset under memory BIOs) pass through as the
transport raised them, as in trio's ``SSLStream``.
"""

from __future__ import annotations

import contextlib
import enum
import operator
import socket
from typing import TYPE_CHECKING

import trio
from OpenSSL import SSL

from .policy import describe_ssl_error

if TYPE_CHECKING:
    from collections.abc import Callable

RECEIVE_SIZE = 65536
SEND_CHUNK = 65536
#: The most plaintext one TLS record carries: what one ``receive_some`` can return.
RECORD_SIZE = 16384


class _State(enum.Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class TLSStream(trio.abc.HalfCloseableStream):
    """TLS over ``transport`` through memory BIOs; see the module docstring.

    Resource handling:
        Owns ``transport``: :meth:`aclose` sends close_notify (bounded by
        ``close_seconds``) and closes it.

    Error handling:
        OpenSSL and transport failures raise ``trio.BrokenResourceError``; using the
        stream after :meth:`aclose` raises ``trio.ClosedResourceError``; two tasks
        sending (or receiving) at once raise ``trio.BusyResourceError``.
    """

    def __init__(
        self, transport: trio.abc.Stream, connection: SSL.Connection, *, initial: bytes = b""
    ) -> None:
        self.transport = transport
        self.connection = connection
        if initial:
            connection.bio_write(initial)
        self._state = _State.OK
        self._sending = False
        self._receiving = False
        self._eof_sent = False
        self._transport_lock = trio.Lock()  # orders ciphertext from the send and receive paths
        self.close_seconds = 1.0

    # -- the loop, and the I/O it asks for --

    async def _retry(self, op: Callable[[], None]) -> None:
        """Call ``op`` until OpenSSL stops asking for I/O, doing that I/O in between.

        OpenSSL's other errors propagate for the caller to word. The handshake and
        close_notify come through here. :meth:`receive_some` and ``_send_chunk`` write
        the same loop out instead: they run once per record, and coming through here
        would cost each call a coroutine, a bound method and a frame.
        """
        while True:
            try:
                op()
            except (SSL.WantReadError, SSL.WantWriteError) as exc:
                await self._more_io(exc)
            else:
                return

    async def _more_io(self, exc: SSL.WantReadError | SSL.WantWriteError) -> None:
        """OpenSSL needs more bytes from the peer (memory BIOs: feed it one read).

        The BIOs grow, so a memory-BIO connection never wants to write; after
        ``bio_shutdown()`` an empty BIO reads as EOF, never as "want more", so a
        retry after the transport's EOF reports it rather than waiting again.
        """
        # Send what OpenSSL queued while reading (a KeyUpdate reply), unless a sender
        # holds the lock: it drains the BIO before it lets go, and waiting for it could
        # stall this direction behind a slow reader.
        if not self._transport_lock.locked():
            await self._flush()
        await self._feed()  # at EOF, the next try reports it

    async def _feed(self) -> bool:
        """Give OpenSSL one more read from the transport; ``False`` at EOF."""
        try:
            data = await self.transport.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._state = _State.BROKEN
            raise
        if not data:
            self.connection.bio_shutdown()
            return False
        self.connection.bio_write(data)
        return True

    async def _flush(self) -> None:
        """Send everything OpenSSL has written, in order (hence the lock around both)."""
        async with self._transport_lock:
            while True:
                try:
                    data = self.connection.bio_read(SEND_CHUNK + 1024)
                except SSL.WantReadError:
                    return
                try:
                    await self.transport.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._state = _State.BROKEN
                    raise

    # -- trio.abc.Stream --

    async def do_handshake(self) -> None:
        """Run the handshake to completion (the caller bounds it with a deadline).

        Error handling:
            ``trio.BrokenResourceError`` with OpenSSL's reason (after the alert
            OpenSSL queued for the peer is sent, for at most ``close_seconds``), or
            "peer closed/reset the connection during the handshake".
        """
        self._check_usable()
        try:
            await self._retry(self.connection.do_handshake)
        except (SSL.ZeroReturnError, SSL.SysCallError) as exc:
            self._state = _State.BROKEN
            raise trio.BrokenResourceError(peer_gone(exc)) from exc
        except SSL.Error as exc:
            self._state = _State.BROKEN
            with trio.move_on_after(self.close_seconds):
                await self._flush()  # the alert OpenSSL queued for the peer
            raise trio.BrokenResourceError(describe_ssl_error(exc)) from exc
        await self._flush()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = RECORD_SIZE
        else:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
            # One call returns at most one record anyway, and pyOpenSSL allocates the
            # whole buffer asked for on every call.
            max_bytes = min(max_bytes, RECORD_SIZE)
        self._check_usable()
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this TLSStream")
        self._receiving = True
        waited = False
        try:
            while True:  # _retry's loop, written out: this is the hot path
                try:
                    data = self.connection.recv(max_bytes)
                except (SSL.WantReadError, SSL.WantWriteError) as exc:
                    await self._more_io(exc)
                    waited = True
                    continue
                except SSL.ZeroReturnError:
                    data = b""  # close_notify
                except SSL.SysCallError as exc:
                    if not exc.args or exc.args[0] != -1:
                        raise self._broken(exc) from exc
                    data = b""  # transport EOF without close_notify
                except SSL.Error as exc:
                    raise self._broken(exc) from exc
                if not waited:
                    await trio.lowlevel.checkpoint()  # trio streams always checkpoint
                return data
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_usable()
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof() was already called")
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLSStream")
        self._sending = True
        try:
            view = memoryview(data)
            if not view:
                await trio.lowlevel.checkpoint()
            for start in range(0, len(view), SEND_CHUNK):
                await self._send_chunk(view[start : start + SEND_CHUNK])
        finally:
            self._sending = False

    async def _send_chunk(self, chunk: memoryview) -> None:
        """Encrypt ``chunk`` into the BIO (which grows: never WantWrite) and flush it."""
        try:
            self.connection.sendall(chunk)
        except SSL.Error as exc:
            raise self._broken(exc) from exc
        await self._flush()

    def _broken(self, exc: BaseException) -> trio.BrokenResourceError:
        self._state = _State.BROKEN
        return trio.BrokenResourceError(describe_ssl_error(exc))

    async def wait_send_all_might_not_block(self) -> None:
        self._check_usable()
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Send close_notify; receiving keeps working (TLS 1.3 half-close)."""
        self._check_usable()
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLSStream")
        if self._eof_sent:
            await trio.lowlevel.checkpoint()
            return
        self._eof_sent = True
        try:
            await self._retry(self._write_close_notify)
        except SSL.Error as exc:
            raise self._broken(exc) from exc
        await self._flush()

    def _write_close_notify(self) -> None:
        with contextlib.suppress(SSL.WantReadError):  # written; the peer's is not awaited
            self.connection.shutdown()

    async def aclose(self) -> None:
        """Try to send close_notify (socket-bound: only what fits without waiting),
        for at most ``close_seconds``; then close the transport."""
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        state, self._state = self._state, _State.CLOSED
        try:
            if state is _State.OK and not self._eof_sent and not self._sending:
                with trio.move_on_after(self.close_seconds):
                    try:
                        self.connection.shutdown()  # one try: never waits for the socket
                        await self._flush()
                    except (SSL.Error, trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
        finally:
            await trio.aclose_forcefully(self.transport)

    # -- details --

    @property
    def protocol_version(self) -> str | None:
        return protocol_version(self.connection)

    @property
    def cipher(self) -> str | None:
        return cipher(self.connection)

    @property
    def alpn_protocol(self) -> str | None:
        return alpn_protocol(self.connection)

    def _check_usable(self) -> None:
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("this TLSStream was closed")
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("this TLSStream is broken")


class SocketTLSStream(TLSStream):
    """TLS where OpenSSL reads and writes the socket itself: the fast path.

    Used when the whole ClientHello was *peeked* (still in the socket), so nothing has to
    be replayed. OpenSSL reads records straight from the kernel instead of Python
    copying them into a memory BIO first (``benchmarks/tls_transport.py``: 1.65x the
    decryption throughput here). Same contract and the same loops as
    :class:`TLSStream`; only the I/O differs. Waiting uses
    ``trio.lowlevel.wait_readable``/``wait_writable``, and waits for writability are
    serialised because OpenSSL may need to write from the receiving side too (a
    TLS 1.3 KeyUpdate reply) while trio allows one writer-waiter per socket.
    """

    def __init__(self, transport: trio.SocketStream, connection: SSL.Connection) -> None:
        super().__init__(transport, connection)
        self._sock = transport.socket
        self._writable = trio.Lock()

    async def _more_io(self, exc: SSL.WantReadError | SSL.WantWriteError) -> None:
        """Wait until the socket can give OpenSSL what it asked for."""
        if isinstance(exc, SSL.WantReadError):
            await trio.lowlevel.wait_readable(self._sock)
        else:
            async with self._writable:
                await trio.lowlevel.wait_writable(self._sock)

    async def _flush(self) -> None:
        """Nothing is queued: OpenSSL wrote to the socket itself. Only the checkpoint
        every trio stream operation has."""
        await trio.lowlevel.checkpoint()

    async def _send_chunk(self, chunk: memoryview) -> None:
        """OpenSSL writes the socket; with partial writes on, it may take several calls."""
        position = 0
        while position < len(chunk):  # _retry's loop, written out: the hot path
            try:
                position += self.connection.send(chunk[position:])
            except (SSL.WantReadError, SSL.WantWriteError) as exc:
                await self._more_io(exc)
                continue
            except SSL.Error as exc:
                raise self._broken(exc) from exc
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        self._check_usable()
        async with self._writable:
            await trio.lowlevel.wait_writable(self._sock)

    @property
    def can_hand_over(self) -> bool:
        """In good order and idle: not broken, closed or half-closed, no task using it."""
        return not (
            self._state is not _State.OK
            or self._eof_sent
            or self._sending
            or self._receiving
            or self._writable.locked()
        )

    def hand_over(self) -> tuple[socket.socket, SSL.Connection]:
        """Give the socket and the ``SSL.Connection`` to the data core, which drives
        them from now on in callbacks (:mod:`l4proxy.links`); this stream is closed
        and owns nothing any more. Only when :attr:`can_hand_over`."""
        assert self.can_hand_over
        self._state = _State.CLOSED
        return detach_socket(self._sock), self.connection


def peer_gone(exc: SSL.ZeroReturnError | SSL.SysCallError) -> str:
    """Why a handshake stopped when the peer went away: its EOF (a ZeroReturnError at
    any point of the handshake, under IGNORE_UNEXPECTED_EOF) or its socket's error."""
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else -1
    verb = "reset" if code > 0 else "closed"
    return f"peer {verb} the connection during the handshake"


def protocol_version(connection: SSL.Connection) -> str | None:
    """The negotiated TLS version's name ("TLSv1.3"), once the handshake is done."""
    version = connection.get_protocol_version_name()
    return str(version) if version and version != "Unknown" else None


def cipher(connection: SSL.Connection) -> str | None:
    name = connection.get_cipher_name()
    return str(name) if name else None


def alpn_protocol(connection: SSL.Connection) -> str | None:
    protocol = connection.get_alpn_proto_negotiated()
    return bytes(protocol).decode("ascii", "replace") if protocol else None


def detach_socket(sock: trio.socket.SocketType) -> socket.socket:
    """The stdlib socket for a trio socket's descriptor, which trio gives up (no task
    may be waiting on it). Family, type and protocol are passed on: no syscall."""
    family, kind, proto = sock.family, sock.type, sock.proto
    return socket.socket(family, kind, proto, sock.detach())
