"""TLS with pyOpenSSL: contexts built once at start, and trio streams over them.

Theory of operation
-------------------
Three modules, by job (each opens with its own theory of operation):

* :mod:`.policy`: what every context gets (versions, ciphers, key exchange groups,
  options) and :func:`describe_ssl_error`, the one wording of OpenSSL's errors.
* :mod:`.contexts`: :func:`build_server_tls` and :class:`ServerTLS` (a listener's
  certificates, one context each, chosen by SNI with the name rules of
  :mod:`l4proxy.names`; client-certificate allow lists) and :class:`BackendTLS`
  (re-encryption to backends, chain and name verified).
* :mod:`.streams`: :class:`TLSStream` (memory BIOs over any trio stream) and
  :class:`SocketTLSStream` (OpenSSL on the socket itself), one
  ``trio.abc.HalfCloseableStream`` contract and one retry loop.

Everything the rest of the proxy uses is imported from here (``from .tls import
TLSStream``); the modules import each other only downwards: streams and contexts on
policy.
"""

from .contexts import BackendTLS, ClientCertificateRejected, ServerTLS, build_server_tls
from .policy import (
    ALERT_NO_APPLICATION_PROTOCOL,
    ALERT_UNRECOGNIZED_NAME,
    TLS12_CIPHERS,
    TLS13_CIPHERSUITES,
    describe_ssl_error,
)
from .streams import RECEIVE_SIZE, RECORD_SIZE, SEND_CHUNK, SocketTLSStream, TLSStream

__all__ = [
    "ALERT_NO_APPLICATION_PROTOCOL",
    "ALERT_UNRECOGNIZED_NAME",
    "RECEIVE_SIZE",
    "RECORD_SIZE",
    "SEND_CHUNK",
    "TLS12_CIPHERS",
    "TLS13_CIPHERSUITES",
    "BackendTLS",
    "ClientCertificateRejected",
    "ServerTLS",
    "SocketTLSStream",
    "TLSStream",
    "build_server_tls",
    "describe_ssl_error",
]
