"""Tiny runs of the embedded upstream on the event loop: when they may, and when never."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.errors import UpstreamUnavailable
from gateway.kserve import InferRequest
from gateway.upstream import embedded
from gateway.upstream.embedded import INLINE_WARMUP_RUNS, EmbeddedUpstream, inline_candidate
from tests.upstream.test_embedded import (
    SCALE_CONFIG,
    SLOW_CONFIG,
    TRITON_REPO,
    add_model,
    fp32,
    scale_model,
    slow_model,
    start,
    started,  # noqa: F401 - fixture
)

SMALL = [[1.0, 2.0]]


@pytest.fixture
def run_threads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The thread each run's feed was built on, in order."""
    seen: list[int] = []
    feed = embedded._feed

    def recording(*args: Any) -> Any:
        seen.append(threading.get_ident())
        return feed(*args)

    monkeypatch.setattr(embedded, "_feed", recording)
    return seen


def scale_request(rows: Any = SMALL) -> InferRequest:
    return InferRequest("scale", "", [fp32("x", rows)])


async def scale_upstream(started: list[EmbeddedUpstream], tmp_path: Path, **kwargs: Any) -> EmbeddedUpstream:  # noqa: F811
    return await start(started, add_model(tmp_path, "scale", SCALE_CONFIG, {"1": scale_model(3.0)}), **kwargs)


async def test_first_runs_go_to_the_pool_then_tiny_runs_are_inline(
    tmp_path: Path, started: list[EmbeddedUpstream], run_threads: list[int]  # noqa: F811
) -> None:
    upstream = await scale_upstream(started, tmp_path)
    loop_thread = threading.get_ident()
    for _ in range(INLINE_WARMUP_RUNS + 3):
        response = await upstream.infer(scale_request(), timeout_s=5)
        np.testing.assert_array_equal(response.outputs[0].data, [[3.0, 6.0]])
    assert loop_thread not in run_threads[:INLINE_WARMUP_RUNS]
    assert run_threads[INLINE_WARMUP_RUNS:] == [loop_thread] * 3


async def test_a_large_request_goes_to_the_pool_even_for_a_tiny_model(
    tmp_path: Path, started: list[EmbeddedUpstream], run_threads: list[int]  # noqa: F811
) -> None:
    upstream = await scale_upstream(started, tmp_path)
    for _ in range(INLINE_WARMUP_RUNS):
        await upstream.infer(scale_request(), timeout_s=5)
    run_threads.clear()
    big = np.ones((8, 2), dtype=np.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(embedded, "INLINE_MAX_ELEMENTS", 8)
        response = await upstream.infer(scale_request(big), timeout_s=5)
    assert response.outputs[0].shape == (8, 2)
    assert run_threads[0] != threading.get_ident()


async def test_inline_off(tmp_path: Path, started: list[EmbeddedUpstream], run_threads: list[int]) -> None:  # noqa: F811
    upstream = await scale_upstream(started, tmp_path, inline=False)
    for _ in range(INLINE_WARMUP_RUNS + 3):
        await upstream.infer(scale_request(), timeout_s=5)
    assert threading.get_ident() not in run_threads


async def test_a_slow_inline_run_sends_the_model_back_to_the_pool(
    tmp_path: Path, started: list[EmbeddedUpstream], run_threads: list[int], monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    upstream = await scale_upstream(started, tmp_path)
    for _ in range(INLINE_WARMUP_RUNS):
        await upstream.infer(scale_request(), timeout_s=5)
    monkeypatch.setattr(embedded, "INLINE_DEMOTE_WALL_S", 0.0)  # every run counts as slow
    run_threads.clear()
    for _ in range(3):
        await upstream.infer(scale_request(), timeout_s=5)
    loop_thread = threading.get_ident()
    assert run_threads[0] == loop_thread  # inline, found slow: back to a warm-up in the pool
    assert loop_thread not in run_threads[1:]


async def test_a_model_measured_slow_is_never_inline(
    tmp_path: Path, started: list[EmbeddedUpstream], run_threads: list[int], monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    monkeypatch.setattr(embedded, "INLINE_MAX_CPU_S", 0.0)
    upstream = await scale_upstream(started, tmp_path)
    for _ in range(INLINE_WARMUP_RUNS + 3):
        await upstream.infer(scale_request(), timeout_s=5)
    assert threading.get_ident() not in run_threads


async def test_an_inline_run_still_needs_a_free_slot(
    tmp_path: Path, started: list[EmbeddedUpstream]  # noqa: F811
) -> None:
    repo = add_model(tmp_path, "slow", SLOW_CONFIG, {"1": slow_model(10**8)})
    add_model(repo, "scale", SCALE_CONFIG, {"1": scale_model(3.0)})
    upstream = await start(started, repo, workers=1, max_queue=0)
    for _ in range(INLINE_WARMUP_RUNS):
        await upstream.infer(scale_request(), timeout_s=5)
    busy = asyncio.create_task(upstream.infer(InferRequest("slow", "", [fp32("x", np.ones((1, 256)))]), timeout_s=30))
    await asyncio.sleep(0.05)
    with pytest.raises(UpstreamUnavailable) as info:  # the one slot is taken: refused, as before
        await upstream.infer(scale_request(), timeout_s=5)
    assert info.value.reason == "upstream_overloaded"
    busy.cancel()
    await asyncio.gather(busy, return_exceptions=True)


def test_models_with_data_dependent_cost_are_never_inline() -> None:
    assert not inline_candidate(slow_model(10))  # Loop: a trip count could come from data
    assert inline_candidate(scale_model(2.0))
    for path in sorted(TRITON_REPO.glob("*/*/model.onnx")):  # the shipped models are plain graphs
        assert inline_candidate(path.read_bytes()), path


async def test_a_loop_model_stays_in_the_pool(
    tmp_path: Path, started: list[EmbeddedUpstream], run_threads: list[int]  # noqa: F811
) -> None:
    upstream = await start(started, add_model(tmp_path, "slow", SLOW_CONFIG, {"1": slow_model(1)}))
    for _ in range(INLINE_WARMUP_RUNS + 3):
        await upstream.infer(InferRequest("slow", "", [fp32("x", np.ones((1, 256)))]), timeout_s=5)
    assert threading.get_ident() not in run_threads
