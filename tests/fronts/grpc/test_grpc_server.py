"""The gRPC front on the wire: metadata, trailers, limits, deadlines, refused RPCs.

The cross-front behaviour (same answers and refusals as HTTP through tritonclient) is in
tests/e2e/test_both_fronts.py; this file covers what only gRPC has. The front runs on
the test's event loop and is called with raw ``grpc.aio`` stubs, so status codes,
details and trailing metadata are visible exactly as a client receives them.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
from aiohttp import web
from google.protobuf import message_factory
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.app import build_app, build_service, runner_for
from gateway.audit import iter_records
from gateway.devissuer import issue_token
from gateway.fronts.grpc import server as grpc_server
from gateway.fronts.grpc.server import (
    MAX_METADATA_BYTES,
    GrpcFront,
    RunningGrpcFront,
    _peer_address,
    server_options,
    start_grpc_front,
)
from gateway.kserve import ModelMetadata, TensorSpec
from gateway.service import InferenceService
from gateway.settings import Settings
from gateway.upstream.triton_grpc import TritonGrpcUpstream
from tests.support.fake_triton import CANARY, FakeTriton, error, slow
from tests.support.liveness import eventually, no_hang
from tests.support.preauth import count_preauth_admits
from tests.support.raw_http import closed_by_server

from ...conftest import POLICIES, TRITON_REPO

SERVED = ("ServerLive", "ServerReady", "ServerMetadata", "ModelMetadata", "ModelReady", "ModelInfer")
SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
REFUSED = tuple(m.name for m in SERVICE.methods if m.name not in SERVED)

DIGITS = ModelMetadata(name="digits", versions=("1",), platform="onnxruntime_onnx",
                       inputs=(TensorSpec("pixels", "FP32", (-1, 64)),),
                       outputs=(TensorSpec("probabilities", "FP32", (-1, 10)),))


# Identity, access and limits only. These tests are about the gRPC wire; the input policy
# (sanitize, adversarial) runs through this front in tests/e2e/test_both_fronts.py, and
# leaving it out keeps these tests independent of how that policy evolves.
CORE_POLICY_FILES = ("access.yaml", "gateway.yaml", "identity.yaml")


def make_settings(directory: Path, **limits: int) -> Settings:
    """A private copy of the core policy files, with ``limits`` overridden."""
    policies = directory / "policies"
    policies.mkdir()
    for name in CORE_POLICY_FILES:
        shutil.copy(POLICIES / name, policies / name)
    path = policies / "gateway.yaml"
    text = path.read_text()
    for key, value in limits.items():
        line = re.compile(rf"^  {key}: .*$", re.MULTILINE)
        text = line.sub(f"  {key}: {value}", text) if line.search(text) else \
            text.replace("limits:\n", f"limits:\n  {key}: {value}\n", 1)
    path.write_text(text)
    return Settings(policies=policies, backend=f"local:{TRITON_REPO}", audit_dir=directory / "audit",
                    state_dir=directory / "state", dev=True, policy_poll_s=0.1)


@dataclass
class Gateway:
    settings: Settings
    service: InferenceService
    runner: web.AppRunner
    front: RunningGrpcFront
    channel: Any
    stub: Any

    def token(self, **claims: Any) -> str:
        return issue_token(self.settings.state_dir, sub=claims.get("sub", "alice"),
                           tenant=claims.get("tenant", "acme"), roles=claims.get("roles", ["analyst"]), ttl_s=600)

    def auth(self, request_id: str = "t-1") -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token()}"), ("x-request-id", request_id))

    def audit(self) -> list[dict[str, Any]]:
        return list(iter_records(self.settings.audit_dir)) if self.settings.audit_dir.exists() else []

    def record(self, request_id: str) -> dict[str, Any]:
        (found,) = [r for r in self.audit() if r["request_id"] == request_id]
        return found

    async def wait_record(self, request_id: str, timeout_s: float = 5.0) -> dict[str, Any]:
        for _ in range(int(timeout_s / 0.02)):
            found = [r for r in self.audit() if r["request_id"] == request_id]
            if found:
                return found[0]
            await asyncio.sleep(0.02)
        raise AssertionError(f"no audit record for {request_id}")


async def open_gateway(settings: Settings, *, upstream: Any = None, **front: Any) -> Gateway:
    """The service with the app's own lifecycle (upstream, audit trail, ...) and only the
    gRPC front: the runner is set up (cleanup_ctx entered) but serves no HTTP site."""
    service = build_service(settings, upstream=upstream)
    runner = runner_for(build_app(settings, service=service))
    await runner.setup()
    running = await start_grpc_front(service, "127.0.0.1", 0, **front)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    return Gateway(settings, service, runner, running, channel, service_pb2_grpc.GRPCInferenceServiceStub(channel))


async def close_gateway(gw: Gateway) -> None:
    await gw.channel.close()
    await gw.front.stop(1.0)
    await gw.runner.cleanup()


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    gateway = await open_gateway(make_settings(tmp_path))
    yield gateway
    await close_gateway(gateway)


@pytest.fixture
async def fake() -> AsyncIterator[FakeTriton]:
    async with FakeTriton([DIGITS]) as server:
        yield server


@pytest.fixture
async def gw_fake(tmp_path: Path, fake: FakeTriton) -> AsyncIterator[Gateway]:
    """The gRPC front in front of TritonGrpcUpstream in front of the scriptable fake."""
    gateway = await open_gateway(make_settings(tmp_path), upstream=TritonGrpcUpstream(fake.url))
    yield gateway
    await close_gateway(gateway)


def digits_request(rows: int = 1, **fields: Any) -> Any:
    message = service_pb2.ModelInferRequest(**{"model_name": "digits", **fields})
    message.inputs.add(name="pixels", datatype="FP32", shape=[rows, 64])
    message.raw_input_contents.append(np.ones((rows, 64), "<f4").tobytes())
    return message


def trailers(exc_or_metadata: Any) -> dict[str, str]:
    metadata = exc_or_metadata.trailing_metadata() if isinstance(exc_or_metadata, grpc.aio.AioRpcError) \
        else exc_or_metadata
    return {str(key): value for key, value in metadata or ()}


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


# ---------------------------------------------------------------------------------------
# Credentials and trailers
# ---------------------------------------------------------------------------------------


class TestAuthorizationMetadata:
    async def test_no_token_gets_a_challenge(self, gw: Gateway) -> None:
        exc = await refused(gw.stub.ServerMetadata(service_pb2.ServerMetadataRequest(),
                                                   metadata=(("x-request-id", "no-token"),)))
        assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
        assert exc.details() == "authentication required: missing bearer token"
        assert trailers(exc) == {"x-request-id": "no-token", "www-authenticate": 'Bearer realm="infergate"'}
        assert gw.record("no-token")["reason"] == "authn_missing_token"

    @pytest.mark.parametrize(("case", "values"), [
        ("two_values", ("Bearer a", "Bearer b")),
        ("basic_scheme", ("Basic YWxpY2U6cGFzcw==",)),
        ("empty_token", ("Bearer  ",)),
    ])
    async def test_malformed_authorization(self, gw: Gateway, case: str, values: tuple[str, ...],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
        counted = count_preauth_admits(monkeypatch)
        shutil.copy(POLICIES / "limits.yaml", gw.settings.policies / "limits.yaml")  # a pre_auth limit
        assert await gw.service.store.reload("test")
        assert gw.service.pin().pipeline.preauth is not None
        if case == "two_values":
            values = tuple(f"Bearer {gw.token()}" for _ in values)  # even two valid tokens
        metadata = (*(("authorization", v) for v in values), ("x-request-id", case))
        exc = await refused(gw.stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="digits"), metadata=metadata))
        # SECURITY (RL-13): refused after the per-address pre-auth limit counted it, so a flood
        # of malformed credentials is throttled like one of bad tokens.
        assert len(counted) == 1
        record = gw.record(case)
        if case == "two_values":
            # AUTHN-23: the REST front's answer to two Authorization headers, a malformed request.
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert exc.details() == "malformed request: more than one authorization metadata entry"
            assert "www-authenticate" not in trailers(exc)
            assert (record["reason"], record["status"], record["transport"]) == ("authn_malformed_header", 400, "grpc")
        else:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            assert trailers(exc)["www-authenticate"] == 'Bearer realm="infergate", error="invalid_token"'
            assert (record["reason"], record["status"], record["transport"]) == ("authn_malformed_header", 401, "grpc")
        assert record["route"] == "/v2/models/{model}" and record["model"] == "digits"

    async def test_request_id_comes_back_in_trailers(self, gw: Gateway) -> None:
        call = gw.stub.ServerMetadata(service_pb2.ServerMetadataRequest(), metadata=gw.auth("ok-1"))
        response = await call
        assert response.name == "infergate"
        assert trailers(await call.trailing_metadata()) == {"x-request-id": "ok-1"}

    async def test_health_is_open(self, gw: Gateway) -> None:
        assert (await gw.stub.ServerLive(service_pb2.ServerLiveRequest())).live
        assert (await gw.stub.ServerReady(service_pb2.ServerReadyRequest())).ready

    async def test_invalid_model_name_looks_unknown(self, gw: Gateway) -> None:
        exc = await refused(gw.stub.ModelInfer(digits_request(model_name="../risk"), metadata=gw.auth("bad-name")))
        unknown = await refused(gw.stub.ModelInfer(digits_request(model_name="no_such"), metadata=gw.auth("unk")))
        # Byte for byte the unknown model's answer (it used to be a shorter "not found").
        assert (exc.code(), exc.details()) == (unknown.code(), unknown.details())
        assert exc.details() == "not found: unknown model or version"
        record = gw.record("bad-name")
        assert (record["route"], record["reason"], record["model"]) == ("unmatched", "model_name_invalid", None)


# ---------------------------------------------------------------------------------------
# Refused RPCs
# ---------------------------------------------------------------------------------------


def test_every_generated_rpc_is_overridden() -> None:
    """A generated default would answer "Unexpected NotImplementedError", unaudited."""
    base = service_pb2_grpc.GRPCInferenceServiceServicer
    generated = {name for name in vars(base) if name[:1].isupper()}
    assert generated == {m.name for m in SERVICE.methods}
    assert all(name in vars(GrpcFront) for name in generated)


@pytest.mark.parametrize("rpc", REFUSED)
async def test_other_rpcs_are_unimplemented_and_audited(gw: Gateway, rpc: str) -> None:
    method = SERVICE.methods_by_name[rpc]
    request = message_factory.GetMessageClass(method.input_type)()
    if method.client_streaming:
        call = getattr(gw.stub, rpc)(iter([request]), metadata=gw.auth(rpc))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        exc = info.value
    else:
        exc = await refused(getattr(gw.stub, rpc)(request, metadata=gw.auth(rpc)))
    assert exc.code() == grpc.StatusCode.UNIMPLEMENTED
    assert exc.details() == f"method not allowed: {rpc} is not available through this gateway"
    record = gw.record(rpc)
    assert (record["route"], record["reason"], record["status"]) == (f"grpc:{rpc}", "rpc_unimplemented", 405)


@pytest.mark.parametrize("rpc", ["ModelInfer", "ModelReady", "ModelMetadata"])
async def test_unparseable_message_is_invalid_argument_and_audited(gw: Gateway, rpc: str) -> None:
    """Not grpcio's UNKNOWN "Unexpected <class 'DecodeError'>": the taxonomy's answer, audited."""
    invalid_utf8_name = b"\x0a\x02\xff\xfe"  # field 1, a string, holding invalid UTF-8
    call = gw.channel.unary_unary(f"/inference.GRPCInferenceService/{rpc}")(invalid_utf8_name,
                                                                           metadata=gw.auth(f"undecodable-{rpc}"))
    exc = await refused(call)
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.details() == "malformed request: the message is not a valid protobuf request"
    record = gw.record(f"undecodable-{rpc}")
    assert (record["route"], record["reason"], record["status"]) == ("unmatched", "request_invalid_protobuf", 400)


@pytest.mark.parametrize("method", [
    "/inference.GRPCInferenceService/Nope",
    "/grpc.health.v1.Health/Check",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/inference.GRPCInferenceService/modelinfer",  # the name's case matters to gRPC
])
async def test_unknown_method_is_unimplemented_and_audited(gw: Gateway, method: str) -> None:
    """As the REST front answers an unknown path: refused, with a request id, audited and
    logged (gRPC's own "Method not found!" is none of these). The method name is the
    client's and stays out of the record."""
    call = gw.channel.unary_unary(method)(b"\x0a\x06digits", metadata=gw.auth("unknown-method"))
    exc = await refused(call)
    assert exc.code() == grpc.StatusCode.UNIMPLEMENTED
    assert exc.details() == "method not allowed: this method is not available through this gateway"
    assert trailers(exc) == {"x-request-id": "unknown-method"}
    record = gw.record("unknown-method")
    assert (record["route"], record["reason"], record["status"]) == ("grpc:unknown", "rpc_unimplemented", 405)
    assert method.rsplit("/", 1)[1] not in str(record)


async def test_unknown_streaming_method_is_refused(gw: Gateway) -> None:
    async def messages() -> AsyncIterator[bytes]:
        yield b"\x0a\x06digits"

    nope = gw.channel.stream_stream("/inference.GRPCInferenceService/Nope")
    call = nope(messages(), metadata=gw.auth("unknown-stream"))
    exc = await refused(call.read())
    assert exc.code() == grpc.StatusCode.UNIMPLEMENTED
    assert gw.record("unknown-stream")["reason"] == "rpc_unimplemented"


# A refused stream is answered once the client has finished sending (see server._drain):
# grpcio's aio client turns a request written while the refusal arrives into INTERNAL
# "Internal error from Core" (tritonclient.grpc.aio stream_infer, at random).
STREAMS = {
    "ModelStreamInfer": ("/inference.GRPCInferenceService/ModelStreamInfer", "grpc:ModelStreamInfer"),
    "unknown": ("/inference.GRPCInferenceService/Nope", "grpc:unknown"),
}


def _open_stream(gw: Gateway, which: str, request_id: str) -> Any:
    """A stream call in reader/writer style: the test writes and half-closes it itself."""
    path, _label = STREAMS[which]
    return gw.channel.stream_stream(path)(metadata=gw.auth(request_id))


@pytest.mark.parametrize("which", list(STREAMS))
async def test_a_refused_stream_waits_for_the_client_to_finish_sending(
        gw: Gateway, which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grpc_server, "DRAIN_S", 600.0)  # only the half-close ends the wait here
    call = _open_stream(gw, which, f"drain-{which}")
    message = digits_request().SerializeToString()
    await call.write(message)
    record = await gw.wait_record(f"drain-{which}")  # the refusal is decided and recorded...
    assert (record["route"], record["reason"]) == (STREAMS[which][1], "rpc_unimplemented")
    for _ in range(3):
        await call.write(message)  # ...yet the client can go on writing: no "execute_batch" failure
    await call.done_writing()
    async with no_hang("refusal after the half-close"):
        code = await call.code()
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert (await call.details()).startswith("method not allowed: ")
    assert trailers(await call.trailing_metadata()) == {"x-request-id": f"drain-{which}"}


@pytest.mark.parametrize("bound", ["time", "messages", "bytes"])
async def test_a_refused_stream_is_answered_within_the_drain_bounds(
        gw: Gateway, bound: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that never half-closes (or keeps sending) is refused all the same: the
    front reads, pre-auth and unparsed, at most DRAIN_MESSAGES / DRAIN_BYTES for DRAIN_S."""
    monkeypatch.setattr(grpc_server, "DRAIN_S", 0.05 if bound == "time" else 600.0)
    monkeypatch.setattr(grpc_server, "DRAIN_MESSAGES", 3 if bound == "messages" else 10**6)
    monkeypatch.setattr(grpc_server, "DRAIN_BYTES", 1000 if bound == "bytes" else 10**9)
    call = _open_stream(gw, "ModelStreamInfer", f"bound-{bound}")
    writes = {"time": 1, "messages": 3, "bytes": 1}[bound]
    for _ in range(writes):
        await call.write(b"\x0a\x06digits" + b"\x00" * (2000 if bound == "bytes" else 0))
    async with no_hang(f"refusal past the {bound} bound"):
        code = await call.code()  # no half-close
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert gw.record(f"bound-{bound}")["reason"] == "rpc_unimplemented"


async def test_a_stream_that_leaves_while_drained_is_audited_once(gw: Gateway,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The record is written before the drain, so a client that leaves then is recorded;
    the cancelled handler leaves the front serving."""
    monkeypatch.setattr(grpc_server, "DRAIN_S", 600.0)
    call = _open_stream(gw, "ModelStreamInfer", "drain-left")
    await call.write(digits_request().SerializeToString())
    await gw.wait_record("drain-left")
    call.cancel()
    async with no_hang("cancelled stream"):
        assert await call.code() == grpc.StatusCode.CANCELLED
    assert (await gw.stub.ServerLive(service_pb2.ServerLiveRequest())).live
    assert [r["reason"] for r in gw.audit() if r["request_id"] == "drain-left"] == ["rpc_unimplemented"]


# ---------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------


def test_server_options_are_limits() -> None:
    options = dict(server_options(max_message_bytes=1000, max_concurrent_streams=7))
    assert options["grpc.max_receive_message_length"] == options["grpc.max_send_message_length"] == 1000
    assert options["grpc.max_metadata_size"] == options["grpc.absolute_max_metadata_size"] == MAX_METADATA_BYTES
    assert options["grpc.max_concurrent_streams"] == 7
    assert options["grpc.so_reuseport"] == 0
    assert options["grpc.keepalive_permit_without_calls"] == 0
    # AV-09: the HTTP listener's connection cap and header timeout, here too.
    assert options["grpc.max_allowed_incoming_connections"] == grpc_server.DEFAULT_MAX_CONNECTIONS
    assert options["grpc.server_handshake_timeout_ms"] == 10_000
    assert dict(server_options(max_message_bytes=1, max_concurrent_streams=1, max_connections=9))[
        "grpc.max_allowed_incoming_connections"] == 9


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def _idle_h2(port: int, n: int) -> list[socket.socket]:
    """``n`` connections that send the HTTP/2 preface and SETTINGS, then nothing."""
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(H2_PREFACE)
        socks.append(sock)
    return socks


async def test_idle_connections_beyond_the_cap_are_closed(tmp_path: Path) -> None:
    """AV-09 on the gRPC front: 3,000 idle HTTP/2 connections were all held (5 min idle
    limit), enough of them exhaust the descriptors of the process (the HTTP front's too).
    Beyond max_connections a new connection is closed at once; a call in progress and the
    connections held are not disturbed; room comes back when they go."""
    cap, flood = 5, 20
    gateway = await open_gateway(make_settings(tmp_path), max_connections=cap)
    socks: list[socket.socket] = []
    try:
        # The test's channel holds one connection (opened by this first call).
        assert (await gateway.stub.ServerLive(service_pb2.ServerLiveRequest())).live
        socks = await asyncio.to_thread(_idle_h2, gateway.front.port, flood)
        await eventually(lambda: sum(map(closed_by_server, socks)) >= flood - (cap - 1),
                         "connections beyond the cap closed", expected_s=0.5)
        assert sum(map(closed_by_server, socks)) == flood - (cap - 1)  # the held ones stay open
        # The channel's connection was admitted before the flood: it still serves.
        assert list((await gateway.stub.ModelInfer(digits_request(), metadata=gateway.auth())).outputs[0].shape) \
            == [1, 10]
    finally:
        for sock in socks:
            sock.close()
    try:
        fresh = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.front.port}")
        try:
            live = False
            async with no_hang("a new connection once the idle ones left", expected_s=1.0):
                while not live:
                    try:
                        live = (await service_pb2_grpc.GRPCInferenceServiceStub(fresh).ServerLive(
                            service_pb2.ServerLiveRequest(), timeout=1.0)).live
                    except grpc.aio.AioRpcError:
                        await asyncio.sleep(0.05)
            assert live
        finally:
            await fresh.close()
    finally:
        await close_gateway(gateway)


async def test_metadata_over_the_limit_is_refused(gw: Gateway) -> None:
    big = (("x-pad", "a" * MAX_METADATA_BYTES), *gw.auth("too-much-metadata"))
    exc = await refused(gw.stub.ServerMetadata(service_pb2.ServerMetadataRequest(), metadata=big))
    assert exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)
    assert not [r for r in gw.audit() if r["request_id"] == "too-much-metadata"]  # never reached the handler
    fits = (("x-pad", "a" * (MAX_METADATA_BYTES // 2)), *gw.auth("metadata-fits"))
    assert (await gw.stub.ServerMetadata(service_pb2.ServerMetadataRequest(), metadata=fits)).name == "infergate"


@pytest.mark.parametrize("compression", [None, grpc.Compression.Gzip])
async def test_message_over_the_limit_is_refused(tmp_path: Path, compression: Any) -> None:
    """Compressed or not: a gzip bomb is measured after decompression."""
    gateway = await open_gateway(make_settings(tmp_path), max_message_bytes=64 * 1024)
    try:
        message = digits_request(rows=400)  # ~100 KiB of ones, a few hundred bytes gzipped
        exc = await refused(gateway.stub.ModelInfer(message, metadata=gateway.auth("too-big"), compression=compression))
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # gRPC core answers before any handler; the front still records it, as the REST
        # front records a body over its limit (same status and reason).
        record = await gateway.wait_record("too-big")
        assert (record["decision"], record["reason"], record["status"]) == ("deny", "input_too_large", 413)
        assert (record["route"], record["transport"]) == ("unmatched", "grpc")
        assert [r for r in gateway.audit() if r["request_id"] == "too-big"] == [record]  # no abandoned marker
        ok = await gateway.stub.ModelInfer(digits_request(rows=2), metadata=gateway.auth("small"),
                                           compression=compression)
        assert list(ok.outputs[0].shape) == [2, 10]
    finally:
        await close_gateway(gateway)


@pytest.mark.parametrize("rpc", ["ModelInfer", "ModelMetadata", "ServerMetadata"])
async def test_a_unary_call_without_a_message_is_refused_and_audited(gw: Gateway, rpc: str) -> None:
    """A hand-made client half-closes without sending the request message."""
    async def nothing() -> AsyncIterator[bytes]:
        empty: tuple[bytes, ...] = ()
        for message in empty:
            yield message

    unary = gw.channel.stream_unary(f"/inference.GRPCInferenceService/{rpc}")
    call = unary(nothing(), metadata=gw.auth(f"none-{rpc}"))
    exc = await refused(call)
    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert exc.details() == "request too large: message larger than 8388608 bytes, or no message"
    assert trailers(exc)["x-request-id"] == f"none-{rpc}"
    record = gw.record(f"none-{rpc}")
    assert (record["reason"], record["status"], record["route"]) == ("input_too_large", 413, "unmatched")


async def test_policy_body_limit_applies_to_grpc(tmp_path: Path) -> None:
    gateway = await open_gateway(make_settings(tmp_path, max_body_bytes=32 * 1024))
    try:
        exc = await refused(gateway.stub.ModelInfer(digits_request(rows=200), metadata=gateway.auth("big")))
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert exc.details() == "request too large: message larger than 32768 bytes"
        assert gateway.record("big")["status"] == 413
    finally:
        await close_gateway(gateway)


async def test_large_message_is_decoded_off_the_loop(gw: Gateway) -> None:
    """Over 256 KiB the decoder runs in a thread; BYTES round-trip intact."""
    words = [bytes([65 + i]) * 60_000 for i in range(5)]
    message = service_pb2.ModelInferRequest(model_name="text_echo", id="big-bytes")
    message.inputs.add(name="text", datatype="BYTES", shape=[5])
    message.raw_input_contents.append(b"".join(len(w).to_bytes(4, "little") + w for w in words))
    response = await gw.stub.ModelInfer(message, metadata=gw.auth())
    raw = bytes(response.raw_output_contents[0])
    assert response.id == "big-bytes" and raw == bytes(message.raw_input_contents[0])


async def test_bind_conflict_is_an_error(gw: Gateway) -> None:
    """SO_REUSEPORT is off: a second listener cannot share (or steal from) the port."""
    with pytest.raises(OSError, match="cannot listen"):
        await start_grpc_front(gw.service, "127.0.0.1", gw.front.port)


async def test_concurrent_streams_per_connection_are_capped(tmp_path: Path, fake: FakeTriton) -> None:
    """With a cap of 1, three calls on one connection reach the upstream one at a time."""
    gateway = await open_gateway(make_settings(tmp_path), upstream=TritonGrpcUpstream(fake.url),
                                 max_concurrent_streams=1)
    try:
        fake.set(slow(0.2))
        auth = gateway.auth()
        results = await asyncio.gather(*(gateway.stub.ModelInfer(digits_request(), metadata=auth) for _ in range(3)))
        assert all(list(r.outputs[0].shape) == [1, 10] for r in results)
        # Counted at the upstream, not timed: all three arrived, never two at once.
        assert fake.counts["ModelInfer"] == 3
        assert fake.peak_in_flight["ModelInfer"] == 1
    finally:
        await close_gateway(gateway)


async def test_concurrent_calls(gw: Gateway) -> None:
    auth = gw.auth()
    results = await asyncio.gather(*(gw.stub.ModelInfer(digits_request(), metadata=auth) for _ in range(32)))
    assert all(list(r.outputs[0].shape) == [1, 10] for r in results)


# ---------------------------------------------------------------------------------------
# Deadlines, cancellation, shedding, upstream errors (behind the scriptable fake)
# ---------------------------------------------------------------------------------------


async def test_client_deadline_bounds_the_call(gw_fake: Gateway, fake: FakeTriton) -> None:
    fake.set(slow(3.0))
    exc = await refused(gw_fake.stub.ModelInfer(digits_request(), metadata=gw_fake.auth("short"), timeout=0.3))
    assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    record = await gw_fake.wait_record("short", timeout_s=2.0)
    assert (record["status"], record["reason"], record["upstream_called"]) == (504, "client_deadline", True)
    for _ in range(100):  # the upstream call was cancelled, not left running for 3 s
        if fake.cancelled["ModelInfer"]:
            break
        await asyncio.sleep(0.02)
    assert fake.cancelled["ModelInfer"] == 1


async def test_a_call_whose_client_left_is_still_audited(gw_fake: Gateway, fake: FakeTriton) -> None:
    fake.set(slow(0.3))
    call = gw_fake.stub.ModelInfer(digits_request(), metadata=gw_fake.auth("gone"))
    await asyncio.sleep(0.1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    record = await gw_fake.wait_record("gone")
    assert (record["decision"], record["status"], record["upstream_called"]) == ("allow", 200, True)


async def test_load_shedding_is_unavailable_with_retry_after(tmp_path: Path, fake: FakeTriton) -> None:
    gateway = await open_gateway(make_settings(tmp_path, max_in_flight=1), upstream=TritonGrpcUpstream(fake.url))
    try:
        fake.set(slow(0.5))
        first = asyncio.ensure_future(gateway.stub.ModelInfer(digits_request(), metadata=gateway.auth("first")))
        await asyncio.sleep(0.15)
        exc = await refused(gateway.stub.ModelInfer(digits_request(), metadata=gateway.auth("second")))
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
        assert exc.details().startswith("temporarily unavailable: too many requests in flight (request id second)")
        assert trailers(exc)["retry-after"] == "1"
        await first
    finally:
        await close_gateway(gateway)


async def test_upstream_errors_do_not_leak(gw_fake: Gateway, fake: FakeTriton) -> None:
    fake.set(error(grpc.StatusCode.INTERNAL))
    exc = await refused(gw_fake.stub.ModelInfer(digits_request(), metadata=gw_fake.auth("upstream-error")))
    assert exc.code() == grpc.StatusCode.INTERNAL
    assert exc.details() == "bad response from the model server (request id upstream-error)"
    assert CANARY not in exc.details()


async def test_only_the_trace_context_goes_upstream(gw_fake: Gateway, fake: FakeTriton) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    metadata = (*gw_fake.auth(), ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"), ("x-tenant", "globex"))
    await gw_fake.stub.ModelInfer(digits_request(), metadata=metadata)
    (call,) = [c for c in fake.calls if c.rpc == "ModelInfer"]
    sent = dict(call.metadata)
    assert "authorization" not in sent and "x-tenant" not in sent and "x-request-id" not in sent
    assert str(sent["traceparent"]).split("-")[1] == trace_id
    assert str(sent["traceparent"]).split("-")[2] != "00f067aa0ba902b7"  # a new span of the same trace


# ---------------------------------------------------------------------------------------
# Client address of a gRPC peer (the pre-auth limit's key)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("peer", "address"), [
    ("ipv4:203.0.113.7:5000", "203.0.113.7"),
    ("ipv6:%5B2001:db8::1%5D:5000", "2001:db8::1"),  # gRPC core's URI form
    ("ipv6:[2001:db8::1]:5000", "2001:db8::1"),  # older gRPC: raw brackets
    ("ipv6:%5B::ffff:203.0.113.7%5D:5000", "203.0.113.7"),  # an IPv4 client of a [::] listener
    ("ipv6:%5Bfe80::1%25eth0%5D:5000", "fe80::1"),  # zone id, percent-encoded too
    ("unix:/run/gw.sock", "unknown"),
    ("ipv6:%5Bnot-an-address%5D:1", "unknown"),
])
def test_peer_address_reads_grpc_uri_peers(peer: str, address: str) -> None:
    assert _peer_address(peer) == address


async def test_ipv6_and_ipv4_peers_of_a_dual_stack_listener_have_their_own_buckets(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SECURITY (RL-02, gRPC): gRPC writes IPv6 peers percent-encoded (``ipv6:%5B::1%5D:5``);
    read literally, every IPv6 client and every IPv4 client of a ``[::]`` listener shared one
    ``unknown`` pre-auth bucket, so one flooding client locked all the others out."""
    counted = count_preauth_admits(monkeypatch)
    settings = make_settings(tmp_path)
    shutil.copy(POLICIES / "limits.yaml", settings.policies / "limits.yaml")  # a pre_auth limit
    service = build_service(settings)
    runner = runner_for(build_app(settings, service=service))
    await runner.setup()
    running = await start_grpc_front(service, "::", 0)
    try:
        for target in (f"ipv6:[::1]:{running.port}", f"127.0.0.1:{running.port}"):
            async with grpc.aio.insecure_channel(target) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                exc = await refused(stub.ServerMetadata(service_pb2.ServerMetadataRequest()))
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await running.stop(1.0)
        await runner.cleanup()
    assert counted == ["::1", "127.0.0.1"]


async def test_the_app_gives_the_front_the_policy_connection_cap(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """limits.max_connections of gateway.yaml caps the gRPC listener as it caps the HTTP one."""
    import dataclasses

    seen: dict[str, Any] = {}
    real = grpc_server.start_grpc_front

    async def recording(*args: Any, **kwargs: Any) -> RunningGrpcFront:
        seen.update(kwargs)
        return await real(*args, **kwargs)

    monkeypatch.setattr(grpc_server, "start_grpc_front", recording)
    settings = dataclasses.replace(make_settings(tmp_path, max_connections=77), grpc_host="127.0.0.1", grpc_port=0)
    runner = runner_for(build_app(settings))
    await runner.setup()
    try:
        assert seen["max_connections"] == 77
    finally:
        await runner.cleanup()
