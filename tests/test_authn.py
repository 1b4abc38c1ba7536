"""Bearer-token authentication: the dev issuer's tokens pass, forged ones never do."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.context import Action, RequestContext
from gateway.devissuer import DEV_AUDIENCE, DEV_ISSUER, issue_token, load_or_create_key, trusted_dev_issuer
from gateway.errors import AuthenticationFailed
from gateway.stages.authn import JwtAuthenticator


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], sign: Any = None) -> str:
    """Build a JWT by hand: PyJWT refuses to sign several of these on purpose."""
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())
    sig = sign(head.encode()) if sign else b""
    return head + "." + _b64(sig)


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": DEV_ISSUER, "aud": DEV_AUDIENCE, "sub": "alice", "tenant": "acme", "roles": ["analyst"],
            "iat": now, "exp": now + 300}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture
def authn(tmp_path: Path) -> JwtAuthenticator:
    return JwtAuthenticator(issuers={DEV_ISSUER: trusted_dev_issuer(tmp_path)})


@pytest.fixture
def key(tmp_path: Path) -> Ed25519PrivateKey:
    return load_or_create_key(tmp_path)


def _ctx(bearer: str | None) -> RequestContext:
    ctx = RequestContext(request_id="r", revision="x", action=Action.INFER, transport="test", client_addr="")
    ctx.bearer = bearer
    return ctx


async def test_dev_token_authenticates(authn: JwtAuthenticator, tmp_path: Path) -> None:
    token = issue_token(tmp_path, sub="alice", tenant="acme", roles=["analyst", "viewer"])
    ctx = _ctx(token)
    await authn.on_call(ctx)
    principal = ctx.require_principal()
    assert (principal.subject, principal.tenant, principal.roles) == ("alice", "acme", {"analyst", "viewer"})
    assert ctx.bearer is None  # the credential does not outlive authentication
    assert token not in repr(principal)


async def test_cached_token_still_checked_for_expiry(authn: JwtAuthenticator, key: Ed25519PrivateKey) -> None:
    now = [time.time()]
    authn.clock = lambda: now[0]
    token = jwt.encode(_claims(exp=int(now[0]) + 60), key, algorithm="EdDSA")
    await authn.on_call(_ctx(token))
    now[0] += 120  # past exp (60 s) and the 30 s leeway
    with pytest.raises(AuthenticationFailed):
        await authn.on_call(_ctx(token))


def _other_key_token() -> str:
    return jwt.encode(_claims(), Ed25519PrivateKey.generate(), algorithm="EdDSA")


def _hs_with_public_key(key: Ed25519PrivateKey) -> str:
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return forge({"alg": "HS256", "typ": "JWT"}, _claims(),
                 lambda m: hmac.new(pub, m, hashlib.sha256).digest())


def _signed(key: Ed25519PrivateKey, header: dict[str, Any], claims: dict[str, Any]) -> str:
    return forge({"alg": "EdDSA", **header}, claims, key.sign)


CASES: list[tuple[str, Any, str]] = [
    # no token at all
    ("missing", lambda k: None, "authn_missing_token"),
    # alg none in several spellings
    ("alg_none", lambda k: forge({"alg": "none"}, _claims()), "authn_alg_not_allowed"),
    ("alg_None", lambda k: forge({"alg": "None"}, _claims()), "authn_alg_not_allowed"),
    ("alg_nOnE", lambda k: forge({"alg": "nOnE"}, _claims()), "authn_alg_not_allowed"),
    # key confusion: the public key used as an HMAC secret
    ("hs_with_public_key", _hs_with_public_key, "authn_alg_not_allowed"),
    # a real signature from an untrusted key
    ("other_key", lambda k: _other_key_token(), "authn_invalid_token"),
    # claims
    ("expired", lambda k: _signed(k, {}, _claims(exp=int(time.time()) - 120)), "authn_token_expired"),
    ("not_yet_valid", lambda k: _signed(k, {}, _claims(nbf=int(time.time()) + 600)), "authn_invalid_token"),
    ("iat_in_future", lambda k: _signed(k, {}, _claims(iat=int(time.time()) + 600)), "authn_invalid_token"),
    ("exp_as_string", lambda k: _signed(k, {}, _claims(exp="9999999999")), "authn_invalid_token"),
    ("no_exp", lambda k: _signed(k, {}, _claims(exp=None)), "authn_invalid_token"),
    ("too_long_lived", lambda k: _signed(k, {}, _claims(exp=int(time.time()) + 10 * 86400)),
     "authn_invalid_token"),
    ("wrong_audience", lambda k: _signed(k, {}, _claims(aud="someone-else")), "authn_invalid_token"),
    ("unknown_issuer", lambda k: _signed(k, {}, _claims(iss="https://evil")), "authn_unknown_issuer"),
    ("no_tenant", lambda k: _signed(k, {}, _claims(tenant=None)), "authn_missing_claims"),
    ("roles_not_list", lambda k: _signed(k, {}, _claims(roles="admin")), "authn_missing_claims"),
    ("sub_not_string", lambda k: _signed(k, {}, _claims(sub=42)), "authn_invalid_token"),
    # header tricks: never follow a key location the token names; refuse crit
    ("crit_header", lambda k: _signed(k, {"crit": ["exp"]}, _claims()), "authn_forbidden_header"),
    ("jku_header", lambda k: _signed(k, {"jku": "http://127.0.0.1:1/jwks"}, _claims()), "authn_forbidden_header"),
    ("jwk_header", lambda k: _signed(k, {"jwk": {"kty": "OKP"}}, _claims()), "authn_forbidden_header"),
    # structure
    ("four_segments", lambda k: _signed(k, {}, _claims()) + ".x", "authn_malformed_token"),
    ("json_serialization", lambda k: json.dumps({"payload": "x", "signatures": []}), "authn_malformed_token"),
    ("oversized", lambda k: "a" * 9000, "authn_malformed_token"),
    ("garbage", lambda k: "not.a.token", "authn_malformed_token"),
    ("non_ascii", lambda k: "é.é.é", "authn_malformed_token"),
]


@pytest.mark.parametrize(("name", "make", "reason"), CASES, ids=[c[0] for c in CASES])
async def test_forged_or_invalid_tokens_are_refused(
    authn: JwtAuthenticator, key: Ed25519PrivateKey, name: str, make: Any, reason: str
) -> None:
    ctx = _ctx(make(key))
    with pytest.raises(AuthenticationFailed) as info:
        await authn.on_call(ctx)
    assert info.value.reason == reason
    assert ctx.principal is None


def test_dev_key_file_is_private(tmp_path: Path) -> None:
    load_or_create_key(tmp_path)
    mode = (tmp_path / "dev-issuer-ed25519.pem").stat().st_mode & 0o777
    assert mode == 0o600
