"""Seeded mutation fuzzing of both fronts end to end, under the world's invariants (§0.6 I1-I3).

Why here and not only in the codec fuzzers: those drive one parser each, in-process; this
sends mutated *valid* requests of every kind (REST JSON and binary-extension infer, the
metadata/ready/health GETs, gRPC ModelInfer/ModelMetadata/ModelReady as serialized bytes)
through a real socket, so the whole path is exercised: HTTP parsing, authentication, the
pipeline, refusals, audit and the error rendering. The autouse invariants fixture then checks
every case: no traceback, no 500, one allow record per 2xx, no canary or token anywhere.

Deterministic (fixed seeds, no hypothesis database) and small (a few hundred requests) for
CI; the scratch harness that ran thousands of cases per front lives in the s7 notes.
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
from typing import Any, Final

import grpc
import grpc.aio
import pytest
from tritonclient.grpc import service_pb2

from security_tests.conftest import Tokens
from security_tests.support.world import CANARIES, DIGIT_ZERO, Client, Response, World, statuses
from security_tests.test_1_2_authz import _from_own_address

CASES: Final = 300
SEEDS: Final = (7, 11)
CANARY_TEXT: Final = ("john.doe@example.com", "078-05-1120", "4111111111111111")
# What a mutated request may get; never 500, never a hang (read until the gateway closes).
HTTP_STATUSES: Final = frozenset({200, 400, 401, 403, 404, 405, 408, 411, 413, 414, 415, 417, 422, 429, 431, 501,
                                  503, 505})
GRPC_REFUSALS: Final = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                  grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED,
                                  grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE})
# tab_dp is left out on purpose: its per-tenant daily budget is shared with the DP cases.
SEED_BODIES: Final[tuple[tuple[str, dict[str, Any]], ...]] = (
    ("pub_clf", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]}),
    ("pub_clf", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}],
                 "outputs": [{"name": "probs", "parameters": {"binary_data": True}}], "id": "r-1"}),
    ("scorer", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}],
                "outputs": [{"name": "label"}]}),
    ("txt_echo", {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                              "data": ["mail john.doe@example.com", "ssn 078-05-1120 card 4111111111111111"]}]}),
    ("digits_clf", {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": DIGIT_ZERO}]}),
)
GETS: Final = ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/pub_clf", "/v2/models/pub_clf/ready",
               "/v2/models/txt_echo/versions/1", "/v2/models/scorer/ready")
ODD_VALUES: Final[tuple[Any, ...]] = (0, -1, 2**63, 10**30, 1e308, -0.0, None, True, [], {}, "", "\ud800", [[1]],
                                      "x" * 5000, *CANARY_TEXT)


class Mutator:
    """Structured mutations of one seeded stream: JSON, binary extension, HTTP framing, protobuf."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def json_value(self, doc: Any, depth: int = 0) -> Any:
        rng = self.rng
        if depth > 6:
            return doc
        if isinstance(doc, dict):
            out = dict(doc)
            if out and rng.random() < 0.3:
                key = rng.choice(list(out))
                choice = rng.randrange(4)
                if choice == 0:
                    del out[key]
                elif choice == 1:
                    out[key] = rng.choice(ODD_VALUES)
                elif choice == 2:
                    out[key + rng.choice(["\u0000", "\ud800", " "])] = out[key]
                else:
                    out[rng.choice(CANARY_TEXT)] = rng.choice(CANARY_TEXT)
            return {k: self.json_value(v, depth + 1) if rng.random() < 0.3 else v for k, v in out.items()}
        if isinstance(doc, list):
            items = list(doc)
            if items and rng.random() < 0.2:
                items.append(rng.choice(items))
            if rng.random() < 0.1:
                items.insert(0, rng.choice(ODD_VALUES))
            return [self.json_value(v, depth + 1) if rng.random() < 0.3 else v for v in items]
        if isinstance(doc, str):
            return rng.choice([doc + rng.choice(CANARY_TEXT), "\ud800", doc.upper(), "", "FP64", "BYTES", "BF16",
                               doc + "\u0000"])
        return rng.choice(ODD_VALUES)

    def bytes_(self, data: bytes) -> bytes:
        rng = self.rng
        out = bytearray(data or b"\x00")
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(out))
            choice = rng.randrange(5)
            if choice == 0:
                out[i] ^= 1 << rng.randrange(8)
            elif choice == 1:
                del out[i:]
            elif choice == 2:  # a length prefix (BYTES element / binary size) made extreme
                out[i:i + 4] = struct.pack("<I", rng.choice([0, 0xFFFFFFFF, 0x7FFFFFFF, 65537, len(out)]))
            elif choice == 3:
                out[i:i] = out[i:i + rng.randrange(1, 16)]
            else:
                out += rng.choice(CANARY_TEXT).encode()
            if not out:
                out += b"\x00"
        return bytes(out)

    def http_request(self, token: str) -> bytes:
        rng = self.rng
        headers: list[tuple[str, str]] = [("Host", "gw"), ("Authorization", f"Bearer {token}")]
        method, version = "POST", "HTTP/1.1"
        if rng.random() < 0.15:
            method, path, body = "GET", rng.choice(GETS), b""
        else:
            model, seed_doc = rng.choice(SEED_BODIES)
            doc: Any = seed_doc
            path = f"/v2/models/{model}/infer"
            if rng.random() < 0.6:
                doc = self.json_value(doc)
            if rng.random() < 0.35 and isinstance(doc, dict) and isinstance(doc.get("inputs"), list):
                body, extra = _binary(doc)
                headers += extra
                if rng.random() < 0.6:
                    body = self.bytes_(body)
            else:
                body = json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
                headers.append(("Content-Type", rng.choice(["application/json", "text/plain",
                                                            "application/json; charset=utf-16"])))
        length = len(body) if rng.random() < 0.9 else rng.choice([0, max(0, len(body) - 1)])
        headers.append(("Content-Length", str(length)))
        if rng.random() < 0.25:
            choice = rng.randrange(6)
            if choice == 0:
                method = rng.choice(["GET", "PUT", "post", "DELETE", "OPTIONS", "HEAD"])
            elif choice == 1:
                version = rng.choice(["HTTP/1.0", "HTTP/2.0", "HTTP/1.2"])
            elif choice == 2:
                headers.append(rng.choice(headers))
            elif choice == 3:
                headers.pop(rng.randrange(len(headers)))
            elif choice == 4:
                headers.append((rng.choice(["X-Request-ID", "X-Tenant-ID", "traceparent", "Content-Encoding"]),
                                rng.choice([*CANARY_TEXT, "gzip", "br", "a" * 100])))
            else:
                headers.append(("Inference-Header-Content-Length", rng.choice(["-1", "0", "99999999999999999999",
                                                                              "1e3", "\u0663"])))
        head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        return (head + "Connection: close\r\n\r\n").encode("utf-8", "surrogatepass") + body

    def proto(self, data: bytes) -> bytes:
        rng = self.rng
        choice = rng.randrange(7)
        if choice == 0:  # unknown field
            return data + _varint(rng.choice([99, 15, 536870911]) << 3 | 2) + b"\x05hello"
        if choice == 1:  # a known field number with another wire type
            wire = rng.choice([0, 1, 5])
            return data + _varint(rng.randint(1, 8) << 3 | wire) + {0: b"\x01", 1: b"\x00" * 8, 5: b"\x00" * 4}[wire]
        if choice == 2:  # truncated varint
            return data + b"\x08\xff\xff"
        if choice == 3:  # a length far beyond the message
            return data + _varint(1 << 3 | 2) + _varint(rng.choice([2**31, 2**40]))
        if choice == 4:  # repeated scalar: a second model name, a canary
            text = rng.choice(CANARY_TEXT).encode()
            return data + b"\x0a" + _varint(len(text)) + text
        if choice == 5:  # request-level parameter with a canary in key and value
            key, value = rng.choice(CANARY_TEXT).encode(), rng.choice(CANARY_TEXT).encode()
            param = b"\x1a" + _varint(len(value)) + value
            entry = b"\x0a" + _varint(len(key)) + key + b"\x12" + _varint(len(param)) + param
            return data + b"\x22" + _varint(len(entry)) + entry
        return self.bytes_(data)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _binary(doc: dict[str, Any]) -> tuple[bytes, list[tuple[str, str]]]:
    """``doc`` in the binary-tensor extension (mutated documents encode what they can)."""
    header = json.loads(json.dumps(doc))
    blobs = b""
    for tensor in header["inputs"]:
        if not isinstance(tensor, dict):
            continue
        data = tensor.pop("data", None)
        values = data if isinstance(data, list) else []
        if tensor.get("datatype") == "BYTES":
            items = [str(v).encode("utf-8", "surrogatepass") for v in values]
            blob = b"".join(struct.pack("<I", len(v)) + v for v in items)
        else:
            floats = [v if isinstance(v, float) and abs(v) < 3e38 else 0.5 for v in values]
            blob = struct.pack(f"<{len(floats)}f", *floats)
        tensor["parameters"] = {"binary_data_size": len(blob)}
        blobs += blob
    head = json.dumps(header).encode()
    return head + blobs, [("Inference-Header-Content-Length", str(len(head))),
                          ("Content-Type", "application/octet-stream")]


