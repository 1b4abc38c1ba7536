"""Large gRPC ModelInfer messages are decoded in the decode worker process (AV-14).

Converting typed contents (``fp32_contents``) to arrays holds the GIL for the whole
message, so above ``PROCESS_DECODE_BYTES`` the front hands the message's wire bytes to
the same process pool as the REST front. What must not change: the answer, and the
status (and audit reason) of a refusal found while decoding.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from gateway.fronts.decode_pool import PROCESS_DECODE_BYTES

from ...conftest import DIGIT_ZERO
from .test_grpc_server import Gateway, close_gateway, make_settings, open_gateway

ROWS = 9_000  # 9000 x 64 fp32 = 2.3 MB of packed floats: over PROCESS_DECODE_BYTES


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    gateway = await open_gateway(make_settings(tmp_path))
    yield gateway
    await close_gateway(gateway)


def _pixels(rows: int) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(7)
    base = np.array(DIGIT_ZERO, dtype="<f4")
    return np.stack([np.roll(base, int(k)) for k in rng.integers(0, 64, rows)])


def typed_request(pixels: np.ndarray[Any, Any], *, extra: int = 0) -> Any:
    """Digits as typed ``fp32_contents``; ``extra`` elements beyond the shape make it malformed."""
    message = service_pb2.ModelInferRequest(model_name="digits")
    tensor = message.inputs.add(name="pixels", datatype="FP32", shape=list(pixels.shape))
    tensor.contents.fp32_contents.extend(pixels.ravel().tolist() + [0.0] * extra)
    return message


class CountingPool:
    """Counts the calls that reach the front's decode pool."""

    def __init__(self, run: Callable[..., Awaitable[Any]]) -> None:
        self._run = run
        self.calls = 0

    async def run(self, fn: Any) -> Any:
        self.calls += 1
        return await self._run(fn)


def _spy(gw: Gateway) -> CountingPool:
    front = gw.front.front
    spy = CountingPool(front.decode_pool.run)
    front.decode_pool.run = spy.run  # type: ignore[method-assign]
    return spy


def text_request(words: list[bytes]) -> Any:
    """text_echo with typed ``bytes_contents`` (the echo answers them back as raw bytes)."""
    message = service_pb2.ModelInferRequest(model_name="text_echo")
    tensor = message.inputs.add(name="text", datatype="BYTES", shape=[len(words)])
    tensor.contents.bytes_contents.extend(words)
    return message


def _serialized(words: list[bytes]) -> bytes:
    return b"".join(len(w).to_bytes(4, "little") + w for w in words)


async def test_large_message_gets_the_same_answer(gw: Gateway) -> None:
    spy = _spy(gw)
    words = [bytes([65 + i % 26]) * 60_000 for i in range(40)]  # 2.4 MB of typed contents
    big = text_request(words)
    assert big.ByteSize() > PROCESS_DECODE_BYTES
    answer = await gw.stub.ModelInfer(big, metadata=gw.auth("big-typed"))
    assert spy.calls == 1  # decoded in the worker process
    assert bytes(answer.raw_output_contents[0]) == _serialized(words)
    # A small message (decoded inline) of the same kind gets the same kind of answer.
    small = await gw.stub.ModelInfer(text_request(words[:2]), metadata=gw.auth("small-typed"))
    assert spy.calls == 1
    assert bytes(small.raw_output_contents[0]) == _serialized(words[:2])
    assert gw.record("big-typed")["decision"] == gw.record("small-typed")["decision"] == "allow"


async def test_refusal_while_decoding_keeps_its_status(gw: Gateway) -> None:
    spy = _spy(gw)
    pixels = _pixels(ROWS)
    with pytest.raises(grpc.aio.AioRpcError) as big:
        await gw.stub.ModelInfer(typed_request(pixels, extra=1), metadata=gw.auth("big-bad"))
    assert spy.calls == 1
    with pytest.raises(grpc.aio.AioRpcError) as small:
        await gw.stub.ModelInfer(typed_request(pixels[:5], extra=1), metadata=gw.auth("small-bad"))
    assert big.value.code() == small.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    big_rec, small_rec = gw.record("big-bad"), gw.record("small-bad")
    assert (big_rec["status"], big_rec["reason"]) == (small_rec["status"], small_rec["reason"])
    assert big_rec["decision"] == "deny" and big_rec["upstream_called"] is False
