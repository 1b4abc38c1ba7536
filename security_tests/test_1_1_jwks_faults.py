"""CATALOGUE §1.1 AUTHN-24: JWKS endpoint faults (500, non-JSON, zero keys, 30 s hang).

Expectation (catalogue row): known keys keep working until max-stale, then 503 (fail
closed); never "accept without verification"; no request waits more than 2 s on JWKS.

Why a side gateway with its own IdP: the world gateway's key source is shared by every
case and already warm, so "startup" cannot be staged on it, and its IdP hit counter is
everyone's. Here one side gateway (built like production, ``build_app`` + ``runner_for``)
points its JWKS issuer at a private :class:`KeyServer`; each case points it at a new URL
path, which the key registry treats as a new source: a cold start on demand. Time past
TTL and max-stale moves the source's injectable clock (``JwksKeySource.clock``, swapped
for one on the same monotonic base), never a sleep.

"No request waits > 2 s" is shown without timing assertions: for the hang the policy's
fetch deadline is raised to 30 s, and the answers must arrive while that fetch is still
in flight (no failure recorded yet), so only the source's request window
(``request_wait_s``, 1.5 s, under the row's 2 s) can have released them. Measured waits go to
``results/jwks_faults.json`` (numbers, not assertions).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.identity.jwks import JwksKeySource
from security_tests.conftest import Tokens
from security_tests.support.jwtforge import ISSUER, forge, rs256, rsa_jwk
from security_tests.support.side import SideGateway
from security_tests.support.world import PUB_BODY, Client, KeyServer, Response, World

FAULTS = ("http500", "nonjson", "empty", "hang")
MAX_STALE_S = 3600  # set in the side's identity.yaml (jwks_settings.max_stale_s)
TTL_S = 300  # the KeyServer's Cache-Control: max-age
RESULTS = Path(__file__).resolve().parent / "results" / "jwks_faults.json"


@dataclass
class ShiftClock:
    """Monotonic time plus an offset: swapped in after a source's first fetch, on the same base."""

    offset: float = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@dataclass
class JwksSide:
    """The side gateway, its private IdP, and the identity.yaml it was rendered with."""

    world: World
    gw: SideGateway
    idp: KeyServer
    base_identity: str
    world_url: str
    url: str = ""
    waits_ms: dict[str, float] = field(default_factory=dict)

    def point_at(self, path: str, *, fetch_timeout_s: int = 2) -> None:
        """A fresh key source: the JWKS issuer now fetches ``path`` from the private IdP."""
        assert self.gw.settings is not None and self.gw.service is not None
        self.url = f"http://127.0.0.1:{self.idp.port}{path}"
        text = self.base_identity.replace(self.world_url, self.url).replace(
            "      fetch_timeout_s: 2\n",
            f"      fetch_timeout_s: {fetch_timeout_s}\n      max_stale_s: {MAX_STALE_S}\n")
        assert self.url in text and f"max_stale_s: {MAX_STALE_S}" in text
        (self.gw.settings.policies / "identity.yaml").write_text(text)
        store = self.gw.service.store
        # The policy watcher (1 s poll) may apply the edit first; then this reload is
        # "unchanged" (False, no error). Either way the revision in force must be this one.
        applied = self.world.loop.run(store.reload("test"))
        assert applied or store.last_error is None, store.last_error
        assert any(i.keys.jwks_url == self.url for i in store.current.policy.identity.issuers)
        self.gw.install_clock()

    def source(self) -> JwksKeySource:
        assert self.gw.service is not None
        for lazy in self.gw.service.key_sources._sources.values():
            if lazy.cfg.issuer == ISSUER and lazy.cfg.keys.jwks_url == self.url and lazy.source is not None:
                return lazy.source
        raise AssertionError(f"no key source built for {self.url}")

    def clock_on(self, source: JwksKeySource) -> ShiftClock:
        clock = ShiftClock()
        source.clock = clock
        return clock

    def client(self) -> Client:
        return self.gw.client()


