"""Audit trail throughput: records/s with fsync group commit, and CPU per record.

Appends realistic request records (pseudonymized subject, AES-GCM-encrypted personal
fields, stage outcomes) from 1, 16 and 64 concurrent tasks for a fixed time, each
``append`` waiting until its record is durable, as a request handler does. Reports
records/s, fsyncs/s, mean batch size, append latency p50/p99 and process CPU µs per
record (writer thread included; split into the event-loop thread and the writer thread
on Linux), then the same at 64 with ``durability="write"`` (no fsync) for comparison, and
how fast ``verify`` reads the result back. ``--record gateway`` appends the record shape
``GatewayService.audit`` writes (16 stage entries, notes; ~2.3 KB on disk) instead of
the default small one.

    .venv/bin/python bench/bench_audit.py [--seconds 3] [--record small|gateway] [--dir DIR_ON_THE_TARGET_DISK]

fsync cost depends entirely on the storage: run it on the disk the audit log will use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.audit import AuditConfig, AuditLog, verify
from gateway.audit.config import Durability

SUBJECTS = 200


def record(worker: int, n: int) -> dict[str, Any]:
    subject = (worker * 7919 + n) % SUBJECTS
    return {
        "request_id": f"{worker:04x}{n:012x}", "tenant": "acme", "subject_id": f"user-{subject}",
        "subject_tenant": "acme",
        "client_addr": f"10.0.{subject % 256}.{n % 256}", "roles": ["analyst"], "model": "digits",
        "model_version": "1", "action": "infer", "purpose": "scoring", "decision": "allow", "reason": "ok",
        "status": 200, "latency_ms": 3.217, "policy_revision": "3f2a9c1b7e00", "eps": 0.5,
        "stages": [{"stage": s, "outcome": "allowed", "us": 12.5} for s in ("jwt_auth", "rbac", "rate_limit",
                                                                              "pii_mask")],
        "pii": {"EMAIL": 0, "PHONE": 1}, "flags": {"canary": "stable"},
    }


_STAGES = ("authn", "feature_flags", "model_exposure", "authz", "rate_limit", "feature_flags", "authz",
           "rate_limit", "sanitize", "adversarial", "pii_mask", "dp_noise", "dp_noise", "pii_mask",
           "adversarial", "authz")


def gateway_record(worker: int, n: int) -> dict[str, Any]:
    """What GatewayService.audit builds for an allowed inference (bench/ab_inprocess's full mode)."""
    subject = (worker * 7919 + n) % SUBJECTS
    return {
        "request_id": f"{worker:08x}{n:024x}", "policy_revision": "553c67e4c311", "transport": "http",
        "route": "/v2/models/{model}/infer", "action": "infer", "model": "digits", "model_version": "1",
        "tenant": "acme", "subject_id": f"user-{subject}", "subject_tenant": "acme", "client_addr": "127.0.0.1",
        "roles": ["analyst"], "decision": "allow", "reason": "ok", "status": 200,
        "latency_ms": round(4.967 + n % 7 / 3, 3),
        "stages": [{"stage": s, "outcome": "allowed", "reason": None, "us": round(7.4 + i * 3.1 + n % 5, 1)}
                   for i, s in enumerate(_STAGES)],
        "upstream_called": True,
        "notes": {"authz": "analyst:infer", "detectors": {"grid": 0, "mahalanobis": 7.4175, "query_pattern": 0,
                                                          "range": 0, "training_range": 0},
                  "flags": {"flag": "digits-version", "reason": "targeting_match", "variant": "stable"},
                  "pii": {"in": {}, "out": {}}, "rate_limit.cost": {"elements": 64}},
        "eps": 0.0, "flag": "digits-version", "variant": "stable", "variant_reason": "targeting_match",
    }


RECORDS: dict[str, Callable[[int, int], dict[str, Any]]] = {"small": record, "gateway": gateway_record}


def _thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process (Linux; empty elsewhere)."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


async def run(root: Path, *, concurrency: int, seconds: float, durability: Durability,
              make: Callable[[int, int], dict[str, Any]]) -> dict[str, Any]:
    config = AuditConfig(log_dir=root / "log", anchor_dir=root / "anchors", key_dir=root / "keys",
                         durability=durability)
    log = AuditLog(config)
    await log.start()
    for n in range(SUBJECTS):  # warm-up: every subject key exists (first use costs extra fsyncs)
        await log.append(make(0, n))
    latencies: list[float] = []
    before = (log.stats.records, log.stats.batches, log.stats.fsyncs)
    stop = time.monotonic() + seconds

    async def worker(w: int) -> None:
        n = 0
        while time.monotonic() < stop:
            started = time.perf_counter()
            await log.append(make(w + 1, n))
            latencies.append(time.perf_counter() - started)
            n += 1

    threads0 = _thread_cpu()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    threads1 = _thread_cpu()
    main = threading.get_native_id()
    loop_cpu = threads1.get(main, 0.0) - threads0.get(main, 0.0)
    other_cpu = sum(t - threads0.get(tid, 0.0) for tid, t in threads1.items() if tid != main)
    records = log.stats.records - before[0]
    batches = log.stats.batches - before[1]
    fsyncs = log.stats.fsyncs - before[2]
    await log.close()
    latencies.sort()
    return {
        "durability": durability, "concurrency": concurrency, "records": records,
        "records_per_s": records / wall, "fsyncs_per_s": fsyncs / wall, "mean_batch": records / max(1, batches),
        "p50_ms": statistics.median(latencies) * 1e3, "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
        "cpu_us_per_record": cpu / records * 1e6,
        "loop_cpu_us_per_record": loop_cpu / records * 1e6 if threads1 else None,
        "writer_cpu_us_per_record": other_cpu / records * 1e6 if threads1 else None,
    }


def verify_speed(root: Path) -> dict[str, Any]:
    started = time.process_time()
    result = verify(root / "log", anchor_dir=root / "anchors", key_dir=root / "keys")
    cpu = time.process_time() - started
    return {"verify_ok": result.ok, "verify_records": result.records,
            "verify_cpu_us_per_record": cpu / max(1, result.records) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--record", choices=sorted(RECORDS), default="small", help="record shape to append")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        cases: list[tuple[Durability, int]] = [("fsync", 1), ("fsync", 16), ("fsync", 64), ("write", 64)]
        for index, (durability, concurrency) in enumerate(cases):
            root = Path(tmp) / f"case{index}"
            rows.append(asyncio.run(run(root, concurrency=concurrency, seconds=args.seconds, durability=durability,
                                        make=RECORDS[args.record])))
        check = verify_speed(Path(tmp) / "case2")
    print(f"record: {args.record}")
    print(f"{'durability':<10} {'conc':>5} {'records/s':>10} {'fsyncs/s':>9} {'batch':>6} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'CPU µs/rec':>11} {'loop µs':>8} {'writer µs':>10}")
    for r in rows:
        split = (f"{r['loop_cpu_us_per_record']:>8.1f} {r['writer_cpu_us_per_record']:>10.1f}"
                 if r["loop_cpu_us_per_record"] is not None else f"{'-':>8} {'-':>10}")
        print(f"{r['durability']:<10} {r['concurrency']:>5} {r['records_per_s']:>10.0f} {r['fsyncs_per_s']:>9.0f} "
              f"{r['mean_batch']:>6.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['cpu_us_per_record']:>11.1f} "
              f"{split}")
    print(f"verify: {check['verify_records']} records, {check['verify_cpu_us_per_record']:.1f} CPU µs/record, "
          f"ok={check['verify_ok']}")
    print(json.dumps({"record": args.record, "append": rows, "verify": check}))


if __name__ == "__main__":
    main()
