"""TLS with pyOpenSSL: contexts built once at start, and a trio stream over memory BIOs.

Theory of operation
-------------------
*Contexts.* Every certificate of a listener gets its own ``SSL.Context`` with the same
policy (TLS 1.2+, Mozilla "intermediate" ECDHE-only AEAD ciphers, no compression, no
renegotiation, session tickets on). The proxy reads the ClientHello itself before any
TLS is spoken, so it already knows the SNI and builds each ``SSL.Connection`` on the
right context: no servername callback is needed. The ALPN callback is the only callback,
and it is total: it never raises.

*Two streams, one contract.* The proxy peeks at the ClientHello; when the whole of it
arrived in the first segment (nearly always) it is still in the socket, and
:class:`SocketTLSStream` lets OpenSSL read and write the socket itself — no copying
of records through Python (1.65x the decryption throughput of memory BIOs measured
by ``benchmarks/tls_transport.py``). Otherwise, and over any other trio stream,
:class:`TLSStream` is used, as described next.

*TLSStream.* A :class:`trio.abc.HalfCloseableStream` over any transport stream, driving
an ``SSL.Connection`` whose I/O goes through memory BIOs (the shape of trio's own
``SSLStream``): each operation is tried, whatever OpenSSL wrote is flushed to the
transport, and on ``WantReadError`` exactly one ``receive_some`` feeds it more. Bytes the
proxy already read while peeking at the ClientHello are fed in first (``initial``).
Buffers stay bounded: plaintext is encrypted 64 KiB at a time and flushed before the
next piece.

*EOF.* ``send_eof`` sends close_notify and keeps reading, which is how TLS 1.3 half-
closes (RFC 8446 §6.1) and what OpenSSL allows under TLS 1.2 too. A received
close_notify, or a transport EOF without one (common in practice; OpenSSL's
``IGNORE_UNEXPECTED_EOF``), reads as EOF.

*Errors.* ``SSL.Error`` becomes ``trio.BrokenResourceError(reason) from exc`` at this
boundary; :func:`describe_ssl_error` gives the short reason the access log shows.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import ipaddress
import logging
import operator

import service_identity
import service_identity.pyopenssl
import trio
from cryptography import x509
from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

from .config import TLSConfig, TLSVersion
from .errors import ConfigError

LOGGER = logging.getLogger("l4proxy.tls")

RECEIVE_SIZE = 65536
SEND_CHUNK = 65536
#: The most plaintext one TLS record carries: what one ``receive_some`` can return.
RECORD_SIZE = 16384

#: A fatal ``unrecognized_name`` alert (RFC 8446 §6.2), sent in clear before any
#: handshake when no route matches the SNI.
ALERT_UNRECOGNIZED_NAME = b"\x15\x03\x03\x00\x02\x02\x70"

#: Mozilla "intermediate" TLS 1.2 suites, ECDHE only (forward secrecy, AEAD).
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
TLS13_CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
_MIN_VERSIONS = {TLSVersion.TLS1_2: SSL.TLS1_2_VERSION, TLSVersion.TLS1_3: SSL.TLS1_3_VERSION}
_POLICY_OPTIONS = (
    SSL.OP_NO_COMPRESSION
    | SSL.OP_NO_RENEGOTIATION
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_IGNORE_UNEXPECTED_EOF
    | SSL.OP_NO_SSLv2
    | SSL.OP_NO_SSLv3
    | SSL.OP_NO_TLSv1
    | SSL.OP_NO_TLSv1_1
)


class ClientCertificateRejected(Exception):
    """The client's certificate verified but is not on the listener's allow lists."""


# --- contexts ---------------------------------------------------------------------------


def _policy_context(method: int, min_version: TLSVersion) -> SSL.Context:
    context = SSL.Context(method)
    context.set_min_proto_version(_MIN_VERSIONS[min_version])
    context.set_options(_POLICY_OPTIONS)
    context.set_cipher_list(TLS12_CIPHERS.encode())
    context.set_tls13_ciphersuites(TLS13_CIPHERSUITES.encode())
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)  # idle connections hold no record buffers
    _restrict_groups(context)
    return context


def _restrict_groups(context: SSL.Context) -> None:
    """Key exchange only over X25519 and P-256 (plus the X25519+ML-KEM-768 hybrid
    where OpenSSL has it), per issue #3's policy.

    pyOpenSSL has no public call for SSL_CTX_set1_groups_list, so this is the one place
    that reaches past its API: the raw SSL_CTX handle, and the function from the
    ``cryptography`` bindings pyOpenSSL itself is built on. If either is missing in a
    future release, the proxy keeps OpenSSL's default groups and says so once.
    """
    handle = getattr(context, "_context", None)
    set_groups = getattr(Binding.lib, "SSL_CTX_set1_curves_list", None)
    if handle is not None and set_groups is not None:
        # "*" (OpenSSL 3.5+): send key shares for both, so older peers need no HelloRetryRequest.
        for groups in (b"*X25519MLKEM768:*X25519:P-256", b"X25519:P-256"):
            if set_groups(handle, groups) == 1:
                return
    if not _warned_about_groups:
        _warned_about_groups.append(True)
        LOGGER.warning("cannot restrict TLS key exchange groups here; using OpenSSL's defaults")


_warned_about_groups: list[bool] = []  # a warn-once latch


def _select_alpn(connection: SSL.Connection, offered: list[bytes]) -> bytes:
    """Server preference: the first of our protocols the client offered. Never raises."""
    try:
        preferred = connection.get_app_data()
        for protocol in preferred or ():
            if protocol in offered:
                return bytes(protocol)
    except Exception:  # a callback must be total: OpenSSL cannot handle a Python error
        LOGGER.exception("ALPN selection failed")
    return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]  # pyOpenSSL's sentinel, not bytes


def _read_file(path: str, what: str, key_path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ConfigError(
            f"{key_path}: cannot read {what} {path!r}: {exc.strerror or exc}"
        ) from None


class ServerTLS:
    """A listener's server contexts, one per certificate, chosen by SNI.

    Built at start (and on reload) by :func:`build_server_tls`; never mutated after.
    """

    def __init__(
        self,
        contexts: list[tuple[SSL.Context, tuple[str, ...]]],
        *,
        alpn: tuple[bytes, ...],
        allow_subjects: tuple[x509.Name, ...],
        allow_sans: frozenset[str],
        verifies_clients: bool,
    ) -> None:
        self.default = contexts[0][0]
        self._exact: dict[str, SSL.Context] = {}
        self._wildcard: dict[str, SSL.Context] = {}
        for context, names in contexts:
            for name in names:
                name = name.lower().removesuffix(".")
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], context)
                else:
                    self._exact.setdefault(name, context)
        self.alpn = alpn
        self.allow_subjects = allow_subjects
        self.allow_sans = allow_sans
        self.verifies_clients = verifies_clients

    def context_for(self, server_name: str | None) -> SSL.Context:
        """Exact SAN match, then a one-label ``*.`` wildcard, else the first certificate."""
        if server_name:
            context = self._exact.get(server_name)
            if context is None and "." in server_name:
                context = self._wildcard.get(server_name.split(".", 1)[1])
            if context is not None:
                return context
        return self.default

    def connection(
        self,
        server_name: str | None,
        alpn: tuple[bytes, ...] | None = None,
        *,
        sock: trio.socket.SocketType | None = None,
    ) -> SSL.Connection:
        """A server-side connection for this SNI, offering ``alpn`` (default: the
        listener's); over memory BIOs, or reading and writing ``sock`` itself."""
        # pyOpenSSL only takes the descriptor (fileno()) of the socket it is given.
        connection = SSL.Connection(self.context_for(server_name), sock)  # type: ignore[arg-type]
        connection.set_app_data(alpn if alpn is not None else self.alpn)
        connection.set_accept_state()
        return connection

    def client_identity(self, connection: SSL.Connection) -> str | None:
        """The verified client certificate's subject, after checking the allow lists.

        Raises:
            ClientCertificateRejected: the certificate is not on an allow list.
        """
        certificate = connection.get_peer_certificate(as_cryptography=True)
        if certificate is None:
            return None
        subject = certificate.subject
        if self.allow_subjects and subject not in self.allow_subjects:
            raise ClientCertificateRejected(f"subject {subject.rfc4514_string()!r} is not allowed")
        if self.allow_sans and not (_subject_alt_names(certificate) & self.allow_sans):
            raise ClientCertificateRejected(
                f"no allowed name in {sorted(_subject_alt_names(certificate))}"
            )
        return subject.rfc4514_string()


def _subject_alt_names(certificate: x509.Certificate) -> set[str]:
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return set()
    names: set[str] = set()
    for kind in (x509.DNSName, x509.RFC822Name, x509.UniformResourceIdentifier):
        names.update(str(value) for value in extension.value.get_values_for_type(kind))
    return names


def build_server_tls(tls: TLSConfig, *, session_id: bytes, key_path: str) -> ServerTLS:
    """Load certificates and keys and build the contexts, or raise ``ConfigError``
    naming the key path and the file. Warns about certificates that are expired or
    not yet valid, since serving them is legal but almost always a mistake."""
    contexts: list[tuple[SSL.Context, tuple[str, ...]]] = []
    for index, pair in enumerate(tls.certs):
        where = f"{key_path}.certs[{index}]"
        chain_pem = _read_file(pair.cert, "certificate", where + ".cert")
        try:
            leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        except ValueError:
            raise ConfigError(f"{where}.cert: {pair.cert!r} holds no PEM certificate") from None
        key_file = pair.key or pair.cert
        _read_file(
            key_file, "key", where + (".key" if pair.key else ".cert")
        )  # a clear error first
        context = _policy_context(SSL.TLS_SERVER_METHOD, tls.min_version)
        context.set_session_id(session_id[:32])
        # Resumption by stateless tickets only: no per-session state kept in the proxy.
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        try:
            context.use_certificate_chain_file(pair.cert)
        except SSL.Error as exc:
            raise ConfigError(
                f"{where}.cert: cannot use {pair.cert!r}: {describe_ssl_error(exc)}"
            ) from None
        key_where = where + (".key" if pair.key else ".cert")
        try:
            context.use_privatekey_file(key_file)
            context.check_privatekey()
        except SSL.Error as exc:
            if "mismatch" in describe_ssl_error(exc) or not exc.args or not exc.args[0]:
                raise ConfigError(
                    f"{key_where}: {key_file!r} does not match the certificate {pair.cert!r}"
                ) from None
            hint = "" if pair.key else " (give a key file, or put the key in the certificate's PEM)"
            raise ConfigError(
                f"{key_where}: no usable private key in {key_file!r}{hint}: {describe_ssl_error(exc)}"
            ) from None
        # Always installed: routes may offer ALPN protocols the listener does not.
        context.set_alpn_select_callback(_select_alpn)
        if tls.client_ca:
            _require_client_certificates(context, tls.client_ca, f"{key_path}.client_ca")
        _warn_about_validity(leaf, pair.cert)
        contexts.append((context, _dns_names(leaf)))
    try:
        subjects = tuple(x509.Name.from_rfc4514_string(s) for s in tls.allow_subjects)
    except ValueError as exc:
        raise ConfigError(f"{key_path}.allow_subjects: {exc}") from None
    return ServerTLS(
        contexts,
        alpn=tuple(protocol.encode() for protocol in tls.alpn),
        allow_subjects=subjects,
        allow_sans=frozenset(tls.allow_sans),
        verifies_clients=tls.client_ca is not None,
    )


def _require_client_certificates(context: SSL.Context, ca_file: str, key_path: str) -> None:
    ca_pem = _read_file(ca_file, "CA file", key_path)
    try:
        authorities = x509.load_pem_x509_certificates(ca_pem)
        context.load_verify_locations(ca_file)
    except (ValueError, SSL.Error):
        raise ConfigError(f"{key_path}: {ca_file!r} holds no usable PEM CA certificate") from None
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    for authority in authorities:  # tell clients which CAs we accept (CertificateRequest)
        context.add_client_ca(authority)


def _dns_names(certificate: x509.Certificate) -> tuple[str, ...]:
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(extension.value.get_values_for_type(x509.DNSName))


def _warn_about_validity(certificate: x509.Certificate, path: str) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if certificate.not_valid_after_utc < now:
        LOGGER.warning(
            "certificate %s expired on %s", path, certificate.not_valid_after_utc.isoformat()
        )
    elif certificate.not_valid_before_utc > now:
        LOGGER.warning(
            "certificate %s is not valid before %s",
            path,
            certificate.not_valid_before_utc.isoformat(),
        )


class BackendTLS:
    """Re-encryption to backends: a client context that verifies the chain during the
    handshake (OpenSSL, against ``backend_ca`` or the system store), then the name
    (RFC 6125, by pyca's ``service_identity``) before any client byte is forwarded.
    """

    def __init__(self, ca_file: str | None, *, server_name: str | None, key_path: str) -> None:
        self.context = _policy_context(SSL.TLS_CLIENT_METHOD, TLSVersion.TLS1_2)
        self.server_name = server_name
        if ca_file is None:
            self.context.set_default_verify_paths()
        else:
            pem = _read_file(ca_file, "CA file", key_path)
            try:
                x509.load_pem_x509_certificates(pem)
                self.context.load_verify_locations(ca_file)
            except (ValueError, SSL.Error):
                raise ConfigError(f"{key_path}: {ca_file!r} holds no PEM CA certificate") from None
        self.context.set_verify(SSL.VERIFY_PEER)

    def connection(self, host: str | None) -> tuple[SSL.Connection, str | None]:
        """A client connection and the name to verify: ``backend_sni`` or the host."""
        name = self.server_name or host
        connection = SSL.Connection(self.context, None)
        connection.set_connect_state()
        if name and not _is_ip(name):
            connection.set_tlsext_host_name(name.encode("idna"))
        return connection, name

    def verify(self, connection: SSL.Connection, name: str | None) -> None:
        """Raise ``trio.BrokenResourceError`` unless the (already chain-verified)
        certificate names ``name``."""
        if name is None:
            raise trio.BrokenResourceError(
                "no name to verify the backend against (set backend_sni)"
            )
        try:
            if _is_ip(name):
                service_identity.pyopenssl.verify_ip_address(connection, name)
            else:
                service_identity.pyopenssl.verify_hostname(connection, name)
        except (service_identity.VerificationError, service_identity.CertificateError) as exc:
            raise trio.BrokenResourceError(f"backend certificate does not match {name!r}") from exc


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# --- the stream ---------------------------------------------------------------------------


class _State(enum.Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


def describe_ssl_error(exc: BaseException) -> str:
    """OpenSSL's reason, short and lowercase: 'peer did not return a certificate'."""
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        last = exc.args[0][-1]
        if isinstance(last, tuple) and last:
            return str(last[-1]).lower()
    return str(exc).lower() or type(exc).__name__


class TLSStream(trio.abc.HalfCloseableStream):
    """TLS over ``transport``; see the module docstring for how it works.

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

    # -- trio.abc.Stream --

    async def do_handshake(self) -> None:
        """Run the handshake to completion (the caller bounds it with a deadline)."""
        self._check_usable()
        while True:
            try:
                self.connection.do_handshake()
            except SSL.WantReadError:
                await self._flush()
                if not await self._feed():
                    self._state = _State.BROKEN
                    raise trio.BrokenResourceError(
                        "peer closed the connection during the handshake"
                    ) from None
                continue
            except SSL.Error as exc:
                self._state = _State.BROKEN
                with trio.move_on_after(self.close_seconds):
                    await self._flush()  # the alert OpenSSL queued for the peer
                raise trio.BrokenResourceError(describe_ssl_error(exc)) from exc
            break
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
            while True:
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

    async def _more_io(self, exc: SSL.WantReadError | SSL.WantWriteError) -> None:
        """OpenSSL needs more bytes from the peer (memory BIOs: feed it one read)."""
        # Send what OpenSSL queued while reading (a KeyUpdate reply), unless a sender
        # holds the lock: it drains the BIO before it lets go, and waiting for it could
        # stall this direction behind a slow reader.
        if not self._transport_lock.locked():
            await self._flush()
        await self._feed()  # at EOF, the next recv reports it

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
        await self._close_notify()

    async def _close_notify(self) -> None:
        """Write close_notify (memory BIOs: into the BIO, then flush it)."""
        try:
            self.connection.shutdown()
        except SSL.Error as exc:
            raise self._broken(exc) from exc
        await self._flush()

    async def aclose(self) -> None:
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        state, self._state = self._state, _State.CLOSED
        try:
            if state is _State.OK and not self._eof_sent and not self._sending:
                with trio.move_on_after(self.close_seconds):
                    try:
                        self.connection.shutdown()
                        await self._flush()
                    except (SSL.Error, trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
        finally:
            await trio.aclose_forcefully(self.transport)

    # -- details --

    @property
    def protocol_version(self) -> str | None:
        version = self.connection.get_protocol_version_name()
        return str(version) if version and version != "Unknown" else None

    @property
    def cipher(self) -> str | None:
        name = self.connection.get_cipher_name()
        return str(name) if name else None

    @property
    def alpn_protocol(self) -> str | None:
        protocol = self.connection.get_alpn_proto_negotiated()
        return bytes(protocol).decode("ascii", "replace") if protocol else None

    def _check_usable(self) -> None:
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("this TLSStream was closed")
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("this TLSStream is broken")

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


class SocketTLSStream(TLSStream):
    """TLS where OpenSSL reads and writes the socket itself: the fast path.

    Used when the whole ClientHello was *peeked* (still in the socket), so nothing has to
    be replayed. OpenSSL reads records straight from the kernel instead of Python
    copying them into a memory BIO first (``benchmarks/tls_transport.py``: 1.65x the
    decryption throughput here). Same contract as :class:`TLSStream`; waiting uses
    ``trio.lowlevel.wait_readable``/``wait_writable``, and waits for writability are
    serialised because OpenSSL may need to write from the receiving side too (a
    TLS 1.3 KeyUpdate reply) while trio allows one writer-waiter per socket.
    """

    def __init__(self, transport: trio.SocketStream, connection: SSL.Connection) -> None:
        super().__init__(transport, connection)
        self._sock = transport.socket
        self._writable = trio.Lock()

    async def _wait(self, exc: SSL.WantReadError | SSL.WantWriteError) -> None:
        if isinstance(exc, SSL.WantReadError):
            await trio.lowlevel.wait_readable(self._sock)
        else:
            async with self._writable:
                await trio.lowlevel.wait_writable(self._sock)

    async def do_handshake(self) -> None:
        self._check_usable()
        while True:
            try:
                self.connection.do_handshake()
            except (SSL.WantReadError, SSL.WantWriteError) as exc:
                await self._wait(exc)
                continue
            except (SSL.ZeroReturnError, SSL.SysCallError) as exc:
                # Same words as the memory-BIO path: the peer went away mid-handshake.
                self._state = _State.BROKEN
                code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else -1
                verb = "reset" if code > 0 else "closed"
                raise trio.BrokenResourceError(
                    f"peer {verb} the connection during the handshake"
                ) from exc
            except SSL.Error as exc:
                raise self._broken(exc) from exc
            break
        await trio.lowlevel.checkpoint()

    async def _more_io(self, exc: SSL.WantReadError | SSL.WantWriteError) -> None:
        await self._wait(exc)

    async def _send_chunk(self, chunk: memoryview) -> None:
        """OpenSSL writes the socket; with partial writes on, it may take several calls."""
        position = 0
        while position < len(chunk):
            try:
                position += self.connection.send(chunk[position:])
            except (SSL.WantReadError, SSL.WantWriteError) as exc:
                await self._wait(exc)
                continue
            except SSL.Error as exc:
                raise self._broken(exc) from exc
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        self._check_usable()
        async with self._writable:
            await trio.lowlevel.wait_writable(self._sock)

    async def _close_notify(self) -> None:
        while True:
            try:
                self.connection.shutdown()
            except SSL.WantWriteError as exc:
                await self._wait(exc)
                continue
            except SSL.WantReadError:
                pass  # close_notify is written; the peer's answer is not awaited
            except SSL.Error as exc:
                raise self._broken(exc) from exc
            break
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        state, self._state = self._state, _State.CLOSED
        if state is _State.OK and not self._eof_sent and not self._sending:
            with contextlib.suppress(SSL.Error):  # one try at close_notify; never wait
                self.connection.shutdown()
        await trio.aclose_forcefully(self.transport)
