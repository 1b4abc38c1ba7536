"""CATALOGUE §1.1 Authentication: forged, confused, expired and misplaced credentials."""

from __future__ import annotations

import base64
import json
import os
import uuid
import zlib
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio
import pytest
from tritonclient.grpc import service_pb2_grpc

from security_tests.conftest import Tokens
from security_tests.support.jwtforge import (
    AUDIENCE,
    DROP,
    EC_ISSUER,
    ISSUER,
    SVC_ISSUER,
    b64u,
    b64u_json,
    ec_jwk,
    es256,
    forge,
    hs256,
    openssh_public,
    public_pem,
    raw_signature,
    rs256,
    rsa_jwk,
)
from security_tests.support.world import PUB_BODY, Client, Response, World
from security_tests.test_1_2_authz import _from_own_address, _grpc_request

INFER = "/v2/models/pub_clf/infer"


async def refused(gw: Client, world: World, token: str, *, status: int = 401) -> None:
    """The common expectation of this section: refused with ``status``, nothing sent upstream."""
    r = await gw.infer("pub_clf", PUB_BODY, token=token)
    assert r.status == status, (r.status, r.body[:200])
    assert world.upstream_calls() == 0
    if status == 401:
        assert r.headers.get("WWW-Authenticate", "").startswith("Bearer")


def deny_reason(world: World, resp_rid: str) -> str | None:
    recs = [r for r in world.audit_records() if r.get("request_id") == resp_rid]
    assert len(recs) == 1, recs
    assert recs[0]["decision"] == "deny"
    return str(recs[0]["reason"])


async def test_authn_01_missing_token(gw: Client, world: World) -> None:
    r = await gw.infer("pub_clf", PUB_BODY, token=None)
    assert r.status == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert world.upstream_calls() == 0
    assert deny_reason(world, r.headers["X-Request-ID"]) == "authn_missing_token"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_authn_02_alg_none(gw: Client, world: World, tokens: Tokens, alg: str) -> None:
    token = tokens.remember(forge({"alg": alg, "typ": "at+jwt"}, world.tokens.claims(sub=tokens.sub("u1")), None))
    r = await gw.infer("pub_clf", PUB_BODY, token=token)
    assert r.status == 401 and world.upstream_calls() == 0
    recs = world.audit_for(r)
    assert len(recs) == 1 and recs[0]["decision"] == "deny" and recs[0]["reason"] == "authn_alg_not_allowed"
    assert recs[0].get("tenant") is None  # claims never recorded as an authenticated principal


@pytest.mark.parametrize("variant", ["last_sig_char", "payload_reordered"])
async def test_authn_03_signature_tamper(gw: Client, world: World, tokens: Tokens, variant: str) -> None:
    good = tokens.u1()
    head, payload, sig = good.split(".")
    if variant == "last_sig_char":
        bad = f"{head}.{payload}.{sig[:-1]}{'A' if sig[-1] != 'A' else 'B'}"
    else:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        bad = f"{head}.{b64u_json(dict(reversed(list(claims.items()))))}.{sig}"
    await refused(gw, world, tokens.remember(bad))


@pytest.mark.parametrize("newline", [True, False])
async def test_authn_04_rs_hs_confusion(gw: Client, world: World, tokens: Tokens, newline: bool) -> None:
    pem = public_pem(world.keys.rs1)
    key = pem if newline else pem.rstrip(b"\n")
    token = forge({"alg": "HS256", "kid": "rs-1", "typ": "at+jwt"}, world.tokens.claims(sub=tokens.sub("u1")),
                  hs256(key))
    await refused(gw, world, tokens.remember(token))


@pytest.mark.parametrize("encoding", ["jwk_json", "ssh_ed25519", "ssh_ecdsa"])
@pytest.mark.parametrize("iss", [ISSUER, EC_ISSUER])
async def test_authn_05_hs_keyed_with_public_encodings(gw: Client, world: World, tokens: Tokens, encoding: str,
                                                       iss: str) -> None:
    keys = {"jwk_json": json.dumps(rsa_jwk(world.keys.rs1, "rs-1")).encode(),
            "ssh_ed25519": openssh_public(world.keys.ed1), "ssh_ecdsa": openssh_public(world.keys.es1)}
    token = forge({"alg": "HS256", "kid": "rs-1", "typ": "at+jwt"},
                  world.tokens.claims(sub=tokens.sub("u1"), iss=iss), hs256(keys[encoding]))
    await refused(gw, world, tokens.remember(token))


@pytest.mark.parametrize(("kid", "key"), [("../../../../../../dev/null", b""),
                                          ("/proc/sys/kernel/randomize_va_space", b"2\n")])
