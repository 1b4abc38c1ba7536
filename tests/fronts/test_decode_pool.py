"""Large bodies are parsed in a worker process: same result, same refusals, fail closed if it dies."""

from __future__ import annotations

import functools
import json
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pytest

from gateway.errors import DependencyUnavailable, MalformedRequest
from gateway.fronts.decode_pool import DecodePool
from gateway.fronts.http.codec import CodecLimits, decode_infer_request

LIMITS = CodecLimits(max_elements_per_tensor=1_048_576, max_dims=8, max_bytes_element=65_536, max_inputs=64)


def _body(rows: int) -> bytes:
    data = np.round(np.random.default_rng(1).uniform(0, 16, rows * 64), 4).tolist()
    return json.dumps({"inputs": [{"name": "pixels", "shape": [rows, 64], "datatype": "FP32",
                                   "data": data}]}).encode()


def _die() -> None:
    os._exit(3)  # a worker killed mid-parse (OOM killer, crash)


async def test_same_tensors_as_inline() -> None:
    body = _body(15_000)
    decode = functools.partial(decode_infer_request, "digits", "", body, header_length=None, limits=LIMITS)
    pool = DecodePool(workers=1)
    try:
        remote = await pool.run(decode)
    finally:
        await pool.aclose()
    local = decode()
    assert remote.model == "digits" and remote.inputs[0].shape == (15_000, 64)
    assert np.array_equal(remote.inputs[0].data, local.inputs[0].data)


async def test_refusal_is_raised_with_its_class_and_reason() -> None:
    decode = functools.partial(decode_infer_request, "digits", "", b'{"inputs": [], "bogus": 1}',
                               header_length=None, limits=LIMITS)
    pool = DecodePool(workers=1)
    try:
        with pytest.raises(MalformedRequest) as info:
            await pool.run(decode)
    finally:
        await pool.aclose()
    assert info.value.reason == "request_unknown_field"
    assert info.value.http_status == 400


async def test_dead_worker_is_a_503_and_the_pool_is_replaced() -> None:
    pool = DecodePool(workers=1)
    try:
        with pytest.raises(DependencyUnavailable) as info:
            await pool.run(_die)
        assert info.value.reason == "decode_pool_unavailable"
        ok = await pool.run(functools.partial(decode_infer_request, "digits", "", _body(1), header_length=None,
                                              limits=LIMITS))
        assert ok.inputs[0].shape == (1, 64)
    finally:
        await pool.aclose()


async def test_workers_are_started_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh pool starts its forkserver and workers inside ``submit``: done on the loop's
    thread, every connection stalled for that long on the first large body."""
    loop_thread = threading.get_ident()
    submitted_on: list[int] = []
    real_submit = ProcessPoolExecutor.submit

    def spy(self: ProcessPoolExecutor, *args: Any, **kwargs: Any) -> Any:
        submitted_on.append(threading.get_ident())
        return real_submit(self, *args, **kwargs)

    monkeypatch.setattr(ProcessPoolExecutor, "submit", spy)
    pool = DecodePool(workers=1)
    try:
        ok = await pool.run(functools.partial(decode_infer_request, "digits", "", _body(2), header_length=None,
                                              limits=LIMITS))
    finally:
        await pool.aclose()
    assert ok.inputs[0].shape == (2, 64)
    assert submitted_on and loop_thread not in submitted_on


async def test_pool_shut_down_under_a_request_is_replaced() -> None:
    """A concurrent request discarded the pool (its worker died) after this one took it:
    ``submit`` raised RuntimeError, answered as a 500. Now: a fresh pool, and a 503 if that refuses too."""
    pool = DecodePool(workers=1)
    stale = pool._executor()
    stale.shutdown(wait=True)
    try:
        ok = await pool.run(functools.partial(decode_infer_request, "digits", "", _body(1), header_length=None,
                                              limits=LIMITS))
        assert ok.inputs[0].shape == (1, 64)
        assert pool._pool is not stale
    finally:
        await pool.aclose()


async def test_pool_refusing_every_job_is_a_503(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: ProcessPoolExecutor, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("cannot schedule new futures after shutdown")

    monkeypatch.setattr(ProcessPoolExecutor, "submit", refuse)
    pool = DecodePool(workers=1)
    try:
        with pytest.raises(DependencyUnavailable) as info:
            await pool.run(_die)
        assert info.value.reason == "decode_pool_unavailable"
    finally:
        await pool.aclose()
