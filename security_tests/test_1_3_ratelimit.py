"""CATALOGUE §1.3 Rate-limit evasion (profile: 1 req/s per (tenant, sub), burst 10; pre-auth 20/s per address)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from security_tests.conftest import Tokens
from security_tests.support.side import RedisSide
from security_tests.support.world import PUB_BODY, Client, World, gather_limited
from tests.support.preauth import count_preauth_admits

BURST = 10
INVALID = "invalid.token.x"


async def burst(gw: Client, token: str, n: int, path: str = "/v2/models/pub_clf/infer",
                body: Any = PUB_BODY) -> list[int]:
    return [(await gw.request("POST", path, json_body=body, token=token)).status for _ in range(n)]


async def test_rl_01_baseline(gw: Client, world: World, tokens: Tokens) -> None:
    await baseline_burst_limited(gw, world, tokens.u1())


async def baseline_burst_limited(gw: Client, world: World, token: str) -> None:
    """RL-01's attack and expectation (also run without `subject_rate`: test_protection_off)."""
    before = world.upstream_calls()
    got = await burst(gw, token, BURST + 5)
    assert got.count(200) >= BURST and 429 in got
    assert world.upstream_calls() - before == got.count(200)
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


# -- RL-08: window boundary, on the injectable clock (§0.1 ``clock``) -------------------------

@pytest.fixture
def limiter_clock(world: World) -> Iterator[None]:
    """The world's memory store on the case clock; the shared per-tenant cost limit is
    scoped away from alpha meanwhile, so a jump in time leaves no debt for later cases."""
    from gateway.state.memory import MemoryState

    assert world.service is not None and world.settings is not None
    state = world.service.state
    assert isinstance(state, MemoryState)
    path = world.settings.policies / "limits.yaml"
    old = path.read_text()
    path.write_text(old.replace("    per: [tenant]\n", "    per: [tenant]\n    exclude_tenants: [alpha]\n"))
    assert world.reload() is True
    state._clock = world.clock  # the constructor's clock parameter, set on the live store
    try:
        yield
    finally:
        state._clock = time.time
        path.write_text(old)
        world.reload()


async def test_rl_08_window_boundary_burst(gw: Client, world: World, tokens: Tokens, limiter_clock: None) -> None:
    t0 = time.time()
    world.frozen = t0
    token = tokens.u1()
    # Eight source addresses: the pre-auth limit (20 per address at one instant) stays out of the way.
    clients = [Client(world, world.next_addr()) for _ in range(8)]
    admitted: list[float] = []

    async def at(t: float, n: int) -> None:
        world.frozen = t0 + t
        for i in range(n):
            if (await clients[i % 8].infer("pub_clf", PUB_BODY, token=token)).status == 200:
                admitted.append(t)

    for second in range(60):  # one request per second, the sustained rate: all admitted
        await at(float(second), 1)
    await at(59.9, 60)  # the attacker's burst just before a fixed window would roll over
    await at(60.1, 60)  # ... and just after it
    in_span = [t for t in admitted if 0.1 <= t <= 60.1]
    assert len(in_span) <= 60 + BURST  # sliding (GCRA), not a fixed window (which admits 120 here)
    assert sum(1 for t in admitted if t == 60.1) <= 1  # no fresh allowance at the "boundary"
    assert sum(1 for t in admitted if t < 59.9) == 60
    assert world.upstream_calls() == len(admitted)


# -- RL-10/11/12: the gateway on real Redis behind a FaultProxy (side gateway) ----------------

DP_BODY: dict[str, Any] = {"inputs": [{"name": "x", "shape": [1, 20], "datatype": "FP32",
                                       "data": [round(0.05 * i, 2) for i in range(20)]}]}


@pytest.fixture
def redis_gw(redis_side: RedisSide) -> Iterator[RedisSide]:
    redis_side.heal()
    yield redis_side
    redis_side.heal()
    redis_side.gateway.restore_policies()
    redis_side.gateway.check_nl()


