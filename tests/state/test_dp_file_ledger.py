"""FileBudgetLedger (no Redis): budgets survive a restart, are shared by workers, and fail closed."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import files as fs_module
from gateway.state.dp_file_ledger import FileBudgetLedger
from privacy.dp.ledger import LedgerUnavailable, PeriodScheme, Refused, Reservation

NOW = 1_800_000_000.0
PERIOD = PeriodScheme().at(NOW)
LIMIT = (5.0,)


def ledger(path: Path) -> FileBudgetLedger:
    return FileBudgetLedger(path, clock=lambda: NOW)


async def test_reservations_survive_a_restart_as_spent(tmp_path: Path) -> None:
    path = tmp_path / "state" / "dp-ledger.json"
    first = ledger(path)
    committed = await first.reserve("dp:alpha:tab_dp", PERIOD, (2.0,), LIMIT)
    assert isinstance(committed, Reservation)
    await first.commit(committed)
    open_one = await first.reserve("dp:alpha:tab_dp", PERIOD, (1.0,), LIMIT)
    assert isinstance(open_one, Reservation)  # the process dies before commit or refund
    refunded = await first.reserve("dp:beta:tab_dp", PERIOD, (4.0,), LIMIT)
    assert isinstance(refunded, Reservation)
    await first.refund(refunded)
    assert oct(path.stat().st_mode & 0o777) == "0o600"

    second = ledger(path)
    assert await second.usage("dp:alpha:tab_dp", PERIOD, 1) == (3.0,)  # the open one stays counted
    assert await second.usage("dp:beta:tab_dp", PERIOD, 1) == (0.0,)
    assert isinstance(await second.reserve("dp:alpha:tab_dp", PERIOD, (2.5,), LIMIT), Refused)


@pytest.mark.parametrize("content", [b"", b"{", b'{"format": 2, "accounts": []}',
                                     b'{"format": 1, "accounts": [{"key": "k", "period": {"id": "p", "start_s": 0, '
                                     b'"end_s": 1}, "used": [-1.0]}]}'])
async def test_an_unreadable_file_is_never_a_fresh_budget(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "dp-ledger.json"
    path.write_bytes(content)
    broken = ledger(path)
    with pytest.raises(LedgerUnavailable):
        await broken.reserve("dp:alpha:tab_dp", PERIOD, (0.5,), LIMIT)
    with pytest.raises(LedgerUnavailable):
        await broken.usage("dp:alpha:tab_dp", PERIOD, 1)


async def test_a_charge_that_cannot_be_saved_is_undone_and_refused(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os


    class _FailingOs:
        """The ``os`` of the module that writes the file, with an fsync that fails (a dying disk)."""

        def __init__(self, fsync: object) -> None:
            self.fsync = fsync

        def __getattr__(self, name: str) -> object:
            return getattr(os, name)

    def failing_fsync(_fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    unwritable = ledger(tmp_path / "dp-ledger.json")
    monkeypatch.setattr(fs_module, "os", _FailingOs(failing_fsync))
    with pytest.raises(LedgerUnavailable):
        await unwritable.reserve("dp:alpha:tab_dp", PERIOD, (0.5,), LIMIT)
    assert await unwritable.usage("dp:alpha:tab_dp", PERIOD, 1) == (0.0,)
    assert unwritable.open_reservations() == 0


async def test_two_workers_on_one_file_share_one_budget(tmp_path: Path) -> None:
    """``--workers 2`` without Redis: two ledgers (two open file descriptions, as two
    processes) racing on one file admit exactly the budget, not twice it."""
    import asyncio

    path = tmp_path / "dp-ledger.json"
    workers = [ledger(path), ledger(path)]
    results = await asyncio.gather(*(workers[i % 2].reserve("dp:alpha:tab_dp", PERIOD, (0.5,), LIMIT)
                                     for i in range(40)))
    granted = [r for r in results if isinstance(r, Reservation)]
    assert len(granted) == 10
    assert await workers[0].usage("dp:alpha:tab_dp", PERIOD, 1) == (5.0,)
    index, held = next((i, r) for i, r in enumerate(results) if isinstance(r, Reservation))
    owner, other = workers[index % 2], workers[1 - index % 2]
    await other.refund(held)  # not its reservation: nothing happens
    assert await workers[0].usage("dp:alpha:tab_dp", PERIOD, 1) == (5.0,)
    await owner.refund(held)
    assert await workers[0].usage("dp:alpha:tab_dp", PERIOD, 1) == (4.5,)