async def test_authn_06_kid_path_traversal(gw: Client, world: World, tokens: Tokens, kid: str, key: bytes) -> None:
    token = forge({"alg": "HS256", "kid": kid, "typ": "at+jwt"}, world.tokens.claims(sub=tokens.sub("u1")), hs256(key))
    await refused(gw, world, tokens.remember(token))
    # The same with RS256 (the issuer's own algorithm): an unknown kid, never a file.
    token = forge({"alg": "RS256", "kid": kid, "typ": "at+jwt"}, world.tokens.claims(sub=tokens.sub("u1")),
                  rs256(world.keys.rs1))
    await refused(gw, world, tokens.remember(token))


@pytest.mark.parametrize("kid", ["x' UNION SELECT 'secret'--", "$(id)", "*)(uid=*"])
async def test_authn_07_kid_injection(gw: Client, world: World, tokens: Tokens, kid: str) -> None:
    token = forge({"alg": "HS256", "kid": kid, "typ": "at+jwt"}, world.tokens.claims(sub=tokens.sub("u1")),
                  hs256(b"secret"))
    await refused(gw, world, tokens.remember(token))


async def test_authn_08_jku(gw: Client, world: World, tokens: Tokens) -> None:
    before = world.attacker.hits
    head = {"alg": "RS256", "kid": "evil-1", "typ": "at+jwt",
            "jku": f"http://127.0.0.1:{world.attacker.port}/jwks.json"}
    token = forge(head, world.tokens.claims(sub=tokens.sub("u1")), rs256(world.keys.attacker_rs))
    await refused(gw, world, tokens.remember(token))
    assert world.attacker.hits == before


@pytest.mark.parametrize("header", ["x5u", "x5c"])
async def test_authn_09_x5u_x5c(gw: Client, world: World, tokens: Tokens, header: str) -> None:
    before = world.attacker.hits
    value: Any = (f"http://127.0.0.1:{world.attacker.port}/cert.pem" if header == "x5u"
                  else [base64.b64encode(public_pem(world.keys.attacker_rs)).decode()])
    head = {"alg": "RS256", "kid": "rs-1", "typ": "at+jwt", header: value}
    token = forge(head, world.tokens.claims(sub=tokens.sub("u1")), rs256(world.keys.attacker_rs))
    await refused(gw, world, tokens.remember(token))
    assert world.attacker.hits == before


async def test_authn_10_embedded_jwk(gw: Client, world: World, tokens: Tokens) -> None:
    head = {"alg": "RS256", "typ": "at+jwt", "jwk": rsa_jwk(world.keys.attacker_rs, "rs-1")}
    token = forge(head, world.tokens.claims(sub=tokens.sub("u1")), rs256(world.keys.attacker_rs))
    await refused(gw, world, tokens.remember(token))


@pytest.mark.parametrize(("delta", "status"), [(-30 - 1, 401), (-30 + 1, 200)])
async def test_authn_11_expiry_boundary(gw: Client, world: World, tokens: Tokens, delta: int, status: int) -> None:
    world.frozen = now = float(int(world.clock()))
    token = tokens.u1(iat=int(now) - 200, nbf=int(now) - 200, exp=int(now) + delta)
    r = await gw.infer("pub_clf", PUB_BODY, token=token)
    assert r.status == status
    if status == 401:
        assert deny_reason(world, r.headers["X-Request-ID"]) == "authn_token_expired"
        assert world.upstream_calls() == 0


@pytest.mark.parametrize(("claim", "literal"), [("exp", "NaN"), ("iat", "NaN"), ("nbf", "NaN"), ("exp", "Infinity"),
                                                ("iat", "-Infinity"),
                                                # session 7: integers no float holds (were a 500: OverflowError)
                                                ("exp", "1" + "0" * 400), ("iat", "-1" + "0" * 400),
                                                ("nbf", "1" + "0" * 400), ("exp", str(2**53 + 1))])
async def test_authn_11_13_non_finite_numeric_dates(gw: Client, world: World, tokens: Tokens, claim: str,
                                                     literal: str) -> None:
    """AUTHN-11/13 variant: a signed token whose date is NaN or infinite (Python's JSON
    parser accepts both literals). NaN fails every comparison, so ``exp: NaN`` never
    expired and ``iat: NaN`` slipped past the lifetime cap; the token must be refused.
    So must a date beyond +-2**53 (I-JSON): a 400-digit integer crashed the float checks."""
    claims = world.tokens.claims(sub=tokens.sub("u1"))
    if claim == "iat":
        claims["exp"] = claims["iat"] + 10 * 365 * 86400  # refused as too long-lived unless iat is not a number
    text = json.dumps(claims).replace(f'"{claim}": {claims[claim]}', f'"{claim}": {literal}')
    assert f'"{claim}": {literal}' in text
    head = {"alg": "RS256", "kid": "rs-1", "typ": "at+jwt"}
    await refused(gw, world, tokens.remember(forge(head, b64u(text.encode()), rs256(world.keys.rs1))))


