"""Two gateway workers starting at once create the same key file: neither reads half of it.

Found by a fresh-clone CI run: ``--workers 2`` crashed one worker with "Unable to load PEM
file" because it read the dev issuer's key while the other worker was still writing it.
"""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

from gateway.keyfiles import read_or_create

SIZE = 8 << 20  # a large payload widens the window a reader could see a partial file in


def _make() -> bytes:
    return os.urandom(SIZE)


def _race(path: str, start: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue[bytes]) -> None:
    start.wait()
    out.put(read_or_create(Path(path), _make))


def test_racing_creators_all_get_the_one_whole_key(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for round_ in range(3):
        path = tmp_path / f"key-{round_}.bin"
        start = ctx.Barrier(6)
        out: multiprocessing.Queue[bytes] = ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(path), start, out)) for _ in range(6)]
        for proc in procs:
            proc.start()
        results = [out.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
            assert proc.exitcode == 0
        on_disk = path.read_bytes()
        assert len(on_disk) == SIZE
        assert all(result == on_disk for result in results)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left
