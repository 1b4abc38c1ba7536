"""The audit writer's thread keeps the executor contract the log relies on."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.audit._thread import WriterThread


async def test_calls_run_in_order_on_one_thread_off_the_loop() -> None:
    worker = WriterThread("audit-writer-test")
    seen: list[tuple[int, str]] = []

    def call(n: int) -> int:
        seen.append((n, threading.current_thread().name))
        return n * 10

    try:
        results = await asyncio.gather(*(worker.run(call, n) for n in range(50)))
    finally:
        worker.shutdown()
    assert results == [n * 10 for n in range(50)]
    assert [n for n, _name in seen] == list(range(50))
    assert {name for _n, name in seen} == {"audit-writer-test"}
    assert threading.current_thread().name not in {name for _n, name in seen}


async def test_an_exception_reaches_the_caller_unchanged() -> None:
    worker = WriterThread("audit-writer-test")
    error = OSError(5, "injected")

    def fail() -> None:
        raise error

    try:
        with pytest.raises(OSError) as caught:
            await worker.run(fail)
        assert caught.value is error
        assert await worker.run(lambda: "still serving") == "still serving"
    finally:
        worker.shutdown()


async def test_a_call_cancelled_before_it_started_never_runs() -> None:
    worker = WriterThread("audit-writer-test")
    gate = threading.Event()
    ran: list[str] = []
    try:
        blocker = worker.run(gate.wait, 10)
        skipped = worker.run(ran.append, "skipped")
        skipped.cancel()
        gate.set()
        assert await blocker is True
        await worker.run(ran.append, "after")
    finally:
        worker.shutdown()
    assert ran == ["after"]


async def test_shutdown_finishes_queued_calls_then_refuses_new_ones() -> None:
    worker = WriterThread("audit-writer-test")
    gate = threading.Event()
    done: list[int] = []
    first = worker.run(gate.wait, 10)
    queued = worker.run(done.append, 1)
    worker.shutdown()
    gate.set()
    await first
    await queued
    assert done == [1]
    with pytest.raises(RuntimeError):
        _refused = worker.run(done.append, 2)


def test_a_result_for_a_closed_loop_is_dropped_quietly() -> None:
    worker = WriterThread("audit-writer-test")
    gate = threading.Event()
    finished = threading.Event()

    async def submit() -> None:
        _blocked = worker.run(gate.wait, 10)
        _after = worker.run(finished.set)

    asyncio.run(submit())  # the loop is closed before either call completes
    gate.set()
    assert finished.wait(10)
    worker.shutdown()
    assert worker._thread is not None
    worker._thread.join(10)
    assert not worker._thread.is_alive()
