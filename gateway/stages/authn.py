"""Authentication: bearer JWTs from trusted issuers, or service-account API keys.

Runs first: every later stage needs the principal, and nothing may touch a request
(not even read its body) before the caller is known. Verified credentials are cached
(bounded, keyed by the credential's hash, never past ``exp``) so a repeat costs a hash
and a dict look-up. A cached JWT verification lasts only while its key source still
serves the key that verified it (:meth:`KeyResolver.vouches`, where the source has one).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import math
import re
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway import strict_json
from gateway.context import Action, Principal, RequestContext
from gateway.errors import AuthenticationFailed, InsufficientScope
from gateway.stages.base import Stage

MAX_TOKEN_BYTES = 8192
API_KEY_PREFIX = "igk_"
_CACHE_MAX = 10_000
_CACHE_HORIZON_S = 300.0

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
VerifyKey = PublicKey | bytes


class KeyResolver(Protocol):
    """Finds the verification key for a token's ``kid`` and (policy-allowed) ``alg``.

    A resolver whose keys can change without a policy reload (a JWKS) also has
    ``vouches(kid, alg, key) -> bool``: True while ``get_key`` would still answer ``key``
    at once. The verified-token cache asks it on every hit.
    """

    async def get_key(self, kid: str | None, alg: str) -> Any: ...


def key_fits(alg: str, key: object) -> bool:
    """# SECURITY: the key type is fixed by policy; ``alg`` must fit it, never pick it."""
    if alg.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048
    if alg == "ES256":
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    if alg == "ES384":
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey)
    if alg.startswith("HS"):
        return isinstance(key, bytes) and len(key) >= 32
    return False


@dataclass(frozen=True, slots=True)
class StaticKeys:
    """Keys given in policy (PEM, a static JWK set, or an HS secret)."""

    keys: Mapping[str | None, VerifyKey]

    async def get_key(self, kid: str | None, alg: str) -> VerifyKey:
        key = self.keys.get(kid)
        if key is None and kid is None and len(self.keys) == 1:
            key = next(iter(self.keys.values()))
        if key is None:
            raise _fail("authn_unknown_kid")
        if not key_fits(alg, key):
            raise _fail("authn_invalid_token")
        return key


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...]
    keys: KeyResolver
    subject_claim: str = "sub"
    tenant_claim: str = "tenant"
    roles_claim: str = "roles"
    required_claims: tuple[str, ...] = ("exp", "iat", "sub")
    leeway_s: int = 30
    max_lifetime_s: int = 86_400
    token_types: tuple[str, ...] | None = None  # accepted `typ` header values (lower case); None = any
    required_scope: str | None = None  # a scope inference calls need
    allowed_roles: frozenset[str] | None = None  # roles this issuer may grant; None = any


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    tenant: str
    roles: frozenset[str]


def api_key_hash(key: str) -> str:
    """API keys are 256-bit random strings, so a plain SHA-256 is a sound verifier."""
    return hashlib.sha256(key.encode()).hexdigest()


_B64URL_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
_KID_RE = re.compile(r"[\x21-\x7e]{1,256}")
# Members that only a private (or symmetric) JWK has (RFC 7518 §6.2.2, §6.3.2, §6.4.1).
PRIVATE_JWK_MEMBERS: frozenset[str] = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# SECURITY: header members the gateway does not implement and that change what the token
# means: a key location or key named by the token (jku, x5u, jwk, x5c; RFC 8725 §3.10),
# critical extensions (RFC 7515 §4.1.11), an unencoded payload (RFC 7797 ``b64``),
# compression (``zip``), JWE (``enc``) and nested tokens (``cty``, RFC 7519 §5.2). Ignoring
# any of them would verify something other than what the issuer (or attacker) meant.
FORBIDDEN_HEADERS: frozenset[str] = frozenset({"crit", "jku", "x5u", "jwk", "x5c", "b64", "zip", "enc", "cty"})