@pytest.mark.parametrize(("typ", "status"), [("application/at+jwt", 200), ("Application/AT+JWT", 200),
                                             ("application/jwt", 401), ("application/x/at+jwt", 401),
                                             ("at+jwt; charset=x", 401)])
async def test_authn_20_typ_full_media_type(gw: Client, world: World, tokens: Tokens, typ: str, status: int) -> None:
    """AUTHN-20 variant: RFC 7515 §4.1.9 lets ``typ`` carry the full ``application/at+jwt``
    (RFC 9068 §4 names it so), which is the same type as ``at+jwt``; no other type passes."""
    token = tokens.remember(forge({"alg": "RS256", "kid": "rs-1", "typ": typ},
                                  world.tokens.claims(sub=tokens.sub("u1")), rs256(world.keys.rs1)))
    r = await gw.infer("pub_clf", PUB_BODY, token=token)
    assert r.status == status, r.body[:200]
    assert world.upstream_calls() == (1 if status == 200 else 0)
    if status == 401:
        assert deny_reason(world, r.headers["X-Request-ID"]) == "authn_wrong_token_type"


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_authn_12_not_yet_valid(gw: Client, world: World, tokens: Tokens, claim: str) -> None:
    world.frozen = now = float(int(world.clock()))
    over = {"nbf": int(now) + 35} if claim == "nbf" else {"iat": int(now) + 86400, "nbf": int(now),
                                                           "exp": int(now) + 86400 + 300}
    await refused(gw, world, tokens.u1(**over))


@pytest.mark.parametrize("claim", ["exp", "aud", "iss", "sub"])
async def test_authn_13_required_claims(gw: Client, world: World, tokens: Tokens, claim: str) -> None:
    await refused(gw, world, tokens.u1(**{claim: DROP}))


@pytest.mark.parametrize(("aud", "status"), [("billing-api", 401), ("inference-gw-evil", 401),
                                             (["billing-api"], 401), (["billing-api", AUDIENCE], 200)])
async def test_authn_14_audience(gw: Client, world: World, tokens: Tokens, aud: Any, status: int) -> None:
    r = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1(aud=aud))
    assert r.status == status
    assert world.upstream_calls() == (1 if status == 200 else 0)


@pytest.mark.parametrize("iss", ["https://idp.test", "http", "prod", "https://idp.test/realms/prod/"])
async def test_authn_15_issuer_partial_match(gw: Client, world: World, tokens: Tokens, iss: str) -> None:
    claims = world.tokens.claims(sub=tokens.sub("u1"), iss=iss)
    token = forge({"alg": "HS256", "typ": "at+jwt"}, claims, hs256(world.keys.hs_key))
    await refused(gw, world, tokens.remember(token))
    token = forge({"alg": "RS256", "kid": "rs-1", "typ": "at+jwt"}, claims, rs256(world.keys.rs1))
    await refused(gw, world, tokens.remember(token))


async def test_authn_16_key_issuer_binding(gw: Client, world: World, tokens: Tokens) -> None:
    # The svc issuer's own token works (positive control) ...
    ok = tokens.remember(world.tokens.svc(sub=tokens.sub("svc"), tenant="alpha", roles=["predictor"]))
    r = await gw.infer("pub_clf", PUB_BODY, token=ok)
    assert r.status == 200
    world.fake.reset()
    # ... but its key cannot vouch for the prod issuer.
    token = forge({"alg": "HS256", "typ": "at+jwt"}, world.tokens.claims(sub=tokens.sub("u1"), iss=ISSUER),
                  hs256(world.keys.hs_key))
    await refused(gw, world, tokens.remember(token))


async def test_authn_17_crit_header(gw: Client, world: World, tokens: Tokens) -> None:
    token = tokens.u1(header={"crit": ["exp-ext"], "exp-ext": 1})
    await refused(gw, world, token)


@pytest.mark.parametrize("sig", [bytes(64), bytes.fromhex("3006020100020100")])
async def test_authn_18_psychic_signature(gw: Client, world: World, tokens: Tokens, sig: bytes) -> None:
    claims = world.tokens.claims(sub=tokens.sub("u1"), iss=EC_ISSUER)
    # Positive control: the EC issuer accepts a real ES256 signature.
    good = tokens.remember(forge({"alg": "ES256", "kid": "es-1", "typ": "at+jwt"}, claims, es256(world.keys.es1)))
    assert (await gw.infer("pub_clf", PUB_BODY, token=good)).status == 200
    world.fake.reset()
    bad = forge({"alg": "ES256", "kid": "es-1", "typ": "at+jwt"}, claims, raw_signature(sig))
    await refused(gw, world, tokens.remember(bad))


