"""The tls package's surface, and which certificate ServerTLS picks for a name."""

from __future__ import annotations

from OpenSSL import SSL

import l4proxy.tls
from l4proxy.tls import ServerTLS


def test_every_name_the_proxy_imports_from_tls_is_there() -> None:
    # connection.py, server.py, the tests and benchmarks/tls_transport.py import these.
    for name in (
        "ALERT_UNRECOGNIZED_NAME",
        "BackendTLS",
        "ClientCertificateRejected",
        "ServerTLS",
        "SocketTLSStream",
        "TLSStream",
        "build_server_tls",
        "describe_ssl_error",
    ):
        assert name in l4proxy.tls.__all__
        value = getattr(l4proxy.tls, name)
        if callable(value):
            assert value.__module__.startswith("l4proxy.tls.")
    assert sorted(l4proxy.tls.__all__) == sorted(set(l4proxy.tls.__all__))


def server_tls(*certificates: tuple[str, ...]) -> tuple[ServerTLS, list[SSL.Context]]:
    """A ServerTLS over bare contexts, one per certificate's DNS names (no keys needed
    to choose among them)."""
    contexts = [SSL.Context(SSL.TLS_SERVER_METHOD) for _ in certificates]
    tls = ServerTLS(
        list(zip(contexts, certificates, strict=True)),
        alpn=(),
        allow_subjects=(),
        allow_sans=frozenset(),
        verifies_clients=False,
    )
    return tls, contexts


def test_exact_then_wildcard_then_the_first_certificate() -> None:
    tls, (first, wildcard, exact) = server_tls(
        ("first.example",), ("*.apps.example",), ("db.apps.example",)
    )
    assert tls.context_for("db.apps.example") is exact  # beats the earlier wildcard
    assert tls.context_for("web.apps.example") is wildcard
    assert tls.context_for("a.web.apps.example") is first  # one label only
    assert tls.context_for("apps.example") is first
    assert tls.context_for("unknown.example") is first
    assert tls.context_for(None) is first
    assert tls.context_for("") is first


def test_the_earliest_certificate_wins_a_name_and_spelling_does_not_matter() -> None:
    tls, (one, two) = server_tls(("Shared.Example.",), ("shared.example", "*.shared.example"))
    assert tls.context_for("shared.example") is one
    assert tls.context_for("SHARED.example.") is one
    assert tls.context_for("x.Shared.Example") is two
