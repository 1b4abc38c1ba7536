"""An inline run is judged slow by its CPU time (the model's cost), wall time only as a backstop."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.upstream import embedded
from gateway.upstream.embedded import INLINE_WARMUP_RUNS, EmbeddedUpstream
from tests.upstream.test_embedded import started  # noqa: F401 - fixture
from tests.upstream.test_embedded_inline import run_threads, scale_request, scale_upstream  # noqa: F401 - fixture


def _stall_inline_runs(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Inline runs (on the loop thread) lose ``seconds`` of wall time without using CPU, as
    when the machine preempts the loop thread."""
    loop_thread = threading.get_ident()
    feed = embedded._feed

    def stalled(*args: Any) -> Any:
        if threading.get_ident() == loop_thread:
            time.sleep(seconds)
        return feed(*args)

    monkeypatch.setattr(embedded, "_feed", stalled)


async def _warmed_up(upstreams: list[EmbeddedUpstream], tmp_path: Path) -> EmbeddedUpstream:
    """The scale model past its pool warm-up: its next small runs are inline."""
    upstream = await scale_upstream(upstreams, tmp_path)
    for _ in range(INLINE_WARMUP_RUNS):
        await upstream.infer(scale_request(), timeout_s=5)
    return upstream


async def _three_runs(upstream: EmbeddedUpstream, threads: list[int]) -> None:
    threads.clear()
    for _ in range(3):
        await upstream.infer(scale_request(), timeout_s=5)


async def test_a_preempted_but_cheap_inline_run_stays_inline(
    tmp_path: Path, started: list[EmbeddedUpstream], run_threads: list[int],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream = await _warmed_up(started, tmp_path)
    _stall_inline_runs(monkeypatch, 0.004)  # twice the CPU bound, in wall time only
    await _three_runs(upstream, run_threads)
    assert run_threads == [threading.get_ident()] * 3


async def test_an_inline_run_over_the_wall_backstop_is_demoted(
    tmp_path: Path, started: list[EmbeddedUpstream], run_threads: list[int],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream = await _warmed_up(started, tmp_path)
    _stall_inline_runs(monkeypatch, embedded.INLINE_DEMOTE_WALL_S * 1.5)
    await _three_runs(upstream, run_threads)
    loop_thread = threading.get_ident()
    assert run_threads[0] == loop_thread
    assert loop_thread not in run_threads[1:]


async def test_an_inline_run_over_the_cpu_bound_is_demoted(
    tmp_path: Path, started: list[EmbeddedUpstream], run_threads: list[int],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream = await _warmed_up(started, tmp_path)
    monkeypatch.setattr(embedded, "INLINE_DEMOTE_CPU_S", 0.0)  # every run costs more than nothing
    monkeypatch.setattr(embedded, "INLINE_DEMOTE_WALL_S", 60.0)
    await _three_runs(upstream, run_threads)
    loop_thread = threading.get_ident()
    assert run_threads[0] == loop_thread
    assert loop_thread not in run_threads[1:]
