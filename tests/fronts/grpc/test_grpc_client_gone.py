"""gRPC calls whose client leaves: the call runs on to be audited, and its record says
no answer was delivered (an ``abandoned`` marker after an ``allow``), so "every allow
record had its 2xx" holds for this front too.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.support.fake_triton import FakeTriton, slow

from .test_grpc_server import Gateway, digits_request, fake, gw_fake  # noqa: F401 - fixtures


async def _marker(gw: Gateway, seq: int) -> dict[str, Any]:
    for _ in range(250):
        found = [r for r in gw.audit() if r.get("type") == "abandoned" and r.get("ref_seq") == seq]
        if found:
            return found[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no abandoned marker for seq {seq}")


async def test_allowed_call_whose_client_left_is_marked_abandoned(
        gw_fake: Gateway, fake: FakeTriton,  # noqa: F811 - the fixtures imported above
) -> None:
    fake.set(slow(0.3))
    call = gw_fake.stub.ModelInfer(digits_request(), metadata=gw_fake.auth("grpc-gone"))
    await asyncio.sleep(0.1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    record = await gw_fake.wait_record("grpc-gone")
    assert (record["decision"], record["status"], record["upstream_called"]) == ("allow", 200, True)
    marker = await _marker(gw_fake, record["seq"])
    assert (marker["cause"], marker["request_id"]) == ("client_gone", "grpc-gone")
    requests = [r for r in gw_fake.audit() if r.get("request_id") == "grpc-gone" and r.get("type") == "request"]
    assert len(requests) == 1

