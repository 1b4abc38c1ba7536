"""CATALOGUE §1.6 PII leakage: masking both ways, Unicode evasion, side channels, masker failure.

The canaries (§0.6 I3) are checked by the invariants in every log line, audit record,
response, /metrics scrape and upstream request; here each case asserts its own rule too.
"""

from __future__ import annotations

import contextlib
import json
import struct
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from security_tests.conftest import Tokens, internal_fault
from security_tests.support.world import PUB_BODY, Client, Response, World, text_body
from security_tests.test_1_2_authz import _from_own_address
from tests.support.fake_triton import echo, ok

PII_01 = "Contact john.doe@example.com, 415-555-0132, SSN 078-05-1120, card 4111 1111 1111 1111"
FORBIDDEN = ("john.doe", "078-05-1120", "4111 1111 1111 1111", "4111111111111111", "415-555-0132", "example.com")


def upstream_texts(world: World, start: int = 0) -> list[str]:
    from tritonclient.utils import deserialize_bytes_tensor

    out: list[str] = []
    for req in world.fake.requests[start:]:
        for raw in req.raw_input_contents:
            out += [bytes(v).decode("utf-8", "replace") for v in deserialize_bytes_tensor(bytes(raw))]
    return out


def assert_masked(texts: list[str]) -> None:
    for text in texts:
        folded = text.replace("\u200b", "").replace("\u200d", "").replace("\u00ad", "")
        for needle in FORBIDDEN:
            assert needle not in folded, (needle, text)


async def test_pii_01_masked_both_ways(gw: Client, world: World, tokens: Tokens) -> None:
    await masked_both_ways(gw, world, tokens.u1())


async def masked_both_ways(gw: Client, world: World, token: str) -> None:
    """PII-01's attack and expectation (also run with pii.yaml `mode: shadow`: test_protection_off)."""
    world.fake.set(echo())
    start = len(world.fake.requests)
    r = await gw.infer("txt_echo", text_body(PII_01), token=token)
    assert r.status == 200
    sent = upstream_texts(world, start)
    assert sent and "[EMAIL]" in sent[0] and "[SSN]" in sent[0]
    assert_masked(sent)
    assert_masked(r.json()["outputs"][0]["data"])
    rec = world.audit_for(r)[0]
    assert "pii" in rec["notes"] and not any(n in json.dumps(rec) for n in FORBIDDEN)


@pytest.mark.parametrize("text", [
    "john\u200b.doe@exa\u200dmple.com", "john\u00ad.doe@example.com", "john.doe\uff20example.com",
    "\u0458ohn.doe@example.com", "\u0660\u0667\u0668-\u0660\u0665-\u0661\u0661\u0662\u0660",
    "\uff10\uff17\uff18-\uff10\uff15-\uff11\uff11\uff12\uff10", "4\u0300111 1111 1111 1111",
], ids=["zwsp", "soft_hyphen", "fullwidth_at", "cyrillic_j", "arabic_digits", "fullwidth_digits", "combining"])
async def test_pii_02_unicode_evasion(gw: Client, world: World, tokens: Tokens, text: str) -> None:
    world.fake.set(echo())
    r = await gw.infer("txt_echo", text_body(f"reach {text} now"), token=tokens.u1())
    assert r.status in (200, 422)
    sent = upstream_texts(world)
    if r.status == 200:
        import unicodedata

        for t in sent + r.json()["outputs"][0]["data"]:
            folded = unicodedata.normalize("NFKC", t)
            assert "doe@example" not in folded.replace("\u0458", "j") and "078-05-1120" not in folded
            assert "4111 1111 1111 1111" not in unicodedata.normalize("NFKD", folded).replace("\u0300", "")
            assert "\u0667\u0668-" not in t