async def test_authn_19_jwe_zip_bomb(gw: Client, world: World, tokens: Tokens) -> None:
    # ~1 MB of deflate that would inflate to 1 GB; sent as the ciphertext of a 5-segment JWE.
    bomb = zlib.compress(bytes(8 * 1024 * 1024), 9)  # 8 MiB plaintext keeps the test itself light
    head = b64u_json({"alg": "dir", "enc": "A256GCM", "zip": "DEF", "kid": "rs-1"})
    token = f"{head}..{b64u(os.urandom(12))}.{b64u(bomb[:4000])}.{b64u(os.urandom(16))}"
    await refused(gw, world, tokens.remember(token))


@pytest.mark.parametrize("kind", ["id_token", "refresh_token", "no_typ"])
async def test_authn_20_token_type_confusion(gw: Client, world: World, tokens: Tokens, kind: str) -> None:
    await token_type_confusion(gw, world, tokens, kind)


async def token_type_confusion(gw: Client, world: World, tokens: Tokens, kind: str) -> None:
    """AUTHN-20's attack and expectation (also run with `token_types` removed: test_protection_off)."""
    if kind == "id_token":
        claims = world.tokens.claims(sub=tokens.sub("u1"), aud="inference-gw", scope=DROP)
        token = forge({"alg": "RS256", "kid": "rs-1", "typ": "JWT"}, claims, rs256(world.keys.rs1))
    elif kind == "refresh_token":
        claims = world.tokens.claims(sub=tokens.sub("u1"), typ="Refresh")
        token = forge({"alg": "RS256", "kid": "rs-1", "typ": "Refresh"}, claims, rs256(world.keys.rs1))
    else:
        token = forge({"alg": "RS256", "kid": "rs-1"}, world.tokens.claims(sub=tokens.sub("u1")),
                      rs256(world.keys.rs1))
    await refused(gw, world, tokens.remember(token))


@pytest.mark.parametrize("kind", ["64k_header", "10k_claims"])
async def test_authn_21_oversize_token(gw: Client, world: World, tokens: Tokens, kind: str) -> None:
    if kind == "64k_header":
        token = "eyJ" + "A" * 65536
    else:
        claims = world.tokens.claims(sub=tokens.sub("u1"))
        claims.update({f"c{i}": i for i in range(10_000)})
        token = forge({"alg": "RS256", "kid": "rs-1", "typ": "at+jwt"}, claims, rs256(world.keys.rs1))
    tokens.remember(token)
    request = (f"POST {INFER} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
               "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}").encode()
    raw = await gw.raw(request)
    status = int(raw.split(b" ", 2)[1])
    assert status in (400, 401, 431)
    assert world.upstream_calls() == 0


async def test_authn_22_unknown_kid_flood(gw: Client, world: World, tokens: Tokens) -> None:
    good = tokens.u1()
    assert (await gw.infer("pub_clf", PUB_BODY, token=good)).status == 200  # key cached
    hits = world.idp.hits
    statuses: list[int] = []
    for batch in range(10):
        client = Client(world, world.next_addr())
        for _ in range(15):
            head = {"alg": "RS256", "kid": f"k-{uuid.uuid4().hex[:12]}", "typ": "at+jwt"}
            token = tokens.remember(forge(head, world.tokens.claims(sub=tokens.sub("u1")), rs256(world.keys.rs1)))
            statuses.append((await client.infer("pub_clf", PUB_BODY, token=token)).status)
        if batch == 5:
            # Legit token (fresh, not cached by hash) still accepted during the flood.
            assert (await gw.infer("pub_clf", PUB_BODY, token=tokens.u1())).status == 200
    assert set(statuses) == {401}
    assert world.idp.hits - hits <= 1  # one refresh per 30 s cooldown at most
    assert (await gw.infer("pub_clf", PUB_BODY, token=tokens.u1())).status == 200  # good key not evicted


