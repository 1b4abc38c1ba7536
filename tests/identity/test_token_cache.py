"""The verified-token cache (stages/authn.py) never outlives the key that verified a token.

A cached verification must stop being accepted at the moment an uncached one of the same
token would be refused: when the JWKS key source stops serving the kid (rotation) or
stops vouching for its stale keys (``max_stale_s`` during an outage). Each step compares
the cached token with a never-seen twin verified from scratch. Time moves the source's
injected clock (as in test_jwks.py); the authenticator's wall clock stands still, so
the cache's own horizon (5 min) and the tokens' ``exp`` never end an entry here.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt
import pytest

from gateway.context import Principal
from gateway.errors import AuthenticationFailed, DependencyUnavailable, GatewayError
from gateway.identity.jwks import JwksKeySource
from gateway.stages.authn import JwtAuthenticator, TrustedIssuer

from . import test_jwks
from .test_jwks import ISSUER, Clock, JwksServer, Keys, SourceFactory, jwk

# The loopback IdP, keys, clock and source factory of test_jwks.py.
clock = test_jwks.clock
idp = test_jwks.idp
keys = test_jwks.keys
make_source = test_jwks.make_source

NOW = float(int(time.time()))


def _token(key: Any, kid: str) -> str:
    claims = {"iss": ISSUER, "aud": "gw", "sub": "u1", "tenant": "acme", "roles": ["analyst"],
              "iat": int(NOW), "exp": int(NOW) + 3600, "jti": str(uuid.uuid4())}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


def _authenticator(source: JwksKeySource) -> JwtAuthenticator:
    issuer = TrustedIssuer(issuer=ISSUER, audiences=("gw",), algorithms=("RS256",), keys=source)
    return JwtAuthenticator(issuers={ISSUER: issuer}, clock=lambda: NOW)


async def _outcome(auth: JwtAuthenticator, token: str) -> str:
    try:
        principal = await auth.authenticate(token)
    except GatewayError as exc:
        return f"{type(exc).__name__}:{exc.reason}"
    assert isinstance(principal, Principal)
    return "ok"


async def _same_as_uncached(auth: JwtAuthenticator, cached: str, keys: Keys) -> str:
    """The cached token's outcome, checked against a fresh token's (never cached)."""
    fresh = await _outcome(auth, _token(keys.rs1, "rs-1"))
    seen = await _outcome(auth, cached)
    assert seen == fresh, (seen, fresh)
    return seen


async def test_repeat_is_served_from_the_cache(make_source: SourceFactory, keys: Keys) -> None:
    source = make_source()
    auth = _authenticator(source)
    token = _token(keys.rs1, "rs-1")
    for _ in range(5):
        assert await _outcome(auth, token) == "ok"
    assert source.hits == 1  # one key look-up: the four repeats never verified again


async def test_rotated_out_kid_ends_cached_verifications(make_source: SourceFactory, idp: JwksServer,
                                                         keys: Keys, clock: Clock) -> None:
    source = make_source()
    auth = _authenticator(source)
    token = _token(keys.rs1, "rs-1")
    assert await _outcome(auth, token) == "ok"
    idp.keys = [jwk(keys.rs2, "rs-2")]  # the IdP rotates rs-1 out
    clock.advance(299)  # still inside the key set's TTL: both paths still accept
    assert await _same_as_uncached(auth, token, keys) == "ok"
    clock.advance(1)  # TTL over: the uncached path refreshes and no longer finds rs-1
    assert await _same_as_uncached(auth, token, keys) == "AuthenticationFailed:authn_unknown_kid"
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(token)


async def test_max_stale_ends_cached_verifications(make_source: SourceFactory, idp: JwksServer,
                                                   keys: Keys, clock: Clock) -> None:
    source = make_source(max_stale_s=3600)
    auth = _authenticator(source)
    token = _token(keys.rs1, "rs-1")
    assert await _outcome(auth, token) == "ok"
    idp.mode = "status_500"  # the IdP goes down
    clock.advance(301)  # past the TTL: stale keys bridge the outage, for both paths
    assert await _same_as_uncached(auth, token, keys) == "ok"
    clock.advance(3600 - 2)  # just inside max_stale_s
    assert await _same_as_uncached(auth, token, keys) == "ok"
    clock.advance(2)  # past it: fail closed, cached or not
    assert await _same_as_uncached(auth, token, keys) == "DependencyUnavailable:jwks_unavailable"
    with pytest.raises(DependencyUnavailable):
        await auth.authenticate(token)
    idp.mode = "ok"  # the IdP is back: the next allowed refresh restores both
    clock.advance(60)
    assert await _same_as_uncached(auth, token, keys) == "ok"


async def test_key_replaced_under_the_same_kid_ends_cached_verifications(
        make_source: SourceFactory, idp: JwksServer, keys: Keys, clock: Clock) -> None:
    source = make_source()
    auth = _authenticator(source)
    token = _token(keys.rs1, "rs-1")
    assert await _outcome(auth, token) == "ok"
    idp.keys = [jwk(keys.rs2, "rs-1")]  # same kid, another key: rs1's signatures no longer verify
    clock.advance(300)
    assert await _outcome(auth, token) == "AuthenticationFailed:authn_invalid_token"
