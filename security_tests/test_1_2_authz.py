"""CATALOGUE §1.2 Authorization and feature-flag access: tenants, paths, admin APIs, policy files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from security_tests.conftest import Tokens
from security_tests.support.jwtforge import SVC_ISSUER
from security_tests.support.world import PUB_BODY, WORLD_DIR, Client, Response, World
from tests.support.fake_triton import ok

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


@pytest.mark.parametrize("query", ["tenant=alpha&tenant=beta", "tenant=beta&tenant=alpha"])
async def test_authz_02_duplicate_tenant_query_parameter(gw: Client, world: World, tokens: Tokens,
                                                         query: str) -> None:
    """AUTHZ-02 variant (parameter pollution): two ``tenant`` parameters on the budget route
    are a 400, not "first wins" here and "last wins" in whatever reads the URL next."""
    for token in (tokens.u1(), tokens.ops()):
        r = await gw.request("GET", f"/v2/privacy/budget?{query}", token=token)
        assert r.status == 400
        assert world.audit_for(r)[0]["reason"] == "query_duplicate"
    assert (await gw.request("GET", "/v2/privacy/budget?tenant=alpha", token=tokens.u1())).status == 200


@pytest.mark.parametrize("who", ["u1", "ops"])
async def test_authz_04_unversioned_call_is_pinned(gw: Client, world: World, tokens: Tokens, who: str) -> None:
    """AUTHZ-04 variant: leave the version out. Triton would serve its default (the newest,
    v2, neither granted to u1 nor exposed); the gateway names v1 itself, for the v1-only
    grant (u1) and for the v1-only exposure (ops, whose grant covers every version)."""
    token = tokens.u1() if who == "u1" else tokens.ops()
    r = await gw.request("POST", "/v2/models/alpha_fraud/infer", json_body=PUB_BODY, token=token)
    assert r.status == 200
    assert [(q.model_name, q.model_version) for q in world.fake.requests] == [("alpha_fraud", "1")]
    assert world.audit_for(r)[0]["model_version"] == "1"
    meta = await gw.request("GET", "/v2/models/alpha_fraud", token=token)
    assert meta.status == 200 and meta.json()["versions"] == ["1"]  # v2 is not even listed
    assert (await gw.request("GET", "/v2/models/alpha_fraud/ready", token=token)).json() == {"ready": True}


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
    # RFC 6750 §3/§3.1: a token that does not enable access is answered with the challenge
    # naming the missing scope, so the client asks its IdP instead of retrying the token.
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="infergate", error="insufficient_scope", scope="models:infer"'


async def test_authz_09_scope_grpc(world: World, tokens: Tokens, grpc_port: int) -> None:
    """AUTHZ-09 on the gRPC front: PERMISSION_DENIED with the same challenge in the trailers."""
    request = _grpc_request("pub_clf")
    async with _from_own_address(world, grpc_port) as relay, grpc.aio.insecure_channel(f"127.0.0.1:{relay}") as ch:
        call = service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
            request, metadata=(("authorization", f"Bearer {tokens.u1(scope='models:read')}"),), timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        trailers = dict(await call.trailing_metadata() or ())
    world.ledger.responses.append(("GRPC", "/v2/models/pub_clf/infer",
                                   Response(403, {"X-Request-ID": str(trailers.get("x-request-id", ""))}, b"")))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert trailers["www-authenticate"] == 'Bearer realm="infergate", error="insufficient_scope", scope="models:infer"'
    assert world.upstream_calls() == 0


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


# ---------------------------------------------------------------------------------------
# AUTHZ-10 (BOPLA): role `labeler` may receive only `label` of `scorer`, on every front.
# ---------------------------------------------------------------------------------------

# Distinctive values, so a withheld output would be recognisable in any encoding.
LOGITS, EMBEDDING = 7.25, 9.5
WITHHELD = ("logits", "embedding")
WITHHELD_BYTES = (np.float32(LOGITS).tobytes(), np.float32(EMBEDDING).tobytes())
X = [0.1, 0.2, 0.3, 0.4]


def _scorer_values(inputs: Mapping[str, Any]) -> dict[str, Any]:
    return {"label": np.full((1, 1), 2, dtype=np.int32), "logits": np.full((1, 3), LOGITS, dtype=np.float32),
            "embedding": np.full((1, 8), EMBEDDING, dtype=np.float32)}


def _scorer_body(*outputs: str, binary: bool | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": X}]}
    if outputs:
        body["outputs"] = [{"name": n} if binary is None else {"name": n, "parameters": {"binary_data": binary}}
                           for n in outputs]
    return body


def _binary_request(body: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """The same request in Triton's binary-tensor form: the input's bytes after the JSON header."""
    doc = json.loads(json.dumps(body))
    doc["inputs"][0].pop("data")
    doc["inputs"][0]["parameters"] = {"binary_data_size": 16}
    header = json.dumps(doc).encode()
    return header + np.asarray(X, dtype="<f4").tobytes(), {
        "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}


def _assert_only_label(r: Response) -> None:
    """Field by field: the answer names `label` only and carries no byte of a withheld output."""
    assert r.status == 200, r.body[:300]
    hlen = r.headers.get("Inference-Header-Content-Length")
    header = r.body[:int(hlen)] if hlen else r.body
    doc = json.loads(header)
    assert set(doc) <= {"model_name", "model_version", "id", "outputs", "parameters"}
    assert [o["name"] for o in doc["outputs"]] == ["label"]
    (label,) = doc["outputs"]
    assert label["datatype"] == "INT32" and label["shape"] == [1, 1]
    if hlen:
        assert label["parameters"] == {"binary_data_size": 4}
        assert len(r.body) == int(hlen) + 4 and np.frombuffer(r.body[int(hlen):], "<i4").tolist() == [2]
    else:
        assert label["data"] == [2]
    for name in WITHHELD:
        assert name.encode() not in r.body
    for value in (*WITHHELD_BYTES, b"7.25", b"9.5"):
        assert value not in r.body


def _assert_refused(world: World, r: Response, *names: str) -> None:
    assert r.status == 403, r.body[:300]
    message = r.json()["error"]
    assert all(f"'{n}'" in message for n in names) and "allowed: 'label'" in message
    assert world.upstream_calls() == 0
    (record,) = world.audit_for(r)
    assert record["decision"] == "deny" and record["reason"] == "authz_output_denied"


async def test_authz_10_named_withheld_outputs_json(gw: Client, world: World, tokens: Tokens) -> None:
    world.fake.set(ok(_scorer_values), model="scorer")
    token = tokens.u1(roles=("labeler",))
    r = await gw.infer("scorer", _scorer_body("logits", "embedding"), token=token)
    _assert_refused(world, r, "logits", "embedding")
    r = await gw.infer("scorer", _scorer_body("label", "embedding"), token=token)  # one withheld among allowed
    _assert_refused(world, r, "embedding")
    _assert_only_label(await gw.infer("scorer", _scorer_body("label"), token=token))


async def test_authz_10_unnamed_outputs_only_label_json(gw: Client, world: World, tokens: Tokens) -> None:
    world.fake.set(ok(_scorer_values), model="scorer")
    r = await gw.infer("scorer", _scorer_body(), token=tokens.u1(roles=("labeler",)))
    _assert_only_label(r)
    # The upstream was asked for the label only: it never computed the withheld outputs.
    assert [[o.name for o in req.outputs] for req in world.fake.requests] == [["label"]]
    assert world.audit_for(r)[0]["decision"] == "allow"


@pytest.mark.parametrize("outputs", [(), ("label",)], ids=["unnamed", "named_label"])
async def test_authz_10_binary_tensor_form(gw: Client, world: World, tokens: Tokens,
                                           outputs: tuple[str, ...]) -> None:
    world.fake.set(ok(_scorer_values), model="scorer")
    token = tokens.u1(roles=("labeler",))
    body = _scorer_body(*outputs, binary=True if outputs else None)
    body["parameters"] = {"binary_data_output": True}
    data, headers = _binary_request(body)
    r = await gw.request("POST", "/v2/models/scorer/infer", data=data, headers=headers, token=token)
    _assert_only_label(r)
    refused_body = _scorer_body("logits", "embedding", binary=True)
    data, headers = _binary_request(refused_body)
    before = world.upstream_calls()
    r = await gw.request("POST", "/v2/models/scorer/infer", data=data, headers=headers, token=token)
    assert r.status == 403 and world.upstream_calls() == before
    assert world.audit_for(r)[0]["reason"] == "authz_output_denied"


async def test_authz_10_admin_positive_control(gw: Client, world: World, tokens: Tokens) -> None:
    """Without the restriction every output is served: the labeler's answer is the grant's doing."""
    world.fake.set(ok(_scorer_values), model="scorer")
    r = await gw.infer("scorer", _scorer_body(), token=tokens.ops())
    assert r.status == 200
    assert [o["name"] for o in r.json()["outputs"]] == ["label", "logits", "embedding"]


async def test_authz_10_metadata_lists_only_released_outputs(gw: Client, world: World, tokens: Tokens) -> None:
    """Model metadata does not disclose withheld outputs (names, shapes) to the restricted role."""
    r = await gw.request("GET", "/v2/models/scorer", token=tokens.u1(roles=("labeler",)))
    assert r.status == 200
    assert [o["name"] for o in r.json()["outputs"]] == ["label"]
    assert b"logits" not in r.body and b"embedding" not in r.body
    r = await gw.request("GET", "/v2/models/scorer", token=tokens.ops())
    assert r.status == 200
    assert [o["name"] for o in r.json()["outputs"]] == ["label", "logits", "embedding"]


async def test_authz_10_protection_off_leaks(gw: Client, world: World, tokens: Tokens) -> None:
    """The case detects a missing protection: without `outputs:` the labeler gets logits."""
    world.fake.set(ok(_scorer_values), model="scorer")
    old = _edit(world, "access.yaml", (WORLD_DIR / "policies" / "access.yaml").read_text()
                .replace("      outputs: [label]\n", ""))
    try:
        assert world.reload() is True
        r = await gw.infer("scorer", _scorer_body("logits"), token=tokens.u1(roles=("labeler",)))
        assert r.status == 200 and b"logits" in r.body
    finally:
        _edit(world, "access.yaml", old)
        world.reload()
    r = await gw.infer("scorer", _scorer_body("logits"), token=tokens.u1(roles=("labeler",)))
    assert r.status == 403


# ---------------------------------------------------------------------------------------
# The gRPC front, started on the world's gateway service for this module's cases.
# ---------------------------------------------------------------------------------------



@dataclass
class GrpcAnswer:
    code: grpc.StatusCode
    details: str
    response: Any


@contextlib.asynccontextmanager
async def _from_own_address(world: World, port: int) -> AsyncIterator[int]:
    """A loopback relay whose upstream leg leaves from a fresh 127.x.y.z address: gRPC clients
    cannot pick their source address, and every case from 127.0.0.1 would share the per-address
    pre-auth bucket (20/s) that the HTTP cases keep apart with their own addresses."""
    addr = world.next_addr()
    tasks: list[asyncio.Task[None]] = []
    writers: list[asyncio.StreamWriter] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(addr, 0))
        writers.append(up_writer)
        tasks.extend((asyncio.create_task(pipe(reader, up_writer)), asyncio.create_task(pipe(up_reader, writer))))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in writers:
            writer.transport.abort()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await server.wait_closed()


async def _grpc_infer(world: World, port: int, request: Any, token: str) -> GrpcAnswer:
    """One ModelInfer on the gRPC front; recorded in the case ledger for the invariants (I1-I3)."""
    async with _from_own_address(world, port) as relay, grpc.aio.insecure_channel(f"127.0.0.1:{relay}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelInfer(request, metadata=(("authorization", f"Bearer {token}"),), timeout=30)
        try:
            response = await call
            code, details = grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as exc:
            response, code, details = None, exc.code(), exc.details() or ""
        trailers = await call.trailing_metadata()
    rid = next((str(v) for k, v in (trailers or ()) if k == "x-request-id"), "")
    status = {grpc.StatusCode.OK: 200, grpc.StatusCode.PERMISSION_DENIED: 403,
              grpc.StatusCode.INVALID_ARGUMENT: 400}.get(code, 599)
    body = (response.SerializeToString() if response is not None else b"") + details.encode()
    world.ledger.responses.append(("GRPC", f"/v2/models/{request.model_name}/infer",
                                   Response(status, {"X-Request-ID": rid}, body)))
    return GrpcAnswer(code, details, response)


def _grpc_request(model: str = "scorer", outputs: tuple[str, ...] = ()) -> Any:
    contents = service_pb2.InferTensorContents(fp32_contents=X)
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4],
                                                            contents=contents)
    request = service_pb2.ModelInferRequest(model_name=model, inputs=[tensor])
    for name in outputs:
        request.outputs.add(name=name)
    return request


async def test_authz_10_grpc_front(world: World, tokens: Tokens, grpc_port: int) -> None:
    world.fake.set(ok(_scorer_values), model="scorer")
    token = tokens.u1(roles=("labeler",))
    refused = await _grpc_infer(world, grpc_port, _grpc_request(outputs=("logits", "embedding")), token)
    assert refused.code == grpc.StatusCode.PERMISSION_DENIED and "'logits'" in refused.details
    assert world.upstream_calls() == 0
    answer = await _grpc_infer(world, grpc_port, _grpc_request(), token)
    assert answer.code == grpc.StatusCode.OK
    assert [o.name for o in answer.response.outputs] == ["label"]
    assert len(answer.response.raw_output_contents) == 1
    assert np.frombuffer(answer.response.raw_output_contents[0], "<i4").tolist() == [2]
    wire = answer.response.SerializeToString()
    assert not any(v in wire for v in (*WITHHELD_BYTES, b"logits", b"embedding"))
    assert [[o.name for o in req.outputs] for req in world.fake.requests] == [["label"]]


async def test_authz_10_grpc_metadata_lists_only_released_outputs(world: World, tokens: Tokens,
                                                                   grpc_port: int) -> None:
    async def outputs(token: str) -> list[str]:
        async with _from_own_address(world, grpc_port) as relay, \
                grpc.aio.insecure_channel(f"127.0.0.1:{relay}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            call = stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="scorer"),
                                      metadata=(("authorization", f"Bearer {token}"),), timeout=30)
            meta = await call
            trailers = await call.trailing_metadata()
        rid = next((str(v) for k, v in (trailers or ()) if k == "x-request-id"), "")
        world.ledger.responses.append(("GRPC", "/v2/models/scorer", Response(200, {"X-Request-ID": rid},
                                                                             meta.SerializeToString())))
        return [o.name for o in meta.outputs]

    assert await outputs(tokens.u1(roles=("labeler",))) == ["label"]
    assert await outputs(tokens.ops()) == ["label", "logits", "embedding"]


# ---------------------------------------------------------------------------------------
# AUTHZ-12: reserved Triton parameters, every level, both fronts; refused, never forwarded.
# ---------------------------------------------------------------------------------------

RESERVED: list[tuple[str, Any]] = [("sequence_id", 42), ("sequence_start", True), ("sequence_end", True),
                                   ("priority", 1), ("timeout", 1), ("headers", {"x": "y"}),
                                   ("triton_enable_empty_final_response", True)]
RESERVED_NAMES = frozenset(name for name, _ in RESERVED)


def _upstream_params(world: World) -> set[str]:
    """Every parameter name the fake upstream received, at any level, lower-cased."""
    names: set[str] = set()
    for req in world.fake.requests:
        names |= {k.lower() for k in req.parameters}
        names |= {k.lower() for t in req.inputs for k in t.parameters}
        names |= {k.lower() for t in req.outputs for k in t.parameters}
    return names


def _assert_refused_400(world: World, r: Response) -> None:
    assert r.status == 400, (r.status, r.body[:200])
    assert world.audit_for(r)[0]["decision"] == "deny"


@pytest.mark.parametrize("param", RESERVED, ids=[p[0] for p in RESERVED])
async def test_authz_12_reserved_parameters(gw: Client, world: World, tokens: Tokens, param: tuple[str, Any]) -> None:
    name, value = param
    token = tokens.u1()
    for where in ("request", "input", "output", "binary_header"):
        body: dict[str, Any] = json.loads(json.dumps(PUB_BODY))
        if where in ("request", "binary_header"):
            body["parameters"] = {name: value}
        elif where == "input":
            body["inputs"][0]["parameters"] = {name: value}
        else:
            body["outputs"] = [{"name": "probs", "parameters": {name: value}}]
        if where == "binary_header":
            data, headers = _binary_request(body)
            r = await gw.request("POST", "/v2/models/pub_clf/infer", data=data, headers=headers, token=token)
        else:
            r = await gw.infer("pub_clf", body, token=token)
        _assert_refused_400(world, r)
    assert world.upstream_calls() == 0 and not _upstream_params(world) & RESERVED_NAMES


@pytest.mark.parametrize("params", [
    {"Sequence_ID": 42}, {"SEQUENCE_ID": 42}, {"sequence_id ": 42}, {"sequence\u200bid": 42},
    {"ſequence_id": 42},  # long s: folds to "sequence_id" under case-insensitive matching
    {"binary_data_output": False, "sequence_id": 42},  # hidden behind an allowed one
    {"binary_data_output": {"sequence_id": 42}},  # nested in an allowed name
    {"x": {"sequence_id": 42, "priority": 1}},  # nested in an unknown name
    {"Priority": 1}, {"TIMEOUT": 1}, {"Headers": {"x": "y"}},
], ids=["Sequence_ID", "SEQUENCE_ID", "trailing_space", "zero_width", "long_s", "behind_allowed",
        "nested_allowed", "nested_unknown", "Priority", "TIMEOUT", "Headers"])
async def test_authz_12_reserved_parameter_variants(gw: Client, world: World, tokens: Tokens,
                                                    params: dict[str, Any]) -> None:
    body: dict[str, Any] = json.loads(json.dumps(PUB_BODY))
    body["parameters"] = params
    _assert_refused_400(world, await gw.infer("pub_clf", body, token=tokens.u1()))
    assert world.upstream_calls() == 0


async def test_authz_12_reserved_outside_parameters(gw: Client, world: World, tokens: Tokens) -> None:
    """Top-level keys, query strings and headers are no side door to the same parameters."""
    body: dict[str, Any] = json.loads(json.dumps(PUB_BODY))
    body["sequence_id"] = 42
    _assert_refused_400(world, await gw.infer("pub_clf", body, token=tokens.u1()))
    r = await gw.request("POST", "/v2/models/pub_clf/infer?sequence_id=42&priority=1", json_body=PUB_BODY,
                         token=tokens.u1(), headers={"sequence_id": "42", "priority": "1", "timeout": "1"})
    assert r.status in (200, 400)
    assert not _upstream_params(world) & RESERVED_NAMES
    forwarded = {key.lower() for call in world.fake.calls for key, _ in call.metadata}
    assert not forwarded & {"sequence_id", "priority", "timeout"}


async def test_authz_12_cannot_join_another_tenants_sequence(gw: Client, world: World, tokens: Tokens) -> None:
    """Sequences are refused outright: beta cannot open sequence 42, and alpha cannot join it."""
    start: dict[str, Any] = json.loads(json.dumps(PUB_BODY))
    start["parameters"] = {"sequence_id": 42, "sequence_start": True}
    _assert_refused_400(world, await gw.infer("pub_clf", start, token=tokens.u2()))
    join: dict[str, Any] = json.loads(json.dumps(PUB_BODY))
    join["parameters"] = {"sequence_id": 42}
    _assert_refused_400(world, await gw.infer("pub_clf", join, token=tokens.u1()))
    join["parameters"] = {"sequence_id": "42", "sequence_end": True}  # string ids (Triton accepts both)
    _assert_refused_400(world, await gw.infer("pub_clf", join, token=tokens.u1()))
    assert world.upstream_calls() == 0 and not _upstream_params(world)


def _grpc_param(target: Any, name: str, value: Any) -> None:
    slot = target[name]
    if isinstance(value, bool):
        slot.bool_param = value
    elif isinstance(value, int):
        slot.int64_param = value
    else:
        slot.string_param = json.dumps(value)  # gRPC parameters are scalars: headers travel as text


@pytest.mark.parametrize("param", RESERVED, ids=[p[0] for p in RESERVED])
async def test_authz_12_reserved_parameters_grpc(world: World, tokens: Tokens, grpc_port: int,
                                                 param: tuple[str, Any]) -> None:
    name, value = param
    token = tokens.u1()
    for where in ("request", "input", "output"):
        request = _grpc_request("pub_clf", ("probs",) if where == "output" else ())
        target = {"request": request.parameters, "input": request.inputs[0].parameters,
                  "output": request.outputs[0].parameters if where == "output" else None}[where]
        _grpc_param(target, name, value)
        answer = await _grpc_infer(world, grpc_port, request, token)
        assert answer.code == grpc.StatusCode.INVALID_ARGUMENT, (where, answer.code)
    assert world.upstream_calls() == 0 and not _upstream_params(world) & RESERVED_NAMES


async def test_authz_12_grpc_cross_tenant_sequence_and_variants(world: World, tokens: Tokens,
                                                                grpc_port: int) -> None:
    attempts: list[tuple[str, dict[str, Any]]] = [(tokens.u2(), {"sequence_id": 42, "sequence_start": True}),
                (tokens.u1(), {"sequence_id": 42}), (tokens.u1(), {"Sequence_ID": 42}),
                (tokens.u1(), {"SEQUENCE_ID": "42"})]
    for token, params in attempts:
        request = _grpc_request("pub_clf")
        for name, value in params.items():
            _grpc_param(request.parameters, name, value)
        answer = await _grpc_infer(world, grpc_port, request, token)
        assert answer.code == grpc.StatusCode.INVALID_ARGUMENT
    request = _grpc_request("pub_clf")
    request.parameters["sequence_id"].uint64_param = 42
    assert (await _grpc_infer(world, grpc_port, request, tokens.u1())).code == grpc.StatusCode.INVALID_ARGUMENT
    assert world.upstream_calls() == 0 and not _upstream_params(world)


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
    # A duplicate key in disguise: the merged `non_enumeration` silently loses to the explicit one.
    "non_enumeration: true\n<<: {non_enumeration: false}\ntenants: {}\nroles: {}\n",
], ids=["13_syntax", "14_alias_bomb", "15_unknown_key", "15_string_models", "15_duplicate_key", "15_python_tag",
        "15_typo", "15_merge_key"])
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


async def test_authz_17_metadata_lists_no_unassigned_canary_version(gw: Client, world: World, tokens: Tokens,
                                                                     grpc_port: int) -> None:
    """A subject outside the canary gets the unknown model's 404 for ``/versions/2`` of the
    flagged ``pub_clf``; its metadata (REST and gRPC) must not list version 2 either, or the
    version list announces the canary the call path hides (API9: inventory)."""
    token = tokens.u1()
    meta = await gw.request("GET", "/v2/models/pub_clf", token=token)
    assert meta.status == 200
    assert meta.json()["versions"] == ["1"]
    for version in ("1", "2"):
        r = await gw.request("GET", f"/v2/models/pub_clf/versions/{version}", token=token)
        listed = version in meta.json()["versions"]
        assert r.status == (200 if listed else 404), (version, r.status)
        if listed:
            assert r.json()["versions"] == ["1"]
    async with _from_own_address(world, grpc_port) as relay, grpc.aio.insecure_channel(f"127.0.0.1:{relay}") as ch:
        call = service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelMetadata(
            service_pb2.ModelMetadataRequest(name="pub_clf"), metadata=(("authorization", f"Bearer {token}"),),
            timeout=30)
        answer = await call
        trailers = await call.trailing_metadata()
    rid = next((str(v) for k, v in (trailers or ()) if k == "x-request-id"), "")
    world.ledger.responses.append(("GRPC", "/v2/models/pub_clf", Response(200, {"X-Request-ID": rid},
                                                                          answer.SerializeToString())))
    assert list(answer.versions) == ["1"]


def _metric(world: World, name: str, **labels: str) -> float:
    assert world.service is not None
    value = world.service.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def _empty(path: Path) -> None:
    path.write_text("")


def _comments_only(path: Path) -> None:
    path.write_text("# being rewritten\n")


def _deleted(path: Path) -> None:
    path.unlink()


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize(("name", "breakage"), [
    ("privacy.yaml", _empty), ("privacy.yaml", _directory), ("pii.yaml", _comments_only),
    ("inputs.yaml", _deleted), ("limits.yaml", _empty), ("inputs.yaml", _directory),
], ids=["privacy_empty", "privacy_directory", "pii_comments_only", "inputs_deleted", "limits_empty",
        "inputs_directory"])
async def test_authz_13_protective_file_emptied_keeps_last_good(gw: Client, world: World, tokens: Tokens,
                                                                 name: str, breakage: Any) -> None:
    """The first step of truncate-then-write (or a deleted file, or a directory in its place)
    must not go live: empty privacy.yaml = no DP noise, empty inputs.yaml = no caps."""
    assert world.service is not None and world.settings is not None
    store = world.service.store
    revision = store.current.policy.revision
    path = world.settings.policies / name
    saved = path.read_bytes()
    failures = _metric(world, "gateway_policy_reload_failures_total",
                       reason="invalid" if breakage is _directory else "vanished")
    try:
        breakage(path)
        assert world.reload() is False
        assert store.current.policy.revision == revision
        assert store.last_failure is not None and name in store.last_failure.error
        # The 0.2 s policy watcher may refuse the same edit before (or as well as) this
        # explicit reload: each refused attempt counts, so at least one, under this reason.
        assert _metric(world, "gateway_policy_reload_failures_total",
                       reason="invalid" if breakage is _directory else "vanished") >= failures + 1
        assert store.current.policy.privacy.models and store.current.policy.inputs.sanitize.defaults.caps.max_batch
        assert (await gw.infer("pub_clf", PUB_BODY, token=tokens.u1())).status == 200
        assert (await gw.infer("beta_fraud", PUB_BODY, token=tokens.u1())).status in DENIED
    finally:
        if path.is_dir():
            path.rmdir()
        path.write_bytes(saved)
        world.reload()
    assert store.current.policy.revision == revision and store.last_error is None


async def test_authz_16_emptied_access_file_on_reload_denies_all(gw: Client, world: World, tokens: Tokens) -> None:
    """An empty access.yaml is deny-all (never allow-all, never refused as "vanished")."""
    assert world.service is not None
    revision = world.service.store.current.policy.revision
    old = _edit(world, "access.yaml", "")
    try:
        assert world.reload() is True
        assert (await gw.infer("pub_clf", PUB_BODY, token=tokens.u1())).status in DENIED
        assert (await gw.infer("pub_clf", PUB_BODY, token=tokens.ops())).status in DENIED
        assert world.upstream_calls() == 0
    finally:
        _edit(world, "access.yaml", old)
        world.reload()
    assert world.service.store.current.policy.revision == revision


async def test_authz_13_unreadable_file_or_build_error_keeps_last_good(
        gw: Client, world: World, tokens: Tokens, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permission denied (mode 000 under a non-root gateway), a file renamed away between
    listing and opening, or any other error while building: a refused reload, never an
    exception that ends the policy watcher."""
    assert world.service is not None
    store = world.service.store
    revision = store.current.policy.revision
    real_open = Path.open

    def deny(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.name == "access.yaml":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "open", deny)
        assert world.reload() is False
    assert store.last_failure is not None and "access.yaml:1:1: cannot be read: Permission denied" in (
        store.last_failure.error)
    assert store.current.policy.revision == revision

    import gateway.policy.store as store_module

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(store_module, "compile_pipeline", boom)
        # A real edit, so the candidate differs from the active revision.
        assert world.settings is not None
        original = (world.settings.policies / "access.yaml").read_text()
        old = _edit(world, "access.yaml", original + "# edited\n")
        try:
            assert world.reload() is False
        finally:
            _edit(world, "access.yaml", old)
    failure = store.last_failure
    assert failure is not None
    assert failure.reason == "error"
    assert store.current.policy.revision == revision
    assert (await gw.infer("pub_clf", PUB_BODY, token=tokens.u1())).status == 200
    world.reload()
    assert store.last_error is None