@pytest.mark.parametrize("placement", ["query", "cookie", "two_headers", "basic"])
async def test_authn_23_credential_placement(gw: Client, world: World, tokens: Tokens, placement: str) -> None:
    token = tokens.u1()
    body = json.dumps(PUB_BODY)
    if placement == "query":
        r = await gw.request("POST", f"{INFER}?access_token={token}", data=body.encode(),
                             headers={"Content-Type": "application/json"})
        assert r.status == 401
    elif placement == "cookie":
        r = await gw.request("POST", INFER, data=body.encode(),
                             headers={"Content-Type": "application/json", "Cookie": f"access_token={token}"})
        assert r.status == 401
    elif placement == "two_headers":
        raw = await gw.raw((f"POST {INFER} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
                            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                            f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        assert raw.startswith(b"HTTP/1.1 400")
    else:
        r = await gw.infer("pub_clf", PUB_BODY, token=None,
                           headers={"Authorization": "Basic " + base64.b64encode(b"u1:pw").decode()})
        assert r.status == 401
    assert world.upstream_calls() == 0


def _jwks_source(world: World) -> Any:
    assert world.service is not None
    for lazy in world.service.key_sources._sources.values():
        if lazy.source is not None and lazy.cfg.issuer == ISSUER:
            return lazy.source
    raise AssertionError("JWKS source not built yet")


@pytest.mark.parametrize("fault", ["http500", "nonjson", "empty", "hang"])
async def test_authn_24_jwks_faults_at_refresh(gw: Client, world: World, tokens: Tokens, fault: str) -> None:
    assert (await gw.infer("pub_clf", PUB_BODY, token=tokens.u1())).status == 200
    source = _jwks_source(world)
    world.idp.mode = fault
    try:
        replaced = world.loop.run(source.refresh())  # a refresh meets the fault (bounded by fetch_timeout_s)
        assert replaced is False
        # Known keys keep working; an unknown kid is refused, never accepted unverified.
        assert (await gw.infer("pub_clf", PUB_BODY, token=tokens.u1())).status == 200
        world.fake.reset()
        await refused(gw, world, tokens.u1(header={"kid": "rs-unknown"}))
    finally:
        world.idp.mode = "ok"
        source._next_attempt_at = float("-inf")


async def test_authn_25_key_rotation(gw: Client, world: World, tokens: Tokens) -> None:
    assert (await gw.infer("pub_clf", PUB_BODY, token=tokens.u1())).status == 200
    source = _jwks_source(world)
    saved = world.idp.jwks
    # rs-1 rotated out: the JWKS now only holds rs-2.
    from cryptography.hazmat.primitives.asymmetric import rsa

    rs2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    world.idp.jwks = {"keys": [rsa_jwk(rs2, "rs-2")]}
    try:
        assert world.loop.run(source.refresh()) is True
        world.fake.reset()
        await refused(gw, world, tokens.u1())  # a fresh rs-1 token after the refresh
        new = forge({"alg": "RS256", "kid": "rs-2", "typ": "at+jwt"}, world.tokens.claims(sub=tokens.sub("u1")),
                    rs256(rs2))
        assert (await gw.infer("pub_clf", PUB_BODY, token=tokens.remember(new))).status == 200
    finally:
        world.idp.jwks = saved
        assert world.loop.run(source.refresh()) is True


_unused: tuple[Callable[..., Any], ...] = (SVC_ISSUER.__len__, ec_jwk)


# ---------------------------------------------------------------------------------------
# Session 7 outsider variants: one token, one meaning. Each case is a correctly signed
# token (or a byte-for-byte re-spelling of one) that some parser reads differently.
# ---------------------------------------------------------------------------------------

_HEAD = {"alg": "RS256", "kid": "rs-1", "typ": "at+jwt"}


def _signed_raw(world: World, header: bytes, payload: bytes) -> str:
    """Sign exactly these header and payload bytes with rs-1 (``forge`` would re-serialise them)."""
    signing_input = f"{b64u(header)}.{b64u(payload)}"
    return f"{signing_input}.{b64u(rs256(world.keys.rs1)(signing_input.encode()))}"


def _dup_variant(world: World, tokens: Tokens, variant: str) -> str:
    claims = json.dumps(world.tokens.claims(sub=tokens.sub("u1")))
    head = json.dumps(_HEAD)
    header, payload = {
        "header_alg_twice": ('{"alg":"none","alg":"RS256","kid":"rs-1","typ":"at+jwt"}', claims),
        "header_kid_twice": ('{"alg":"RS256","kid":"zz","kid":"rs-1","typ":"at+jwt"}', claims),
        "payload_sub_twice_last": (head, claims[:-1] + ', "sub": "ops"}'),
        "payload_sub_twice_first": (head, '{"sub": "ops", ' + claims[1:]),
        "payload_sub_twice_escaped": (head, '{"\\u0073ub": "ops", ' + claims[1:]),
        "payload_iss_twice": (head, '{"iss": "https://evil.example", ' + claims[1:]),
        "payload_tenant_twice": (head, claims[:-1] + ', "tenant": "beta"}'),
    }[variant]
    return tokens.remember(_signed_raw(world, header.encode(), payload.encode()))


@pytest.mark.parametrize("variant", ["header_alg_twice", "header_kid_twice", "payload_sub_twice_last",
                                     "payload_sub_twice_first", "payload_sub_twice_escaped", "payload_iss_twice",
                                     "payload_tenant_twice"])
async def test_authn_03_duplicate_members_refused(gw: Client, world: World, tokens: Tokens, variant: str) -> None:
    """AUTHN-03 variant: a signed header or claims set naming a member twice ("alg", "sub",
    "iss", "tenant"). Python reads the last, other stacks the first; RFC 7515 §5.2 lets a
    recipient refuse, and one token must have one meaning: refused before any key lookup."""
    r = await gw.infer("pub_clf", PUB_BODY, token=_dup_variant(world, tokens, variant))
    assert r.status == 401 and world.upstream_calls() == 0
    assert deny_reason(world, r.headers["X-Request-ID"]) == "authn_malformed_token"


@pytest.mark.parametrize("variant", ["bom_header", "bom_payload", "utf16_header", "utf16_payload", "utf32_payload",
                                     "nan_in_header", "nan_in_other_claim", "infinity_in_other_claim",
                                     "lone_surrogate_sub", "lone_low_surrogate_sub", "lone_surrogate_tenant",
                                     "lone_surrogate_role", "lone_surrogate_member_name", "lone_surrogate_kid"])
async def test_authn_03_claims_must_be_utf8_json(gw: Client, world: World, tokens: Tokens, variant: str) -> None:
    """AUTHN-03 variant: Python's ``json.loads(bytes)`` takes a UTF-8 BOM, UTF-16/32 text and
    the NaN/Infinity literals; RFC 7519 §7.2 says UTF-8 JSON. Correctly signed, still refused.
    A ``\\ud800`` escape decodes to a lone surrogate, no Unicode text (RFC 8259 §8.2, I-JSON
    RFC 7493 §2.1): such a subject or tenant made the routing flag's key (a UTF-8 hash of
    tenant and subject) raise, a 500 on ``pub_clf``."""
    head = json.dumps(_HEAD).encode()
    claims = json.dumps(world.tokens.claims(sub=tokens.sub("u1")))
    sub = json.dumps(tokens.sub("u1"))
    header, payload = {
        "bom_header": (b"\xef\xbb\xbf" + head, claims.encode()),
        "bom_payload": (head, b"\xef\xbb\xbf" + claims.encode()),
        "utf16_header": (json.dumps(_HEAD).encode("utf-16-le"), claims.encode()),
        "utf16_payload": (head, claims.encode("utf-16-le")),
        "utf32_payload": (head, claims.encode("utf-32")),
        "nan_in_header": (head[:-1] + b', "x": NaN}', claims.encode()),
        "nan_in_other_claim": (head, claims[:-1].encode() + b', "x": NaN}'),
        "infinity_in_other_claim": (head, claims[:-1].encode() + b', "x": -Infinity}'),
        "lone_surrogate_sub": (head, claims.replace(sub, sub[:-1] + '\\ud800"').encode()),
        "lone_low_surrogate_sub": (head, claims.replace(sub, sub[:-1] + '\\udfff"').encode()),
        "lone_surrogate_tenant": (head, claims.replace('"tenant": "alpha"', '"tenant": "alpha\\udbff"').encode()),
        "lone_surrogate_role": (head, claims.replace('"roles": ["predictor"]',
                                                     '"roles": ["predictor", "\\ud800"]').encode()),
        "lone_surrogate_member_name": (head, claims[:-1].encode() + b', "x\\ud800": 1}'),
        "lone_surrogate_kid": (head.replace(b'"rs-1"', b'"rs-1\\ud800"'), claims.encode()),
    }[variant]
    if variant.startswith("lone_"):
        assert b"\\ud" in header + payload  # the escape is in the signed bytes
    token = tokens.remember(_signed_raw(world, header, payload))
    r = await gw.infer("pub_clf", PUB_BODY, token=token)
    assert r.status == 401 and world.upstream_calls() == 0
    assert deny_reason(world, r.headers["X-Request-ID"]) == "authn_malformed_token"


_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _respell(token: str, variant: str) -> str:
    """The same three byte strings, base64url-spelled another way (decodes to identical bytes)."""
    head, payload, sig = token.split(".")
    if variant == "sig_padded":
        return f"{head}.{payload}.{sig}{'=' * (-len(sig) % 4)}"
    if variant == "header_padded":
        return f"{head}{'=' * (-len(head) % 4)}.{payload}.{sig}"
    if variant == "sig_standard_alphabet":
        return f"{head}.{payload}.{sig.replace('-', '+').replace('_', '/')}"
    if variant == "sig_trailing_bits":
        last = _B64URL.index(sig[-1])  # 256-byte RSA signature: the last character carries 4 unused bits
        return f"{head}.{payload}.{sig[:-1]}{_B64URL[last ^ 0b0001]}"
    if variant == "payload_junk_chars":
        return f"{head}.{payload[:8]}****{payload[8:]}.{sig}"
    raise AssertionError(variant)


@pytest.mark.parametrize("variant", ["sig_padded", "header_padded", "sig_standard_alphabet", "sig_trailing_bits",
                                     "payload_junk_chars"])
async def test_authn_03_non_canonical_base64url(gw: Client, world: World, tokens: Tokens, variant: str) -> None:
    """AUTHN-03 variant: RFC 7515 §2 base64url has no '=' padding, no '+'/'/' and no stray
    bits. A lenient decoder gives every token many spellings of one signature (a different
    string to hash, cache, log and deny-list); only the canonical spelling is accepted."""
    good = ""
    for _ in range(20):  # a token whose segments give the respelling something to change
        good = tokens.u1()
        head, _payload, sig = good.split(".")
        if len(sig) % 4 and len(head) % 4 and ("-" in sig or "_" in sig):
            break
    bad = _respell(good, variant)
    assert bad != good
    if variant != "payload_junk_chars":  # the respelling decodes to the very same bytes
        assert [base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)) for s in bad.rstrip("=").split(".")] == [
            base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)) for s in good.split(".")]
    r = await gw.infer("pub_clf", PUB_BODY, token=tokens.remember(bad))
    assert r.status == 401 and world.upstream_calls() == 0
    assert deny_reason(world, r.headers["X-Request-ID"]) == "authn_malformed_token"
    assert (await gw.infer("pub_clf", PUB_BODY, token=good)).status == 200  # the canonical spelling passes


