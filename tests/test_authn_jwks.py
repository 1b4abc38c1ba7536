"""JWKS and OIDC-discovery issuers through the whole gateway, against a local IdP.

Keys are generated per test run; the IdP counts every hit so refresh floods and
token-named key locations (jku) can be asserted on.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.app import SERVICE_KEY

from .conftest import DIGITS_BODY as DIGITS
from .conftest import Client

ISSUER = "https://idp.test/realms/prod"


@dataclass
class Idp:
    keys: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=lambda: {"jwks": 0, "discovery": 0, "attacker": 0})
    down: bool = False
    base: str = ""

    def jwks(self) -> dict[str, Any]:
        return {"keys": [{**jwt.algorithms.RSAAlgorithm.to_jwk(k.public_key(), as_dict=True), "kid": kid,
                          "use": "sig", "alg": "RS256"} for kid, k in self.keys.items()]}

    def token(self, kid: str, **over: Any) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": "inference-gw", "sub": "u1", "tenant": "acme", "roles": ["analyst"],
                  "iat": now, "nbf": now, "exp": now + 300, "jti": str(uuid.uuid4())}
        claims.update(over)
        # an unknown kid is signed by a key the IdP never published
        key = self.keys[kid] if kid in self.keys else rsa.generate_private_key(65537, 2048)
        return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid, "typ": "at+jwt"})


@pytest.fixture
async def idp(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Idp:
    state = Idp(keys={"rs-1": rsa.generate_private_key(65537, 2048)})

    async def jwks(_: web.Request) -> web.Response:
        state.hits["jwks"] += 1
        if state.down:
            return web.Response(status=503)
        return web.json_response(state.jwks(), headers={"Cache-Control": "max-age=300"})

    async def discovery(_: web.Request) -> web.Response:
        state.hits["discovery"] += 1
        return web.json_response({"issuer": ISSUER, "jwks_uri": f"{state.base}/jwks"})

    async def attacker(_: web.Request) -> web.Response:
        state.hits["attacker"] += 1
        return web.json_response(state.jwks())

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/attacker", attacker)
    server = await aiohttp_server(app)
    state.base = str(server.make_url("")).rstrip("/")
    return state


def _use_issuer(policy_dir: Path, keys_yaml: str) -> None:
    (policy_dir / "identity.yaml").write_text(
        f"issuers:\n  - issuer: {ISSUER}\n    audiences: [inference-gw]\n    algorithms: [RS256]\n"
        f"    keys:\n      {keys_yaml}\n    jwks_settings: {{allow_http: true, fetch_timeout_s: 1}}\n")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("source", ["jwks_url", "oidc_discovery"])
async def test_jwks_issuer_end_to_end(client: Client, idp: Idp, policy_dir: Path, source: str) -> None:
    url = f"{idp.base}/jwks" if source == "jwks_url" else f"{idp.base}/.well-known/openid-configuration"
    _use_issuer(policy_dir, f"{source}: {url}")
    assert await client.app[SERVICE_KEY].store.reload("test")
    for _ in range(3):
        resp = await client.post("/v2/models/digits/infer", json=DIGITS, headers=bearer(idp.token("rs-1")))
        assert resp.status == 200, await resp.text()
    assert idp.hits["jwks"] == 1  # cached after the first fetch


async def test_unknown_kid_flood_fetches_at_most_once(client: Client, idp: Idp, policy_dir: Path) -> None:
    _use_issuer(policy_dir, f"jwks_url: {idp.base}/jwks")
    assert await client.app[SERVICE_KEY].store.reload("test")
    assert (await client.post("/v2/models/digits/infer", json=DIGITS,
                              headers=bearer(idp.token("rs-1")))).status == 200
    for i in range(50):
        resp = await client.post("/v2/models/digits/infer", json=DIGITS, headers=bearer(idp.token(f"rand-{i}")))
        assert resp.status == 401
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert idp.hits["jwks"] <= 2  # the first fetch, then at most one refresh per cooldown


async def test_token_named_key_location_is_never_fetched(client: Client, idp: Idp, policy_dir: Path) -> None:
    _use_issuer(policy_dir, f"jwks_url: {idp.base}/jwks")
    assert await client.app[SERVICE_KEY].store.reload("test")
    key = idp.keys["rs-1"]
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "inference-gw", "sub": "u1", "tenant": "acme", "roles": ["analyst"],
              "iat": now, "exp": now + 300}
    for header in ({"jku": f"{idp.base}/attacker"}, {"x5u": f"{idp.base}/attacker"},
                   {"kid": "../../../../dev/null"}, {"kid": "rs-1' OR '1'='1"}):
        token = jwt.encode(claims, key, algorithm="RS256", headers=header)
        assert (await client.post("/v2/models/digits/infer", json=DIGITS, headers=bearer(token))).status == 401
    assert idp.hits["attacker"] == 0


async def test_jwks_down_with_no_cache_fails_closed(client: Client, idp: Idp, policy_dir: Path) -> None:
    idp.down = True
    _use_issuer(policy_dir, f"jwks_url: {idp.base}/jwks")
    assert await client.app[SERVICE_KEY].store.reload("test")
    resp = await client.post("/v2/models/digits/infer", json=DIGITS, headers=bearer(idp.token("rs-1")))
    assert resp.status == 503
    assert "Retry-After" in resp.headers


async def test_jwks_down_with_cache_keeps_serving(client: Client, idp: Idp, policy_dir: Path) -> None:
    _use_issuer(policy_dir, f"jwks_url: {idp.base}/jwks")
    assert await client.app[SERVICE_KEY].store.reload("test")
    assert (await client.post("/v2/models/digits/infer", json=DIGITS,
                              headers=bearer(idp.token("rs-1")))).status == 200
    idp.down = True
    # a new token (not in the verified-token cache) still verifies with the cached key
    resp = await client.post("/v2/models/digits/infer", json=DIGITS, headers=bearer(idp.token("rs-1", sub="u2")))
    assert resp.status == 200


async def test_cache_survives_a_policy_reload(client: Client, idp: Idp, policy_dir: Path) -> None:
    _use_issuer(policy_dir, f"jwks_url: {idp.base}/jwks")
    store = client.app[SERVICE_KEY].store
    assert await store.reload("test")
    assert (await client.post("/v2/models/digits/infer", json=DIGITS,
                              headers=bearer(idp.token("rs-1")))).status == 200
    gateway_yaml = policy_dir / "gateway.yaml"
    gateway_yaml.write_text(gateway_yaml.read_text() + "\n# an unrelated edit\n")
    assert await store.reload("test")
    assert (await client.post("/v2/models/digits/infer", json=DIGITS,
                              headers=bearer(idp.token("rs-1", sub="u3")))).status == 200
    assert idp.hits["jwks"] == 1


@pytest.mark.parametrize(
    ("over", "status"),
    [
        ({"aud": "someone-else"}, 401),  # wrong audience
        ({"iss": "https://idp.test/realms/other"}, 401),  # wrong issuer
        ({"exp": int(time.time()) - 3600}, 401),  # expired
        ({"tenant": "globex"}, 200),  # another tenant, own models
    ],
)
async def test_claims(client: Client, idp: Idp, policy_dir: Path, over: dict[str, Any], status: int) -> None:
    _use_issuer(policy_dir, f"jwks_url: {idp.base}/jwks")
    assert await client.app[SERVICE_KEY].store.reload("test")
    resp = await client.post("/v2/models/digits/infer", json=DIGITS, headers=bearer(idp.token("rs-1", **over)))
    assert resp.status == status, await resp.text()
