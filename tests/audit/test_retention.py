"""Retention deletes old segments behind a signed tombstone; the rest still verifies."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from gateway.audit import AuditLog, list_segments

from . import check, fill, find_line, make_config, records

DAY = 86_400.0
T0 = 1_750_000_000.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def old_trail(tmp_path: Path, clock: Clock, **overrides: object) -> AuditLog:
    config = make_config(tmp_path, segment_max_records=10, retention_s=7 * DAY, **overrides)
    log = AuditLog(config, clock=clock, monotonic=clock)  # time really passes: both clocks move
    await fill(log, 35)  # segments 1, 11, 21 (sealed) and 31 (holds the head)
    return log


class TestRetention:
    async def test_old_segments_go_behind_a_signed_tombstone(self, tmp_path: Path) -> None:
        clock = Clock(T0)
        log = await old_trail(tmp_path, clock)
        clock.now = T0 + 10 * DAY
        deleted = await log.apply_retention()
        await log.append({"decision": "allow", "n": 36})
        await log.close()
        assert deleted == ["seg-000000000001.jsonl", "seg-000000000011.jsonl", "seg-000000000021.jsonl"]
        # 31 holds the old head and is kept; it is a day old, so the tombstone opens a new one.
        assert [s.first_seq for s in list_segments(log.config.log_dir)] == [31, 36]
        kept = records(log.config)
        tombstone = kept[5]
        assert tombstone["type"] == "tombstone" and tombstone["seq"] == 36
        assert [(s["first_seq"], s["last_seq"], s["records"]) for s in tombstone["segments"]] == [
            (1, 10, 10), (11, 20, 10), (21, 30, 10)]
        assert tombstone["sig"] and tombstone["sig_key_id"]
        result = check(log.config)
        assert result.ok, result
        assert (result.first_seq, result.last_seq) == (31, 37)

    async def test_nothing_young_is_deleted(self, tmp_path: Path) -> None:
        clock = Clock(T0)
        log = await old_trail(tmp_path, clock)
        clock.now = T0 + 6 * DAY
        assert await log.apply_retention() == []
        await log.close()
        assert len(list_segments(log.config.log_dir)) == 4

    async def test_the_writer_applies_retention_by_itself(self, tmp_path: Path) -> None:
        clock = Clock(T0)
        log = await old_trail(tmp_path, clock, retention_check_s=0.01, checkpoint_interval_s=0.05)
        clock.now = T0 + 10 * DAY
        for _ in range(60):
            await asyncio.sleep(0.05)
            if len(list_segments(log.config.log_dir)) == 2:
                break
        await log.close()
        assert [s.first_seq for s in list_segments(log.config.log_dir)] == [31, 36]
        assert check(log.config).ok

    async def test_forged_tombstone_is_detected(self, tmp_path: Path) -> None:
        clock = Clock(T0)
        log = await old_trail(tmp_path, clock)
        clock.now = T0 + 10 * DAY
        await log.apply_retention()
        await log.close()
        path, index = find_line(log.config, 36)
        lines = path.read_bytes().splitlines(keepends=True)
        lines[index] = lines[index].replace(b'"records":10', b'"records":11', 1)
        path.write_bytes(b"".join(lines))
        result = check(log.config)
        assert (result.ok, result.first_bad_seq) == (False, 36)

    async def test_deleting_more_than_the_tombstone_says_is_detected(self, tmp_path: Path) -> None:
        clock = Clock(T0)
        log = await old_trail(tmp_path, clock)
        clock.now = T0 + 10 * DAY
        await log.apply_retention()
        await fill(log, 29, start=36)  # seqs 37..65
        await log.close()
        segments = list_segments(log.config.log_dir)
        assert [s.first_seq for s in segments] == [31, 36, 46, 56]
        segments[2].path.unlink()  # 46..55 gone with no tombstone for them
        result = check(log.config)
        assert (result.ok, result.first_bad_seq, result.problem) == (False, 46, "missing")
        # Deleting the segment holding the tombstone too: the first gap seen is named.
        segments[1].path.unlink()
        assert check(log.config).first_bad_seq == 36

    async def test_tombstoned_segment_left_behind_by_a_crash_still_verifies(self, tmp_path: Path) -> None:
        """Tombstone written, crash mid-deletion (oldest first): what is left still verifies."""
        clock = Clock(T0)
        log = await old_trail(tmp_path, clock)
        clock.now = T0 + 10 * DAY
        saved = {s.path: s.path.read_bytes() for s in list_segments(log.config.log_dir)[1:3]}
        await log.apply_retention()
        await log.close()
        for path, data in saved.items():
            path.write_bytes(data)
        result = check(log.config)
        assert result.ok, result
        assert result.first_seq == 11
        assert json.loads(saved[min(saved)].splitlines()[0])["seq"] == 11
