"""Bearer-token authentication against the issuers the policy trusts.

Runs first: every later stage needs the principal, and nothing may touch a request
(not even read its body) before the caller is known.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.context import Principal, RequestContext
from gateway.errors import AuthenticationFailed
from gateway.stages.base import Stage

MAX_TOKEN_BYTES = 8192
_CACHE_MAX = 10_000

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    """One issuer, compiled: a typed key object and the algorithms that fit it."""

    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...]
    key: PublicKey
    tenant_claim: str = "tenant"
    roles_claim: str = "roles"
    leeway_s: int = 30
    max_lifetime_s: int = 86_400

    @classmethod
    def from_pem(cls, pem: str, **kwargs: Any) -> TrustedIssuer:
        key = load_pem_public_key(pem.encode())
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
            raise TypeError("unsupported public key type")
        issuer = cls(key=key, **kwargs)
        issuer.check_key_family()
        return issuer

    def check_key_family(self) -> None:
        """# SECURITY: one key family per issuer; the token's ``alg`` never picks the key type."""
        for alg in self.algorithms:
            family: type[Any]
            if alg.startswith(("RS", "PS")):
                family = rsa.RSAPublicKey
            elif alg.startswith("ES"):
                family = ec.EllipticCurvePublicKey
            elif alg == "EdDSA":
                family = ed25519.Ed25519PublicKey
            else:
                raise ValueError(f"algorithm {alg} is not allowed")
            if not isinstance(self.key, family):
                raise TypeError(f"algorithm {alg} does not fit the issuer's {type(self.key).__name__}")


def _unverified_header(token: str) -> dict[str, Any]:
    segment = token.split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error) as exc:
        raise _fail("authn_malformed_token") from exc
    if not isinstance(header, dict):
        raise _fail("authn_malformed_token")
    return header


def _fail(reason: str, detail: str = "invalid token") -> AuthenticationFailed:
    return AuthenticationFailed(detail, reason=reason)


@dataclass(slots=True)
class JwtAuthenticator(Stage):
    name: ClassVar[str] = "authn"
    issuers: dict[str, TrustedIssuer]
    clock: Any = time.time
    _cache: dict[bytes, tuple[Principal, float]] = field(default_factory=dict)

    async def on_call(self, ctx: RequestContext) -> None:
        token = ctx.bearer
        ctx.bearer = None
        if not token:
            raise _fail("authn_missing_token", "missing bearer token")
        ctx.principal = self.authenticate(token)

    def authenticate(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_BYTES or not token.isascii():
            raise _fail("authn_malformed_token")
        key = hashlib.sha256(token.encode()).digest()
        now = self.clock()
        cached = self._cache.get(key)
        if cached is not None:
            principal, exp = cached
            if now < exp:
                return principal
            del self._cache[key]
        principal, exp = self._verify(token, now)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[key] = (principal, exp)
        return principal

    def _verify(self, token: str, now: float) -> tuple[Principal, float]:
        if token.count(".") != 2:
            raise _fail("authn_malformed_token")
        header = _unverified_header(token)
        # SECURITY: RFC 7515 §4.1.11: refuse critical extensions we do not understand, and
        # never follow key locations named by the token (jku, x5u, jwk, x5c).
        if any(h in header for h in ("crit", "jku", "x5u", "jwk", "x5c")):
            raise _fail("authn_forbidden_header")
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise _fail("authn_malformed_token") from exc
        iss = unverified.get("iss")
        issuer = self.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise _fail("authn_unknown_issuer")
        try:
            claims = jwt.decode(
                token,
                issuer.key,
                algorithms=list(issuer.algorithms),
                audience=list(issuer.audiences),
                issuer=issuer.issuer,
                # Times are checked below against the injectable clock.
                options={"require": ["exp", "iat", "sub"], "verify_exp": False, "verify_nbf": False,
                         "verify_iat": False},
            )
        except jwt.PyJWTError as exc:
            raise _fail("authn_invalid_token") from exc
        exp, iat = claims["exp"], claims["iat"]
        nbf = claims.get("nbf", iat)
        # SECURITY: numeric dates must be numbers (RFC 7519 §2), never strings or booleans.
        if not all(type(v) in (int, float) for v in (exp, iat, nbf)):
            raise _fail("authn_invalid_token")
        leeway = issuer.leeway_s
        if now > exp + leeway:
            raise _fail("authn_token_expired", "token expired")
        if now + leeway < nbf or now + leeway < iat or exp - iat > issuer.max_lifetime_s:
            raise _fail("authn_invalid_token")
        sub = claims["sub"]
        tenant = claims.get(issuer.tenant_claim)
        roles = claims.get(issuer.roles_claim, [])
        if not (isinstance(sub, str) and sub and isinstance(tenant, str) and tenant):
            raise _fail("authn_missing_claims")
        if not (isinstance(roles, list) and all(isinstance(r, str) for r in roles)):
            raise _fail("authn_missing_claims")
        principal = Principal(
            subject=sub,
            tenant=tenant,
            roles=frozenset(roles),
            issuer=issuer.issuer,
            credential_id=hashlib.sha256(token.encode()).hexdigest()[:16],
        )
        # Cache no longer than the token lives, nor past a short horizon.
        return principal, min(float(exp), now + 300.0)
