"""CATALOGUE §1.1 Authentication: forged, confused, expired and misplaced credentials."""

from __future__ import annotations

import base64
import json
import os
import uuid
import zlib
from collections.abc import Callable
from typing import Any

import pytest

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
from security_tests.support.world import PUB_BODY, Client, World

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
                                                ("iat", "-Infinity")])
async def test_authn_11_13_non_finite_numeric_dates(gw: Client, world: World, tokens: Tokens, claim: str,
                                                     literal: str) -> None:
    """AUTHN-11/13 variant: a signed token whose date is NaN or infinite (Python's JSON
    parser accepts both literals). NaN fails every comparison, so ``exp: NaN`` never
    expired and ``iat: NaN`` slipped past the lifetime cap; the token must be refused."""
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
