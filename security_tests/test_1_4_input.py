"""CATALOGUE §1.4 Input / parser: malformed JSON, hostile tensors, binary extension, bombs."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from typing import Any

import pytest

from security_tests.conftest import Tokens
from security_tests.support.world import DIGIT_ZERO, PUB_BODY, Client, World, text_body

REFUSED = (400, 413, 415, 422)


def tensor(shape: Any, datatype: str = "FP32", data: Any = None, name: str = "x") -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype,
                        "data": data if data is not None else [0.1, 0.2, 0.3, 0.4]}]}


async def refused_raw(gw: Client, world: World, token: str, body: bytes, *, model: str = "pub_clf",
                      ctype: str = "application/json", extra: dict[str, str] | None = None,
                      expect: tuple[int, ...] = REFUSED) -> int:
    headers = {"Content-Type": ctype, **(extra or {})}
    r = await gw.request("POST", f"/v2/models/{model}/infer", data=body, token=token, headers=headers)
    assert r.status in expect, (r.status, r.body[:200])
    assert world.upstream_calls() == 0
    return r.status


CASES: dict[str, bytes] = {
    "IN-01_truncated": b'{"inputs":[{"name":"x"',
    "IN-02_dup_top": b'{"inputs":[],"inputs":' + json.dumps(PUB_BODY["inputs"]).encode() + b"}",
    "IN-02_dup_tensor": b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4],"name":"y"}]}',
    "IN-03_depth": b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":' + b"[" * 100_000
                   + b"]" * 100_000 + b"}]}",
    "IN-06_nan": b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[NaN,1,2,3]}]}',
    "IN-06_inf": b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[Infinity,1,2,3]}]}',
    "IN-06_neginf": b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[-Infinity,1,2,3]}]}',
    "IN-08_1e400": b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1e400,1,2,3]}]}',
    "IN-08_5000_digits": b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[' + b"9" * 5000
                         + b',1,2,3]}]}',
    "IN-08_100k_digits": b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[' + b"9" * 100_000
                         + b',1,2,3]}]}',
    "IN-15_utf16": '{"inputs":[]}'.encode("utf-16"),
    "IN-16_unknown_top": json.dumps({**PUB_BODY, "evil": {"x": 1}}).encode(),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_in_parser(gw: Client, world: World, tokens: Tokens, case: str) -> None:
    status = await refused_raw(gw, world, tokens.u1(), CASES[case], expect=(*REFUSED, 200)
                               if case.startswith("IN-16") else REFUSED)
    if case.startswith("IN-16") and status == 200:
        raise AssertionError("unknown fields must be refused or dropped; 200 needs the check below")


async def test_in_16_unknown_fields_never_forwarded(gw: Client, world: World, tokens: Tokens) -> None:
    body = {**PUB_BODY, "outputs": [{"name": "probs", "parameters": {"foo": "bar"}}]}
    r = await gw.infer("pub_clf", body, token=tokens.u1())
    assert r.status in (200, 400)
    for req in world.fake.requests:
        assert all("foo" not in o.parameters for o in req.outputs)


@pytest.mark.parametrize("shape", [[1, 2147483648], [4611686018427387904, 4], [-1, 4], [0], [1] * 64, [1.5, 4],
                                   ["1", 4]], ids=lambda s: f"IN-04_{str(s)[:20]}")
async def test_in_04_shapes(gw: Client, world: World, tokens: Tokens, shape: Any) -> None:
    await refused_raw(gw, world, tokens.u1(), json.dumps(tensor(shape)).encode())


@pytest.mark.parametrize(("shape", "datatype", "data"), [
    ([2, 2], "FP32", [1, 2, 3]), ([1, 4], "FP32", ["1", 2, 3, 4]), ([1, 4], "INT8", [300, 1, 2, 3]),
    ([1, 4], "UINT8", [-1, 1, 2, 3]), ([1, 4], "BOOL", [2, 1, 0, 1]), ([1, 4], "FP32", [[1, 2], 3, 4]),
], ids=["IN-05_count", "IN-05_string", "IN-05_int8", "IN-05_uint8", "IN-05_bool", "IN-05_mixed"])
async def test_in_05_data_mismatch(gw: Client, world: World, tokens: Tokens, shape: Any, datatype: str,
                                   data: Any) -> None:
    await refused_raw(gw, world, tokens.u1(), json.dumps(tensor(shape, datatype, data)).encode())


@pytest.mark.parametrize("variant", ["FP64", "fp32", "FP8", "unknown_name", "missing", "extra"],
                         ids=lambda v: f"IN-07_{v}")
async def test_in_07_metadata(gw: Client, world: World, tokens: Tokens, variant: str) -> None:
    body: dict[str, Any]
    if variant in ("FP64", "fp32", "FP8"):
        body = tensor([1, 4], variant)
    elif variant == "unknown_name":
        body = tensor([1, 4], name="y")
    elif variant == "missing":
        body = {"inputs": []}
    else:
        body = {"inputs": [*PUB_BODY["inputs"], {"name": "z", "shape": [1, 4], "datatype": "FP32",
                                                  "data": [1, 2, 3, 4]}]}
    await refused_raw(gw, world, tokens.u1(), json.dumps(body).encode())


@pytest.mark.parametrize("variant", ["one_10mb", "64k_plus_1", "many_empty"], ids=lambda v: f"IN-09_{v}")
async def test_in_09_bytes_limits(gw: Client, world: World, tokens: Tokens, variant: str) -> None:
    await bytes_limit_refused(gw, world, tokens.u1(), variant)


async def bytes_limit_refused(gw: Client, world: World, token: str, variant: str) -> None:
    """IN-09's attack and expectation (also run with the element cap raised: test_protection_off)."""
    if variant == "one_10mb":
        body = text_body("a" * (10 * 1024 * 1024))
    elif variant == "64k_plus_1":
        body = text_body("a" * (65536 + 1))
    else:
        body = {"inputs": [{"name": "text", "shape": [1_048_577], "datatype": "BYTES", "data": [""] * 1_048_577}]}
    await refused_raw(gw, world, token, json.dumps(body).encode(), model="txt_echo", expect=(413, 422))


