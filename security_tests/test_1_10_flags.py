"""CATALOGUE §1.10 Availability / faults, AV-12: the feature-flag store fails during a rollback.

Expectation: the stable variant is served (safe default) whatever breaks: the flag file
(garbage, truncated, deleted), the OFREP flag service (down, 500, garbage, hanging) or
Redis holding the shared rollback state; an audit record and a log line say why; a
rollback to a 0 % canary takes effect within 10 s; a canary call already in flight when
it lands finishes on the canary; one subject's calls stay on one variant.

Each case uses a side gateway with its own copy of the world's policy (the world's
gateway is shared by every case), routing ``pub_clf`` by ``pub-clf-version``: variant
``stable`` = version 1, ``canary`` = version 2 of the fake Triton, which records the
version every call asked for.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from security_tests.conftest import Tokens
from security_tests.support.side import RedisSide, SideGateway
from security_tests.support.world import PUB_BODY, Response, World
from tests.support.fake_triton import ok, slow
from tests.support.ofrep_server import OfrepServer

FLAG = "pub-clf-version"
Fault = Callable[[OfrepServer], Coroutine[Any, Any, None]]
WORLD_FLAGS = Path(__file__).resolve().parent / "world" / "policies" / "flags.json"
ROLLBACK_DEADLINE_S = 10.0  # the catalogue's bound for a rollback to take effect


def flags_doc(stable: int, canary: int) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(WORLD_FLAGS.read_text())
    doc["flags"][FLAG]["targeting"] = {"fractional": [["stable", stable], ["canary", canary]]}
    return doc


def write_flags(side: SideGateway, stable: int, canary: int) -> None:
    assert side.settings is not None
    (side.settings.policies / "flags.json").write_text(json.dumps(flags_doc(stable, canary), indent=2))


def reload(side: SideGateway) -> None:
    assert side.service is not None
    side.world.loop.run(side.service.store.reload("test"))
    side.install_clock()


class Caller:
    """Calls ``pub_clf`` on a side gateway, each call as a fresh subject (rate buckets stay apart)."""

    def __init__(self, side: SideGateway, tokens: Tokens) -> None:
        self.side = side
        self.tokens = tokens
        self.n = 0

    async def call(self, subject: str | None = None) -> Response:
        self.n += 1
        token = self.tokens.u1(sub=self.tokens.sub(subject or f"c{self.n}"))
        return await self.side.client().infer("pub_clf", PUB_BODY, token=token)

    async def until(self, variant: str, *, deadline_s: float = ROLLBACK_DEADLINE_S) -> Response:
        """Call until a call is served by ``variant``; fail after ``deadline_s``."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while True:
            r = await self.call()
            assert r.status == 200, (r.status, r.body[:200])
            if r.headers.get("X-Model-Variant") == variant:
                return r
            assert loop.time() < end, f"still not served by {variant!r} after {deadline_s} s"
            await asyncio.sleep(0.1)


def version_of(r: Response) -> str:
    return str(r.json()["model_version"])


def assert_stable(side: SideGateway, world: World, r: Response, reason: str) -> None:
    assert r.status == 200
    assert r.headers.get("X-Model-Variant") == "stable" and version_of(r) == "1"
    (rec,) = side.audit_for(r)
    assert rec["decision"] == "allow" and rec["variant"] == "stable", rec
    assert rec["variant_reason"] == reason, rec["variant_reason"]
    assert world.fake.requests[-1].model_version == "1"


@pytest.fixture
def canary_side(side_gateways: Callable[..., SideGateway]) -> SideGateway:
    """A side gateway whose flag file sends every subject to the canary."""
    side = side_gateways("flags")
    write_flags(side, 0, 100)
    reload(side)
    return side


