"""``kill -9`` under load: every acknowledged record survives and the chain continues (AUD-09).

A subprocess (``tests/audit/driver.py``) appends from 16 concurrent tasks and prints
``<seq> <n>`` only after ``append`` returned. It is killed with SIGKILL mid-load, several
times in a row; after each kill the test checks that every printed pair is in the log,
then a restarted writer recovers (sealing any torn tail), continues the chain, and
``verify`` passes.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from gateway.audit import AuditLog, iter_records
from gateway.audit.verify import verify

from .driver import config_for

ROOT = Path(__file__).resolve().parents[2]


def run_and_kill(root: Path, *, acked_before_kill: int, deadline_s: float = 15.0) -> dict[int, int]:
    """Start the driver, SIGKILL it once it acknowledged enough records; return ``seq -> n`` it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.audit.driver", str(root), "16"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    buffer = b""
    acked: dict[int, int] = {}
    end = time.monotonic() + deadline_s
    try:
        while len(acked) < acked_before_kill and time.monotonic() < end:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if not ready:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for line in complete:
                if line and line != b"READY":
                    seq, n = line.split()
                    acked[int(seq)] = int(n)
        os.kill(proc.pid, signal.SIGKILL)  # mid-load: tasks are appending, a batch may be half written
    finally:
        rest, err = proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL, err.decode(errors="replace")
    # Lines already printed before the kill are acknowledgements too; a cut last line is not.
    for line in (buffer + rest).split(b"\n")[:-1]:
        if line and line != b"READY":
            seq, n = line.split()
            acked[int(seq)] = int(n)
    assert len(acked) >= acked_before_kill, "the driver did not get going in time"
    return acked


async def test_every_acknowledged_record_survives_kill_9(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    acknowledged: dict[int, int] = {}
    for round_ in range(3):
        acknowledged.update(run_and_kill(tmp_path, acked_before_kill=300 * (round_ + 1)))
        on_disk = {r["seq"]: r.get("n") for r in iter_records(config.log_dir) if r.get("type") == "request"}
        missing = {seq: n for seq, n in acknowledged.items() if on_disk.get(seq) != n}
        assert not missing, f"round {round_}: acknowledged but not durable: {sorted(missing)[:10]}"

    log = AuditLog(config)  # restart: recovery seals a torn tail and continues the chain
    seq = await log.append({"request_id": "after-restart", "decision": "allow", "status": 200})
    await log.close()
    assert seq > max(acknowledged)
    result = verify(config.log_dir, anchor_dir=config.anchor_dir, key_dir=config.key_dir)
    assert result.ok, result
    assert not result.warnings, result.warnings
    assert result.last_seq == seq