def _grpc_seeds() -> list[tuple[str, bytes]]:
    seeds: list[tuple[str, bytes]] = []
    for model, doc in SEED_BODIES:
        typed = service_pb2.ModelInferRequest(model_name=model, id="r-1")
        raw = service_pb2.ModelInferRequest(model_name=model)
        for tensor in doc["inputs"]:
            typed_input = typed.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
            raw.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
            if tensor["datatype"] == "BYTES":
                items = [s.encode() for s in tensor["data"]]
                typed_input.contents.bytes_contents.extend(items)
                raw.raw_input_contents.append(b"".join(struct.pack("<I", len(v)) + v for v in items))
            else:
                typed_input.contents.fp32_contents.extend(float(v) for v in tensor["data"])
                raw.raw_input_contents.append(struct.pack(f"<{len(tensor['data'])}f", *tensor["data"]))
        seeds += [("ModelInfer", typed.SerializeToString()), ("ModelInfer", raw.SerializeToString())]
    for name in ("pub_clf", "txt_echo", "beta_fraud"):
        seeds.append(("ModelMetadata", service_pb2.ModelMetadataRequest(name=name, version="1").SerializeToString()))
        seeds.append(("ModelReady", service_pb2.ModelReadyRequest(name=name).SerializeToString()))
    return seeds


