"""Tests of the audit trail (gateway.audit); shared helpers live here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.audit import AuditConfig, AuditLog, list_segments
from gateway.audit.verify import VerifyResult, verify


def make_config(root: Path, **overrides: Any) -> AuditConfig:
    """Three separate directories under ``root``, small limits so tests see every path."""
    values: dict[str, Any] = {"checkpoint_every": 10, "checkpoint_interval_s": 60.0}
    values.update(overrides)
    return AuditConfig(log_dir=root / "log", anchor_dir=root / "anchors", key_dir=root / "keys", **values)


def request_record(n: int, **extra: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "request_id": f"req-{n}", "tenant": "acme", "subject_id": f"user-{n % 3}", "client_addr": "10.0.0.7",
        "roles": ["analyst"], "model": "digits", "model_version": "1", "action": "infer", "decision": "allow",
        "reason": "ok", "status": 200, "latency_ms": 1.5, "policy_revision": "abc123", "n": n,
    }
    record.update(extra)
    # As the gateway writes it: the subject's tenant, unredacted, beside the subject id.
    record.setdefault("subject_tenant", record.get("tenant"))
    return record


async def fill(log: AuditLog, count: int, start: int = 0, **extra: Any) -> list[int]:
    """Append ``count`` records one after another (one batch each: checkpoints land exactly)."""
    return [await log.append(request_record(n, **extra)) for n in range(start, start + count)]


def check(config: AuditConfig, *, keys: bool = True, anchors: bool = True) -> VerifyResult:
    return verify(config.log_dir, anchor_dir=config.anchor_dir if anchors else None,
                  key_dir=config.key_dir if keys else None)


def all_lines(config: AuditConfig) -> list[tuple[Path, list[bytes]]]:
    return [(s.path, s.path.read_bytes().splitlines(keepends=True)) for s in list_segments(config.log_dir)]


def find_line(config: AuditConfig, seq: int) -> tuple[Path, int]:
    """(segment path, index of the line) holding record ``seq``."""
    for path, lines in all_lines(config):
        for index, line in enumerate(lines):
            if json.loads(line)["seq"] == seq:
                return path, index
    raise AssertionError(f"seq {seq} not found")


def records(config: AuditConfig) -> list[dict[str, Any]]:
    return [json.loads(line) for _path, lines in all_lines(config) for line in lines]
