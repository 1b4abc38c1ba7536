"""Shared fixtures: settings on temporary state, the app on the embedded backend, tokens."""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer

from gateway.app import build_app, runner_for
from gateway.devissuer import issue_token
from gateway.settings import Settings
from tests.support.redis_server import RedisServer


@pytest.fixture(autouse=True)
def _process_logging_restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``infergate serve`` run in-process (CLI refusal tests) configures the process's
    logging with the stream of that moment, pytest's per-test capture file, closed once the
    test ends; structlog also caches each module logger on first use. Every later test's log
    line then raised "I/O operation on closed file". Here such a configuration does not
    cache, and the previous one is put back after the test."""
    import logging

    import structlog

    import gateway.observability.logging as logging_setup

    real = logging_setup.configure_logging

    def uncached(level: str = "info") -> None:
        real(level)
        structlog.configure(cache_logger_on_first_use=False)

    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(logging_setup, "configure_logging", uncached)
    yield
    structlog.configure(**saved)
    root.handlers = handlers
    root.setLevel(level)

ROOT = Path(__file__).resolve().parent.parent

# A real handwritten zero from scikit-learn's digits (integers 0..16): constant or
# off-grid pixels are refused by the adversarial checks (IN-20), so tests send this.
DIGIT_ZERO = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8,
              8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10,
              0, 0, 0]
DIGITS_BODY = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": DIGIT_ZERO}]}
TRITON_REPO = ROOT / "triton_repo"
POLICIES = ROOT / "policies"



class GatewayTestServer(TestServer):
    """A test server built with production's runner (``TestServer`` drops constructor
    kwargs, so ``server_kwargs`` would silently leave decompression on)."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return runner_for(self.app, **kwargs)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, one per test module that asks: modules
    change its configuration or flush it, so none shares one with another."""
    server = RedisServer.start(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """A private copy of the shipped policies, safe to edit in a test."""
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    return target


@pytest.fixture
def settings(tmp_path: Path, policy_dir: Path) -> Settings:
    return Settings(
        policies=policy_dir,
        backend=f"local:{TRITON_REPO}",
        audit_dir=tmp_path / "audit",
        state_dir=tmp_path / "state",
        dev=True,
        policy_poll_s=0.1,
    )


@pytest.fixture
def token(settings: Settings) -> Callable[..., str]:
    def make(sub: str = "alice", tenant: str = "acme", roles: tuple[str, ...] = ("analyst",), ttl: int = 600) -> str:
        return issue_token(settings.state_dir, sub=sub, tenant=tenant, roles=list(roles), ttl_s=ttl)

    return make


@pytest.fixture
def auth(token: Callable[..., str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token()}"}


Client = TestClient  # type: ignore[type-arg]


@pytest.fixture
async def client(
    settings: Settings, aiohttp_client: Callable[..., Awaitable[Client]]
) -> Client:
    server: BaseTestServer = GatewayTestServer(build_app(settings))
    return await aiohttp_client(server)
