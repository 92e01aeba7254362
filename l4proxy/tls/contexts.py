"""The contexts: built once per listener at start (and on reload), never changed after.

:func:`build_server_tls` reads a listener's certificates and keys and makes one
server context per certificate, each with the whole policy (:mod:`.policy`). A
:class:`ServerTLS` picks one by SNI with the name rules routes use too
(:class:`l4proxy.names.NameTable`: exact SAN, then one-label wildcard, else the first
certificate) and checks client certificates against the allow lists.
:class:`BackendTLS` is the client side for re-encryption: chain verified by OpenSSL
during the handshake, then the name by pyca's ``service_identity``.

The proxy reads the ClientHello itself before any TLS is spoken, so it already knows
the SNI and builds each ``SSL.Connection`` on the right context: no servername
callback is needed. The ALPN callback is the only callback, and it is total: it never
raises.
"""

from __future__ import annotations

import datetime
import ipaddress
from typing import TYPE_CHECKING

import service_identity
import service_identity.pyopenssl
import trio
from cryptography import x509
from OpenSSL import SSL

from l4proxy.config import TLSConfig, TLSVersion
from l4proxy.errors import ConfigError
from l4proxy.names import NameTable

from .policy import LOGGER, describe_ssl_error, policy_context, read_file

if TYPE_CHECKING:
    import socket


class ClientCertificateRejected(Exception):
    """The client's certificate verified but is not on the listener's allow lists."""


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
        expiries: tuple[tuple[str, float], ...] = (),
    ) -> None:
        self.default = contexts[0][0]
        self._names: NameTable[SSL.Context] = NameTable()
        for context, names in contexts:
            for name in names:
                self._names.add(name, context)
        self.alpn = alpn
        self.allow_subjects = allow_subjects
        self.allow_sans = allow_sans
        self.verifies_clients = verifies_clients
        #: Each certificate file and its leaf's notAfter (seconds since the epoch), read
        #: once here: the metrics export them without touching the files again.
        self.expiries = expiries

    def context_for(self, server_name: str | None) -> SSL.Context:
        """Exact SAN match, then a one-label ``*.`` wildcard, else the first certificate;
        among certificates with the same name, the earliest listed."""
        if server_name:
            exact, wildcard = self._names.lookup(server_name)
            candidates = exact or wildcard
            if candidates:
                return candidates[0]
        return self.default

    def connection(
        self,
        server_name: str | None,
        alpn: tuple[bytes, ...] | None = None,
        *,
        sock: socket.socket | trio.socket.SocketType | None = None,
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
    expiries: list[tuple[str, float]] = []
    for index, pair in enumerate(tls.certs):
        where = f"{key_path}.certs[{index}]"
        chain_pem = read_file(pair.cert, "certificate", where + ".cert")
        try:
            leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        except ValueError:
            raise ConfigError(f"{where}.cert: {pair.cert!r} holds no PEM certificate") from None
        key_file = pair.key or pair.cert
        read_file(key_file, "key", where + (".key" if pair.key else ".cert"))  # a clear error first
        context = policy_context(SSL.TLS_SERVER_METHOD, tls.min_version)
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
        try:
            names = _dns_names(leaf)
        except ValueError as exc:  # cryptography parses extensions lazily, here
            raise ConfigError(
                f"{where}.cert: {pair.cert!r}: cannot parse its extensions: {exc}"
            ) from None
        contexts.append((context, names))
        expiries.append((pair.cert, leaf.not_valid_after_utc.timestamp()))
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
        expiries=tuple(expiries),
    )


def _require_client_certificates(context: SSL.Context, ca_file: str, key_path: str) -> None:
    ca_pem = read_file(ca_file, "CA file", key_path)
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
        self.context = policy_context(SSL.TLS_CLIENT_METHOD, TLSVersion.TLS1_2)
        self.server_name = server_name
        if ca_file is None:
            self.context.set_default_verify_paths()
        else:
            pem = read_file(ca_file, "CA file", key_path)
            try:
                x509.load_pem_x509_certificates(pem)
                self.context.load_verify_locations(ca_file)
            except (ValueError, SSL.Error):
                raise ConfigError(f"{key_path}: {ca_file!r} holds no PEM CA certificate") from None
        self.context.set_verify(SSL.VERIFY_PEER)

    def connection(
        self, host: str | None, *, sock: trio.socket.SocketType | None = None
    ) -> tuple[SSL.Connection, str | None]:
        """A client connection and the name to verify: ``backend_sni`` or the host;
        over memory BIOs, or reading and writing ``sock`` itself."""
        name = self.server_name or host
        connection = SSL.Connection(self.context, sock)  # type: ignore[arg-type]
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