async def test_in_10_declared_oversize(gw: Client, world: World, tokens: Tokens) -> None:
    raw = await gw.raw((f"POST /v2/models/pub_clf/infer HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {tokens.u1()}"
                        "\r\nContent-Type: application/json\r\nContent-Length: 209715200\r\n\r\n{").encode(),
                       timeout_s=3)
    assert raw.startswith(b"HTTP/1.1 413")
    assert world.upstream_calls() == 0


async def test_in_10_chunked_oversize(gw: Client, world: World, tokens: Tokens) -> None:
    head = (f"POST /v2/models/pub_clf/infer HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {tokens.u1()}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"%x\r\n%s\r\n" % (1024 * 1024, b" " * (1024 * 1024))
    raw = await gw.raw(head, chunks=[chunk] * 10, timeout_s=3)
    assert b" 413 " in raw[:20]
    assert world.upstream_calls() == 0


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "gzip, gzip"], ids=lambda e: f"IN-11_{e}")
async def test_in_11_decompression_bomb(gw: Client, world: World, tokens: Tokens, encoding: str) -> None:
    zeros = bytes(64 * 1024 * 1024)  # 64 MiB inflated is far past the 8 MiB cap
    if encoding == "deflate":
        body = zlib.compress(zeros, 9)
    elif encoding == "gzip, gzip":
        body = gzip.compress(gzip.compress(zeros, 9), 9)
    else:
        body = gzip.compress(zeros, 9)
    await refused_raw(gw, world, tokens.u1(), body, extra={"Content-Encoding": encoding}, expect=(400, 413, 415))