def _no_canary(data: bytes, what: str) -> None:
    for canary in CANARIES:
        assert canary.encode() not in data, f"{canary!r} echoed in {what}: {data[:300]!r}"



@pytest.mark.parametrize("seed", SEEDS)
async def test_http_front_mutations(world: World, tokens: Tokens, seed: int) -> None:
    mutator = Mutator(seed)
    for batch in range(0, CASES, 20):
        cases = [mutator.http_request(tokens.u1(sub=tokens.sub(f"h{batch + i}"))) for i in range(20)]
        answers = await asyncio.gather(*(Client(world, world.next_addr()).raw(case, timeout_s=30) for case in cases))
        for case, raw in zip(cases, answers, strict=True):
            got = statuses(raw)
            assert got, f"no answer (hang or silent close) to {case[:300]!r}"
            assert set(got) <= HTTP_STATUSES, f"{got} answered to {case[:300]!r}"
            _no_canary(raw, "an HTTP answer")


@pytest.mark.parametrize("seed", SEEDS)
async def test_grpc_front_mutations(world: World, tokens: Tokens, grpc_port: int, seed: int) -> None:
    mutator = Mutator(seed)
    seeds = _grpc_seeds()
    for batch in range(0, CASES, 15):
        # Each batch from its own address: the per-address pre-auth limit is 20/s.
        async with _from_own_address(world, grpc_port) as relay, \
                grpc.aio.insecure_channel(f"127.0.0.1:{relay}") as channel:

            async def one(i: int, base: int) -> None:
                rpc, data = mutator.rng.choice(seeds)
                data = mutator.proto(data) if mutator.rng.random() < 0.85 else data
                token = tokens.u1(sub=tokens.sub(f"g{base + i}"))
                call = channel.unary_unary(f"/inference.GRPCInferenceService/{rpc}")(
                    data, metadata=(("authorization", f"Bearer {token}"),), timeout=30)
                try:
                    body: bytes = await call
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    code, body = exc.code(), (exc.details() or "").encode()
                trailers = await call.trailing_metadata()
                rid = next((str(v) for k, v in (trailers or ()) if k == "x-request-id"), "")
                world.ledger.responses.append(("GRPC", f"/grpc/{rpc}", Response(
                    200 if code == grpc.StatusCode.OK else 400, {"X-Request-ID": rid}, body + repr(trailers).encode())))
                assert code == grpc.StatusCode.OK or code in GRPC_REFUSALS, f"{code} for {rpc} {data[:200]!r}"
                _no_canary(body + repr(trailers).encode(), f"a gRPC {rpc} answer")

            await asyncio.gather(*(one(i, batch) for i in range(15)))