# Characters a subject or tenant never holds: controls (C0, DEL, C1), invisible formatting
# (zero-width, bidi overrides), unpaired surrogates, line and paragraph separators.
_UNPRINTED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def usable_principal_name(value: object) -> bool:
    """A ``sub`` or ``tenant`` the gateway may key state on: non-empty text, not padded with
    whitespace, no control or invisible characters.

    # SECURITY: "u1 ", "u1\\u200b" or "u1\\x00" print as "u1" in logs, audit exports and
    # dashboards, yet are principals of their own (rate buckets, flag bucket, audit subject):
    # a token naming one is refused rather than shown as someone it is not. ``infergate
    # token`` applies the same rule (gateway/cli.py).
    """
    return (isinstance(value, str) and value != "" and value == value.strip()
            and not any(unicodedata.category(c) in _UNPRINTED_CATEGORIES for c in value))


def valid_kid(kid: object) -> bool:
    """A ``kid`` we are willing to look up: 1-256 printable ASCII characters, no spaces.

    # SECURITY: the kid is attacker input; it is only ever a dictionary key here, but a
    # bounded charset keeps it harmless in logs and lets us refuse junk without a fetch.
    """
    return isinstance(kid, str) and _KID_RE.fullmatch(kid) is not None


def signing_jwk_problem(jwk: object) -> str | None:
    """Why a JWK must not verify token signatures, or ``None`` if nothing forbids it.

    One rule set for every key source (a fetched JWKS and one written into policy).
    # SECURITY: a JWKS is public, so a symmetric key there is a leak or a trap (HS256 keyed
    # with published material); private members mean the IdP leaked its key; an encryption
    # key (``use``/``key_ops``, RFC 7517 §4.2-4.3) is not a signature key.
    """
    if not isinstance(jwk, dict):
        return "not_an_object"
    if jwk.get("kty") == "oct":
        return "symmetric_key"
    if any(member in jwk for member in PRIVATE_JWK_MEMBERS):
        return "private_key_material"
    if jwk.get("use", "sig") != "sig":
        return "use"
    if "key_ops" in jwk and not (isinstance(jwk["key_ops"], list) and "verify" in jwk["key_ops"]):
        return "key_ops"
    kid = jwk.get("kid")
    if kid is not None and not valid_kid(kid):
        return "kid"
    return None


def _b64url_segment(segment: str) -> bytes:
    """Decode one compact-serialisation segment, refusing every non-canonical spelling.

    # SECURITY: RFC 7515 §2 base64url has no padding, no ``+``/``/``, no whitespace and
    # no stray bits: each token has exactly one spelling, so what we hash (the verified
    # cache key), log and verify is the one string the issuer signed.
    """
    if _B64URL_SEGMENT.fullmatch(segment) is None or len(segment) % 4 == 1:
        raise _fail("authn_malformed_token")
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (ValueError, binascii.Error) as exc:
        raise _fail("authn_malformed_token") from exc
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != segment:
        raise _fail("authn_malformed_token")
    return raw


def _json_segment(segment: str) -> dict[str, Any]:
    """A header or claims segment: canonical base64url of a UTF-8 JSON object (RFC 7519 §7.2).

    # SECURITY: strict where Python's ``json.loads(bytes)`` is lenient: it would accept a
    # UTF-8 BOM, UTF-16/32 text, duplicate members and the NaN/Infinity literals, each a
    # way for one token to mean different things to different parsers.
    """
    raw = _b64url_segment(segment)
    if raw.startswith(b"\xef\xbb\xbf"):
        raise _fail("authn_malformed_token")
    try:
        # SECURITY: a member given twice ("alg", "sub", "iss" ...) is read as the first by some
        # parsers and the last by others (RFC 7515 §5.2 lets a recipient refuse it): refused.
        doc = strict_json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        # SECURITY: a header of nested brackets ("[[[[...") makes json.loads recurse past the
        # interpreter's limit; that is a malformed token (401), not a 500.
        raise _fail("authn_malformed_token") from exc
    if not isinstance(doc, dict):
        raise _fail("authn_malformed_token")
    return doc


def _media_type(typ: str) -> str:
    """The ``typ`` header as the short media type policy lists, lower case.

    RFC 7515 §4.1.9: ``typ`` omits the ``application/`` prefix when it has no other ``/``,
    and a recipient must treat ``at+jwt`` and ``application/at+jwt`` alike (RFC 9068 §4
    names the full form); an IdP sending the full form is not sending another type.
    """
    lowered = typ.lower()
    if lowered.startswith("application/") and "/" not in lowered[len("application/"):]:
        return lowered[len("application/"):]
    return lowered