def _binary_body(header_len_override: str | None, trailing: bytes, size: int | None = None) -> tuple[bytes, str]:
    payload = struct.pack("<4f", 0.1, 0.2, 0.3, 0.4)
    head = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": size if size is not None else len(payload)}}]})
    return head.encode() + trailing, header_len_override if header_len_override is not None else str(len(head))


@pytest.mark.parametrize("value", ["99999", "-1", "abc", "0x10", "+5", "two", "missing"], ids=lambda v: f"IN-12_{v}")
async def test_in_12_binary_header_length(gw: Client, world: World, tokens: Tokens, value: str) -> None:
    payload = struct.pack("<4f", 0.1, 0.2, 0.3, 0.4)
    body, good = _binary_body(None, payload)
    if value == "missing":
        await refused_raw(gw, world, tokens.u1(), body, ctype="application/octet-stream", expect=(400, 415))
        return
    header = good if value == "two" else value
    token = tokens.u1()
    extra = f"Inference-Header-Content-Length: {good}\r\n" if value == "two" else ""
    raw = await gw.raw((f"POST /v2/models/pub_clf/infer HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
                        f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {header}\r\n"
                        f"{extra}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
    assert raw.startswith(b"HTTP/1.1 400"), raw[:80]
    assert world.upstream_calls() == 0


@pytest.mark.parametrize("size", [20, 12, 9223372036854775807, -4], ids=lambda s: f"IN-13_{s}")
async def test_in_13_binary_data_size(gw: Client, world: World, tokens: Tokens, size: int) -> None:
    payload = struct.pack("<4f", 0.1, 0.2, 0.3, 0.4)
    body, header = _binary_body(None, payload, size)
    await refused_raw(gw, world, tokens.u1(), body, ctype="application/octet-stream",
                      extra={"Inference-Header-Content-Length": header}, expect=(400, 422))


async def test_in_14_bytes_length_prefix(gw: Client, world: World, tokens: Tokens) -> None:
    payload = b"\xff\xff\xff\xff" + b"abcd"
    head = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(payload)}}]})
    await refused_raw(gw, world, tokens.u1(), head.encode() + payload, model="txt_echo",
                      ctype="application/octet-stream", extra={"Inference-Header-Content-Length": str(len(head))},
                      expect=(400, 422))


async def test_in_06_binary_non_finite(gw: Client, world: World, tokens: Tokens) -> None:
    for bits in (0x7FC00000, 0x7F800000, 0xFF800000):
        payload = struct.pack("<I3f", bits, 0.2, 0.3, 0.4)
        body, header = _binary_body(None, payload)
        await refused_raw(gw, world, tokens.u1(), body, ctype="application/octet-stream",
                          extra={"Inference-Header-Content-Length": header}, expect=(400, 422))


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x"],
                         ids=lambda c: f"IN-15_{c.split(';')[0]}")
async def test_in_15_content_types(gw: Client, world: World, tokens: Tokens, ctype: str) -> None:
    await refused_raw(gw, world, tokens.u1(), json.dumps(PUB_BODY).encode(), ctype=ctype, expect=(400, 415))


@pytest.mark.parametrize("rid", ["a" * (1024 * 1024), "a\r\nSet-Cookie: x=1"], ids=["IN-17_1mb", "IN-17_crlf"])
async def test_in_17_request_id(gw: Client, world: World, tokens: Tokens, rid: str) -> None:
    r = await gw.infer("pub_clf", {**PUB_BODY, "id": rid}, token=tokens.u1())
    assert r.status in (200, 400, 413)
    for key, value in r.raw_headers:
        assert b"\r" not in key + value and b"\n" not in key + value
        assert key.lower() != b"set-cookie"
    if r.status == 200:
        assert len(r.json().get("id", "")) <= 128