@pytest.fixture(scope="module")
def jwks_side(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JwksSide]:
    idp = KeyServer({"keys": [rsa_jwk(world.keys.rs1, "rs-1")]})
    world.loop.run(idp.start())
    gw = SideGateway(world, tmp_path_factory.mktemp("sectest-jwks")).start()
    assert gw.settings is not None
    side = JwksSide(world, gw, idp, (gw.settings.policies / "identity.yaml").read_text(),
                    f"http://127.0.0.1:{world.idp.port}/jwks.json")
    try:
        yield side
    finally:
        idp.mode = "ok"
        gw.stop()
        world.loop.run(idp.stop())
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps({"request_wait_ms": side.waits_ms}, indent=2, sort_keys=True) + "\n")


@pytest.fixture
def side(jwks_side: JwksSide) -> Iterator[JwksSide]:
    jwks_side.idp.mode = "ok"
    yield jwks_side
    jwks_side.idp.mode = "ok"
    jwks_side.gw.check_nl()


def token(tokens: Tokens, i: int, **over: Any) -> str:
    """A fresh u1-like token with its own subject (the per-subject rate limit stays out of the way)."""
    return tokens.u1(sub=f"{tokens.sub('u1')}.{i}", **over)


async def timed(client: Client, tok: str) -> tuple[Response, float]:
    started = time.perf_counter()
    r = await client.infer("pub_clf", PUB_BODY, token=tok)
    return r, time.perf_counter() - started


def forged(world: World, tokens: Tokens, kid: str = "rs-1") -> str:
    """A token naming a published kid but signed with the attacker's key: must never pass."""
    return tokens.remember(forge({"alg": "RS256", "kid": kid, "typ": "at+jwt"},
                                 world.tokens.claims(sub=tokens.sub("forger")), rs256(world.keys.attacker_rs)))


def assert_unavailable(side: JwksSide, r: Response) -> None:
    """503 fail-closed, with Retry-After and a deny audit record (``r`` from its own client address)."""
    assert r.status == 503, (r.status, r.body[:200])
    assert int(r.headers["Retry-After"]) >= 1
    recs = side.gw.audit_for(r)
    assert [(rec["decision"], rec["reason"]) for rec in recs] == [("deny", "jwks_unavailable")]


def refusals_logged(world: World, since: int, reason: str) -> int:
    return sum(1 for line in world.logs.text()[since:].splitlines()
               if '"request_refused"' in line and f'"reason": "{reason}"' in line)


# -- at startup: the IdP already misbehaves when the key source is first used ----------------------


@pytest.mark.parametrize("fault", FAULTS)
async def test_authn_24_jwks_fault_at_startup(side: JwksSide, world: World, tokens: Tokens, fault: str) -> None:
    side.idp.mode = fault
    # For the hang, a 30 s fetch deadline: only the request window can release the requests.
    side.point_at(f"/startup-{fault}.json", fetch_timeout_s=30 if fault == "hang" else 2)
    hits0, log0 = side.idp.hits, len(world.logs.text())
    # One client address each: anonymous refusals are audited first per (client, reason, minute).
    answers = await asyncio.gather(*(timed(side.client(), token(tokens, i)) for i in range(6)),
                                   timed(side.client(), forged(world, tokens)))
    source = side.source()
    for r, _ in answers:
        assert_unavailable(side, r)  # fail closed: not 200, and not a silent 401 either
    assert side.idp.hits - hits0 == 1  # seven concurrent cold requests, one fetch
    assert source.settings.request_wait_s < 2.0
    if fault == "hang":
        # Answered while the 30 s fetch is still in flight: the request window released them.
        assert (source.fetches, source.failures) == (1, 0)
        assert source.waits_cut == len(answers)
        assert side.idp.mode == "hang"
    else:
        assert (source.fetches, source.failures) == (1, 1)
        assert '"jwks_refresh_failed"' in world.logs.text()[log0:]
    assert refusals_logged(world, log0, "jwks_unavailable") == len(answers)
    side.waits_ms[f"startup_{fault}_max"] = round(max(t for _, t in answers) * 1000, 1)

    # Inside the backoff (or while the slow fetch runs) nothing more reaches the IdP, nobody waits.
    clock = side.clock_on(source)
    more = [await timed(side.client(), token(tokens, 10 + i)) for i in range(5)]
    for r, _ in more:
        assert_unavailable(side, r)
    assert side.idp.hits - hits0 == 1
    side.waits_ms[f"startup_{fault}_backoff_max"] = round(max(t for _, t in more) * 1000, 1)

    # The IdP heals: the next allowed fetch brings the keys, and requests pass again.
    side.idp.mode = "ok"
    if fault == "hang":
        assert world.loop.run(source.refresh()) is True  # the slow fetch in flight now completes
    else:
        clock.offset += 5  # the first failure backoff
    world.fake.reset()
    r = await side.client().infer("pub_clf", PUB_BODY, token=token(tokens, 20))
    assert r.status == 200, r.body[:200]
    assert world.upstream_calls() == 1
    assert side.idp.hits - hits0 == (1 if fault == "hang" else 2)  # the hang's own fetch was the one
    # Still verified: the attacker-signed token naming the real kid is refused.
    r = await side.client().infer("pub_clf", PUB_BODY, token=forged(world, tokens))
    assert r.status == 401