@pytest.mark.parametrize("extra", [{"b64": False}, {"b64": True}, {"zip": "DEF"}, {"cty": "JWT"},
                                   {"cty": "application/jwt"}, {"enc": "A256GCM"}, {"crit": []}])
async def test_authn_17_header_members_that_change_meaning(gw: Client, world: World, tokens: Tokens,
                                                          extra: dict[str, Any]) -> None:
    """AUTHN-17 variant: ``b64`` (RFC 7797), ``zip``, ``enc`` and ``cty: JWT`` (nested token)
    each change how the payload is to be read; the gateway implements none, so a signed token
    carrying one is refused (never verified as if the member were absent)."""
    token = tokens.u1(header=extra)
    r = await gw.infer("pub_clf", PUB_BODY, token=token)
    assert r.status == 401 and world.upstream_calls() == 0
    assert deny_reason(world, r.headers["X-Request-ID"]) == "authn_forbidden_header"


async def test_authn_17_informational_header_members_pass(gw: Client, world: World, tokens: Tokens) -> None:
    """Positive control: members real IdPs send (Azure AD's ``x5t``, ``x5t#S256``, ``nonce``) stay accepted."""
    token = tokens.u1(header={"x5t": "abc", "x5t#S256": "def", "nonce": "n"})
    assert (await gw.infer("pub_clf", PUB_BODY, token=token)).status == 200


