"""A local token issuer for ``--dev`` only: a newcomer's first token without an IdP.

The key is generated on first use and kept under the state directory (mode 0600). The
gateway trusts it only when started with ``--dev``; outside that, this issuer does not
exist, so a leaked dev key is worthless against a production gateway.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.keyfiles import read_or_create
from gateway.stages.authn import StaticKeys, TrustedIssuer

DEV_ISSUER = "infergate-dev"
DEV_AUDIENCE = "infergate"
KEY_FILE = "dev-issuer-ed25519.pem"


def _new_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def load_or_create_key(state_dir: Path, *, allow_insecure: bool = False) -> Ed25519PrivateKey:
    path = state_dir / KEY_FILE
    key = serialization.load_pem_private_key(read_or_create(path, _new_pem, allow_insecure=allow_insecure),
                                             password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError(f"{path} is not an Ed25519 key")
    return key


def trusted_dev_issuer(state_dir: Path, *, allow_insecure: bool = False) -> TrustedIssuer:
    key = load_or_create_key(state_dir, allow_insecure=allow_insecure)
    return TrustedIssuer(
        issuer=DEV_ISSUER,
        audiences=(DEV_AUDIENCE,),
        algorithms=("EdDSA",),
        keys=StaticKeys({None: key.public_key()}),
        max_lifetime_s=86_400,
    )


def issue_token(state_dir: Path, *, sub: str, tenant: str, roles: list[str], ttl_s: int = 3600) -> str:
    if not 0 < ttl_s <= 86_400:
        raise ValueError("ttl must be between 1 and 86400 seconds")
    now = int(time.time())
    claims = {
        "iss": DEV_ISSUER,
        "aud": DEV_AUDIENCE,
        "sub": sub,
        "tenant": tenant,
        "roles": roles,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_s,
        "jti": secrets.token_hex(8),
    }
    return jwt.encode(claims, load_or_create_key(state_dir), algorithm="EdDSA", headers={"typ": "JWT"})
