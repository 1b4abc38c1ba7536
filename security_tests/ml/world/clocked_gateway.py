"""``python -m security_tests.ml.world.clocked_gateway serve ...``: the gateway on a simulated clock.

CATALOGUE §0.1 ``clock`` for a real gateway process: ``time.time`` (and ``time_ns``) is
replaced, before anything of the gateway is imported, by wall time plus an offset read
from the file named by ``INFERGATE_TEST_CLOCK_FILE``. Tests move the gateway's calendar
(DP budget periods, quota days, token times, audit timestamps) by rewriting that file
(atomically, so a new inode marks a change; one ``stat`` per call). Monotonic time (event
loop, detector cooldowns) is untouched. Test-only: never used by the product.
"""

from __future__ import annotations

import os
import sys
import time

_PATH = os.environ.get("INFERGATE_TEST_CLOCK_FILE", "")
_REAL_TIME = time.time
_STATE: list[float] = [-1.0, 0.0]  # inode seen, offset


def _offset() -> float:
    try:
        inode = float(os.stat(_PATH).st_ino)
    except OSError:
        return _STATE[1]
    if inode != _STATE[0]:
        try:
            with open(_PATH, encoding="ascii") as fh:
                _STATE[1] = float(fh.read().strip() or 0.0)
            _STATE[0] = inode
        except (OSError, ValueError):
            pass
    return _STATE[1]


def fake_time() -> float:
    return _REAL_TIME() + _offset()


def fake_time_ns() -> int:
    return int(fake_time() * 1e9)


def write_offset(path: str, offset: float) -> None:
    """Publish a new offset atomically (a new inode, which :func:`_offset` notices)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="ascii") as fh:
        fh.write(repr(float(offset)))
    os.replace(tmp, path)


def main() -> int:
    if _PATH:
        time.time = fake_time
        time.time_ns = fake_time_ns
    from gateway.cli import main as gateway_main

    return gateway_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
