"""A standalone audit writer for the ``kill -9`` test (run as ``python -m tests.audit.driver ROOT``).

Appends records from many concurrent tasks forever and prints ``<seq> <n>`` on stdout
only after ``append`` returned, i.e. once the record is durable: exactly what a client
sees as a 2xx. The test kills it with SIGKILL mid-load and checks every printed pair.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from pathlib import Path

from gateway.audit import AuditConfig, AuditLog


def config_for(root: Path) -> AuditConfig:
    return AuditConfig(log_dir=root / "log", anchor_dir=root / "anchors", key_dir=root / "keys",
                       checkpoint_every=50, checkpoint_interval_s=0.2, segment_max_records=400)


async def run(root: Path, concurrency: int) -> None:
    log = AuditLog(config_for(root))
    await log.start()
    counter = itertools.count()
    out = sys.stdout

    async def worker() -> None:
        while True:
            n = next(counter)
            seq = await log.append({"request_id": f"k-{n}", "n": n, "subject_id": f"user-{n % 7}",
                                    "subject_tenant": "acme",
                                    "client_addr": "127.0.0.1", "decision": "allow", "status": 200})
            out.write(f"{seq} {n}\n")
            out.flush()

    out.write("READY\n")
    out.flush()
    await asyncio.gather(*(worker() for _ in range(concurrency)))


if __name__ == "__main__":
    asyncio.run(run(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 16))