@pytest.mark.parametrize("text", ["john.doe%40example.com", "john.doe&#64;example.com"])
async def test_pii_03_encodings(gw: Client, world: World, tokens: Tokens, text: str) -> None:
    world.fake.set(echo())
    r = await gw.infer("txt_echo", text_body(f"mail {text}"), token=tokens.u1())
    assert r.status == 200
    for t in upstream_texts(world) + r.json()["outputs"][0]["data"]:
        assert "john.doe" not in t


async def test_pii_04_outside_tensors(gw: Client, world: World, tokens: Tokens) -> None:
    body: dict[str, Any] = {**text_body("hello"), "id": "john.doe@example.com",
                            "parameters": {"note": "SSN 078-05-1120"}}
    r = await gw.request("POST", "/v2/models/txt_echo/infer?who=john.doe@example.com", json_body=body,
                         token=tokens.u1(), headers={"User-Agent": "john.doe@example.com"})
    assert r.status in (200, 400)
    for req in world.fake.requests:
        assert "john.doe" not in req.id and "078-05-1120" not in str(req.parameters)
    # The canaries in logs/audit/metrics are checked by the invariants (I3).


async def test_pii_05_model_produced_pii(gw: Client, world: World, tokens: Tokens) -> None:
    world.fake.set(ok(lambda _inputs: {"text": np.array([b"reach me at jane@corp.example"], dtype=np.object_)}))
    r = await gw.infer("txt_echo", text_body("hello"), token=tokens.u1())
    assert r.status == 200
    out = r.json()["outputs"][0]["data"]
    assert all("jane@corp.example" not in t for t in out)


async def test_pii_06_error_paths(gw: Client, world: World, tokens: Tokens) -> None:
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "FP99", "data": [PII_01]}]}
    r = await gw.infer("txt_echo", body, token=tokens.u1())
    assert r.status in (400, 422)
    assert not any(n.encode() in r.body for n in FORBIDDEN)
    raw = await gw.raw(b"POST /v2/models/txt_echo/infer HTTP/1.1\r\nHost: gw\r\nX-Bad: "
                       + b"john.doe@example.com 078-05-1120 " * 400 + b"\r\n\r\n")
    assert b"john.doe" not in raw and b"078-05" not in raw


async def test_pii_07_binary_bytes_tensor(gw: Client, world: World, tokens: Tokens) -> None:
    world.fake.set(echo())
    value = PII_01.encode()
    payload = struct.pack("<I", len(value)) + value
    head = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(payload)}}]})
    r = await gw.request("POST", "/v2/models/txt_echo/infer", data=head.encode() + payload, token=tokens.u1(),
                         headers={"Content-Type": "application/octet-stream",
                                  "Inference-Header-Content-Length": str(len(head))})
    assert r.status == 200
    sent = upstream_texts(world)
    assert sent and "[EMAIL]" in sent[0]
    assert_masked(sent)


@pytest.mark.parametrize("text", ["a" * 61440 + "@", "1-" * 30720], ids=["a_at", "dash_digits"])
async def test_pii_08_masker_linear(gw: Client, world: World, tokens: Tokens, text: str) -> None:
    world.fake.set(echo())
    r = await gw.infer("txt_echo", text_body(text), token=tokens.u1())
    assert r.status in (200, 413, 422)  # answered at all: no catastrophic backtracking hang


