"""Protection off, one proof per catalogue category (issue 10: "the suite fails when a protection is switched off").

Each test runs one existing case's attack *and assertions* (the same function the case calls)
three ways: with the protection switched off it must fail (``pytest.raises(AssertionError)``)
and the attack must visibly succeed (evidence below); with the protection back on it passes
again. So a gateway without the protection fails the case itself, not just similar code.
1.2, 1.9 and 1.11 have their proofs elsewhere (test_1_2_authz.py::test_authz_10_protection_off_leaks,
security_tests/ml baselines, test_1_11_secrets.py::test_sec_08_lint_catches_each_missing_protection).

Category: switch -> attack (the case's function) -> evidence with the protection off.

- 1.1 authn: identity.yaml without the prod issuer's `token_types` -> AUTHN-20
  token_type_confusion (no_typ, refresh_token) -> both answered 200, allow record, upstream
  called. Authentication as a whole has no off switch: the loader refuses `algorithms: [none]`
  and `authentication: false`.
- 1.3 rate limit: limits.yaml without `subject_rate` -> RL-01 baseline_burst_limited -> 15 of
  15 burst requests reach the model.
- 1.4 input: max_bytes_element 65536 -> 131072 (gateway.yaml limits, inputs.yaml caps) ->
  IN-09 bytes_limit_refused (64k_plus_1) -> the 65,537-byte element reaches the fake upstream.
- 1.5 HTTP: side gateway limits.body_timeout_s 1 -> 60 -> HTTP-13 slow_body_cut -> no 408
  while the body drips for 3 s.
- 1.6 PII: pii.yaml `mode: shadow` -> PII-01 masked_both_ways -> canaries unmasked in the
  upstream request and the answer; invariant I3 would fail the case too (declared with
  ``ledger.expected_breach``, and the invariant check requires that it happened).
- 1.7 DP: own attack-world gateway process, tab_dp budget ε 50 -> 1000 -> DP-04
  sybils_share_the_budget -> 20 of 20 answered, ε 100 spent in one period.
- 1.8 audit: no policy switch (the loader refuses `audit.personal_fields` and `audit.chain`);
  in process, for the test only, AuditConfig.personal_fields = {} -> AUD-10 audit_minimised ->
  the subject id in clear in the audit record.
- 1.10 availability: gateway.yaml without models.pub_clf.max_in_flight -> AV-11
  slow_model_shed -> nothing shed (model_load_shed counter unchanged), the excess queued.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.policy.loader import PolicyError, load_policy_dir
from security_tests.conftest import Tokens
from security_tests.dp.test_dp_gateway import BUDGET, EPS_ROW, K_MAX, budget, sybils_share_the_budget
from security_tests.ml.world.fixtures import attack_world
from security_tests.ml.world.harness import AttackGateway
from security_tests.ml.world.models import World as AttackWorld
from security_tests.support.side import SideGateway
from security_tests.support.world import CANARIES, Client, World
from security_tests.test_1_1_authn import token_type_confusion
from security_tests.test_1_3_ratelimit import BURST, baseline_burst_limited
from security_tests.test_1_4_input import bytes_limit_refused
from security_tests.test_1_5_http import slow_body_cut
from security_tests.test_1_6_pii import masked_both_ways, upstream_texts
from security_tests.test_1_8_audit import audit_minimised
from security_tests.test_1_10_availability import MODEL_CAP, slow_model_shed

__all__ = ["attack_world"]  # the attack world's session fixture, for the DP proof


@contextlib.contextmanager
def world_policy(world: World, *edits: tuple[str, str, str]) -> Iterator[None]:
    """The world's policy with ``(file, old, new)`` edits applied and loaded; restored (and
    reloaded) on the way out, whatever happened."""
    assert world.settings is not None and world.service is not None
    saved: dict[Path, str] = {}
    for name, old, new in edits:
        path = world.settings.policies / name
        text = saved.setdefault(path, path.read_text())
        current = path.read_text()
        assert old in current, f"{old!r} not in {name}"
        path.write_text(current.replace(old, new, 1))
    before = world.service.store.current.policy.revision
    try:
        world.reload()  # the 0.2 s watcher may have loaded it first: the revision is what counts
        assert world.service.store.current.policy.revision != before, "the protection-off policy did not load"
        yield
    finally:
        for path, text in saved.items():
            path.write_text(text)
        world.reload()
        assert world.service.store.current.policy.revision == before, "the world policy was not restored"


def _refused_by_loader(world: World, tmp: Path, name: str, old: str, new: str) -> str:
    """A copy of the world's policy with one edit: the loader (and so `infergate policy check`
    and every hot reload) refuses it; the message, for the caller to check."""
    assert world.settings is not None
    target = tmp / f"refused-{len(list(tmp.iterdir()))}"
    shutil.copytree(world.settings.policies, target)
    text = (target / name).read_text()
    assert old in text
    (target / name).write_text(text.replace(old, new, 1))
    with pytest.raises(PolicyError) as err:
        load_policy_dir(target)
    return str(err.value)


# ------------------------------------------------------------------------------------ 1.1


async def test_off_1_1_authn_token_types(gw: Client, world: World, tokens: Tokens, tmp_path: Path) -> None:
    # Authentication as a whole cannot be switched off by policy: the loader refuses it.
    msg = _refused_by_loader(world, tmp_path, "identity.yaml", "algorithms: [RS256]", "algorithms: [none]")
    assert "algorithms" in msg
    msg = _refused_by_loader(world, tmp_path, "identity.yaml", "issuers:\n", "authentication: false\nissuers:\n")
    assert "authentication" in msg and "Extra inputs are not permitted" in msg
    # What policy can weaken, the case notices: without `token_types` an ID/refresh token passes.
    with world_policy(world, ("identity.yaml", "    token_types: [at+jwt]\n", "")):
        for kind in ("no_typ", "refresh_token"):
            world.fake.reset()
            with pytest.raises(AssertionError):
                await token_type_confusion(gw, world, tokens, kind)
            assert world.upstream_calls() == 1  # the confused token was served
            last = world.ledger.responses[-1][2]
            assert last.status == 200 and world.audit_for(last)[0]["decision"] == "allow"
    for kind in ("no_typ", "refresh_token"):
        world.fake.reset()
        await token_type_confusion(gw, world, tokens, kind)


# ------------------------------------------------------------------------------------ 1.3

SUBJECT_RATE = "  - name: subject_rate\n    kind: rate\n    per: [tenant, subject]\n    rate: 1\n    burst: 10\n"


async def test_off_1_3_rate_limit(gw: Client, world: World, tokens: Tokens) -> None:
    with world_policy(world, ("limits.yaml", SUBJECT_RATE, "")):
        with pytest.raises(AssertionError):
            await baseline_burst_limited(gw, world, tokens.u1())
        assert world.upstream_calls() == BURST + 5  # the whole burst reached the model
    # Back on: a fresh subject from a fresh address (the pre-auth 20/s per address stays out of it).
    await baseline_burst_limited(Client(world, world.next_addr()), world, tokens.u1(sub=tokens.sub("on")))


# ------------------------------------------------------------------------------------ 1.4


async def test_off_1_4_input_element_cap(gw: Client, world: World, tokens: Tokens) -> None:
    raised = (("gateway.yaml", "  max_bytes_element: 65536\n", "  max_bytes_element: 131072\n"),
              ("inputs.yaml", "      max_bytes_element: 65536\n", "      max_bytes_element: 131072\n"))
    with world_policy(world, *raised):
        with pytest.raises(AssertionError):
            await bytes_limit_refused(gw, world, tokens.u1(), "64k_plus_1")
        assert world.upstream_calls() == 1
        assert world.fake.requests[0].ByteSize() > 65536  # the oversize element, forwarded whole
    world.fake.reset()
    await bytes_limit_refused(gw, world, tokens.u1(), "64k_plus_1")


# ------------------------------------------------------------------------------------ 1.5


async def test_off_1_5_http_slow_body(world: World, tokens: Tokens, tmp_path: Path) -> None:
    side = SideGateway(world, tmp_path / "slow", runner_kwargs={"keepalive_timeout": 1.0}).start()
    try:
        side.edit_policy("gateway.yaml", "  max_inputs: 64\n", "  max_inputs: 64\n  body_timeout_s: 60\n")
        with pytest.raises(AssertionError, match="408"):  # nothing answered while the body drips
            await slow_body_cut(side, world, tokens.u1(), max_s=3.0)
        side.edit_policy("gateway.yaml", "  body_timeout_s: 60\n", "  body_timeout_s: 1\n")
        await slow_body_cut(side, world, tokens.u1(), max_s=3.0)
        side.check_nl()
    finally:
        side.stop()


# ------------------------------------------------------------------------------------ 1.6


async def test_off_1_6_pii_shadow(gw: Client, world: World, tokens: Tokens) -> None:
    world.ledger.expected_breach = {"I3:upstream", "I3:responses"}  # the leak is the point (checked there)
    with world_policy(world, ("pii.yaml", "mode: enforce\n", "mode: shadow\n")):
        with pytest.raises(AssertionError):
            await masked_both_ways(gw, world, tokens.u1())
        sent = upstream_texts(world)
        assert any(canary in text for text in sent for canary in CANARIES)  # unmasked upstream
    await masked_both_ways(gw, world, tokens.u1())


# ------------------------------------------------------------------------------------ 1.7

TAB_DP_BUDGET = "    budget: {epsilon: 50.0, period_s: 86400}\n    # MI-02"


def _budget_in_force(gw: AttackGateway, epsilon: float) -> None:
    """Wait (bounded) until the process's policy watcher has loaded the budget ``epsilon``."""
    token = gw.token("reader", "alpha")
    for _ in range(150):
        if budget(gw, token, "epsilon_budget") == epsilon:
            return
        time.sleep(0.1)
    raise AssertionError(f"tab_dp budget {epsilon} never loaded")


