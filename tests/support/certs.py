"""Throw-away PKI for TLS tests, generated at test time with ``cryptography``.

A CA, a server certificate for ``127.0.0.1``/``localhost`` (SANs, serverAuth) and a client
certificate (clientAuth), all signed by the CA, plus a second, unrelated CA ("rogue") for
"a certificate from someone else" cases. Written to a temporary directory; no key material
is ever committed (keys are ECDSA P-256, files mode 0600).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class TestPki:
    __test__ = False  # not a pytest test class

    ca: Path  # CA certificate (PEM): clients trust it, the server verifies clients with it
    server: CertPair
    client: CertPair
    rogue_ca: Path  # a CA nobody trusts (and that signed nothing the gateway serves)
    rogue_client: CertPair  # signed by the rogue CA


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str, *,
          server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                              else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                x509.IPAddress(ipaddress.IPv6Address("::1")),
            ]),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(directory: Path) -> TestPki:
    """Generate the CA, server and client pairs into ``directory`` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _ca("infergate test CA")
    rogue_cert, rogue_key = _ca("rogue CA")
    _write_cert(directory / "ca.pem", ca_cert)
    _write_cert(directory / "rogue-ca.pem", rogue_cert)

    def pair(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> CertPair:
        result = CertPair(directory / f"{name}.pem", directory / f"{name}-key.pem")
        _write_cert(result.cert, cert)
        _write_key(result.key, key)
        return result

    return TestPki(
        ca=directory / "ca.pem",
        server=pair("server", *_leaf(ca_cert, ca_key, "localhost", server=True)),
        client=pair("client", *_leaf(ca_cert, ca_key, "infergate test client", server=False)),
        rogue_ca=directory / "rogue-ca.pem",
        rogue_client=pair("rogue-client", *_leaf(rogue_cert, rogue_key, "rogue client", server=False)),
    )
