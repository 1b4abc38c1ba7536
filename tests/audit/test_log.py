"""The writer: group commit and durability, fail-closed behaviour, recovery, chain shape."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditConfig, AuditIntegrityError, AuditLog, StdoutSink, list_segments
from gateway.audit.anchors import CHECKPOINT_FILE, AnchorKeys, AnchorStore
from gateway.audit.verify import verify
from gateway.errors import DependencyUnavailable

from . import all_lines, check, fill, make_config, records, request_record


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


class FsyncSpy:
    """Wraps os.fsync: counts segment fsyncs and how many lines each one made durable."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, gate: threading.Event | None = None,
                 fail: Callable[[], bool] | None = None) -> None:
        self.real = os.fsync
        self.durable_lines: list[int] = []
        self.gate = gate
        self.fail = fail
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd: int) -> None:
        path = _fd_path(fd)
        is_segment = "/seg-" in path
        if is_segment and self.gate is not None:
            assert self.gate.wait(10)
        if is_segment and self.fail is not None and self.fail():
            raise OSError(errno.EIO, "injected fsync failure")
        self.real(fd)
        if is_segment:
            self.durable_lines.append(Path(path).read_bytes().count(b"\n"))


class TestGroupCommit:
    async def test_concurrent_appends_share_fsyncs_and_return_only_when_durable(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        spy = FsyncSpy(monkeypatch)
        log = AuditLog(make_config(tmp_path, checkpoint_every=1000))
        await log.start()
        covered: dict[int, int] = {}

        async def one(n: int) -> None:
            seq = await log.append(request_record(n))
            covered[seq] = max(spy.durable_lines)  # what was on stable storage when append returned

        await asyncio.gather(*(one(n) for n in range(64)))
        assert sorted(covered) == list(range(1, 65))
        assert all(durable >= seq for seq, durable in covered.items())
        assert len(spy.durable_lines) <= 4, spy.durable_lines  # 64 records, a handful of fsyncs
        assert log.stats.batches == len(spy.durable_lines)
        await log.close()

    async def test_append_waits_for_the_fsync(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        gate = threading.Event()
        FsyncSpy(monkeypatch, gate=gate)
        log = AuditLog(make_config(tmp_path))
        await log.start()
        task = asyncio.create_task(log.append(request_record(1)))
        await asyncio.sleep(0.2)
        assert not task.done()  # written to the file, but not yet fsynced: no answer yet
        gate.set()
        assert await task == 1
        await log.close()

    async def test_write_durability_skips_the_per_batch_fsync(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        spy = FsyncSpy(monkeypatch)
        log = AuditLog(make_config(tmp_path, durability="write", checkpoint_every=1000))
        await fill(log, 20)
        assert spy.durable_lines == []
        await log.close()  # the final checkpoint forces the data out before signing it
        assert spy.durable_lines == [20]
        assert check(log.config).ok

    async def test_a_thousand_concurrent_appends_make_one_contiguous_chain(self, tmp_path: Path) -> None:
        """AUD-12: no fork, no gap, no duplicate."""
        log = AuditLog(make_config(tmp_path, checkpoint_every=100, segment_max_records=300))
        seqs = await asyncio.gather(*(log.append(request_record(n)) for n in range(1000)))
        await log.close()
        assert sorted(seqs) == list(range(1, 1001))
        assert [r["seq"] for r in records(log.config)] == list(range(1, 1001))
        assert check(log.config).ok


class TestFailClosed:
    async def test_disk_full_refuses_and_leaves_no_partial_record(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        log = AuditLog(make_config(tmp_path))
        await fill(log, 5)
        real_write = os.write
        full = True

        def write(fd: int, data: Any) -> int:
            if full and "/seg-" in _fd_path(fd):
                real_write(fd, bytes(data[: len(data) // 2]))  # part of the batch lands, then ENOSPC
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)
        with pytest.raises(DependencyUnavailable) as info:
            await log.append(request_record(99))
        assert info.value.reason == "audit_unavailable"
        assert [r["seq"] for r in records(log.config)] == [1, 2, 3, 4, 5]  # cut back: no half record
        full = False
        assert await log.append(request_record(6)) == 6  # space again: the chain goes on, no gap
        await log.close()
        assert check(log.config).ok

    async def test_permission_denied_on_a_new_segment(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        log = AuditLog(make_config(tmp_path))
        await log.start()
        real_open = os.open

        def deny(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
            if "seg-" in str(path):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, mode, **kw)

        monkeypatch.setattr(os, "open", deny)
        with pytest.raises(DependencyUnavailable):
            await log.append(request_record(1))
        monkeypatch.setattr(os, "open", real_open)
        assert await log.append(request_record(2)) == 1
        await log.close()

    async def test_fsync_error_refuses_the_batch(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        failing = [True]
        FsyncSpy(monkeypatch, fail=lambda: failing[0])
        log = AuditLog(make_config(tmp_path))
        await log.start()
        with pytest.raises(DependencyUnavailable):
            await log.append(request_record(1))
        failing[0] = False
        assert await log.append(request_record(2)) == 1
        await log.close()
        kept = records(log.config)
        assert [r["n"] for r in kept if "deferred" not in r] == [2]
        # The refused request is recorded as the 503 it got, never as an allow (AUD-08).
        assert [(r["n"], r["decision"], r["status"]) for r in kept if "deferred" in r] == [(1, "deny", 503)]
        assert check(log.config).ok

    async def test_full_queue_refuses_at_once(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        gate = threading.Event()
        FsyncSpy(monkeypatch, gate=gate)
        log = AuditLog(make_config(tmp_path, queue_max=4, batch_max=1))
        await log.start()
        first = asyncio.create_task(log.append(request_record(0)))
        await asyncio.sleep(0.1)  # picked up, stuck in fsync
        queued = [asyncio.create_task(log.append(request_record(n))) for n in range(1, 5)]
        await asyncio.sleep(0.05)
        with pytest.raises(DependencyUnavailable):
            await log.append(request_record(5))
        assert log.stats.rejected_full == 1
        gate.set()
        seqs = [await t for t in [first, *queued]]
        await log.close()
        assert seqs == sorted(seqs) and len(set(seqs)) == 5 and seqs[0] == 1
        late = [r for r in records(log.config) if "deferred" in r]
        assert [(r["n"], r["deferred"]["cause"]) for r in late] == [(5, "queue_full")]

    async def test_stall_times_out_and_a_late_write_is_marked_abandoned(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        gate = threading.Event()
        FsyncSpy(monkeypatch, gate=gate)
        log = AuditLog(make_config(tmp_path, append_timeout_s=0.2))
        await log.start()
        with pytest.raises(DependencyUnavailable):
            await log.append(request_record(1, request_id="slow"))
        gate.set()
        for _ in range(500):  # the writer leaves the released fsync
            if not log.stalled:
                break
            await asyncio.sleep(0.01)
        assert await log.append(request_record(2)) >= 2
        await log.close()
        marker = next(r for r in records(log.config) if r["type"] == "abandoned")
        assert (marker["ref_seq"], marker["request_id"], marker["cause"]) == (1, "slow", "audit_timeout")
        assert (marker["status"], marker["reason"]) == (503, "audit_unavailable")  # the answer it got
        assert check(log.config).ok

    async def test_failing_anchor_store_stops_new_records(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        log = AuditLog(make_config(tmp_path, checkpoint_every=2))
        real = AnchorStore.write

        def broken(self: AnchorStore, **kw: Any) -> Any:
            raise OSError(errno.ENOSPC, "anchor disk full")

        monkeypatch.setattr(AnchorStore, "write", broken)
        assert await fill(log, 2) == [1, 2]  # durable; the checkpoint after them fails
        with pytest.raises(DependencyUnavailable):
            await log.append(request_record(3))
        monkeypatch.setattr(AnchorStore, "write", real)
        assert await log.append(request_record(4)) == 3
        await log.close()
        assert check(log.config).ok

    async def test_unrepresentable_or_forging_records_are_refused(self, tmp_path: Path) -> None:
        log = AuditLog(make_config(tmp_path))
        for bad in ({"x": float("nan")}, {"seq": 5}, {"prev_hash": "0" * 64}, {"mac": "x"}, {"x": object()},
                    {"x": 2**60}):
            with pytest.raises(DependencyUnavailable):
                await log.append(bad)
        await log.close()
        with pytest.raises(DependencyUnavailable):
            await log.append({"x": 1})


class TestRecovery:
    async def test_torn_last_line_is_quarantined_and_the_chain_continues(self, tmp_path: Path) -> None:
        config = make_config(tmp_path)
        log = AuditLog(config)
        await fill(log, 20)
        await log.close()
        [segment] = list_segments(config.log_dir)
        torn = b'{"client":"ab","decision":"al'
        with segment.path.open("ab") as handle:
            handle.write(torn)  # a crash in the middle of a write
        assert not check(config).ok or check(config).warnings
        log = AuditLog(config)
        assert await log.append(request_record(20)) == 22
        await log.close()
        kept = records(config)
        assert [r["seq"] for r in kept] == list(range(1, 23))
        recovery = kept[20]
        assert recovery["type"] == "recovery" and recovery["torn"][0]["bytes"] == len(torn)
        assert len(list_segments(config.log_dir)) == 2  # the new process wrote a new segment
        quarantined = list((config.log_dir / "quarantine").iterdir())
        assert [p.read_bytes() for p in quarantined] == [torn]
        result = check(config)
        assert result.ok and not result.warnings

    async def test_a_second_writer_is_refused(self, tmp_path: Path) -> None:
        config = make_config(tmp_path)
        first = AuditLog(config)
        await first.start()
        second = AuditLog(config)
        with pytest.raises(AuditIntegrityError, match="another audit writer"):
            await second.start()
        with pytest.raises(DependencyUnavailable):
            await AuditLog(config).append({"x": 1})
        await first.close()

    async def test_forged_newest_checkpoint_blocks_start(self, tmp_path: Path) -> None:
        config = make_config(tmp_path)
        log = AuditLog(config)
        await fill(log, 3)
        await log.close()
        path = config.anchor_dir / CHECKPOINT_FILE
        checkpoint = json.loads(path.read_bytes())
        path.write_text(json.dumps({**checkpoint, "seq": 2}, sort_keys=True, separators=(",", ":")) + "\n")
        with pytest.raises(AuditIntegrityError, match="not valid"):
            await AuditLog(config).start()

    async def test_torn_checkpoint_line_is_dropped(self, tmp_path: Path) -> None:
        config = make_config(tmp_path)
        log = AuditLog(config)
        await fill(log, 3)
        await log.close()
        with (config.anchor_dir / CHECKPOINT_FILE).open("ab") as handle:
            handle.write(b'{"at":"2025')
        log = AuditLog(config)
        await fill(log, 2, start=3)
        await log.close()
        assert check(config).ok


class TestChainShape:
    async def test_clock_stepped_back_keeps_seq_order(self, tmp_path: Path) -> None:
        """AUD-11: verification depends on seq, never on time."""
        now = [1_700_000_000.0]

        def clock() -> float:
            now[0] -= 3600.0
            return now[0]

        log = AuditLog(make_config(tmp_path), clock=clock)
        await fill(log, 5)
        await log.close()
        kept = records(log.config)
        assert [r["seq"] for r in kept] == [1, 2, 3, 4, 5]
        assert kept[0]["time"] > kept[-1]["time"]
        assert check(log.config).ok

    async def test_record_fields_and_canonical_numbers(self, tmp_path: Path) -> None:
        log = AuditLog(make_config(tmp_path))
        await log.append(request_record(1, eps=0.1 + 0.2, whole=2.0, tiny=1e-9, scores={"b": 0.5, "a": 1}))
        await log.close()
        [(_path, [line])] = all_lines(log.config)
        record = json.loads(line)
        assert record["eps"] == 0.3 and record["whole"] == 2 and record["tiny"] == 0
        assert b'"whole":2,' in line and b'"scores":{"a":1,"b":0.5}' in line
        for field in ("seq", "prev_hash", "time", "key_id", "mac", "subject", "client", "enc", "type"):
            assert field in record, field
        assert record["time"].endswith("Z")
        # SECURITY: no raw subject or address in clear; the pseudonym is a keyed HMAC.
        assert "user-1" not in line.decode() and "10.0.0.7" not in line.decode()
        assert "subject_tenant" not in record  # the unredacted tenant is only ever encrypted
        assert record["subject"] == log.pseudonym("acme", "user-1")

    async def test_credentials_never_reach_the_log(self, tmp_path: Path) -> None:
        """AUD-10, last line of defence: a token passed by mistake is redacted."""
        token = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSIsInRlbmFudCI6ImFjbWUifQ.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
        log = AuditLog(make_config(tmp_path))
        await log.append(request_record(1, Authorization=f"Bearer {token}", note=token, password="hunter2"))
        await log.close()
        text = b"".join(line for _path, lines in all_lines(log.config) for line in lines).decode()
        assert token not in text and "hunter2" not in text
        [record] = records(log.config)
        assert record["Authorization"] == record["note"] == record["password"] == "[redacted]"

    async def test_segments_roll_and_each_end_is_anchored(self, tmp_path: Path) -> None:
        log = AuditLog(make_config(tmp_path, segment_max_records=10, checkpoint_every=1000))
        await fill(log, 35)
        await log.close()
        assert [s.first_seq for s in list_segments(log.config.log_dir)] == [1, 11, 21, 31]
        lines = (log.config.anchor_dir / CHECKPOINT_FILE).read_bytes().splitlines()
        assert [json.loads(line)["seq"] for line in lines] == [10, 20, 30, 35]

    async def test_checkpoint_every_t_seconds(self, tmp_path: Path) -> None:
        log = AuditLog(make_config(tmp_path, checkpoint_every=1000, checkpoint_interval_s=0.1))
        await fill(log, 3)
        for _ in range(50):
            await asyncio.sleep(0.05)
            if (log.config.anchor_dir / CHECKPOINT_FILE).exists() and log.stats.checkpoints:
                break
        assert log.stats.checkpoints >= 1
        await log.close()

    async def test_stdout_sink_gets_the_same_lines(self, tmp_path: Path) -> None:
        stream = io.BytesIO()
        log = AuditLog(make_config(tmp_path), sinks=[StdoutSink(stream)])
        await fill(log, 3)
        await log.close()
        [(_path, lines)] = all_lines(log.config)
        assert stream.getvalue() == b"".join(lines)

    async def test_key_rotation_keeps_everything_verifiable(self, tmp_path: Path) -> None:
        config = make_config(tmp_path)
        log = AuditLog(config)
        await fill(log, 12)
        old_anchor = log.anchor_keys.current()[0]
        new_anchor = await log.rotate_key("anchor")
        await log.rotate_key("mac")
        await log.rotate_key("pseudonym")
        await fill(log, 12, start=12)
        await log.close()
        assert new_anchor != old_anchor
        assert {json.loads(line)["sig_key_id"]
                for line in (config.anchor_dir / CHECKPOINT_FILE).read_bytes().splitlines()} == {old_anchor,
                                                                                                new_anchor}
        assert check(config).ok
        # Pinning only the first key: the signed rotation record vouches for the next one.
        pinned = AnchorKeys(config.key_dir).public_keys()[old_anchor]
        result = verify(config.log_dir, anchor_dir=config.anchor_dir, trusted_keys={old_anchor: pinned})
        assert result.ok, result

    async def test_key_files_are_private(self, tmp_path: Path) -> None:
        config = make_config(tmp_path)
        log = AuditLog(config)
        await fill(log, 2)
        await log.close()
        key_files = [p for p in config.key_dir.rglob("*") if p.is_file()]
        assert key_files
        assert all(p.stat().st_mode & 0o077 == 0 for p in key_files)
        assert all(p.stat().st_mode & 0o077 == 0 for p in config.key_dir.rglob("*") if p.is_dir())


def test_config_keeps_the_three_stores_apart(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="separate"):
        AuditConfig(log_dir=tmp_path / "log", anchor_dir=tmp_path / "log" / "anchors", key_dir=tmp_path / "k")
    with pytest.raises(ValueError, match="separate"):
        AuditConfig(log_dir=tmp_path / "log", anchor_dir=tmp_path / "a", key_dir=tmp_path / "log")
    defaults = AuditConfig.for_dir(tmp_path / "audit")
    assert (defaults.anchor_dir.name, defaults.key_dir.name) == ("audit-anchors", "audit-keys")