def test_off_1_7_dp_budget(attack_world: AttackWorld, tmp_path: Path) -> None:
    gw = AttackGateway.start(tmp_path / "dp", attack_world.repo)
    try:
        path = tmp_path / "dp" / "policies" / "privacy.yaml"  # the process's own copy (AttackGateway.start)
        old = path.read_text()
        assert TAB_DP_BUDGET in old
        path.write_text(old.replace(TAB_DP_BUDGET, TAB_DP_BUDGET.replace("50.0", "1000.0"), 1))
        _budget_in_force(gw, 1000.0)
        with pytest.raises(AssertionError):
            sybils_share_the_budget(gw, attack_world)
        spent = budget(gw, gw.token("reader", "alpha"), "epsilon_spent")
        assert spent == 2 * K_MAX * EPS_ROW > BUDGET  # twice the real period budget released
        path.write_text(old)
        _budget_in_force(gw, BUDGET)
        sybils_share_the_budget(gw, attack_world)
    finally:
        code = gw.stop()
    log = Path(gw.proc.log_path).read_text(errors="replace")
    assert "Traceback" not in log and code == 0, log[-3000:]


# ------------------------------------------------------------------------------------ 1.8


async def test_off_1_8_audit_minimisation(gw: Client, world: World, tokens: Tokens, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # No policy switch: the audit section refuses any key that would turn minimisation or the chain off.
    for key in ("personal_fields: []", "chain: false"):
        msg = _refused_by_loader(world, tmp_path, "gateway.yaml", "  stdout: false\n", f"  stdout: false\n  {key}\n")
        assert f"audit.{key.split(':')[0]}" in msg and "Extra inputs are not permitted" in msg
    # In process, for this test only: the writer keeps the personal fields in clear.
    assert world.service is not None
    log = world.service.audit_log
    with monkeypatch.context() as patch:
        patch.setattr(log, "config", dataclasses.replace(log.config, personal_fields=frozenset()))
        with pytest.raises(AssertionError):
            await audit_minimised(gw, world, tokens)
        rec = world.audit_for(world.ledger.responses[-1][2])[0]
        assert rec.get("subject_id") == tokens.sub("u1")  # the subject in clear in the trail
    await audit_minimised(gw, world, tokens)


# ------------------------------------------------------------------------------------ 1.10


def _shed_total(text: bytes) -> float:
    m = re.search(rb'^gateway_refusals_total\{reason="model_load_shed"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_off_1_10_per_model_cap(world: World, tokens: Tokens, fresh_breakers: None) -> None:
    metrics = Client(world, world.next_addr())
    before = _shed_total((await metrics.request("GET", "/metrics")).body)
    with pytest.raises(AssertionError):
        await slow_model_shed(world, tokens, cap=False)
    assert _shed_total((await metrics.request("GET", "/metrics")).body) == before  # nothing shed: all queued
    await slow_model_shed(world, tokens)
    assert _shed_total((await metrics.request("GET", "/metrics")).body) >= before + 3 * MODEL_CAP
