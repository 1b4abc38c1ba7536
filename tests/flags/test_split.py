"""Fractional rollout: the configured ratio, sticky per subject, the same after a restart."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from gateway.stages.feature_flags import FeatureFlags, FlagsRuntime, build_flags_stage, targeting_key
from tests.flags import context, doc, policy, principal, route_flag, split

ROOT = Path(__file__).resolve().parents[2]
SUBJECTS = [f"user-{i:05d}" for i in range(10_000)]


def stage(stable: int = 90, canary: int = 10, *, runtime: FlagsRuntime | None = None) -> FeatureFlags:
    raw = doc({"digits-version": route_flag(split(stable, canary))})
    return build_flags_stage(raw, policy(), runtime or FlagsRuntime())


async def assignments(flags: FeatureFlags, subjects: list[str]) -> list[str]:
    out = []
    for sub in subjects:
        ctx = context(principal(sub))
        await flags.on_call(ctx)
        out.append(ctx.notes["flags"]["variant"])
    return out


async def test_10000_subjects_split_90_10_within_2_percent() -> None:
    counts = Counter(await assignments(stage(), SUBJECTS))
    assert abs(counts["canary"] / len(SUBJECTS) - 0.10) <= 0.02
    assert abs(counts["stable"] / len(SUBJECTS) - 0.90) <= 0.02
    assert counts["stable"] + counts["canary"] == len(SUBJECTS)


async def test_assignment_identical_across_independently_built_stages() -> None:
    """A restart builds a new provider and a new runtime: nothing random survives in between."""
    first = await assignments(stage(), SUBJECTS)
    second = await assignments(stage(runtime=FlagsRuntime()), SUBJECTS)
    assert first == second


async def test_sticky_per_subject_whatever_else_changes() -> None:
    flags = stage(50, 50)
    for sub in ("alice", "bob", "carol"):
        seen = set()
        for roles in (("analyst",), ("analyst", "admin"), ()):
            ctx = context(principal(sub, roles=roles))
            await flags.on_call(ctx)
            seen.add(ctx.notes["flags"]["variant"])
        assert len(seen) == 1, sub


async def test_same_subject_in_two_tenants_is_bucketed_independently() -> None:
    """Bucketing is by hash(tenant, subject): a subject name is not shared across tenants."""
    assert targeting_key("acme", "alice") != targeting_key("beta", "alice")
    assert targeting_key("acme", "alice") == targeting_key("acme", "alice")
    assert targeting_key("acme", "alice", b"k" * 32) != targeting_key("acme", "alice")


async def test_ramping_up_never_moves_a_canary_subject_back() -> None:
    at_10 = await assignments(stage(90, 10), SUBJECTS[:3000])
    at_30 = await assignments(stage(70, 30), SUBJECTS[:3000])
    assert all(later == "canary" for early, later in zip(at_10, at_30, strict=True) if early == "canary")


def test_same_buckets_in_a_fresh_process_with_another_hash_seed() -> None:
    """Stable across restarts: a new interpreter (different PYTHONHASHSEED) agrees."""
    script = (
        "import asyncio, hashlib\n"
        "from tests.flags.test_split import stage, assignments, SUBJECTS\n"
        "print(hashlib.sha256(','.join(asyncio.run(assignments(stage(), SUBJECTS[:2000]))).encode()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=60)
    here = hashlib.sha256(",".join(asyncio.run(assignments(stage(), SUBJECTS[:2000]))).encode()).hexdigest()
    assert out.stdout.strip() == here


def test_golden_keys() -> None:
    """Pinned values: a change here re-buckets every subject of every running canary."""
    assert targeting_key("acme", "alice") == hashlib.sha256(
        b"infergate-flags/v1\x00acme\x1falice").hexdigest()[:32]


async def test_golden_assignments() -> None:
    """Pinned: these subjects are in these variants of a 90/10 ``digits-version`` split, in
    this process, after a restart, and in a flagd daemon fed the same targetingKey."""
    flags = stage()
    assert await assignments(flags, ["user-00000", "user-00021", "user-00027"]) == ["stable", "canary", "canary"]