# -- the flag file (file provider) ---------------------------------------------------------------


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xff{{{ not json")


def _truncated(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _deleted(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("breakage", [_garbage, _truncated, _deleted], ids=["garbage", "truncated", "deleted"])
async def test_av_12_flag_file_broken_mid_run_serves_stable(world: World, tokens: Tokens, canary_side: SideGateway,
                                                            breakage: Callable[[Path], None]) -> None:
    side = canary_side
    caller = Caller(side, tokens)
    r = await caller.call()
    assert r.headers.get("X-Model-Variant") == "canary" and version_of(r) == "2"
    assert side.settings is not None
    path = side.settings.policies / "flags.json"
    log_start = len(world.logs.text())
    try:
        breakage(path)  # the policy watcher sees it: no explicit reload
        r = await caller.until("stable")
        assert_stable(side, world, r, "flag_file_unusable")
        logs = world.logs.text()[log_start:]
        assert '"flag_file_unusable"' in logs and '"policy_reload_rejected"' in logs
        # The rollback the operator meant to write lands: stable for its own reason.
        write_flags(side, 100, 0)
        loop = asyncio.get_running_loop()
        end = loop.time() + ROLLBACK_DEADLINE_S
        while True:
            r = await caller.call()
            if side.audit_for(r)[0]["variant_reason"] != "flag_file_unusable":
                break
            assert loop.time() < end, "a usable flag file did not end the hold"
            await asyncio.sleep(0.1)
        assert_stable(side, world, r, "targeting_match")
    finally:
        if not path.exists():
            write_flags(side, 100, 0)


async def test_av_12_rollback_within_10s_and_in_flight_canary_finishes(world: World, tokens: Tokens,
                                                                       canary_side: SideGateway) -> None:
    side = canary_side
    caller = Caller(side, tokens)
    world.fake.set(slow(6.0), model="pub_clf")
    in_flight = asyncio.ensure_future(caller.call("in-flight"))
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while not world.fake.requests:  # the canary call has reached the upstream
        assert loop.time() < end and not in_flight.done()
        await asyncio.sleep(0.02)
    world.fake.set(ok(), model="pub_clf")
    write_flags(side, 100, 0)  # rollback to a 0 % canary, picked up by the policy watcher
    r = await caller.until("stable")
    assert_stable(side, world, r, "targeting_match")
    assert not in_flight.done(), "precondition: the canary call was still in flight when the rollback landed"
    first = await in_flight
    assert first.status == 200
    assert first.headers.get("X-Model-Variant") == "canary" and version_of(first) == "2"
    assert world.fake.requests[0].model_version == "2"
    assert side.audit_for(first)[0]["variant"] == "canary"


async def test_av_12_one_subject_stays_on_one_variant(world: World, tokens: Tokens,
                                                      side_gateways: Callable[..., SideGateway]) -> None:
    side = side_gateways("sticky")
    write_flags(side, 50, 50)
    reload(side)
    caller = Caller(side, tokens)
    seen: dict[str, set[str]] = {}
    for subject in range(12):
        for _ in range(3):
            r = await caller.call(f"seq{subject}")
            assert r.status == 200
            seen.setdefault(f"seq{subject}", set()).add(f"{r.headers['X-Model-Variant']}:{version_of(r)}")
    assert all(len(v) == 1 for v in seen.values()), seen
    assert set().union(*seen.values()) == {"stable:1", "canary:2"}  # the split does split


# -- the OFREP flag service ----------------------------------------------------------------------


async def ofrep_side(side: SideGateway, service: OfrepServer, tokens: Tokens) -> tuple[SideGateway, Caller]:
    """``side`` asking ``service`` (0.5 s deadline, 5 s cool-down), checked to route to its canary."""
    side.edit_policy("gateway.yaml", "stages:\n", f"flags:\n  provider:\n    kind: ofrep\n    url: {service.url}\n"
                                                  "    timeout_s: 0.5\n    cooldown_s: 5\nstages:\n")
    caller = Caller(side, tokens)
    r = await caller.call()
    assert r.headers.get("X-Model-Variant") == "canary" and version_of(r) == "2"
    return side, caller


async def _down(service: OfrepServer) -> None:
    await service.stop()


async def _http500(service: OfrepServer) -> None:
    service.status_override = 500


async def _garbage_answer(service: OfrepServer) -> None:
    service.mode = "garbage"


async def _hang(service: OfrepServer) -> None:
    service.mode = "hang"


@pytest.mark.parametrize("fault", [_down, _http500, _garbage_answer, _hang], ids=["down", "500", "garbage", "hang"])
async def test_av_12_ofrep_service_fault_serves_stable(world: World, tokens: Tokens,
                                                       side_gateways: Callable[..., SideGateway],
                                                       fault: Fault) -> None:
    service = world.loop.run(OfrepServer.start(flags_doc(0, 100)))
    try:
        side, caller = await ofrep_side(side_gateways("ofrep"), service, tokens)
        log_start = len(world.logs.text())
        world.loop.run(fault(service))
        r = await caller.call()  # the very next call: no canary, no hang (0.5 s provider deadline)
        assert_stable(side, world, r, "error")
        logs = world.logs.text()[log_start:]
        assert '"flag_provider_unavailable"' in logs and '"flag_evaluation_failed"' in logs
        r = await caller.call()  # cooling down: stable without asking
        assert_stable(side, world, r, "error")
    finally:
        service.unhang()
        world.loop.run(service.stop())


async def test_av_12_ofrep_rollback_takes_effect_within_10s(world: World, tokens: Tokens,
                                                            side_gateways: Callable[..., SideGateway]) -> None:
    service = world.loop.run(OfrepServer.start(flags_doc(0, 100)))
    try:
        side, caller = await ofrep_side(side_gateways("ofrep-rollback"), service, tokens)
        service.flags = flags_doc(100, 0)  # the flag service is told: canary 0 %
        r = await caller.until("stable")
        assert_stable(side, world, r, "targeting_match")
    finally:
        world.loop.run(service.stop())


# -- Redis holding the shared rollback state -----------------------------------------------------


@pytest.fixture
def redis_flags(redis_side: RedisSide) -> Iterator[RedisSide]:
    redis_side.heal()
    side = redis_side.gateway
    # Rate limits fall back to local buckets when Redis is down (explicitly, in policy), so
    # that what the flags do is visible as a 200 rather than hidden behind a fail-closed 503.
    side.edit_policy("limits.yaml", "on_backend_error: deny\n", "on_backend_error: local\n")
    write_flags(side, 0, 100)
    reload(side)
    yield redis_side
    redis_side.heal()
    side.restore_policies()
    side.check_nl()


async def test_av_12_shared_rollback_store_down_serves_stable(world: World, tokens: Tokens,
                                                              redis_flags: RedisSide) -> None:
    side = redis_flags.gateway
    caller = Caller(side, tokens)
    r = await caller.until("canary")  # the store is read and confirms: no rollback
    assert version_of(r) == "2"
    log_start = len(world.logs.text())
    redis_flags.proxy.blackhole()
    r = await caller.until("stable")  # within the store refresh interval
    assert_stable(side, world, r, "rollback_state_unavailable")
    assert '"canary_rollback_store_unavailable"' in world.logs.text()[log_start:]
    redis_flags.heal()
    r = await caller.until("canary")  # the store answers again: routing resumes
    assert version_of(r) == "2"


# -- flag-file edits that could only fail at request time -------------------------------------


@pytest.mark.parametrize("split", [
    [["stable", 110], ["canary", -10]],  # negative weight
    [["stable", 0], ["canary", 0]],  # nothing to split
    [["stabel", 100], ["canary", 0]],  # misspelt variant: the "rollback" would never land
    [["stable", 99.5], ["canary", 0.5]],  # fractional weights are whole numbers
], ids=["negative_weight", "all_zero", "misspelt_variant", "float_weight"])
async def test_av_12_unusable_split_refused_at_reload_and_stable_served(world: World, tokens: Tokens,
                                                                       canary_side: SideGateway,
                                                                       split: list[list[Any]]) -> None:
    """A split flagd could only evaluate to an error is refused when the file is loaded,
    with the place named, and the active revision serves stable (never the canary, never a
    silent "error" per call)."""
    side = canary_side
    assert side.settings is not None and side.service is not None
    doc = flags_doc(100, 0)
    doc["flags"][FLAG]["targeting"] = {"fractional": split}
    (side.settings.policies / "flags.json").write_text(json.dumps(doc))
    assert side.world.loop is not None
    assert await side.service.store.reload("test") is False
    side.install_clock()
    error = side.service.store.last_error or ""
    assert f"flags.json:1:1: flags.{FLAG}.targeting: fractional:" in error, error
    r = await Caller(side, tokens).call()
    assert_stable(side, world, r, "flag_file_unusable")


@pytest.mark.parametrize("attribute", ["headers.x-canary", "header", "query.variant", "cookie.variant", "canary"])
async def test_authz_17_targeting_on_client_controlled_input_never_matches(
        world: World, tokens: Tokens, side_gateways: Callable[..., SideGateway], attribute: str) -> None:
    """A rule written against request input (header, query, cookie) finds nothing: only
    verified identity is in the evaluation context, so the client cannot opt into a canary."""
    side = side_gateways("client-input")
    assert side.settings is not None
    doc = flags_doc(100, 0)
    doc["flags"][FLAG]["targeting"] = {"if": [{"in": ["canary", {"cat": [{"var": attribute}]}]}, "canary", "stable"]}
    (side.settings.policies / "flags.json").write_text(json.dumps(doc))
    reload(side)
    token = tokens.u1(sub=tokens.sub("forcer"))
    r = await side.client().request(
        "POST", "/v2/models/pub_clf/infer?variant=canary&canary=1", json_body=PUB_BODY, token=token,
        headers={"X-Canary": "canary", "Header": "canary", "Cookie": "variant=canary; canary=canary",
                 "X-Model-Variant": "canary"})
    assert_stable(side, world, r, "targeting_match")


async def test_authz_17_canary_subject_metadata_lists_its_versions(tokens: Tokens, canary_side: SideGateway) -> None:
    """Positive control of the unassigned-canary case (test_1_2_authz.py): a subject in the
    100 % canary may call version 2 (its variant) and pin version 1 (stable), and its
    metadata lists exactly those two."""
    token = tokens.u1(sub=tokens.sub("cohort"))
    meta = await canary_side.client().request("GET", "/v2/models/pub_clf", token=token)
    assert meta.status == 200 and meta.json()["versions"] == ["1", "2"]
    for version in ("1", "2"):
        r = await canary_side.client().infer("pub_clf", PUB_BODY, token=token, version=version)
        assert r.status == 200 and version_of(r) == version


async def test_authz_17_green_model_name_never_announced(world: World, tokens: Tokens,
                                                          side_gateways: Callable[..., SideGateway]) -> None:
    """Blue-green by model: ``pub_clf`` is routed to the model ``alpha_fraud`` (green), which is
    then reachable only through the flag; called by its own name it answers as an unknown model.
    Metadata and inference answers name the model the client asked for, never the green one
    (it was announced in ``name``/``model_name``, REST and gRPC alike)."""
    side = side_gateways("bluegreen")
    doc = flags_doc(100, 0)
    doc["flags"][FLAG].update({
        "variants": {"blue": {"model": "pub_clf", "version": "1"}, "green": {"model": "alpha_fraud", "version": "1"}},
        "defaultVariant": "green", "targeting": {"fractional": [["blue", 0], ["green", 100]]},
    })
    doc["flags"][FLAG]["metadata"]["gateway.stable"] = "blue"
    assert side.settings is not None
    (side.settings.policies / "flags.json").write_text(json.dumps(doc))
    reload(side)
    token = tokens.u1()
    direct = await side.client().infer("alpha_fraud", PUB_BODY, token=token)
    assert direct.status == 404  # route-only: the green model has no name of its own
    answer = await side.client().infer("pub_clf", PUB_BODY, token=token)
    assert answer.status == 200 and answer.headers.get("X-Model-Variant") == "green"
    assert world.fake.requests[-1].model_name == "alpha_fraud"  # green served it
    meta = await side.client().request("GET", "/v2/models/pub_clf", token=token)
    assert meta.status == 200
    for r in (answer, meta):
        assert b"alpha_fraud" not in r.body, r.body
    assert answer.json()["model_name"] == meta.json()["name"] == "pub_clf"
    (rec,) = side.audit_for(answer)
    assert rec["model"] == "alpha_fraud" and rec["variant"] == "green"  # the audit keeps what was served


@pytest.mark.parametrize(("method", "path"), [("POST", "/v2/models/{m}/infer"), ("GET", "/v2/models/{m}"),
                                              ("GET", "/v2/models/{m}/ready")])
async def test_authz_17_refused_call_names_no_variant(world: World, tokens: Tokens, canary_side: SideGateway,
                                                      method: str, path: str) -> None:
    """Routing runs before authorization, so a call refused by authorization has already been
    assigned a variant. Every subject is in the 100 % canary here: the labeler role, which
    may not see ``pub_clf``, must get the unknown model's answer, without ``X-Model-Variant:
    canary`` (which would say "exists, flagged, and you are in the canary")."""
    body = PUB_BODY if method == "POST" else None
    hidden = await canary_side.client().request(method, path.format(m="pub_clf"), json_body=body,
                                                token=tokens.u1(sub=tokens.sub("lab"), roles=("labeler",)))
    unknown = await canary_side.client().request(method, path.format(m="no_such_model"), json_body=body,
                                                 token=tokens.u1(sub=tokens.sub("unk"), roles=("labeler",)))
    assert hidden.status == unknown.status == 404
    assert "X-Model-Variant" not in hidden.headers
    assert hidden.body == unknown.body
    assert hidden.headers.get("Content-Length") == unknown.headers.get("Content-Length")
    (rec,) = canary_side.audit_for(hidden)
    assert rec["decision"] == "deny" and rec["variant"] == "canary"  # the audit keeps what the client is not told
    assert not world.fake.requests
    # Positive control: a caller who may see it is told the variant it got.
    seen = await canary_side.client().request(method, path.format(m="pub_clf"), json_body=body,
                                              token=tokens.u1(sub=tokens.sub("ok")))
    assert seen.status == 200 and seen.headers.get("X-Model-Variant") == "canary"


# -- rollback triggers a client can pull -----------------------------------------------------------


async def test_av_12_calls_the_gateway_shed_are_not_the_canarys_errors(world: World, tokens: Tokens,
                                                                        canary_side: SideGateway) -> None:
    """Probe (s8): a canary-cohort client that floods ``pub_clf`` past its per-model in-flight
    cap gets 503 ``model_load_shed``; those refusals were counted as the canary's server
    errors, so one client rolled the canary back for everyone (held until a person edits
    the flag). A refusal of the gateway's own capacity or dependencies (load shedding, rate
    limiter or DP ledger down) says nothing about the variant: not counted."""
    side = canary_side
    doc = flags_doc(0, 100)
    doc["flags"][FLAG]["metadata"].update({"rollback.enabled": True, "rollback.min_requests": 5,
                                           "rollback.max_error_rate": 0.05})
    assert side.settings is not None
    (side.settings.policies / "flags.json").write_text(json.dumps(doc, indent=2))
    side.edit_policy("gateway.yaml", "  pub_clf: {}\n", "  pub_clf:\n    max_in_flight: 1\n")
    caller = Caller(side, tokens)
    world.fake.set(slow(2.0), model="pub_clf")
    holder = asyncio.ensure_future(caller.call("holder"))
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while not world.fake.requests:  # the holder's call occupies the model's only slot
        assert loop.time() < end and not holder.done()
        await asyncio.sleep(0.02)
    shed = [await caller.call() for _ in range(10)]
    assert [r.status for r in shed] == [503] * 10
    assert side.audit_for(shed[0])[0]["reason"] == "model_load_shed"
    assert (await holder).status == 200
    world.fake.set(ok(), model="pub_clf")
    after = await caller.call()
    assert after.status == 200
    assert after.headers.get("X-Model-Variant") == "canary", "the shed calls rolled the canary back"
    assert version_of(after) == "2"
