"""pytest fixtures of the attack world, imported by ``security_tests/{ml,dp}/conftest.py``.

One world (models) and one in-memory gateway per session, shared by the ML and DP cases:
each case moves the simulated clock to a fresh budget period and/or uses its own tenant,
so no case inherits another's budget or quota.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from security_tests.ml.world.harness import AttackGateway
from security_tests.ml.world.models import World, build_world


@pytest.fixture(scope="session")
def attack_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("attack-world") / "repo")


@pytest.fixture(scope="session")
def attack_gw(attack_world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AttackGateway]:
    gw = AttackGateway.start(tmp_path_factory.mktemp("attack-gw"), attack_world.repo)
    try:
        yield gw
    finally:
        code = gw.stop()
        log = Path(gw.proc.log_path).read_text(errors="replace")
        # I1: no traceback in the gateway process, and a clean exit.
        assert "Traceback" not in log, log[-3000:]
        assert code == 0, log[-3000:]