def _rate_keys(side: RedisSide) -> list[str]:
    keys = side.server.cli("--scan", "--pattern", "ig:*").split()
    return [k for k in keys if ":rl." in k]


async def test_rl_10_ttl_survives_connection_reset(redis_gw: RedisSide, world: World, tokens: Tokens) -> None:
    side = redis_gw
    gw = side.gateway.client()
    token = tokens.u1()
    assert (await gw.infer("pub_clf", PUB_BODY, token=token)).status == 200

    async def cut() -> None:
        await asyncio.sleep(0.01)
        side.proxy.reset()  # RST on every connection, mid-burst, between writes

    results = await asyncio.gather(*(gw.infer("pub_clf", PUB_BODY, token=token) for _ in range(15)), cut())
    side.heal()
    got = [r.status for r in results if r is not None]
    assert set(got) <= {200, 429, 503}
    keys = _rate_keys(side)
    assert keys
    for key in keys:
        ttl = int(side.server.cli("PTTL", key))
        # Every limiter key carries its expiry (one script writes value and TTL together):
        # nobody is blocked forever. -1 would be a key without expiry (-2: already expired).
        assert ttl != -1 and ttl <= 120_000, (key, ttl)


async def test_rl_11_redis_down_fails_closed(redis_gw: RedisSide, world: World, tokens: Tokens) -> None:
    side = redis_gw
    gw = side.gateway.client()
    side.proxy.blackhole()
    pub = [await gw.infer("pub_clf", PUB_BODY, token=tokens.u1()) for _ in range(3)]
    dp = [await gw.infer("tab_dp", DP_BODY, token=tokens.u2()) for _ in range(3)]
    for r in pub + dp:
        assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
        rec = side.gateway.audit_for(r)
        assert len(rec) == 1 and rec[0]["decision"] == "deny"
        assert "unavailable" in rec[0]["reason"]
    assert world.upstream_calls() == 0  # never unlimited: nothing reached the model

    # Policy says ``local`` for the non-DP limits: local in-process limits, still never unlimited.
    side.heal()
    side.gateway.edit_policy("limits.yaml", "on_backend_error: deny\npre_auth:", "on_backend_error: local\npre_auth:")
    side.proxy.blackhole()
    token = tokens.u1(sub=tokens.sub("local"))
    local = [(await gw.infer("pub_clf", PUB_BODY, token=token)).status for _ in range(BURST + 5)]
    assert local.count(200) == BURST and local[BURST:] == [429] * 5
    # The DP budget has no local stand-in: the DP route stays closed.
    assert (await gw.infer("tab_dp", DP_BODY, token=tokens.u2())).status == 503
    assert world.upstream_calls() == BURST


async def test_rl_12_redis_slow_times_out_to_fail_mode(redis_gw: RedisSide, world: World, tokens: Tokens) -> None:
    side = redis_gw
    gw = side.gateway.client()
    side.proxy.latency(2000)
    got = [await gw.infer("pub_clf", PUB_BODY, token=tokens.u1()) for _ in range(3)]
    assert [r.status for r in got] == [503, 503, 503]  # 100 ms op timeout → the deny fail mode
    assert world.upstream_calls() == 0
    side.heal()
    assert (await gw.infer("pub_clf", PUB_BODY, token=tokens.u1(sub=tokens.sub("after")))).status == 200


# -- Variants: a limit's kind changed on reload; one key of the wrong type (WRONGTYPE) -----------

RULES = {
    "rate": "  - name: subject_rate\n    kind: rate\n    per: [tenant, subject]\n    rate: 1\n    burst: 10\n",
    "quota": "  - name: subject_rate\n    kind: quota\n    per: [tenant, subject]\n    limit: 100\n    period: day\n",
    "concurrency": "  - name: subject_rate\n    kind: concurrency\n    per: [tenant, subject]\n    limit: 5\n",
}


