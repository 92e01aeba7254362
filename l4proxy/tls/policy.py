"""What every context gets: the TLS policy of issue #3, and how OpenSSL's errors read.

Server contexts (one per certificate, :mod:`.contexts`) and the backend client context
are all made by :func:`policy_context`: TLS 1.2+, Mozilla "intermediate" ECDHE-only
AEAD ciphers, X25519/P-256 key exchange, no compression, no renegotiation, OpenSSL's
``IGNORE_UNEXPECTED_EOF`` (the streams rely on it: a transport EOF reads as a
``ZeroReturnError``, see :mod:`.streams`). :func:`describe_ssl_error` is the one
place that turns an ``SSL.Error`` into the short reason logs and config errors show.
"""

from __future__ import annotations

import logging

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

from l4proxy.config import TLSVersion
from l4proxy.errors import ConfigError

#: One logger for the whole package (operators filter on ``l4proxy.tls``).
LOGGER = logging.getLogger("l4proxy.tls")

#: A fatal ``unrecognized_name`` alert (RFC 8446 §6.2), sent in clear before any
#: handshake when no route matches the SNI.
ALERT_UNRECOGNIZED_NAME = b"\x15\x03\x03\x00\x02\x02\x70"

#: A fatal ``no_application_protocol`` alert (RFC 7301 §3.2), sent in clear before any
#: handshake to a client that must offer an ALPN protocol and did not (PostgreSQL's
#: direct TLS without ``postgresql``).
ALERT_NO_APPLICATION_PROTOCOL = b"\x15\x03\x03\x00\x02\x02\x78"

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


def policy_context(method: int, min_version: TLSVersion) -> SSL.Context:
    """A new context with the whole policy applied; the caller adds keys and trust."""
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


def describe_ssl_error(exc: BaseException) -> str:
    """OpenSSL's reason, short and lowercase: 'peer did not return a certificate'."""
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        last = exc.args[0][-1]
        if isinstance(last, tuple) and last:
            return str(last[-1]).lower()
    return str(exc).lower() or type(exc).__name__


def read_file(path: str, what: str, key_path: str) -> bytes:
    """The file's bytes, or a ``ConfigError`` naming the key path, the file and why."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ConfigError(
            f"{key_path}: cannot read {what} {path!r}: {exc.strerror or exc}"
        ) from None
