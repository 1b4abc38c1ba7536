"""A canary variant never skips a stage: the same security checks hold on both routes.

The shipped repository serves two `digits` versions (1 non-private, 2 DP-SGD); the routing
flag sends every subject to one variant or the other, and the same refusals must come back
either way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import BaseTestServer

from gateway.app import build_app
from gateway.settings import Settings

from .conftest import DIGITS_BODY, TRITON_REPO, Client, GatewayTestServer
from .test_http_front import audit_records


@pytest.fixture
def two_version_repo() -> Path:
    """The shipped repository: digits/1 (non-private) and digits/2 (DP-SGD), both served."""
    assert re.search(r"version_policy \{\s*all \{", (TRITON_REPO / "digits" / "config.pbtxt").read_text())
    assert (TRITON_REPO / "digits" / "2" / "model.onnx").is_file()
    return TRITON_REPO


@pytest.fixture(params=["stable", "canary"])
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def gw(settings: Settings, policy_dir: Path, two_version_repo: Path, variant: str,
             aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    flags = json.loads((policy_dir / "flags.json").read_text())
    weights = [["stable", 100], ["canary", 0]] if variant == "stable" else [["stable", 0], ["canary", 100]]
    flags["flags"]["digits-version"]["targeting"] = {"fractional": weights}
    (policy_dir / "flags.json").write_text(json.dumps(flags))
    settings = Settings(policies=policy_dir, backend=f"local:{two_version_repo}", audit_dir=settings.audit_dir,
                        state_dir=settings.state_dir, dev=True)
    server: BaseTestServer = GatewayTestServer(build_app(settings))
    return await aiohttp_client(server)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_served_variant_and_version(gw: Client, token: Callable[..., str], variant: str,
                                          settings: Settings) -> None:
    resp = await gw.post("/v2/models/digits/infer", json=DIGITS_BODY, headers=bearer(token()))
    assert resp.status == 200, await resp.text()
    assert resp.headers["X-Model-Variant"] == variant
    assert (await resp.json())["model_version"] == ("1" if variant == "stable" else "2")
    assert audit_records(settings)[-1]["variant"] == variant


CASES: list[tuple[str, dict[str, Any], dict[str, Any] | None, int]] = [
    # (who, token kwargs or {} for none, body override, expected status)
    ("no token", {}, None, 401),
    ("viewer may not infer", {"roles": ("viewer",)}, None, 403),
    ("unknown tenant", {"tenant": "initech"}, None, 403),
    ("constant image (IN-20)", {"roles": ("analyst",)},
     {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [7.0] * 64}]}, 422),
    ("off-grid pixels", {"roles": ("analyst",)},
     {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 32 + [3.0] * 32}]}, 422),
    ("wrong shape", {"roles": ("analyst",)},
     {"inputs": [{"name": "pixels", "shape": [1, 63], "datatype": "FP32", "data": [1.0] * 63}]}, 422),
    ("reserved parameter", {"roles": ("analyst",)}, {**DIGITS_BODY, "parameters": {"sequence_id": 5}}, 400),
]


@pytest.mark.parametrize(("case", "who", "body", "status"), CASES, ids=[c[0] for c in CASES])
async def test_same_refusals_on_both_variants(gw: Client, token: Callable[..., str], case: str,
                                              who: dict[str, Any], body: dict[str, Any] | None,
                                              status: int) -> None:
    headers = bearer(token(**who)) if who else {}
    resp = await gw.post("/v2/models/digits/infer", json=body or DIGITS_BODY, headers=headers)
    assert resp.status == status, await resp.text()
