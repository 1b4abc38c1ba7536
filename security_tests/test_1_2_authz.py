"""CATALOGUE §1.2 Authorization and feature-flag access: tenants, paths, admin APIs, policy files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from security_tests.conftest import Tokens
from security_tests.support.jwtforge import SVC_ISSUER
from security_tests.support.world import PUB_BODY, Client, World

DENIED = (403, 404)


async def test_authz_01_cross_tenant_model(gw: Client, world: World, tokens: Tokens) -> None:
    r = await gw.infer("beta_fraud", PUB_BODY, token=tokens.u1())
    unknown = await gw.infer("no_such_model", PUB_BODY, token=tokens.u1())
    assert r.status in DENIED and r.status == unknown.status and r.body == unknown.body
    assert world.upstream_calls() == 0
    assert world.audit_for(r)[0]["reason"].startswith("authz_")


@pytest.mark.parametrize("trick", ["X-Tenant-ID", "X-Tenant", "query", "parameters"])
async def test_authz_02_tenant_from_claims_only(gw: Client, world: World, tokens: Tokens, trick: str) -> None:
    body: dict[str, Any] = json.loads(json.dumps(PUB_BODY))
    headers: dict[str, str] = {}
    path = "/v2/models/beta_fraud/infer"
    if trick.startswith("X-"):
        headers[trick] = "beta"
    elif trick == "query":
        path += "?tenant=beta"
    else:
        body["parameters"] = {"tenant": "beta"}
    r = await gw.request("POST", path, json_body=body, token=tokens.u1(), headers=headers)
    assert r.status in (400, *DENIED)
    assert world.upstream_calls() == 0
    # The same trick on an allowed model is served as alpha (audit tenant from the claims).
    ok = await gw.request("POST", path.replace("beta_fraud", "pub_clf"), json_body=body, token=tokens.u1(),
                          headers=headers)
    if ok.status == 200:
        assert world.audit_for(ok)[0]["tenant"] == "alpha"


@pytest.mark.parametrize("path", [
    "/v2/models/pub_clf/../alpha_fraud/infer", "/v2/models/alpha_fraud%2Finfer", "/v2//models/alpha_fraud/infer",
    "/v2/models/ALPHA_FRAUD/infer", "/v2/models/alpha_fraud/infer/", "/v2/models/alpha_fraud;x=1/infer",
    "/v2/models/alpha_fraud%00/infer", "/v2/models/pub_clf/..%2falpha_fraud/infer",
    "/v2/models/%61lpha_fraud/infer",
])
async def test_authz_03_path_normalisation(gw: Client, world: World, tokens: Tokens, path: str) -> None:
    body = json.dumps(PUB_BODY)
    raw = await gw.raw((f"POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {tokens.u2()}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                        f"{body}").encode())
    status = int(raw.split(b" ", 2)[1])
    assert status in (400, 403, 404)
    assert all(req.model_name != "alpha_fraud" for req in world.fake.requests)


@pytest.mark.parametrize("path", ["/v2/models/alpha_fraud/versions/2/infer",
                                  "/v2/models/alpha_fraud/versions/1/../2/infer",
                                  "/v2/models/alpha_fraud/versions/01/infer",
                                  "/v2/models/alpha_fraud/versions/-1/infer"])
async def test_authz_04_version_scoped_grant(gw: Client, world: World, tokens: Tokens, path: str) -> None:
    r = await gw.request("POST", path, json_body=PUB_BODY, token=tokens.u1())
    assert r.status in (400, 403, 404)
    assert world.upstream_calls() == 0
    # Positive control: the granted version is served.
    ok = await gw.request("POST", "/v2/models/alpha_fraud/versions/1/infer", json_body=PUB_BODY, token=tokens.u1())
    assert ok.status == 200


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v2/repository/index"), ("POST", "/v2/repository/models/pub_clf/load"),
    ("POST", "/v2/repository/models/pub_clf/unload"), ("POST", "/v2/systemsharedmemory/region/r/register"),
    ("POST", "/v2/cudasharedmemory/region/r/register"), ("POST", "/v2/logging"), ("POST", "/v2/trace/setting"),
    ("GET", "/v2/models/pub_clf/config"), ("GET", "/v2/models/stats"), ("GET", "/v2/models/pub_clf/stats"),
])
async def test_authz_05_triton_admin_endpoints(gw: Client, world: World, tokens: Tokens, method: str,
                                               path: str) -> None:
    r = await gw.request(method, path, json_body={}, token=tokens.u1())
    assert r.status in (403, 404, 405)
    assert world.upstream_calls() == 0
    assert {c.rpc for c in world.fake.calls} <= {"ModelMetadata", "ModelReady", "ServerReady", "ServerLive"}


async def test_authz_06_admin_model_load_blocked(gw: Client, world: World, tokens: Tokens) -> None:
    body = {"parameters": {"config": '{"backend":"python"}', "file:1/model.py": "aW1wb3J0IG9zOyBvcy5zeXN0ZW0oImlkIik="}}
    r = await gw.request("POST", "/v2/repository/models/x/load", json_body=body, token=tokens.ops())
    assert r.status in (403, 404)
    assert world.upstream_calls() == 0 and not world.fake.calls


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "override", "lower"])
async def test_authz_07_methods_on_infer(gw: Client, world: World, tokens: Tokens, method: str) -> None:
    if method == "lower":
        body = json.dumps(PUB_BODY)
        raw = await gw.raw((f"post /v2/models/pub_clf/infer HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
                            f"{tokens.u1()}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                            f"{body}").encode())
        assert int(raw.split(b" ", 2)[1]) in (400, 405)
    elif method == "override":
        r = await gw.request("POST", "/v2/models/beta_fraud/infer", json_body=PUB_BODY, token=tokens.u1(),
                             headers={"X-HTTP-Method-Override": "DELETE"})
        assert r.status in DENIED  # same outcome as a plain POST
    else:
        r = await gw.request(method, "/v2/models/pub_clf/infer", token=tokens.u1())
        assert r.status == 405
    assert world.upstream_calls() == 0


@pytest.mark.parametrize("shape", ["string", "nested", "svc_admin", "other_claim"])
async def test_authz_08_roles_claim_shapes(gw: Client, world: World, tokens: Tokens, shape: str) -> None:
    f = world.tokens
    if shape == "string":
        token = f.rs(sub=tokens.sub("u1"), roles="admin,predictor")
    elif shape == "nested":
        token = f.rs(sub=tokens.sub("u1"), roles=[["admin"]])
    elif shape == "svc_admin":
        token = f.svc(sub=tokens.sub("svc"), iss=SVC_ISSUER, roles=["admin"])
    else:
        claims = f.claims(sub=tokens.sub("u1"), roles=())
        claims["https://x/roles"] = ["admin"]
        token = f.rs(claims)
    # None of these shapes yields a role, so not even pub_clf is reachable (escalation would be 200).
    r = await gw.infer("pub_clf", PUB_BODY, token=token)
    assert r.status in (401, 403, 404)
    assert world.upstream_calls() == 0


async def test_authz_09_scope(gw: Client, world: World, tokens: Tokens) -> None:
    r = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1(scope="models:read"))
    assert r.status == 403 and world.upstream_calls() == 0


async def test_authz_11_shared_memory_params(gw: Client, world: World, tokens: Tokens) -> None:
    for where in ("input", "output"):
        body: dict[str, Any] = json.loads(json.dumps(PUB_BODY))
        shm = {"shared_memory_region": "beta_region", "shared_memory_byte_size": 16}
        if where == "input":
            body["inputs"][0]["parameters"] = shm
        else:
            body["outputs"] = [{"name": "probs", "parameters": shm}]
        r = await gw.infer("pub_clf", body, token=tokens.u1())
        assert r.status == 400
    assert world.upstream_calls() == 0


@pytest.mark.parametrize("param", [("sequence_id", 42), ("sequence_start", True), ("sequence_end", True),
                                   ("priority", 1), ("timeout", 1), ("headers", {"x": "y"}),
                                   ("triton_enable_empty_final_response", True)])
async def test_authz_12_reserved_parameters(gw: Client, world: World, tokens: Tokens, param: tuple[str, Any]) -> None:
    body: dict[str, Any] = json.loads(json.dumps(PUB_BODY))
    body["parameters"] = {param[0]: param[1]}
    r = await gw.infer("pub_clf", body, token=tokens.u1())
    assert r.status in (200, 400)
    for req in world.fake.requests:  # stripped if forwarded (also checked by I4)
        assert param[0] not in req.parameters


def _edit(world: World, name: str, text: str) -> str:
    assert world.settings is not None
    path = world.settings.policies / name
    old = path.read_text()
    path.write_text(text)
    return old


@pytest.mark.parametrize("broken", [
    "tenants: [unclosed\n",  # AUTHZ-13 syntax error
    "\n".join(["a: &a [\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\"]"]
              + [f"{c}: &{c} [{','.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]),
    "non_enumeration: true\nallow_all: true\ntenants: {}\nroles: {}\n",  # AUTHZ-15 unknown key
    "tenants:\n  alpha:\n    models: \"*\"\nroles: {}\n",
    "tenants: {}\ntenants: {}\nroles: {}\n",
    "tenants: !!python/object/apply:os.system [\"id\"]\nroles: {}\n",
    "non_enumeration: true\ntenants:\n  alpha:\n    models: [pub_clf]\nrolse: {}\n",
], ids=["13_syntax", "14_alias_bomb", "15_unknown_key", "15_string_models", "15_duplicate_key", "15_python_tag",
        "15_typo"])
async def test_authz_13_15_bad_policy_keeps_last_good(gw: Client, world: World, tokens: Tokens, broken: str) -> None:
    assert world.service is not None
    revision = world.service.store.current.policy.revision
    old = _edit(world, "access.yaml", broken)
    try:
        assert world.reload() is False
        assert world.service.store.last_error
        assert world.service.store.current.policy.revision == revision
        r = await gw.infer("beta_fraud", PUB_BODY, token=tokens.u1())  # still denied
        assert r.status in DENIED
        assert (await gw.infer("pub_clf", PUB_BODY, token=tokens.u1())).status == 200
    finally:
        _edit(world, "access.yaml", old)
        world.reload()
    assert world.service.store.current.policy.revision == revision


@pytest.mark.parametrize("variant", ["absent_model", "empty_file", "no_tenants"])
async def test_authz_16_default_deny(gw: Client, world: World, tokens: Tokens, tmp_path: Path, variant: str) -> None:
    from gateway.observability.metrics import Metrics
    from gateway.policy.compile import CompileEnv, compile_pipeline
    from gateway.policy.loader import load_policy_dir

    assert world.settings is not None
    target = tmp_path / "p"
    shutil.copytree(world.settings.policies, target)
    (target / "identity.yaml").write_text("issuers: []\n")  # JWKS issuers need a running gateway
    if variant == "empty_file":
        (target / "access.yaml").write_text("")
    elif variant == "no_tenants":
        (target / "access.yaml").write_text("tenants: {}\nroles: {}\n")
    if variant == "absent_model":
        # A model the upstream serves but no policy names: answered like an unknown model.
        r = await gw.infer("undeclared", PUB_BODY, token=tokens.ops())
        assert r.status == 404 and world.upstream_calls() == 0
        return
    policy = load_policy_dir(target)
    pipeline = compile_pipeline(policy, Metrics(), CompileEnv(repo_dir=world.settings.profiles))
    from gateway.stages.authz import RoleAuthorizer

    authz = next(b.stage for b in pipeline.stages if isinstance(b.stage, RoleAuthorizer))
    assert dict(authz.grants) == {}


@pytest.mark.parametrize("trick", ["header", "query", "cookie", "direct_name"])
async def test_authz_17_canary_forcing(gw: Client, world: World, tokens: Tokens, trick: str) -> None:
    headers: dict[str, str] = {}
    path = "/v2/models/pub_clf/infer"
    if trick == "header":
        headers["X-Canary"] = "true"
    elif trick == "query":
        path += "?variant=canary"
    elif trick == "cookie":
        headers["Cookie"] = "variant=canary"
    else:
        path = "/v2/models/pub_clf_canary/infer"
    r = await gw.request("POST", path, json_body=PUB_BODY, token=tokens.u1(), headers=headers)
    if trick == "direct_name":
        assert r.status in DENIED
        assert world.upstream_calls() == 0
    else:
        assert r.status == 200
        assert [req.model_version for req in world.fake.requests] == ["1"]  # stable
