"""Refusal floods: the first per (client, reason, minute) individually, the rest as a counter."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditAggregator, AuditLog
from gateway.errors import DependencyUnavailable

from . import check, make_config, records

T0 = 1_750_000_020.0  # 20 s into a minute


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def refusal(addr: str, reason: str = "authn_missing_token") -> dict[str, Any]:
    return {"decision": "deny", "reason": reason, "status": 401, "client_addr": addr, "route": "/v2/models/{m}/infer"}


class TestAggregator:
    async def test_a_flood_becomes_one_record_and_one_counter(self, tmp_path: Path) -> None:
        clock = Clock()
        log = AuditLog(make_config(tmp_path))
        agg = AuditAggregator(log, clock=clock)
        written = [await agg.refusal(refusal("198.51.100.7"), key="198.51.100.7") for _ in range(100)]
        assert written.count(True) == 1
        await agg.refusal(refusal("198.51.100.7", "authn_invalid_token"), key="198.51.100.7")  # new reason
        await agg.refusal(refusal("198.51.100.8"), key="198.51.100.8")  # new client
        assert await agg.flush() == 0  # the minute is not over
        clock.now += 60
        assert await agg.flush() == 1
        await log.close()
        kept = records(log.config)
        assert [r["type"] for r in kept] == ["request", "request", "request", "denial_aggregate"]
        counter = kept[-1]
        assert (counter["count"], counter["reason"], counter["first_seq"]) == (99, "authn_missing_token", 1)
        assert counter["window_start"].endswith(":00.000000Z") and counter["window_s"] == 60
        assert counter["client"] == kept[0]["client"]  # linkable pseudonym, address encrypted
        assert "198.51.100.7" not in str(kept)
        assert check(log.config).ok

    async def test_concurrent_first_refusals_write_once(self, tmp_path: Path) -> None:
        log = AuditLog(make_config(tmp_path))
        agg = AuditAggregator(log, clock=Clock())
        results = await asyncio.gather(*(agg.refusal(refusal("203.0.113.1"), key="203.0.113.1") for _ in range(20)))
        assert results.count(True) == 1
        await agg.close()
        await log.close()
        assert [r.get("count") for r in records(log.config)] == [None, 19]

    async def test_memory_is_bounded_under_address_rotation(self, tmp_path: Path) -> None:
        log = AuditLog(make_config(tmp_path))
        agg = AuditAggregator(log, clock=Clock(), max_keys=3)
        results = [await agg.refusal(refusal(f"2001:db8::{i}"), key=f"2001:db8::{i}") for i in range(50)]
        assert results.count(True) == 4  # three keys + the overflow bucket's first
        await agg.close()
        await log.close()
        overflow = [r for r in records(log.config) if r.get("overflow")]
        assert [r["count"] for r in overflow] == [46]
        assert "client" not in overflow[0] and "enc" not in overflow[0]

    async def test_failed_first_write_is_retried_and_surfaces(self) -> None:
        class Failing:
            calls = 0

            async def append(self, record: Mapping[str, Any]) -> int:
                self.calls += 1
                raise DependencyUnavailable(reason="audit_unavailable")

        sink = Failing()
        agg = AuditAggregator(sink, clock=Clock())
        for _ in range(2):
            with pytest.raises(DependencyUnavailable):
                await agg.refusal(refusal("192.0.2.1"), key="192.0.2.1")
        assert sink.calls == 2  # not silently counted against a record that never existed

    async def test_background_flush(self, tmp_path: Path) -> None:
        clock = Clock()
        log = AuditLog(make_config(tmp_path))
        agg = AuditAggregator(log, clock=clock)
        agg.start(interval_s=0.02)
        for _ in range(3):
            await agg.refusal(refusal("192.0.2.5"), key="192.0.2.5")
        clock.now += 61
        for _ in range(50):
            await asyncio.sleep(0.02)
            if len(records(log.config)) == 2:
                break
        await agg.close()
        await log.close()
        assert [r.get("count") for r in records(log.config)] == [None, 2]