async def test_pii_09_masker_failure_fails_closed(gw: Client, world: World, tokens: Tokens,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.stages.pii_mask import PiiMasker

    def boom(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("masker fault flag")

    assert world.service is not None
    stage = next(b.stage for b in world.service.store.current.pipeline.stages if isinstance(b.stage, PiiMasker))
    for name in ("on_request", "on_call_request", "before"):
        if hasattr(type(stage), name):
            monkeypatch.setattr(type(stage), name, boom)
            break
    else:
        pytest.fail("masker hook not found")
    internal_fault(world.ledger)
    r = await gw.infer("txt_echo", text_body(PII_01), token=tokens.u1())
    assert r.status in (500, 503)
    assert world.upstream_calls() == 0
    assert not any(n.encode() in r.body for n in FORBIDDEN)


# --- outsider variants (session 6) -----------------------------------------------------

SPLIT_OUTPUT = (b"x", b"203.0.", b"113.77", b"7", b"AKIAIOSFOD", b"NN7EXAMPLE", b"ab1", b"(415) ", b"555-0199",
                b"x", b"GB82 WEST ", b"1234 5698 7654 32", b"7", b"2001:db8::", b"ff00:42:8329", b".")
SPLIT_PIECES = ("203.0.", "113.77", "AKIAIOSFOD", "NN7EXAMPLE", "555-0199", "GB82 WEST", "5698 7654", "ff00:42:8329")


async def test_pii_05_split_output_glued_to_neighbours(gw: Client, world: World, tokens: Tokens) -> None:
    """PII-05 variant: a model's output elements join into entities whose neighbours glue
    to them ("x" + "203.0." + "113.77" + "7"); every piece is masked all the same."""
    world.fake.set(ok(lambda _inputs: {"text": np.array(SPLIT_OUTPUT, dtype=np.object_)}))
    r = await gw.infer("txt_echo", text_body("hello"), token=tokens.u1())
    assert r.status == 200
    out = r.json()["outputs"][0]["data"]
    assert len(out) == len(SPLIT_OUTPUT)
    assert not [p for p in SPLIT_PIECES if any(p in t for t in out)], out


@pytest.mark.parametrize("text", [
    "john&#46;doe&#64;example&#46;com", "john.doe&commat;example&period;com", "john.doe&#x40;example&#x2E;com",
    "john.doe%EF%BC%A0example.com", "john.doe @ example.com", "4111%201111%201111%201111",
    "4111&#32;1111&#32;1111&#32;1111", "SSN 078&#45;05&#45;1120", "john.doe\\u0040example.com",
], ids=["html_dec_dots", "html_named", "html_hex", "pct_utf8_fullwidth_at", "spaced_at", "pct_card", "html_card",
        "html_ssn", "json_escape"])
async def test_pii_03_decoded_references(gw: Client, world: World, tokens: Tokens, text: str) -> None:
    """PII-03 variant: every character reference a decoder would read (percent, HTML
    decimal/hex/named, backslash escapes) is decoded on the detection copy, anywhere."""
    world.fake.set(echo())
    r = await gw.infer("txt_echo", text_body(f"reach {text} today"), token=tokens.u1())
    assert r.status == 200
    sent = upstream_texts(world)
    assert sent
    for t in sent + r.json()["outputs"][0]["data"]:
        assert t.startswith("reach ") and t.endswith(" today")
        # CARD keeps its last 4 digits under this policy (mask, keep_last: 4): never more.
        assert text not in t and "john" not in t and "4111" not in t and "1120" not in t
        assert sum(c.isdigit() for c in t) <= 4, t


@pytest.mark.parametrize("path", ["/v2/models/078-05-1120/infer", "/v2/models/078-05-1120",
                                  "/v2/models/txt_echo/versions/4111111111111111/infer"])
async def test_pii_04_model_name_not_in_audit(gw: Client, world: World, tokens: Tokens, path: str) -> None:
    """PII-04 variant: an unknown model name or version is whatever the client typed; the
    audit record keeps it only redacted (the invariants check the canary everywhere too)."""
    world.fake.set(echo())
    method = "POST" if path.endswith("/infer") else "GET"
    r = await gw.request(method, path, json_body=text_body("hello") if method == "POST" else None,
                         token=tokens.u1())
    assert r.status == 404
    records = world.audit_for(r)
    assert records and all(n not in json.dumps(rec) for rec in records for n in ("078-05-1120", "4111111111111111"))
    assert world.upstream_calls() == 0


@pytest.mark.parametrize("text", ["DOB: 14-Mar-1985", "DOB 19850314", "born on March 14, 1985", "birthdate 1985/03/14"])
async def test_pii_01_dates_of_birth(gw: Client, world: World, tokens: Tokens, text: str) -> None:
    """PII-01 variant: a date of birth near its keyword, in the forms people and forms write."""
    world.fake.set(echo())
    r = await gw.infer("txt_echo", text_body(f"patient {text}."), token=tokens.u1())
    assert r.status == 200
    for t in upstream_texts(world) + r.json()["outputs"][0]["data"]:
        assert "1985" not in t and "85" not in t.split()[-1], t
        assert "[DOB]" in t


# ---------------------------------------------------------------------------------------
# Client request ids: copied into every log line, audit record and trailer of a request.
# ---------------------------------------------------------------------------------------

PII_REQUEST_IDS = ("078-05-1120", "4111111111111111", "r4111111111111111x", "ssn:078.05.1120", "10.1.2.3")


def _assert_id_not_kept(world: World, offered: str, answered: str, log_start: int) -> None:
    assert answered and answered != offered
    assert offered not in world.logs.text()[log_start:]
    assert offered.encode() not in world.audit_bytes()


@pytest.mark.parametrize("offered", PII_REQUEST_IDS)
async def test_pii_04_request_id_with_pii_replaced(gw: Client, world: World, tokens: Tokens, offered: str) -> None:
    """A well-formed X-Request-ID holding an SSN/card/IP is replaced by a fresh id, never echoed
    (fuzz finding: the id reached logs, audit records and the response header unmasked)."""
    log_start = len(world.logs.text())
    r = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1(), headers={"X-Request-ID": offered})
    assert r.status == 200
    _assert_id_not_kept(world, offered, r.headers.get("X-Request-ID", ""), log_start)


async def test_pii_04_plain_request_id_still_echoed(gw: Client, tokens: Tokens) -> None:
    """Positive control: an id without PII is kept (clients correlate on it)."""
    r = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1(), headers={"X-Request-ID": "req-7.a:b"})
    assert r.status == 200 and r.headers.get("X-Request-ID") == "req-7.a:b"



