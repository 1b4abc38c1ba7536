"""A second gateway on the world's loop, for cases that need other *process settings*.

Why: Redis-backed state (RL-10/11/12, AV-07/08) and short socket timeouts (HTTP-12/13)
are settings fixed for a process's life, not policy. The side gateway shares the world's
fake upstream, IdP and token factory, but has its own policy copy (editable per case),
audit directory and response ledger, so the world's invariants (I2 counts the world's
audit trail) stay exact and the side's nothing-lost check (:meth:`SideGateway.check_nl`)
runs on its own trail.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, cast

from aiohttp import web

from gateway.app import SERVICE_KEY, build_app, runner_for
from gateway.audit import iter_records
from gateway.service import InferenceService
from gateway.settings import Settings
from security_tests.support.world import CaseLedger, Client, Response, World


@dataclasses.dataclass
class SideGateway:
    world: World
    workdir: Path
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    runner_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    ledger: CaseLedger = dataclasses.field(default_factory=CaseLedger)
    gateway_port: int = 0
    settings: Settings | None = None
    service: InferenceService | None = None
    _runner: web.AppRunner | None = None

    def start(self) -> SideGateway:
        assert self.world.settings is not None
        policies = self.world.render_policies(self.workdir / "policies")
        self.settings = dataclasses.replace(self.world.settings, policies=policies,
                                            audit_dir=self.workdir / "audit", state_dir=self.workdir / "state",
                                            **self.overrides)
        self.service = self.world.loop.run(self._start(self.settings))
        self.install_clock()
        return self

    async def _start(self, settings: Settings) -> InferenceService:
        app = build_app(settings)
        runner = runner_for(app, **self.runner_kwargs)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runner = runner
        self.gateway_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return app[SERVICE_KEY]

    def install_clock(self) -> None:
        from gateway.stages.authn import JwtAuthenticator

        assert self.service is not None
        for bound in self.service.store.current.pipeline.stages:
            if isinstance(bound.stage, JwtAuthenticator):
                bound.stage.clock = self.world.clock

    def stop(self) -> None:
        async def down() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
        self.world.loop.run(down())

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def client(self) -> Client:
        # Client only touches .base, .gateway_port and .ledger of its "world".
        return Client(cast(World, self), self.world.next_addr())

    def edit_policy(self, name: str, old: str, new: str) -> None:
        """Replace text in one of the side's policy files and reload (fails the case if nothing changed)."""
        assert self.settings is not None and self.service is not None
        path = self.settings.policies / name
        text = path.read_text()
        assert old in text, f"{old!r} not in {name}"
        path.write_text(text.replace(old, new))
        assert self.world.loop.run(self.service.store.reload("test")) is True
        self.install_clock()

    def restore_policies(self) -> None:
        assert self.settings is not None and self.service is not None
        fresh = self.world.render_policies(self.workdir / "policies.fresh")
        for path in fresh.iterdir():
            target = self.settings.policies / path.name
            if target.read_bytes() != path.read_bytes():
                target.write_bytes(path.read_bytes())
        for path in fresh.iterdir():
            path.unlink()
        fresh.rmdir()
        self.world.loop.run(self.service.store.reload("test"))
        self.install_clock()

    def audit_records(self) -> list[dict[str, Any]]:
        assert self.settings is not None
        return list(iter_records(self.settings.audit_dir))

    def audit_for(self, resp: Response) -> list[dict[str, Any]]:
        rid = resp.headers.get("X-Request-ID")
        return [r for r in self.audit_records() if rid is not None and r.get("request_id") == rid]

    def check_nl(self) -> None:
        """I2 on the side gateway: each 2xx has exactly one allow record, each allow record an answer."""
        allow = [r for r in self.audit_records() if r.get("decision") == "allow"]
        seen = b"".join(r.body + json.dumps(r.headers).encode() for _m, _p, r in self.ledger.responses)
        for method, path, r in self.ledger.responses:
            if method != "RAW" and path.startswith("/v2/models/") and 200 <= r.status < 300:
                rid = r.headers.get("X-Request-ID")
                assert sum(1 for rec in allow if rec.get("request_id") == rid) == 1, f"NL: {rid}"
            assert r.status != 500, f"I1 on the side gateway: 500 for {path}"
        for rec in allow:
            assert str(rec.get("request_id", "")).encode() in seen, f"NL: allow record without answer {rec}"


@dataclasses.dataclass
class RedisSide:
    """A real ``redis-server`` behind :class:`FaultProxy`, and a side gateway using it (§0.1 ``redis``)."""

    world: World
    workdir: Path
    server: Any = None
    proxy: Any = None
    gw: SideGateway | None = None

    def start(self) -> RedisSide:
        from tests.support.fault_proxy import FaultProxy
        from tests.support.redis_server import RedisServer

        self.server = RedisServer.start(self.workdir / "redis")
        self.proxy = FaultProxy("127.0.0.1", self.server.port).start()
        self.gw = SideGateway(self.world, self.workdir / "gw",
                              overrides={"redis_url": self.proxy.url_for("redis")}).start()
        return self

    @property
    def gateway(self) -> SideGateway:
        assert self.gw is not None
        return self.gw

    def heal(self) -> None:
        """Back to a healthy path, and the store's breaker closed again."""
        self.proxy.pass_()
        assert self.gw is not None and self.gw.service is not None
        breaker = self.gw.service.state._breaker  # type: ignore[attr-defined]
        breaker.open_until = 0.0
        breaker.probing = False
        breaker.failures = 0

    def stop(self) -> None:
        if self.gw is not None:
            self.gw.stop()
        if self.proxy is not None:
            self.proxy.stop()
        if self.server is not None:
            self.server.kill()