@pytest.mark.parametrize("kid", [None, ["rs-1"], {"id": "rs-1"}, 1, True])
async def test_authn_06_kid_must_be_a_string(gw: Client, world: World, tokens: Tokens, kid: Any) -> None:
    """AUTHN-06 variant: ``"kid": null`` is not "no kid" (which picks the issuer's only key),
    and a list/object/number kid is not a key id: refused as malformed."""
    r = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1(header={"kid": kid}))
    assert r.status == 401 and world.upstream_calls() == 0
    assert deny_reason(world, r.headers["X-Request-ID"]) == "authn_malformed_token"


@pytest.mark.parametrize(("over", "reason"), [
    ({"iat": -200, "nbf": -200, "exp": -30}, "authn_token_expired"),  # exactly at exp + leeway
    ({"iat": -10, "nbf": -10, "exp": -10}, "authn_invalid_token"),  # expires as it is issued
    ({"iat": 0, "nbf": 0, "exp": -5}, "authn_invalid_token"),  # expired before issued (within leeway)
    ({"iat": -100, "nbf": 20, "exp": 10}, "authn_invalid_token"),  # valid from after it expires
])
async def test_authn_11_exact_boundary_and_inverted_dates(gw: Client, world: World, tokens: Tokens,
                                                           over: dict[str, int], reason: str) -> None:
    """AUTHN-11 variant: RFC 7519 §4.1.4: now must be *before* exp (+ leeway), so at exactly
    exp + 30 s the token is expired; and a token that expires before it is issued or valid
    is not one an IdP mints (the leeway must not make it valid)."""
    world.frozen = now = float(int(world.clock()))
    r = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1(**{k: int(now) + v for k, v in over.items()}))
    assert r.status == 401 and world.upstream_calls() == 0
    assert deny_reason(world, r.headers["X-Request-ID"]) == reason


async def test_authn_11_last_second_before_the_boundary(gw: Client, world: World, tokens: Tokens) -> None:
    """Positive control of the boundary above: one second earlier the token still passes."""
    world.frozen = now = float(int(world.clock()))
    token = tokens.u1(iat=int(now) - 200, nbf=int(now) - 200, exp=int(now) - 29)
    assert (await gw.infer("pub_clf", PUB_BODY, token=token)).status == 200