_MAX_NUMERIC_DATE = 2**53  # RFC 7493 (I-JSON) §2.2: the integers every JSON parser reads exactly


def _finite_number(value: object) -> bool:
    """An int or float (not a bool), neither NaN nor infinite, within +-2**53.

    # SECURITY: a signed ``"exp": 1000...0`` (400 digits) is a valid Python int that no float
    # holds: ``math.isfinite`` and every float conversion raised OverflowError (a 500).
    """
    if type(value) is int:
        return -_MAX_NUMERIC_DATE <= value <= _MAX_NUMERIC_DATE
    return type(value) is float and math.isfinite(value) and abs(value) <= _MAX_NUMERIC_DATE


def _fail(reason: str, detail: str = "invalid token") -> AuthenticationFailed:
    return AuthenticationFailed(detail, reason=reason)


@dataclass(slots=True)
class JwtAuthenticator(Stage):
    name: ClassVar[str] = "authn"
    issuers: Mapping[str, TrustedIssuer]
    api_keys: Mapping[str, ApiKey] = field(default_factory=dict)  # sha256 hex -> key
    clock: Callable[[], float] = time.time
    # digest -> (principal, until, vouched): ``vouched`` is None for keys only a policy
    # reload can change (static keys, API keys), else the key source's live check.
    _cache: dict[bytes, tuple[Principal, float, Callable[[], bool] | None]] = field(default_factory=dict)

    async def on_call(self, ctx: RequestContext) -> None:
        token = ctx.bearer
        ctx.bearer = None
        if not token:
            raise _fail("authn_missing_token", "missing bearer token")
        principal = await self.authenticate(token)
        ctx.principal = principal
        issuer = self.issuers.get(principal.issuer)
        # SECURITY: a token the IdP issued for reading (scope) does not let its holder infer.
        if (issuer is not None and issuer.required_scope is not None and ctx.action is Action.INFER
                and issuer.required_scope not in principal.scopes):
            raise InsufficientScope("token scope does not allow inference", scope=issuer.required_scope)

    async def authenticate(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_BYTES or not token.isascii():
            raise _fail("authn_malformed_token")
        digest = hashlib.sha256(token.encode()).digest()
        now = self.clock()
        cached = self._cache.get(digest)
        if cached is not None:
            principal, until, vouched = cached
            # SECURITY: a cached verification ends when the key source stops serving its key
            # (kid rotated out, max_stale_s passed in an outage), as an uncached one would.
            if now < until and (vouched is None or vouched()):
                return principal
            del self._cache[digest]
        vouched = None
        if token.startswith(API_KEY_PREFIX):
            principal, until = self._api_key(token, digest, now)
        else:
            principal, until, vouched = await self._verify(token, digest, now)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[digest] = (principal, until, vouched)
        return principal

    def _api_key(self, token: str, digest: bytes, now: float) -> tuple[Principal, float]:
        entry = self.api_keys.get(digest.hex())
        if entry is None:
            raise _fail("authn_unknown_api_key")
        principal = Principal(subject=f"apikey:{entry.id}", tenant=entry.tenant, roles=entry.roles,
                              issuer="api_key", credential_id=digest.hex()[:16])
        # Revocation is a policy edit, which builds a new authenticator with an empty cache.
        return principal, now + _CACHE_HORIZON_S

    async def _verify(self, token: str, digest: bytes, now: float
                      ) -> tuple[Principal, float, Callable[[], bool] | None]:
        segments = token.split(".")
        if len(segments) != 3:
            raise _fail("authn_malformed_token")
        header = _json_segment(segments[0])
        if any(h in header for h in FORBIDDEN_HEADERS):
            raise _fail("authn_forbidden_header")
        unverified = _json_segment(segments[1])
        _b64url_segment(segments[2])
        iss = unverified.get("iss")
        issuer = self.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise _fail("authn_unknown_issuer")
        # SECURITY: RFC 8725 §3.11/RFC 9068: an ID or refresh token of the same issuer is
        # not an access token; only the configured `typ` values are accepted.
        if issuer.token_types is not None:
            typ = header.get("typ")
            if not isinstance(typ, str) or _media_type(typ) not in issuer.token_types:
                raise _fail("authn_wrong_token_type")
        alg = header.get("alg")
        # SECURITY: algorithms come from policy, never from the token (RFC 8725 §2.1).
        if not isinstance(alg, str) or alg not in issuer.algorithms:
            raise _fail("authn_alg_not_allowed")
        kid = header.get("kid")
        # SECURITY: a kid that is present must be a string (RFC 7515 §4.1.4); "kid": null is
        # not the same as no kid (it would select the issuer's only key).
        if "kid" in header and (not isinstance(kid, str) or len(kid) > 256):
            raise _fail("authn_malformed_token")
        key = await issuer.keys.get_key(kid, alg)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=list(issuer.audiences),
                issuer=issuer.issuer,
                # Times are checked below against the injectable clock.
                options={"require": list(issuer.required_claims), "verify_exp": False, "verify_nbf": False,
                         "verify_iat": False},
            )
        except jwt.PyJWTError as exc:
            raise _fail("authn_invalid_token") from exc
        principal, until = self._principal(claims, issuer, digest, now)
        vouches = getattr(issuer.keys, "vouches", None)
        return principal, until, (functools.partial(vouches, kid, alg, key) if vouches is not None else None)

    def _principal(self, claims: dict[str, Any], issuer: TrustedIssuer, digest: bytes,
                   now: float) -> tuple[Principal, float]:
        exp, iat = claims.get("exp"), claims.get("iat")
        nbf = claims.get("nbf", iat)
        # SECURITY: numeric dates must be finite numbers (RFC 7519 §2), never strings or
        # booleans, and never NaN: the JSON parser accepts the literal NaN, and every
        # comparison with NaN is False, so `exp: NaN` would never expire and `iat: NaN`
        # would slip past the lifetime cap.
        if not all(_finite_number(v) for v in (exp, iat, nbf)):
            raise _fail("authn_invalid_token")
        assert isinstance(exp, int | float) and isinstance(iat, int | float)  # noqa: S101 - checked above
        assert isinstance(nbf, int | float)  # noqa: S101
        leeway = issuer.leeway_s
        # RFC 7519 §4.1.4: valid only while now is *before* exp (plus leeway); at exp + leeway
        # the token has expired, as the verified-token cache (valid while now < until) agrees.
        if now >= exp + leeway:
            raise _fail("authn_token_expired", "token expired")
        if now + leeway < nbf or now + leeway < iat or exp - iat > issuer.max_lifetime_s:
            raise _fail("authn_invalid_token")
        # SECURITY: a token that expires before it is issued or becomes valid is not one an
        # issuer mints; it is refused rather than read as "valid within the leeway".
        if exp <= iat or exp <= nbf:
            raise _fail("authn_invalid_token")
        sub = claims.get(issuer.subject_claim)
        tenant = claims.get(issuer.tenant_claim)
        roles = claims.get(issuer.roles_claim, [])
        if not (usable_principal_name(sub) and usable_principal_name(tenant)):
            raise _fail("authn_missing_claims")
        assert isinstance(sub, str) and isinstance(tenant, str)  # noqa: S101 - checked above
        if not (isinstance(roles, list) and all(isinstance(r, str) for r in roles)):
            raise _fail("authn_missing_claims")
        granted = frozenset(roles)
        if issuer.allowed_roles is not None:
            # SECURITY: an issuer grants only the roles policy lets it grant (no escalation
            # by a service issuer minting "admin").
            granted &= issuer.allowed_roles
        scope = claims.get("scope", "")
        scopes = frozenset(scope.split()) if isinstance(scope, str) else frozenset()
        principal = Principal(subject=sub, tenant=tenant, roles=granted, issuer=issuer.issuer,
                              credential_id=digest.hex()[:16], scopes=scopes)
        # Cache no longer than the token lives (with its leeway), nor past a short horizon.
        return principal, min(float(exp) + leeway, now + _CACHE_HORIZON_S)
