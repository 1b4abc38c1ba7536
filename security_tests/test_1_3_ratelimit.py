"""CATALOGUE §1.3 Rate-limit evasion (profile: 1 req/s per (tenant, sub), burst 10; pre-auth 20/s per address)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from security_tests.conftest import Tokens
from security_tests.support.world import PUB_BODY, Client, World

BURST = 10
INVALID = "invalid.token.x"


async def burst(gw: Client, token: str, n: int, path: str = "/v2/models/pub_clf/infer",
                body: Any = PUB_BODY) -> list[int]:
    return [(await gw.request("POST", path, json_body=body, token=token)).status for _ in range(n)]


async def test_rl_01_baseline(gw: Client, world: World, tokens: Tokens) -> None:
    token = tokens.u1()
    got = await burst(gw, token, BURST + 5)
    assert got.count(200) >= BURST and 429 in got
    assert world.upstream_calls() == got.count(200)
    denied = next(r for _m, _p, r in world.ledger.responses if r.status == 429)
    assert int(denied.headers["Retry-After"]) >= 1
    assert world.audit_for(denied)[0]["decision"] == "deny"


@pytest.mark.parametrize("spoof", ["X-Forwarded-For", "Forwarded", "X-Real-IP", "True-Client-IP",
                                   "CF-Connecting-IP"])
async def test_rl_02_03_preauth_ignores_client_address_headers(gw: Client, world: World, spoof: str) -> None:
    statuses = []
    for i in range(1, 41):
        value = f"for=198.51.100.{i}" if spoof == "Forwarded" else f"198.51.100.{i}"
        r = await gw.request("POST", "/v2/models/pub_clf/infer", json_body=PUB_BODY, token=INVALID,
                             headers={spoof: value})
        statuses.append(r.status)
    assert 429 in statuses  # all counted against the socket peer: the 20/s bucket trips
    assert world.upstream_calls() == 0


async def test_rl_04_many_tokens_one_principal(gw: Client, world: World, tokens: Tokens) -> None:
    toks = [tokens.u1() for _ in range(5)]  # distinct jti, same (tenant, sub)
    got = [(await gw.infer("pub_clf", PUB_BODY, token=toks[i % 5])).status for i in range(25)]
    assert got.count(200) <= BURST + 3 and 429 in got


async def test_rl_05_model_path_variants_share_bucket(gw: Client, world: World, tokens: Tokens) -> None:
    token = tokens.u1()
    paths = ["/v2/models/pub_clf/infer", "/v2/models/PUB_CLF/infer", "/v2/models/pub_clf/versions/1/infer"]
    got = [(await gw.request("POST", paths[i % 3], json_body=PUB_BODY, token=token)).status for i in range(24)]
    assert got.count(200) <= BURST + 3 and 429 in got


async def test_rl_06_batch_amplification(gw: Client, world: World, tokens: Tokens) -> None:
    body = {"inputs": [{"name": "x", "shape": [4096, 4], "datatype": "FP32", "data": [0.5] * (4096 * 4)}]}
    r = await gw.infer("pub_clf", body, token=tokens.u1())
    assert r.status in (413, 422)
    assert world.upstream_calls() == 0


async def test_rl_07_concurrent_burst(gw: Client, world: World, tokens: Tokens) -> None:
    token = tokens.u1()
    clients = [Client(world, world.next_addr()) for _ in range(10)]
    results = await asyncio.gather(*(clients[i % 10].infer("pub_clf", PUB_BODY, token=token) for i in range(100)))
    ok = sum(1 for r in results if r.status == 200)
    assert ok <= BURST + 2  # atomic check-and-take (a second may refill one token)
    assert world.upstream_calls() == ok
    assert all(r.status in (200, 429, 503) for r in results)


async def test_rl_09_key_injection(gw: Client, world: World, tokens: Tokens) -> None:
    f = world.tokens
    a = f.rs(sub=f"a:b.{tokens.suffix}", tenant="alpha", roles=("predictor",))
    b = f.rs(sub=f"b.{tokens.suffix}", tenant="alpha:a", roles=("predictor",))
    assert (await burst(gw, a, BURST)).count(200) == BURST
    second = await gw.infer("pub_clf", PUB_BODY, token=b)
    assert second.status in (403, 404)  # unknown tenant, and never a shared bucket
    for sub in ("x*", "x\r\ny", "x" * 10_000, "x\x00y"):
        r = await gw.infer("pub_clf", PUB_BODY, token=f.rs(sub=sub + tokens.suffix, tenant="alpha",
                                                           roles=("predictor",)))
        assert r.status in (200, 401, 431)  # a 10 KB subject makes the header too large
    assert json.dumps(world.ledger.responses[-1][2].headers)