def _x_tensor() -> Any:
    contents = service_pb2.InferTensorContents(fp32_contents=[0.1, 0.2, 0.3, 0.4])
    return service_pb2.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4], contents=contents)


@pytest.mark.parametrize("offered", PII_REQUEST_IDS[:2])
async def test_pii_04_request_id_with_pii_replaced_grpc(world: World, tokens: Tokens, grpc_port: int,
                                                        offered: str) -> None:
    """The gRPC front takes the id from ``x-request-id`` metadata: same rule, on refusals too."""
    log_start = len(world.logs.text())
    for model in ("pub_clf", "no_such_model"):
        request = service_pb2.ModelInferRequest(model_name=model, inputs=[_x_tensor()])
        async with _from_own_address(world, grpc_port) as relay, \
                grpc.aio.insecure_channel(f"127.0.0.1:{relay}") as channel:
            call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, metadata=(("authorization", f"Bearer {tokens.u1()}"), ("x-request-id", offered)), timeout=30)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call
            trailers = await call.trailing_metadata()
            code = await call.code()
        answered = next((str(v) for k, v in (trailers or ()) if k == "x-request-id"), "")
        assert code == (grpc.StatusCode.OK if model == "pub_clf" else grpc.StatusCode.NOT_FOUND)
        world.ledger.responses.append(("GRPC", f"/v2/models/{model}/infer",
                                       Response(200 if code == grpc.StatusCode.OK else 404,
                                                {"X-Request-ID": answered}, b"")))
        _assert_id_not_kept(world, offered, answered, log_start)



@pytest.mark.parametrize("claims", [{"tenant": "078-05-1120"}, {"roles": ("predictor", "4111111111111111")},
                                    {"roles": ("10.1.2.3",)}])
async def test_pii_04_claims_not_in_audit(gw: Client, world: World, tokens: Tokens, claims: dict[str, Any]) -> None:
    """PII-04 variant (fuzz): tenant and roles are claims of a verified token but free text; an
    unknown tenant or role holding PII is audited only redacted (the subject is pseudonymized)."""
    r = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1(**claims))
    assert r.status in (200, 403, 404)
    records = world.audit_for(r)
    assert records
    text = json.dumps(records)
    assert all(str(v) not in text for value in claims.values()
               for v in ((value,) if isinstance(value, str) else value) if v != "predictor")


