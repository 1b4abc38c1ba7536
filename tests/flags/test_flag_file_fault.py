"""A broken flag file (garbage, truncated, invalid, deleted) holds every route on stable (AV-12).

The revision carrying the broken file is refused, as any invalid policy is; the point
here is the *active* revision: it may be the very split being rolled back, so it must
stop routing to the canary until a usable file is built again.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.flags.rollback import HELD_FLAG_FILE
from gateway.policy.loader import PolicyError
from gateway.stages.feature_flags import FeatureFlags, FlagsRuntime, build_flags_stage
from tests.flags import RecordingHooks, context, doc, policy, principal, route_flag, split

ALL_CANARY = doc({"digits-version": route_flag(split(0, 100))})
KILL_SANITIZE = doc({"stage.sanitize.enabled": {"state": "ENABLED", "variants": {"on": True, "off": False},
                                                "defaultVariant": "off"}})


async def routed(flags: FeatureFlags, sub: str = "alice") -> tuple[str, str, str]:
    ctx = context(principal(sub))
    await flags.on_call(ctx)
    note: dict[str, Any] = ctx.notes["flags"]
    return note["variant"], note["reason"], ctx.version


@pytest.mark.parametrize("broken", [
    b"\x00\xffgarbage",  # replaced by garbage
    ALL_CANARY[: len(ALL_CANARY) // 2],  # truncated mid-write
    doc({"digits-version": route_flag(split(0, 100), variants={"stable": "1", "canary": "x"})}),  # invalid
], ids=["garbage", "truncated", "invalid"])
async def test_broken_file_holds_the_active_revision_on_stable(broken: bytes) -> None:
    hooks = RecordingHooks()
    runtime = FlagsRuntime(hooks=hooks)
    active = build_flags_stage(ALL_CANARY, policy(), runtime)
    assert await routed(active) == ("canary", "targeting_match", "2")

    with pytest.raises(PolicyError):
        build_flags_stage(broken, policy(), runtime)
    assert await routed(active) == ("stable", HELD_FLAG_FILE, "1")
    assert ("digits-version", "FLAG_FILE_UNUSABLE") in hooks.failures

    # A usable file again (even the same bytes) ends the hold.
    build_flags_stage(ALL_CANARY, policy(), runtime)
    assert await routed(active) == ("canary", "targeting_match", "2")


async def test_deleted_file_after_routing_is_a_fault_not_no_flags() -> None:
    runtime = FlagsRuntime()
    active = build_flags_stage(ALL_CANARY, policy(), runtime)
    with pytest.raises(PolicyError, match="missing while routing flags are active"):
        build_flags_stage(b"", policy(), runtime)
    assert await routed(active) == ("stable", HELD_FLAG_FILE, "1")
    # Removing every flag on purpose is an explicit, empty document.
    empty = build_flags_stage(doc({}), policy(), runtime)
    assert empty.routes == {}
    assert runtime.tracker.flag_file_fault is None


async def test_no_file_without_routing_history_is_no_flags() -> None:
    runtime = FlagsRuntime()
    flags = build_flags_stage(b"", policy(), runtime)
    assert flags.routes == {}
    assert runtime.tracker.flag_file_fault is None


async def test_kill_switches_are_not_trusted_while_the_file_is_broken() -> None:
    runtime = FlagsRuntime()
    active = build_flags_stage(KILL_SANITIZE, policy(), runtime)
    assert await active.kill_switched("sanitize") is True
    with pytest.raises(PolicyError):
        build_flags_stage(b"{", policy(), runtime)
    assert await active.kill_switched("sanitize") is False
