"""Spy on the pre-auth limiter: which client addresses it was asked to admit."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.stages.ratelimit import PreAuthLimiter


def count_preauth_admits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The list every ``PreAuthLimiter.admit`` call appends its address to (then admits as
    before): a test can tell a request was counted even when the limit did not trip."""
    counted: list[str] = []
    admit = PreAuthLimiter.admit

    async def counting(self: PreAuthLimiter, client_addr: str, ctx: Any = None) -> None:
        counted.append(client_addr)
        await admit(self, client_addr, ctx)

    monkeypatch.setattr(PreAuthLimiter, "admit", counting)
    return counted