# Names the echo rules let through (identifier-like, no run of four digits) that are still
# entities: a GitHub token, an AWS access key id.
SECRET_NAMES = ("ghp_" + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ", "AKIAIOSFODNN7EXAMPLE")


@pytest.mark.parametrize("name", SECRET_NAMES, ids=("github_token", "aws_key_id"))
async def test_pii_06_error_text_masked_on_both_fronts(gw: Client, world: World, tokens: Tokens, grpc_port: int,
                                                       name: str) -> None:
    """PII-06 variant (s8 probe): an error detail quotes the input name that broke a rule.
    The REST front masked PII in error text; the gRPC front sent the same text unmasked in
    its status details, so a secret-shaped name came back (and into any client log)."""
    from security_tests.test_1_2_authz import _grpc_infer

    world.ledger.extra_secrets.append(name)  # I3: nowhere in responses, logs, audit, metrics
    body = {"inputs": [{"name": name, "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]}
    r = await gw.infer("pub_clf", body, token=tokens.u1())
    assert r.status == 422 and "[SECRET]" in r.json()["error"]
    contents = service_pb2.InferTensorContents(fp32_contents=[0.1, 0.2, 0.3, 0.4])
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=[1, 4],
                                                            contents=contents)
    for inputs in ([tensor], [tensor, tensor]):  # not an input of the model (422); a duplicate (400)
        request = service_pb2.ModelInferRequest(model_name="pub_clf", inputs=inputs)
        answer = await _grpc_infer(world, grpc_port, request, tokens.u1())
        assert answer.code == grpc.StatusCode.INVALID_ARGUMENT
        assert name not in answer.details and "[SECRET]" in answer.details, answer.details
    assert world.upstream_calls() == 0


@pytest.mark.parametrize("trace_id", ["4111111111111111abcdefabcdefabcd", "abcdefabcdefabcd4111111111111111"],
                         ids=["card_first", "card_last"])
async def test_pii_04_trace_id_with_pii_not_forwarded(gw: Client, world: World, tokens: Tokens, grpc_port: int,
                                                      trace_id: str) -> None:
    """PII-04 variant (s8 probe): the W3C trace id is the one client-chosen value the gateway
    forwards to the upstream (``traceparent`` metadata); 32 hex digits can hold a card number,
    which reached the model server past the masking every tensor gets. Such a trace id is
    replaced like a request id holding PII, on both fronts; a plain one still continues."""
    plain = "4bf92f3577b34da6a3ce929d0e0e4736"
    for offered, kept in ((trace_id, False), (plain, True)):
        header = f"00-{offered}-00f067aa0ba902b7-01"
        r = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1(), headers={"traceparent": header})
        assert r.status == 200
        request = service_pb2.ModelInferRequest(model_name="pub_clf", inputs=[_x_tensor()])
        async with _from_own_address(world, grpc_port) as relay, \
                grpc.aio.insecure_channel(f"127.0.0.1:{relay}") as channel:
            call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, metadata=(("authorization", f"Bearer {tokens.u1()}"), ("traceparent", header)), timeout=30)
            await call
            trailers = await call.trailing_metadata()
        rid = next((str(v) for k, v in (trailers or ()) if k == "x-request-id"), "")
        world.ledger.responses.append(("GRPC", "/v2/models/pub_clf/infer", Response(200, {"X-Request-ID": rid}, b"")))
        sent = [dict(c.metadata).get("traceparent", "") for c in world.fake.calls if c.rpc == "ModelInfer"][-2:]
        assert len(sent) == 2 and all(len(s) == 55 for s in sent)
        assert all((offered in s) == kept for s in sent), (offered, sent)
    assert "4111111111111111" not in world.logs.text()
