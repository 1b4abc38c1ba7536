"""tests/support/liveness.py: the hang checks fail on a hang, and only on a hang."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.liveness import HANG_FACTOR, HANG_S, MIN_HANG_S, eventually, hang_bound, no_hang


def test_bounds_are_generous() -> None:
    assert hang_bound() == HANG_S
    assert hang_bound(0.3) == pytest.approx(HANG_FACTOR * 0.3)
    assert hang_bound(0.001) == MIN_HANG_S  # never down to scheduling noise
    assert HANG_FACTOR >= 5


async def test_a_hang_fails_the_test_at_the_bound() -> None:
    with pytest.raises(AssertionError, match="HANG: a call that never returns"):
        async with no_hang("a call that never returns", expected_s=0.01):  # bound: MIN_HANG_S
            await asyncio.Event().wait()


async def test_the_blocks_own_outcome_passes_through() -> None:
    with pytest.raises(TimeoutError):  # raised by the block itself: not reported as a hang
        async with no_hang("a block with its own timeout"):
            async with asyncio.timeout(0):
                await asyncio.sleep(1)
    async with no_hang("a quick block") as watch:
        await asyncio.sleep(0)
    frozen = watch.seconds
    await asyncio.sleep(0.01)
    assert watch.seconds == frozen  # stopped with the block: what a test reads is the block's span


async def test_eventually_polls_until_the_condition_holds() -> None:
    polls: list[int] = []

    def third_time() -> bool:
        polls.append(1)
        return len(polls) >= 3

    await eventually(third_time, "the third poll", poll_s=0)
    assert len(polls) == 3
    with pytest.raises(AssertionError, match="HANG: never true"):
        await eventually(lambda: False, "never true", expected_s=0.01)