# ---------------------------------------------------------------------------------------
# Non-enumeration, byte for byte: an unknown model, another tenant's model, a model the
# role may not see and a name that could never exist answer alike on every model route.
# ---------------------------------------------------------------------------------------

HIDDEN_ROUTES = [("GET", "/v2/models/{m}"), ("HEAD", "/v2/models/{m}"), ("GET", "/v2/models/{m}/ready"),
                 ("GET", "/v2/models/{m}/versions/1"), ("GET", "/v2/models/{m}/versions/1/ready"),
                 ("POST", "/v2/models/{m}/infer"), ("POST", "/v2/models/{m}/versions/1/infer")]
LONG_NAME = "m" * 129  # one past the longest name a route accepts


def _comparable(r: Response) -> tuple[int, tuple[tuple[str, str], ...], bytes]:
    """Status, every header but the per-request ones, and the body with its request id masked."""
    rid = r.headers.get("X-Request-ID", "")
    headers = tuple(sorted((k.lower(), v) for k, v in r.headers.items() if k.lower() not in {"x-request-id", "date"}))
    return r.status, headers, r.body.replace(rid.encode(), b"<rid>") if rid else r.body


@pytest.mark.parametrize(("method", "template"), HIDDEN_ROUTES)
async def test_authz_01_hidden_models_answer_byte_identically(world: World, tokens: Tokens, method: str,
                                                              template: str) -> None:
    """AUTHZ-01/17 variant. ``pub_clf`` is routed by a flag that runs before authorization:
    refused to the labeler role, its 404 used to carry ``X-Model-Variant: stable`` (an
    unknown model's does not), i.e. "exists and is flagged". A name longer than any route
    accepts used to answer a shorter body ("not found"), a different Content-Length."""
    cases = {"unknown": ("u1", "no_such_model"), "other_tenant": ("u1", "beta_fraud"),
             "role_hidden_flagged": ("labeler", "pub_clf"), "role_hidden": ("u1", "scorer"),
             "too_long": ("u1", LONG_NAME), "never_a_name": ("u1", "pub_clf.")}
    answers = {}
    for case, (who, model) in cases.items():
        # A fresh subject and source address per call: no rate bucket shared between the cases.
        sub = tokens.sub(f"{case}.{method}")
        token = tokens.u1(sub=sub) if who == "u1" else tokens.u1(sub=sub, roles=("labeler",))
        r = await Client(world, world.next_addr()).request(
            method, template.format(m=model), json_body=PUB_BODY if method == "POST" else None, token=token)
        assert r.status == 404, (case, r.status, r.body[:200])
        assert "X-Model-Variant" not in r.headers, case
        answers[case] = _comparable(r)
    assert len(set(answers.values())) == 1, answers
    assert world.upstream_calls() == 0
    # Positive control: the flagged model, visible to u1, names its variant.
    ok_answer = await Client(world, world.next_addr()).request(
        method, template.format(m="pub_clf"), json_body=PUB_BODY if method == "POST" else None,
        token=tokens.u1(sub=tokens.sub(f"ok.{method}")))
    assert ok_answer.status == 200 and ok_answer.headers.get("X-Model-Variant") == "stable"