# -- at refresh: keys cached, then the IdP misbehaves ----------------------------------------------


@pytest.mark.parametrize("fault", FAULTS)
async def test_authn_24_jwks_fault_at_refresh(side: JwksSide, world: World, tokens: Tokens, fault: str) -> None:
    side.point_at(f"/refresh-{fault}.json", fetch_timeout_s=30 if fault == "hang" else 2)
    client = side.client()
    assert (await client.infer("pub_clf", PUB_BODY, token=token(tokens, 0))).status == 200
    source = side.source()
    clock = side.clock_on(source)
    hits0, log0 = side.idp.hits, len(world.logs.text())
    side.idp.mode = fault

    # Inside the TTL the outage is invisible: cached keys, no fetch.
    assert (await client.infer("pub_clf", PUB_BODY, token=token(tokens, 1))).status == 200
    assert side.idp.hits == hits0

    # Past the TTL: one refresh attempt meets the fault; the known kid keeps verifying (stale).
    clock.offset += TTL_S + 1
    r, waited = await timed(client, token(tokens, 2))
    assert r.status == 200, r.body[:200]
    assert side.idp.hits - hits0 == 1
    assert source.stale_served == 1
    if fault == "hang":
        assert (source.failures, source.waits_cut) == (0, 1)  # answered with the 30 s fetch in flight
    else:
        assert source.failures == 1
        assert '"jwks_refresh_failed"' in world.logs.text()[log0:]
    side.waits_ms[f"refresh_{fault}_first_stale"] = round(waited * 1000, 1)

    # During the outage: known kids keep working, unknown kids and forgeries are refused fast,
    # and none of it reaches the IdP (negative caching / single flight).
    waits: list[float] = []
    for i in range(8):
        r, t = await timed(side.client(), token(tokens, 100 + i))
        assert r.status == 200
        waits.append(t)
        r, t = await timed(side.client(), token(tokens, 200 + i, header={"kid": f"rs-unknown-{i}"}))
        assert r.status == 401
        assert side.gw.audit_for(r)[0]["reason"] == "authn_unknown_kid"
        waits.append(t)
    r = await side.client().infer("pub_clf", PUB_BODY, token=forged(world, tokens))
    assert r.status == 401  # a stale key still verifies signatures: never "accept unverified"
    assert side.idp.hits - hits0 == 1
    side.waits_ms[f"refresh_{fault}_outage_max"] = round(max(waits) * 1000, 1)

    # Past TTL + max-stale: the cache is no longer trusted; fail closed.
    clock.offset += MAX_STALE_S
    log1 = len(world.logs.text())
    for i in range(4):
        assert_unavailable(side, await side.client().infer("pub_clf", PUB_BODY, token=token(tokens, 300 + i)))
    assert_unavailable(side, await side.client().infer("pub_clf", PUB_BODY, token=forged(world, tokens)))
    assert refusals_logged(world, log1, "jwks_unavailable") == 5
    # At most one more attempt (the backoff had passed), never one per request.
    assert side.idp.hits - hits0 <= 2

    # Heal: the next allowed fetch brings fresh keys; nothing stale is served any more.
    side.idp.mode = "ok"
    if fault == "hang":
        world.loop.run(source.refresh())  # let the slow fetch in flight finish (or fetch anew)
    clock.offset += 31  # past any backoff (capped at the 30 s cooldown)
    world.fake.reset()
    assert (await side.client().infer("pub_clf", PUB_BODY, token=token(tokens, 400))).status == 200
    stale = source.stale_served
    assert (await side.client().infer("pub_clf", PUB_BODY, token=token(tokens, 401))).status == 200
    assert source.stale_served == stale
    assert world.upstream_calls() == 2