async def _grpc_code(world: World, port: int, token: str, copies: int = 1) -> tuple[grpc.StatusCode, str]:
    """One ModelInfer on the gRPC front with ``token`` (in ``copies`` authorization entries);
    its status code and request id."""
    async with _from_own_address(world, port) as relay, grpc.aio.insecure_channel(f"127.0.0.1:{relay}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelInfer(_grpc_request("pub_clf"), metadata=(("authorization", f"Bearer {token}"),) * copies,
                               timeout=30)
        try:
            await call
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        trailers = await call.trailing_metadata()
    rid = next((str(v) for k, v in (trailers or ()) if k == "x-request-id"), "")
    status = {grpc.StatusCode.OK: 200, grpc.StatusCode.UNAUTHENTICATED: 401,
              grpc.StatusCode.INVALID_ARGUMENT: 400}.get(code, 599)
    world.ledger.responses.append(("GRPC", "/v2/models/pub_clf/infer", Response(status, {"X-Request-ID": rid}, b"")))
    return code, rid


@pytest.mark.parametrize("variant", ["header_alg_twice", "payload_sub_twice_last", "sig_padded", "zip_header"])
async def test_authn_03_grpc_front_same_token_rules(world: World, tokens: Tokens, grpc_port: int,
                                                   variant: str) -> None:
    """The gRPC front shares the authenticator: the same one-token-one-meaning rules hold in
    ``authorization`` metadata (duplicate members, padded base64url, a ``zip`` header)."""
    if variant == "sig_padded":
        good = tokens.u1()
        token = tokens.remember(good + "=" * (-len(good.rsplit(".", 1)[1]) % 4 or 4))
    elif variant == "zip_header":
        token = tokens.u1(header={"zip": "DEF"})
    else:
        token = _dup_variant(world, tokens, variant)
    code, rid = await _grpc_code(world, grpc_port, token)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert world.upstream_calls() == 0
    recs = [r for r in world.audit_records() if r.get("request_id") == rid]
    assert len(recs) == 1 and recs[0]["decision"] == "deny"
    assert recs[0]["reason"] in ("authn_malformed_token", "authn_forbidden_header")
    ok, _ = await _grpc_code(world, grpc_port, tokens.u1())
    assert ok == grpc.StatusCode.OK  # control: a canonical token of the same principal passes


async def test_authn_23_grpc_two_authorization_entries(world: World, tokens: Tokens, grpc_port: int) -> None:
    """AUTHN-23 on the gRPC front: two ``authorization`` entries (even the same valid token
    twice) are the REST front's two Authorization headers: a malformed request (400 ->
    INVALID_ARGUMENT), recorded as such; never authenticated, never forwarded."""
    token = tokens.u1()
    code, rid = await _grpc_code(world, grpc_port, token, copies=2)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert world.upstream_calls() == 0
    recs = [r for r in world.audit_records() if r.get("request_id") == rid]
    assert len(recs) == 1 and (recs[0]["decision"], recs[0]["status"]) == ("deny", 400)
    assert recs[0]["reason"] == "authn_malformed_header"
    ok, _ = await _grpc_code(world, grpc_port, token)
    assert ok == grpc.StatusCode.OK  # control: the same token once passes


@pytest.mark.parametrize("name", ["padded_sub", "leading_sub", "nbsp_sub", "newline_sub", "nul_sub", "crlf_sub",
                                  "zero_width_sub", "bidi_sub", "c1_sub", "padded_tenant", "zero_width_tenant"])
async def test_authn_13_subject_and_tenant_must_be_printable(gw: Client, world: World, tokens: Tokens,
                                                             name: str) -> None:
    """AUTHN-13/RL-09 neighbour: a signed ``sub`` or ``tenant`` that prints like another
    ("u1 ", "u1\u200b", a bidi override) is a principal of its own (rate buckets, flag bucket,
    audit subject) shown as someone it is not in logs and exports: refused like a missing one."""
    sub, tenant = tokens.sub("u1"), "alpha"
    over = {"padded_sub": {"sub": sub + " "}, "leading_sub": {"sub": " " + sub}, "nbsp_sub": {"sub": sub + "\u00a0"},
            "newline_sub": {"sub": sub + "\n"}, "nul_sub": {"sub": sub + "\x00"}, "crlf_sub": {"sub": sub + "\r\nX: y"},
            "zero_width_sub": {"sub": sub + "\u200b"}, "bidi_sub": {"sub": "\u202e" + sub},
            "c1_sub": {"sub": sub + "\x85"}, "padded_tenant": {"tenant": tenant + " "},
            "zero_width_tenant": {"tenant": "\u200d" + tenant}}[name]
    r = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1(**over))
    assert r.status == 401 and world.upstream_calls() == 0
    assert deny_reason(world, r.headers["X-Request-ID"]) == "authn_missing_claims"
    assert (await gw.infer("pub_clf", PUB_BODY, token=tokens.u1())).status == 200  # control