async def _grpc_call(world: World, port: int, rpc: str, request: Any, token: str) -> tuple[str, str]:
    """One unary call on the gRPC front: (status code name, details); recorded for the invariants."""
    async with _from_own_address(world, port) as relay, grpc.aio.insecure_channel(f"127.0.0.1:{relay}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        call = getattr(stub, rpc)(request, metadata=(("authorization", f"Bearer {token}"),), timeout=30)
        try:
            await call
            code, details = grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
        trailers = await call.trailing_metadata()
    rid = next((str(v) for k, v in (trailers or ()) if k == "x-request-id"), "")
    world.ledger.responses.append(("GRPC", rpc, Response(404 if code == grpc.StatusCode.NOT_FOUND else 599,
                                                         {"X-Request-ID": rid}, details.encode())))
    return code.name, details


@pytest.mark.parametrize("rpc", ["ModelMetadata", "ModelReady", "ModelInfer"])
async def test_authz_01_hidden_models_answer_alike_grpc(world: World, tokens: Tokens, grpc_port: int,
                                                        rpc: str) -> None:
    """The same over gRPC, where no URL normalisation happens: a name with '/' or '..', an
    over-long name or a fullwidth lookalike used to answer "not found" where an unknown,
    foreign or hidden model answers "not found: unknown model or version"."""
    names = ["no_such_model", "beta_fraud", "scorer", LONG_NAME, "pub_clf/../beta_fraud", "../pub_clf",
             "\uff50ub_clf", "pub_clf\x00"]
    answers = {}
    for i, name in enumerate(names):
        if rpc == "ModelInfer":
            request = _grpc_request(model=name)
        elif rpc == "ModelMetadata":
            request = service_pb2.ModelMetadataRequest(name=name)
        else:
            request = service_pb2.ModelReadyRequest(name=name)
        answers[name] = await _grpc_call(world, grpc_port, rpc, request, tokens.u1(sub=tokens.sub(f"g{i}")))
    assert set(answers.values()) == {("NOT_FOUND", "not found: unknown model or version")}, answers
    assert world.upstream_calls() == 0
