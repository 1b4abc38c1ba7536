"""Identity and access end to end: RBAC per tenant, non-enumeration, API keys, HS and JWKS
issuers, and nothing refused (or identifying) ever reaching the upstream.

The upstream here is the scriptable fake Triton behind the real Triton-gRPC upstream, so
every call that reaches it is counted and its metadata recorded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp.test_utils import BaseTestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.app import SERVICE_KEY, build_app, build_service
from gateway.settings import Settings
from gateway.stages.authn import api_key_hash
from gateway.upstream.model_repo import load_repository
from gateway.upstream.triton_grpc import TritonGrpcUpstream
from tests.support.fake_triton import FakeTriton

from .conftest import DIGITS_BODY as DIGITS
from .conftest import TRITON_REPO, Client, GatewayTestServer
from .test_authn import forge
from .test_http_front import audit_records

RISK = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [1.0] * 30}]}


@pytest.fixture
async def fake() -> AsyncIterator[FakeTriton]:
    repo = load_repository(TRITON_REPO)
    async with FakeTriton([m.metadata for m in repo.models]) as server:
        yield server


@pytest.fixture
async def gw(settings: Settings, fake: FakeTriton,
             aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    service = build_service(settings, upstream=TritonGrpcUpstream(fake.url))
    server: BaseTestServer = GatewayTestServer(build_app(settings, service=service))
    return await aiohttp_client(server)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upstream_calls(fake: FakeTriton, model: str) -> int:
    return sum(1 for c in fake.calls if c.model == model)


class TestRbac:
    async def test_globex_analyst_cannot_see_risk_and_nothing_reaches_upstream(
        self, gw: Client, fake: FakeTriton, token: Callable[..., str]
    ) -> None:
        headers = bearer(token(tenant="globex", roles=("analyst",)))
        infer = await gw.post("/v2/models/risk/infer", json=RISK, headers=headers)
        meta = await gw.get("/v2/models/risk", headers=headers)
        ready = await gw.get("/v2/models/risk/ready", headers=headers)
        unknown = await gw.get("/v2/models/ghost", headers=headers)
        # non-enumeration: the same answer as a model that does not exist
        for resp in (infer, meta, ready):
            assert resp.status == unknown.status == 404
            assert await resp.json() == await unknown.json()
        assert upstream_calls(fake, "risk") == 0
        # globex still uses its own models
        assert (await gw.post("/v2/models/digits/infer", json=DIGITS, headers=headers)).status == 200

    async def test_viewer_reads_metadata_but_cannot_infer(
        self, gw: Client, fake: FakeTriton, token: Callable[..., str]
    ) -> None:
        headers = bearer(token(tenant="acme", roles=("viewer",)))
        assert (await gw.get("/v2/models/digits", headers=headers)).status == 200
        before = fake.counts["ModelInfer"]
        refused = await gw.post("/v2/models/digits/infer", json=DIGITS, headers=headers)
        assert refused.status == 403
        assert (await refused.json())["error"].startswith("forbidden")
        assert fake.counts["ModelInfer"] == before

    @pytest.mark.parametrize(
        ("tenant", "roles", "path", "body", "status"),
        [
            ("acme", ("analyst",), "/v2/models/risk/infer", RISK, 200),  # risk is acme's
            ("acme", ("admin",), "/v2/models/risk/infer", RISK, 200),  # admin: everything in its tenant
            ("globex", ("admin",), "/v2/models/risk/infer", RISK, 404),  # ...but only in its tenant
            ("acme", ("auditor",), "/v2/models/digits/infer", DIGITS, 404),  # no model grant at all
            ("acme", (), "/v2/models/digits/infer", DIGITS, 404),  # no roles: deny by default
            ("acme", ("root",), "/v2/models/digits/infer", DIGITS, 404),  # a role the policy does not know
            ("initech", ("admin",), "/v2/models/digits/infer", DIGITS, 403),  # unknown tenant
            ("initech", ("admin",), "/v2", None, 403),
            ("acme", ("viewer", "analyst"), "/v2/models/digits/infer", DIGITS, 200),  # roles add up
            ("acme", ("analyst",), "/v2/models/digits/versions/1/infer", DIGITS, 200),
        ],
    )
    async def test_decisions(self, gw: Client, token: Callable[..., str], tenant: str, roles: tuple[str, ...],
                             path: str, body: dict[str, Any] | None, status: int) -> None:
        headers = bearer(token(tenant=tenant, roles=roles))
        resp = await (gw.post(path, json=body, headers=headers) if body else gw.get(path, headers=headers))
        assert resp.status == status, await resp.text()

    async def test_without_non_enumeration_forbidden_is_403(
        self, gw: Client, policy_dir: Path, token: Callable[..., str]
    ) -> None:
        path = policy_dir / "access.yaml"
        path.write_text(path.read_text().replace("non_enumeration: true", "non_enumeration: false"))
        assert await gw.app[SERVICE_KEY].store.reload("test")
        resp = await gw.post("/v2/models/risk/infer", json=RISK, headers=bearer(token(tenant="globex")))
        assert resp.status == 403

    async def test_version_scoped_grant(self, gw: Client, policy_dir: Path, token: Callable[..., str]) -> None:
        path = policy_dir / "access.yaml"
        grant = "      models: [digits, text_echo, risk]\n"
        path.write_text(path.read_text().replace(grant, grant + "      versions: ['2']\n"))
        assert await gw.app[SERVICE_KEY].store.reload("test")
        headers = bearer(token())
        text = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]}
        # text_echo has no routing flag: the request's own version is what is authorized
        assert (await gw.post("/v2/models/text_echo/versions/1/infer", json=text, headers=headers)).status == 403
        # no explicit version: never the server's default (text_echo's only version, 1, is not
        # granted); the gateway pins the newest granted version the server has: none here
        assert (await gw.post("/v2/models/text_echo/infer", json=text, headers=headers)).status == 404
        # digits and risk are routed by their flags to version 1, which this grant does not cover
        assert (await gw.post("/v2/models/digits/infer", json=DIGITS, headers=headers)).status == 403
        assert (await gw.post("/v2/models/risk/infer", json=RISK, headers=headers)).status == 403

    async def test_decisions_are_audited_and_counted(self, gw: Client, token: Callable[..., str],
                                                     settings: Settings) -> None:
        await gw.post("/v2/models/digits/infer", json=DIGITS, headers=bearer(token(roles=("viewer",))))
        await gw.post("/v2/models/digits/infer", json=DIGITS, headers=bearer(token()))
        deny, allow = audit_records(settings)[-2:]
        assert (deny["decision"], deny["reason"]) == ("deny", "authz_denied")
        assert {"stage": "authz", "outcome": "denied"}.items() <= deny["stages"][-1].items()
        assert (allow["decision"], allow["reason"]) == ("allow", "ok")
        metrics = await (await gw.get("/metrics")).text()
        assert 'gateway_stage_decisions_total{outcome="denied",stage="authz"} 1.0' in metrics
        assert 'gateway_stage_decisions_total{outcome="allowed",stage="authz"}' in metrics


class TestUpstreamNeverSeesClientIdentity:
    async def test_identity_and_hop_headers_are_not_forwarded(
        self, gw: Client, fake: FakeTriton, auth: dict[str, str]
    ) -> None:
        headers = {**auth, "X-Forwarded-For": "1.2.3.4", "X-User": "admin", "X-Tenant-ID": "globex",
                   "X-Real-IP": "1.2.3.4", "Forwarded": "for=1.2.3.4", "X-User-Roles": "admin"}
        assert (await gw.post("/v2/models/digits/infer", json=DIGITS, headers=headers)).status == 200
        call = next(c for c in reversed(fake.calls) if c.rpc == "ModelInfer")
        sent = {key.lower() for key, _ in call.metadata}
        assert not sent & {"authorization", "x-forwarded-for", "x-user", "x-tenant-id", "x-real-ip",
                           "forwarded", "x-user-roles"}
        token = auth["Authorization"].split()[1]
        assert all(token not in str(value) for _, value in call.metadata)


def write_identity(policy_dir: Path, text: str) -> None:
    (policy_dir / "identity.yaml").write_text(text)


class TestApiKeys:
    async def test_api_key_authenticates_and_is_revocable(
        self, gw: Client, fake: FakeTriton, policy_dir: Path
    ) -> None:
        key = "igk_" + secrets.token_urlsafe(32)
        write_identity(policy_dir, f"api_keys:\n  - id: ci-bot\n    sha256: {api_key_hash(key)}\n"
                                   "    tenant: acme\n    roles: [analyst]\n")
        assert await gw.app[SERVICE_KEY].store.reload("test")
        assert (await gw.post("/v2/models/risk/infer", json=RISK, headers=bearer(key))).status == 200
        assert (await gw.post("/v2/models/risk/infer", json=RISK,
                              headers=bearer(key[:-1] + ("A" if key[-1] != "A" else "B")))).status == 401
        write_identity(policy_dir, "api_keys: []\n")  # revoke
        assert await gw.app[SERVICE_KEY].store.reload("test")
        assert (await gw.post("/v2/models/risk/infer", json=RISK, headers=bearer(key))).status == 401

    def test_policy_never_holds_the_key(self, policy_dir: Path) -> None:
        text = (policy_dir / "identity.yaml").read_text()
        assert "igk_" not in text.replace("igk_` prefix", "")


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": "svc", "aud": "infergate", "sub": "svc-1", "tenant": "acme", "roles": ["analyst"],
              "iat": now, "exp": now + 300}
    claims.update(over)
    return claims


class TestIssuers:
    async def test_hs256_issuer_with_secret_from_env(
        self, gw: Client, policy_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        secret = secrets.token_bytes(32).hex()
        monkeypatch.setenv("TEST_SVC_SECRET", secret)
        write_identity(policy_dir, "issuers:\n  - issuer: svc\n    audiences: [infergate]\n    algorithms: [HS256]\n"
                                   "    keys: {hs_secret_env: TEST_SVC_SECRET}\n")
        assert await gw.app[SERVICE_KEY].store.reload("test")
        good = jwt.encode(_claims(), secret, algorithm="HS256")
        assert (await gw.post("/v2/models/digits/infer", json=DIGITS, headers=bearer(good))).status == 200
        wrong = jwt.encode(_claims(), secrets.token_hex(32), algorithm="HS256")
        assert (await gw.post("/v2/models/digits/infer", json=DIGITS, headers=bearer(wrong))).status == 401
        # HS384 is not in this issuer's algorithms, even with the right secret
        other_alg = jwt.encode(_claims(), secret, algorithm="HS384")
        assert (await gw.post("/v2/models/digits/infer", json=DIGITS, headers=bearer(other_alg))).status == 401

    async def test_short_hs_secret_is_refused_by_policy(
        self, gw: Client, policy_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("TEST_SVC_SECRET", "too-short")
        write_identity(policy_dir, "issuers:\n  - issuer: svc\n    audiences: [infergate]\n    algorithms: [HS256]\n"
                                   "    keys: {hs_secret_env: TEST_SVC_SECRET}\n")
        store = gw.app[SERVICE_KEY].store
        assert not await store.reload("test")
        assert store.last_error is not None
        assert "at least 32 bytes" in store.last_error
        assert "too-short" not in store.last_error

    async def test_static_jwks_issuer_selects_key_by_kid(self, gw: Client, policy_dir: Path) -> None:
        k1, k2 = rsa.generate_private_key(65537, 2048), rsa.generate_private_key(65537, 2048)
        jwks = [{**jwt.algorithms.RSAAlgorithm.to_jwk(k.public_key(), as_dict=True), "kid": kid}
                for k, kid in ((k1, "k1"), (k2, "k2"))]
        write_identity(policy_dir, "issuers:\n  - issuer: svc\n    audiences: [infergate]\n    algorithms: [RS256]\n"
                                   f"    keys:\n      jwks: {json.dumps({'keys': jwks})}\n")
        assert await gw.app[SERVICE_KEY].store.reload("test")
        for key, kid, status in ((k1, "k1", 200), (k2, "k2", 200), (k1, "k2", 401), (k2, "nope", 401)):
            tok = jwt.encode(_claims(), key, algorithm="RS256", headers={"kid": kid})
            resp = await gw.post("/v2/models/digits/infer", json=DIGITS, headers=bearer(tok))
            assert resp.status == status, (kid, await resp.text())
        # an EC key cannot sign for an RS256 issuer, whatever the token's header says
        ec_key = ec.generate_private_key(ec.SECP256R1())
        tok = jwt.encode(_claims(), ec_key, algorithm="ES256", headers={"kid": "k1"})
        assert (await gw.post("/v2/models/digits/infer", json=DIGITS, headers=bearer(tok))).status == 401
        # the public key used as an HMAC secret: key confusion
        pem = k1.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        forged = forge({"alg": "HS256", "kid": "k1"}, _claims(), lambda m: hmac.new(pem, m, hashlib.sha256).digest())
        assert (await gw.post("/v2/models/digits/infer", json=DIGITS, headers=bearer(forged))).status == 401


class TestTracePropagation:
    async def test_valid_trace_context_continues_upstream(self, gw: Client, fake: FakeTriton,
                                                          auth: dict[str, str]) -> None:
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        incoming = f"00-{trace_id}-00f067aa0ba902b7-01"
        assert (await gw.post("/v2/models/digits/infer", json=DIGITS,
                              headers={**auth, "traceparent": incoming})).status == 200
        call = next(c for c in reversed(fake.calls) if c.rpc == "ModelInfer")
        sent = dict(call.metadata)["traceparent"]
        assert sent.startswith(f"00-{trace_id}-")
        assert sent != incoming  # a new span id: the gateway's own span

    @pytest.mark.parametrize("bad", ["garbage", "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
                                     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nX-Evil: 1"])
    async def test_invalid_trace_context_is_replaced(self, gw: Client, fake: FakeTriton, auth: dict[str, str],
                                                     bad: str) -> None:
        headers = {**auth, "traceparent": bad} if "\r" not in bad else auth
        assert (await gw.post("/v2/models/digits/infer", json=DIGITS, headers=headers)).status == 200
        sent = dict(next(c for c in reversed(fake.calls) if c.rpc == "ModelInfer").metadata)["traceparent"]
        assert sent != bad
        assert len(sent) == 55
