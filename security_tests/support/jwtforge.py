"""Keys of the catalogue's IdP and a hand-rolled JWT/JWS builder (CATALOGUE §0.1 ``idp``/``forge``).

PyJWT refuses to sign most of the malicious tokens the catalogue needs (``alg: none``,
HS256 keyed with a PEM, psychic ES256 signatures), so tokens are assembled here from
base64url segments and raw ``hmac``/``cryptography`` signatures.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

ISSUER = "https://idp.test/realms/prod"
EC_ISSUER = "https://idp.test/realms/ec"
SVC_ISSUER = "svc"
AUDIENCE = "inference-gw"


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64u_json(obj: Any) -> str:
    return b64u(json.dumps(obj, separators=(",", ":")).encode())


def _int_b64(n: int, length: int | None = None) -> str:
    length = length or (n.bit_length() + 7) // 8
    return b64u(n.to_bytes(length, "big"))


@dataclass
class Keys:
    """One run's key material (generated once per session)."""

    hs_secret: bytes
    rs1: rsa.RSAPrivateKey
    es1: ec.EllipticCurvePrivateKey
    ed1: ed25519.Ed25519PrivateKey
    attacker_rs: rsa.RSAPrivateKey

    @classmethod
    def generate(cls) -> Keys:
        return cls(
            hs_secret=os.urandom(32),
            rs1=rsa.generate_private_key(public_exponent=65537, key_size=2048),
            es1=ec.generate_private_key(ec.SECP256R1()),
            ed1=ed25519.Ed25519PrivateKey.generate(),
            attacker_rs=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        )

    @property
    def hs_key(self) -> bytes:
        """The HMAC key as the gateway reads it: the environment variable's text, encoded."""
        return self.hs_secret_text.encode()

    @property
    def hs_secret_text(self) -> str:
        # Environment variables hold text: a 43-char base64url string is 32 random bytes.
        return b64u(self.hs_secret)


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, str]:
    pub = key.public_key().public_numbers()
    return {"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": _int_b64(pub.n), "e": _int_b64(pub.e)}


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, str]:
    pub = key.public_key().public_numbers()
    return {"kty": "EC", "kid": kid, "use": "sig", "alg": "ES256", "crv": "P-256",
            "x": _int_b64(pub.x, 32), "y": _int_b64(pub.y, 32)}


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def openssh_public(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


Signer = Callable[[bytes], bytes]


def hs256(key: bytes) -> Signer:
    return lambda msg: hmac.new(key, msg, hashlib.sha256).digest()


def rs256(key: rsa.RSAPrivateKey) -> Signer:
    return lambda msg: key.sign(msg, padding.PKCS1v15(), hashes.SHA256())


def es256(key: ec.EllipticCurvePrivateKey) -> Signer:
    def sign(msg: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(msg, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return sign


def raw_signature(sig: bytes) -> Signer:
    return lambda _msg: sig


def forge(header: dict[str, Any], payload: dict[str, Any] | str, signer: Signer | None) -> str:
    """``b64(header).b64(payload).b64(signer(signing input))``; ``signer=None`` = empty signature."""
    body = payload if isinstance(payload, str) else b64u_json(payload)
    signing_input = f"{b64u_json(header)}.{body}"
    sig = signer(signing_input.encode()) if signer is not None else b""
    return f"{signing_input}.{b64u(sig)}"


@dataclass
class TokenFactory:
    """Valid tokens of the baseline world (§0.2); every minted token is remembered for NO-LEAK."""

    keys: Keys
    clock: Callable[[], float] = time.time
    minted: list[str] = field(default_factory=list)

    def claims(self, sub: str = "u1", tenant: str = "alpha", roles: tuple[str, ...] = ("predictor",),
               **over: Any) -> dict[str, Any]:
        now = int(self.clock())
        claims: dict[str, Any] = {
            "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "tenant": tenant, "roles": list(roles),
            "scope": "models:infer", "iat": now, "nbf": now, "exp": now + 300, "jti": str(uuid.uuid4()),
        }
        if sub is _DROP:
            del claims["sub"]
        for key, value in over.items():
            if value is _DROP:
                claims.pop(key, None)
            else:
                claims[key] = value
        return claims

    def rs(self, claims: dict[str, Any] | None = None, *, header: dict[str, Any] | None = None, **kw: Any) -> str:
        head = {"alg": "RS256", "kid": "rs-1", "typ": "at+jwt", **(header or {})}
        return self.remember(forge(head, claims if claims is not None else self.claims(**kw), rs256(self.keys.rs1)))

    def svc(self, claims: dict[str, Any] | None = None, **kw: Any) -> str:
        base = claims if claims is not None else self.claims(**{"iss": SVC_ISSUER, **kw})
        return self.remember(forge({"alg": "HS256", "typ": "JWT"}, base, hs256(self.keys.hs_key)))

    def remember(self, token: str) -> str:
        self.minted.append(token)
        return token


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


_DROP: Any = _Drop()
DROP: Any = _DROP  # pass as a claim override to remove that claim
