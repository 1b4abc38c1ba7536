"""Breaker thresholds come from the policy: set once per revision, and a reload reaches
breakers that already exist without resetting what they counted."""

from __future__ import annotations

from pathlib import Path

from gateway.app import SERVICE_KEY
from gateway.resilience.breaker import Breakers, State

from .conftest import DIGITS_BODY as DIGITS
from .conftest import Client


def test_configure_reaches_existing_and_new_breakers_and_keeps_their_state() -> None:
    breakers = Breakers(failure_threshold=5, cooldown_s=5.0)
    old = breakers.get("digits")
    old.before()
    old.failure()
    breakers.configure(2, 0.5)
    assert (old.failure_threshold, old.cooldown_s, old.failures) == (2, 0.5, 1)
    new = breakers.get("risk")
    assert (new.failure_threshold, new.cooldown_s) == (2, 0.5)
    old.before()
    old.failure()  # the second failure under the new threshold opens it
    assert old.state is State.OPEN


async def test_thresholds_follow_the_policy_revision(client: Client, auth: dict[str, str], policy_dir: Path) -> None:
    service = client.app[SERVICE_KEY]
    assert (await client.post("/v2/models/digits/infer", json=DIGITS, headers=auth)).status == 200
    breaker = service.breakers.get("digits")
    assert (breaker.failure_threshold, breaker.cooldown_s) == (5, 5.0)  # the schema defaults

    path = policy_dir / "gateway.yaml"
    path.write_text(path.read_text().replace("infer_timeout_s: 10", "infer_timeout_s: 10\n  breaker_failures: 2\n"
                                             "  breaker_cooldown_s: 0.5"))
    assert await service.store.reload("test")
    # The pinned revision changed, so the next call sets the new thresholds on the old breaker.
    assert (await client.post("/v2/models/digits/infer", json=DIGITS, headers=auth)).status == 200
    assert service.breakers.get("digits") is breaker
    assert (breaker.failure_threshold, breaker.cooldown_s) == (2, 0.5)

    # Within one revision nothing is copied again: a value set by hand survives the next call.
    service.breakers.configure(7, 1.0)
    assert (await client.post("/v2/models/digits/infer", json=DIGITS, headers=auth)).status == 200
    assert breaker.failure_threshold == 7