# -- a new signing key during the outage: refused fast, at most one fetch per cooldown ------------


async def test_authn_24_unknown_kid_flood_during_a_hang_is_cut(side: JwksSide, world: World,
                                                               tokens: Tokens) -> None:
    side.point_at("/flood-hang.json", fetch_timeout_s=30)
    assert (await side.client().infer("pub_clf", PUB_BODY, token=token(tokens, 0))).status == 200
    source = side.source()
    clock = side.clock_on(source)
    hits0 = side.idp.hits
    side.idp.mode = "hang"
    clock.offset += 31  # past the unknown-kid cooldown, keys still fresh
    # A key the IdP has not published (yet): the first lookup may refresh once, the rest join or wait out.
    rs_new = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    client = side.client()
    new_tokens = [tokens.remember(forge({"alg": "RS256", "kid": "rs-new", "typ": "at+jwt"},
                                        world.tokens.claims(sub=tokens.sub(f"n{i}")), rs256(rs_new)))
                  for i in range(10)]
    answers = await asyncio.gather(*(timed(client, t) for t in new_tokens))
    assert [r.status for r, _ in answers] == [401] * 10
    assert side.idp.hits - hits0 == 1
    assert source.failures == 0 and source.waits_cut == 10  # the fetch still runs; nobody waited it out
    side.waits_ms["unknown_kid_flood_hang_max"] = round(max(t for _, t in answers) * 1000, 1)
    # The known kid is unaffected meanwhile.
    assert (await side.client().infer("pub_clf", PUB_BODY, token=token(tokens, 1))).status == 200
    side.idp.mode = "ok"
    assert world.loop.run(source.refresh()) is True


# ---------------------------------------------------------------------------------------
# A key set written into policy (identity.yaml ``keys.jwks``) is held to the rules of a
# fetched JWKS: no encryption keys, no private material, no two keys under one kid.
# ---------------------------------------------------------------------------------------


def _policy_jwks_problem(keys: list[dict[str, Any]]) -> str | None:
    from gateway.policy.compile import _static_keys
    from gateway.policy.schema import IssuerPolicy

    cfg = IssuerPolicy.model_validate({"issuer": "https://idp.test/realms/static", "audiences": ["inference-gw"],
                                       "algorithms": ["RS256"], "keys": {"jwks": {"keys": keys}}})
    try:
        _static_keys(cfg)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("variant", ["use_enc", "key_ops_sign_only", "key_ops_not_a_list", "duplicate_kid",
                                     "two_without_kid", "private_prime", "kid_with_space"])
def test_authn_25_policy_jwks_held_to_jwks_rules(variant: str) -> None:
    """Brief variants "JWKS with duplicate kids, keys with use: enc or key_ops without
    verify": the fetched source skips such keys; the same keys pasted into policy were
    loaded (the last of two same-kid keys silently won). Now a policy error naming why."""
    k1, k2 = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    a, b = rsa_jwk(k1, "rs-a"), rsa_jwk(k2, "rs-b")
    variants: dict[str, list[dict[str, Any]]] = {
        "use_enc": [{**a, "use": "enc"}],
        "key_ops_sign_only": [{**a, "key_ops": ["sign"]}],
        "key_ops_not_a_list": [{**a, "key_ops": "verify"}],
        "duplicate_kid": [a, {**b, "kid": "rs-a"}],
        "two_without_kid": [{k: v for k, v in a.items() if k != "kid"}, {k: v for k, v in b.items() if k != "kid"}],
        "private_prime": [{**a, "p": "AQAB"}],
        "kid_with_space": [{**a, "kid": "rs a"}],
    }
    problem = _policy_jwks_problem(variants[variant])
    assert problem is not None and problem.startswith("keys.jwks")
    # Positive control: the two keys as published (sig keys, distinct kids, key_ops verify) load.
    assert _policy_jwks_problem([{**a, "use": "sig"}, {**b, "key_ops": ["verify"]}]) is None
