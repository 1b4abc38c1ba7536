"""The JWT path under fuzz: arbitrary tokens and Authorization headers are refused with
AuthenticationFailed (401) and nothing else, and never authenticate; a forged signature
with any key an attacker can know never passes; any change to a valid token fails it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from functools import cache
from typing import Any

from aiohttp.test_utils import make_mocked_request
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import assume, given
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.devissuer import DEV_AUDIENCE, DEV_ISSUER, issue_token, load_or_create_key
from gateway.errors import GatewayError
from gateway.fronts.http.server import _bearer
from security_tests.fuzz import targets
from security_tests.fuzz.corpus_examples import with_corpus
from security_tests.fuzz.profiles import fuzz_settings


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@cache
def _valid_token() -> str:
    return issue_token(targets.jwt_world().state_dir, sub="alice", tenant="acme", roles=["analyst"], ttl_s=3600)


@cache
def _attacker_keys() -> list[bytes]:
    """HMAC secrets an attacker can know or guess: encodings of the real public key."""
    public = load_or_create_key(targets.jwt_world().state_dir).public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    ssh = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    jwk = json.dumps({"kty": "OKP", "crv": "Ed25519", "x": _b64(raw)}).encode()
    return [b"", b"secret", b"\0" * 32, raw, pem, pem.rstrip(b"\n"), ssh, jwk, _b64(raw).encode()]


def test_positive_control_the_world_can_authenticate() -> None:
    """Without this, 'never authenticates' could hold for a broken harness."""
    assert targets.authenticate(_valid_token()).subject == "alice"


def _expect_refused(token: str) -> None:
    try:
        principal = targets.authenticate(token)
    except GatewayError as exc:
        assert exc.http_status == 401, f"{type(exc).__name__} ({exc.reason}), not AuthenticationFailed"
        return
    raise AssertionError(f"authenticated as {principal!r}")


@fuzz_settings()
@given(data=st.one_of(st.binary(max_size=512), st.text(max_size=512).map(str.encode),
                      st.lists(st.binary(max_size=64).map(_b64), min_size=3, max_size=3).map(
                          lambda parts: ".".join(parts).encode())))
@with_corpus("jwt")
def test_arbitrary_tokens_are_refused(data: bytes) -> None:
    targets.jwt(data)


CLAIM_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(), st.text(max_size=8),
                         st.lists(st.text(max_size=4), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                   st.integers(), max_size=2))
ALGS = st.one_of(st.sampled_from(["none", "None", "NONE", "nOnE", "HS256", "HS384", "HS512", "RS256", "PS256",
                                  "ES256", "EdDSA", "eddsa", "EDDSA", "ES256K", ""]), CLAIM_VALUES)


@st.composite
def forged_tokens(draw: st.DrawFn) -> str:
    now = int(time.time())
    header: dict[str, Any] = {"alg": draw(ALGS)}
    for key in draw(st.lists(st.sampled_from(["kid", "typ", "jku", "x5u", "jwk", "x5c", "crit", "cty", "b64"]),
                             max_size=3, unique=True)):
        header[key] = draw(CLAIM_VALUES)
    claims: dict[str, Any] = {"iss": DEV_ISSUER, "aud": DEV_AUDIENCE, "sub": "mallory", "tenant": "acme",
                              "roles": ["admin"], "iat": now, "exp": now + 300}
    for key in draw(st.lists(st.sampled_from([*claims, "nbf", "scope", "jti"]), max_size=3, unique=True)):
        if draw(st.booleans()):
            claims.pop(key, None)
        else:
            claims[key] = draw(CLAIM_VALUES)
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    how = draw(st.sampled_from(["empty", "random", "hmac", "ed25519"]))
    if how == "empty":
        signature = b""
    elif how == "random":
        signature = draw(st.binary(min_size=0, max_size=128))
    elif how == "hmac":
        digest = draw(st.sampled_from([hashlib.sha256, hashlib.sha384, hashlib.sha512]))
        signature = hmac.new(draw(st.sampled_from(_attacker_keys())), head.encode(), digest).digest()
    else:  # a well-formed EdDSA signature, by a key that is not the issuer's
        signature = _attacker_ed25519().sign(head.encode())
    return head + "." + _b64(signature)


@cache
def _attacker_ed25519() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@fuzz_settings()
@given(token=forged_tokens())
def test_forged_tokens_never_authenticate(token: str) -> None:
    """alg none/confusion, key-location headers, claim type games, attacker keys: all 401."""
    _expect_refused(token)


@fuzz_settings()
@given(position=st.integers(0, 10_000), action=st.sampled_from(["replace", "insert", "delete"]),
       char=st.characters(min_codepoint=0x20, max_codepoint=0x7e))
def test_any_change_to_a_valid_token_fails_it(position: int, action: str, char: str) -> None:
    """One character changed, added or removed anywhere: never the same principal."""
    token = _valid_token()
    i = position % len(token)
    if action == "replace":
        mutated = token[:i] + char + token[i + 1:]
    elif action == "insert":
        mutated = token[:i] + char + token[i:]
    else:
        mutated = token[:i] + token[i + 1:]
    assume(mutated != token)
    _expect_refused(mutated)


@fuzz_settings()
@given(values=st.lists(st.text(st.characters(min_codepoint=0x20, max_codepoint=0xff), max_size=80),
                       min_size=1, max_size=2))
def test_authorization_headers(values: list[str]) -> None:
    """The header parser refuses cleanly (400/401) or yields a token the authenticator refuses."""
    headers = CIMultiDict[str]()
    for value in values:
        headers.add("Authorization", value)
    request = make_mocked_request("POST", "/v2/models/m/infer", headers=headers)
    try:
        token = _bearer(request)
    except GatewayError as exc:
        assert exc.http_status in (400, 401)
        return
    assert token is not None and token == token.strip() and token
    _expect_refused(token)
