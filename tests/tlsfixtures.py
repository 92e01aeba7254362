"""Certificates for TLS tests: a trustme CA, PEM files on disk, and client contexts.

Imported by conftest.py, so the fixtures are available to every test module.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import attrs
import pytest
import trustme


@attrs.frozen
class CertFiles:
    """A certificate chain and key written to disk, as the proxy's config needs them."""

    cert: str  # leaf + intermediates
    key: str
    combined: str  # chain and key in one PEM


def write_cert(cert: trustme.LeafCert, directory: Path, name: str) -> CertFiles:
    directory.mkdir(parents=True, exist_ok=True)
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    key = cert.private_key_pem.bytes()
    (directory / f"{name}.pem").write_bytes(chain)
    (directory / f"{name}.key").write_bytes(key)
    (directory / f"{name}-combined.pem").write_bytes(chain + key)
    return CertFiles(
        str(directory / f"{name}.pem"),
        str(directory / f"{name}.key"),
        str(directory / f"{name}-combined.pem"),
    )


@attrs.frozen
class PKI:
    """Two server certificates (exact + wildcard names), a CA file, client certs."""

    ca: trustme.CA
    ca_file: str
    a: CertFiles  # a.example, *.b.example
    c: CertFiles  # c.example
    other_ca: trustme.CA
    other_ca_file: str
    alice: CertFiles  # client cert from ca: CN=alice
    mallory: CertFiles  # client cert from other_ca

    def client_context(
        self, *, alpn: list[str] | None = None, client: CertFiles | None = None
    ) -> ssl.SSLContext:
        """A stdlib (second TLS stack) client context trusting our CA."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if alpn:
            context.set_alpn_protocols(alpn)
        if client is not None:
            context.load_cert_chain(client.cert, client.key)
        return context


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    other_ca = trustme.CA()
    ca_file = str(directory / "ca.pem")
    ca.cert_pem.write_to_path(ca_file)
    other_ca_file = str(directory / "other-ca.pem")
    other_ca.cert_pem.write_to_path(other_ca_file)
    return PKI(
        ca=ca,
        ca_file=ca_file,
        a=write_cert(ca.issue_cert("a.example", "*.b.example"), directory, "a"),
        c=write_cert(ca.issue_cert("c.example"), directory, "c"),
        other_ca=other_ca,
        other_ca_file=other_ca_file,
        alice=write_cert(
            ca.issue_cert("alice@example.com", common_name="alice"), directory, "alice"
        ),
        mallory=write_cert(
            other_ca.issue_cert("mallory@example.com", common_name="mallory"), directory, "mallory"
        ),
    )
