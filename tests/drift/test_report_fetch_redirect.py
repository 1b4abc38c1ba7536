"""The drift report client sends a bearer token: it must never follow a redirect (HTTP-17)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.drift.report import fetch


async def test_fetch_does_not_follow_a_redirect() -> None:
    seen: list[str] = []

    async def moved(request: web.Request) -> web.Response:
        seen.append(request.path)
        raise web.HTTPFound("/elsewhere")

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response({"stolen": request.headers.get("Authorization", "")})

    app = web.Application()
    app.router.add_get("/v2/models/digits/drift", moved)
    app.router.add_get("/elsewhere", elsewhere)
    async with TestServer(app) as server:
        status, _body = await fetch(str(server.make_url("/")), "digits", "secret-token", timeout_s=5)
    assert status == 302
    assert seen == ["/v2/models/digits/drift"]
