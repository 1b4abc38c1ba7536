"""TLS for both fronts and for the upstream channel, configured once from settings.

One :class:`TlsSettings` value describes the server side (certificate, key, optional
client-certificate verification); :func:`server_ssl_context` turns it into the
``ssl.SSLContext`` aiohttp serves with, :func:`grpc_server_credentials` into gRPC server
credentials, so both fronts present the same certificate and apply the same client rule.
:func:`grpc_channel_credentials` is the client side, for a TLS or mTLS channel to Triton.

Protocol choices (Mozilla "intermediate", without the finite-field DHE suites):

- TLS 1.2 minimum. TLS 1.3 suites are all AEAD with forward secrecy and are left to
  OpenSSL's defaults; for TLS 1.2 only ECDHE with AES-GCM or ChaCha20-Poly1305.
- No TLS compression (CRIME), no renegotiation (client-initiated renegotiation is a DoS
  lever and was the vehicle of CVE-2009-3555), no session tickets (OpenSSL never rotates
  the ticket key in a long-lived process, which would undo forward secrecy).
- gRPC's core (BoringSSL) is not configurable from Python beyond certificates; its
  defaults already match: TLS 1.2 minimum and ECDHE-AEAD suites only for TLS 1.2. The
  tests check both fronts refuse a TLS 1.1 client and a non-AEAD TLS 1.2 client.

Certificates are read once at start; rotating them means a restart (or a new front).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc  # type: ignore[import-untyped, unused-ignore]

__all__ = [
    "TLS12_CIPHERS",
    "TlsSettings",
    "grpc_channel_credentials",
    "grpc_server_credentials",
    "server_ssl_context",
]

# SECURITY: TLS 1.2 suites with forward secrecy (ECDHE) and an AEAD cipher only: no CBC
# (Lucky13, POODLE-style padding oracles), no RSA key exchange (no forward secrecy), no
# SHA-1 MACs, no finite-field DHE (small or shared groups, Raccoon).
TLS12_CIPHERS: Final = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
])


@dataclass(frozen=True)
class TlsSettings:
    """Server-side TLS: what a front presents and whom it lets connect.

    ``client_ca`` (PEM bundle) enables client-certificate verification: a certificate a
    client presents must chain to it. ``require_client_cert`` makes one mandatory (mTLS);
    without it a client may connect with no certificate, but never with a bad one.
    """

    cert: Path
    key: Path
    client_ca: Path | None = None
    require_client_cert: bool = False

    def __post_init__(self) -> None:
        # SECURITY: "require a client certificate" with nothing to verify it against would
        # either fail every handshake or, worse, be taken to mean "any certificate".
        if self.require_client_cert and self.client_ca is None:
            raise ValueError("require_client_cert needs client_ca (the CA that issues client certificates)")


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """An ``ssl.SSLContext`` for aiohttp's ``web.TCPSite(..., ssl_context=...)``.

    Raises ``OSError``/``ssl.SSLError`` when a file is missing, unreadable or the key does
    not match the certificate: a misconfigured TLS front must not start at all.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # SECURITY: TLS 1.0/1.1 are deprecated (RFC 8996); SSLv3 and below are long gone.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)  # TLS 1.2 only; TLS 1.3 suites are separate and all AEAD
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    ctx.load_cert_chain(certfile=tls.cert, keyfile=tls.key)
    if tls.client_ca is not None:
        ctx.load_verify_locations(cafile=tls.client_ca)
        # CERT_OPTIONAL still rejects a certificate that does not verify; it only lets a
        # client present none.
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def grpc_server_credentials(tls: TlsSettings) -> Any:
    """``grpc.ServerCredentials`` for the gRPC front, with the same client rule as HTTP.

    grpcio's Python API has two client modes only: require and verify
    (``require_client_cert=True``), or do not ask. So with a ``client_ca`` but
    ``require_client_cert=False`` the gRPC front asks for no certificate, where the HTTP
    front verifies one that is offered. Neither front derives identity from a client
    certificate (the bearer token does that), so the difference grants nothing.
    """
    key = tls.key.read_bytes()
    cert = tls.cert.read_bytes()
    client_ca = tls.client_ca.read_bytes() if tls.client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=tls.require_client_cert,
    )


def grpc_channel_credentials(ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> Any:
    """``grpc.ChannelCredentials`` for a TLS channel to the upstream, mTLS when given a client pair.

    ``ca`` verifies the server (``None``: the system roots). ``cert`` and ``key`` are the
    gateway's own client certificate and must come together.

    ``TritonGrpcUpstream`` takes the same three files as paths (tritonclient reads them):
    ``TritonGrpcUpstream(url, ssl=True, root_certificates=str(ca), certificate_chain=str(cert),
    private_key=str(key))``.
    """
    if (cert is None) != (key is None):
        raise ValueError("an upstream client certificate needs both cert and key")
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca is not None else None,
        private_key=key.read_bytes() if key is not None else None,
        certificate_chain=cert.read_bytes() if cert is not None else None,
    )