@pytest.mark.parametrize(("old", "new"), [("rate", "quota"), ("quota", "rate"), ("rate", "concurrency")])
async def test_rl_limit_kind_change_on_reload_redis(redis_gw: RedisSide, world: World, tokens: Tokens,
                                                    old: str, new: str) -> None:
    """An operator keeps a limit's name and changes its kind. The old bucket (a GCRA time, a
    quota hash, a lease set) used to sit under the same Redis key: every caller with a live
    bucket got 503 (WRONGTYPE) until it expired, a day for a daily quota. Now the new limit
    has its own keys and applies at once."""
    side = redis_gw
    if old != "rate":
        side.gateway.edit_policy("limits.yaml", RULES["rate"], RULES[old])
    gw = side.gateway.client()
    token = tokens.u1()
    assert (await gw.infer("pub_clf", PUB_BODY, token=token)).status == 200  # a live bucket of the old kind
    side.gateway.edit_policy("limits.yaml", RULES[old], RULES[new])
    after = [await gw.infer("pub_clf", PUB_BODY, token=token) for _ in range(3)]
    assert [r.status for r in after] == [200, 200, 200], [r.body for r in after]
    assert all(side.gateway.audit_for(r)[0]["decision"] == "allow" for r in after)


async def test_rl_limit_kind_change_on_reload_memory(gw: Client, world: World, tokens: Tokens) -> None:
    """The same on the in-process store (no Redis): it refused the old structure as Redis does."""
    assert world.settings is not None
    path = world.settings.policies / "limits.yaml"
    old = path.read_text()
    token = tokens.u1()
    assert (await gw.infer("pub_clf", PUB_BODY, token=token)).status == 200
    path.write_text(old.replace(RULES["rate"], RULES["quota"]))
    assert world.reload() is True
    try:
        after = [(await gw.infer("pub_clf", PUB_BODY, token=token)).status for _ in range(3)]
    finally:
        path.write_text(old)
        world.reload()
    assert after == [200, 200, 200]


async def test_av_08_wrongtype_on_one_key_stays_with_its_caller(redis_gw: RedisSide, world: World,
                                                                 tokens: Tokens) -> None:
    """AV-08 variant: a WRONGTYPE reply (one limiter key holding another structure). Its
    caller fails closed (503, audited, never a 500); but the error is about one key, not
    Redis: counted by the store's breaker, 30 such calls opened it and every other tenant
    got 503 for the cooldown."""
    from gateway.state.base import StateKey

    side = redis_gw
    assert side.gateway.service is not None
    state = side.gateway.service.state
    sub = tokens.sub("u1")
    key = state.key(StateKey("t:alpha", "rl.subject_rate.rate", ("alpha", sub)))  # type: ignore[attr-defined]
    side.server.cli("HSET", key, "x", "1")
    try:
        clients = [side.gateway.client() for _ in range(10)]
        poisoned = await asyncio.gather(*(clients[i % 10].infer("pub_clf", PUB_BODY, token=tokens.u1())
                                          for i in range(30)))
        others = [await side.gateway.client().infer("pub_clf", PUB_BODY, token=tokens.u2(sub=tokens.sub(f"o{i}")))
                  for i in range(3)]
    finally:
        side.server.cli("DEL", key)
    assert {r.status for r in poisoned} == {503}
    rec = side.gateway.audit_for(poisoned[0])
    assert len(rec) == 1 and rec[0]["decision"] == "deny" and "unavailable" in rec[0]["reason"]
    assert [r.status for r in others] == [200, 200, 200]  # the breaker stayed closed for everyone else
    assert state._breaker.failures == 0  # type: ignore[attr-defined]
    assert world.upstream_calls() == 3


# -- RL-13: invalid-token flood from one address -----------------------------------------------