@pytest.mark.parametrize("where", ["bytes", "id"], ids=lambda w: f"IN-18_{w}")
async def test_in_18_lone_surrogate(gw: Client, world: World, tokens: Tokens, where: str) -> None:
    if where == "bytes":
        body = b'{"inputs":[{"name":"text","shape":[1],"datatype":"BYTES","data":["a\\ud800b"]}]}'
    else:
        body = b'{"id":"x\\ud800","inputs":[{"name":"text","shape":[1],"datatype":"BYTES","data":["hello"]}]}'
    r = await gw.request("POST", "/v2/models/txt_echo/infer", data=body, token=tokens.u1(),
                         headers={"Content-Type": "application/json"})
    assert r.status in (200, 400, 422)
    if r.status == 200:
        assert b"\\ud800" not in r.body


@pytest.mark.parametrize("name", ["a" * 300, "pub_clf%0d%0a", "\u0440\u0430b_clf", "pub_clf\u200b"],
                         ids=["IN-19_long", "IN-19_crlf", "IN-19_cyrillic", "IN-19_zwsp"])
async def test_in_19_model_name_charset(gw: Client, world: World, tokens: Tokens, name: str) -> None:
    from urllib.parse import quote

    path = f"/v2/models/{quote(name, safe='%')}/infer"
    r = await gw.request("POST", path, json_body=PUB_BODY, token=tokens.u1())
    assert r.status in (400, 404)
    assert world.upstream_calls() == 0


@pytest.mark.parametrize("variant", ["out_of_range", "constant"], ids=lambda v: f"IN-20_{v}")
async def test_in_20_sanitizer(gw: Client, world: World, tokens: Tokens, variant: str) -> None:
    data = [1e6] * 64 if variant == "out_of_range" else [3.0] * 64
    body = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": data}]}
    r = await gw.infer("digits_clf", body, token=tokens.u1())
    assert r.status == 422 and world.upstream_calls() == 0
    assert world.audit_for(r)[0]["reason"] == "input_out_of_range"
    # Positive control: a real digit passes.
    ok = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": DIGIT_ZERO}]}
    assert (await gw.infer("digits_clf", ok, token=tokens.u1())).status == 200


# IN-04 variants: an empty tensor (any zero dimension) fits a model's variable dimension
# ([0,4] for pub_clf's [-1,4], [0] for txt_echo's [-1]) and used to be forwarded (UP=1).
EMPTY_TENSORS: dict[str, tuple[str, dict[str, Any]]] = {
    "batch_0_json": ("pub_clf", tensor([0, 4], data=[])),
    "batch_0_nested": ("pub_clf", {"inputs": [{"name": "x", "shape": [0, 4], "datatype": "FP32", "data": [[]]}]}),
    "bytes_0": ("txt_echo", {"inputs": [{"name": "text", "shape": [0], "datatype": "BYTES", "data": []}]}),
    "dp_batch_0": ("tab_dp", {"inputs": [{"name": "x", "shape": [0, 20], "datatype": "FP32", "data": []}]}),
}


@pytest.mark.parametrize("case", sorted(EMPTY_TENSORS), ids=lambda c: f"IN-04_empty_{c}")
async def test_in_04_empty_tensor_refused(gw: Client, world: World, tokens: Tokens, case: str) -> None:
    model, body = EMPTY_TENSORS[case]
    r = await gw.infer(model, body, token=tokens.u1())
    assert r.status in (400, 422), (r.status, r.body[:200])
    assert world.upstream_calls() == 0
    assert [(a["decision"], a["reason"]) for a in world.audit_for(r)] in (
        [("deny", "input_wrong_shape")], [("deny", "input_invalid_shape")])
    # Positive control: one row is fine.
    ok = tensor([1, 4]) if model == "pub_clf" else None
    if ok is not None:
        assert (await gw.infer(model, ok, token=tokens.u1())).status == 200


async def test_in_04_empty_tensor_binary(gw: Client, world: World, tokens: Tokens) -> None:
    head = json.dumps({"inputs": [{"name": "x", "shape": [0, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 0}}]})
    status = await refused_raw(gw, world, tokens.u1(), head.encode(), ctype="application/octet-stream",
                               extra={"Inference-Header-Content-Length": str(len(head))}, expect=(400, 422))
    assert status == 422