async def test_rl_13_invalid_token_flood(gw: Client, world: World, tokens: Tokens) -> None:
    """Scaled to 600 requests (one address, one keep-alive connection at a time): the
    pre-auth limit trips before any signature check, and the audit aggregates the flood."""
    assert world.service is not None
    bad = world.tokens.rs(sub=tokens.sub("x"), header={"kid": "rs-1"}) + "A"  # valid shape, bad signature
    counters_before = world.service.key_sources.counters()["hits"]
    audit_before = len(world.audit_records())
    got = await gather_limited(600, lambda _i: gw.infer("pub_clf", PUB_BODY, token=bad), limit=20)
    statuses = [r.status for r in got]
    assert set(statuses) <= {401, 429}
    assert statuses.count(429) >= 500  # 20/s per address: the flood is refused before authentication
    key_lookups = world.service.key_sources.counters()["hits"] - counters_before
    assert key_lookups == statuses.count(401)  # every RSA verification belongs to an admitted request
    assert len(world.audit_records()) - audit_before < 100  # denials aggregated, not 600 lines
    assert world.upstream_calls() == 0


@pytest.mark.parametrize("authorization", ["Basic dTE6cHc=", "Bearer", "Negotiate YWJj", "Bearer a b"])
async def test_rl_13_malformed_credentials_count_against_pre_auth(gw: Client, world: World,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   authorization: str) -> None:
    """RL-13 variant: a flood whose Authorization header is not even a bearer token (Basic,
    an empty Bearer, another scheme) was refused before the pre-auth limit saw it, so it was
    never throttled. Every such request must be counted per address, then refused."""
    counted = count_preauth_admits(monkeypatch)
    got = await gather_limited(80, lambda _i: gw.request("POST", "/v2/models/pub_clf/infer", json_body=PUB_BODY,
                                                         headers={"Authorization": authorization}), limit=20)
    statuses = [r.status for r in got]
    assert set(statuses) <= {401, 429}
    assert counted.count(gw.addr) == 80  # every one went through the per-address limit
    assert 429 in statuses  # 20/s per address, burst 20: the flood is throttled
    assert world.upstream_calls() == 0


# -- Variant: --workers N without Redis ------------------------------------------------------------

def test_rl_workers_without_redis_warns_at_start(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """``--workers 2`` without ``--redis``: each worker enforces the limits alone, so a client
    spread over the workers gets twice each. The command says so before serving (it used to
    say nothing); with Redis, or with no limits at all, it stays quiet."""
    import dataclasses
    from pathlib import Path

    from gateway import app as gateway_app
    from gateway.cli import main
    from gateway.observability import logging as gateway_logging
    from gateway.policy.loader import load_policy_dir
    from gateway.settings import Settings
    from gateway.stages.ratelimit import RateLimitPolicy
    from gateway.startup_checks import per_worker_limits_warning

    policies = Path(__file__).resolve().parents[1] / "policies"
    limits = load_policy_dir(policies).limits
    assert limits.limits or limits.pre_auth is not None  # the shipped set has limits
    settings = Settings(policies=policies)
    message = per_worker_limits_warning(settings, 2, limits)
    assert message is not None and "--redis" in message and "2 times" in message
    assert per_worker_limits_warning(settings, 1, limits) is None
    assert per_worker_limits_warning(dataclasses.replace(settings, redis_url="redis://127.0.0.1:1"), 2, limits) is None
    assert per_worker_limits_warning(settings, 2, RateLimitPolicy()) is None

    started: list[int] = []

    def serve_workers(_settings: Settings, workers: int, **_kw: Any) -> int:
        started.append(workers)  # stands in for the worker processes: nothing is served
        return 0

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gateway_app, "serve_workers", serve_workers)
        # The command configures process-wide logging; the world's gateway logs through it.
        mp.setattr(gateway_logging, "configure_logging", lambda _level: None)
        code = main(["serve", "--policies", str(policies), "--workers", "2", "--backend", "local:triton_repo",
                     "--audit-dir", str(tmp_path / "audit"), "--state-dir", str(tmp_path / "state")])
    assert code == 0 and started == [2]
    assert "WARNING: --workers 2 without --redis" in capsys.readouterr().err
