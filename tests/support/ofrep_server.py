"""A real OFREP flag service on loopback for tests: what a flagd daemon serves on port 8016.

No flagd binary can be installed here (not on PyPI, Debian or npm as a daemon), so this
aiohttp server implements the OFREP v1 single-flag evaluation endpoint over a flagd
flag-definition document, evaluated with the same flagd semantics as the gateway's file
provider (which is tested against flagd's own vectors)::

    POST /ofrep/v1/evaluate/flags/{key}  {"context": {...}}
      200 {"key", "value", "variant", "reason", "metadata"}
      400 {"key", "errorCode": "PARSE_ERROR" | "GENERAL", "errorDetails"}
      404 {"key", "errorCode": "FLAG_NOT_FOUND", "errorDetails"}
      401 without the expected Authorization header (when one is set)

Usage::

    server = await OfrepServer.start(flags_document)
    server.url                   # http://127.0.0.1:PORT
    server.flags = other_doc     # the "daemon" was given new flags
    server.requests              # [(flag key, context), ...]
    server.mode = "garbage"      # 200 with a body that is not JSON; "hang": never answer
    server.redirect_to = url     # 302 to url for every call
    await server.stop(); await server.restart()   # same port
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from aiohttp import web
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import OpenFeatureError

from gateway.flags.provider import FlagdFileProvider, FlagFileError

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class OfrepServer:
    def __init__(self, flags: dict[str, Any], *, auth: str | None = None) -> None:
        self.flags = flags
        self.auth = auth
        self.port = _free_port()
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.status_override: int | None = None  # answer every call with this status (e.g. 500)
        self.mode = "ok"  # ok | garbage | hang
        self.redirect_to: str | None = None
        self.hits = 0
        self._unhang = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @classmethod
    async def start(cls, flags: dict[str, Any], *, auth: str | None = None) -> OfrepServer:
        server = cls(flags, auth=auth)
        await server.restart()
        return server

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def restart(self) -> None:
        app = web.Application()
        app.router.add_post("/ofrep/v1/evaluate/flags/{key}", self._evaluate)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, self.port, reuse_address=True).start()

    def unhang(self) -> None:
        """Back to answering; calls held by ``mode = "hang"`` are released (answered normally)."""
        self.mode = "ok"
        self._unhang.set()
        self._unhang = asyncio.Event()

    async def stop(self) -> None:
        self._unhang.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _evaluate(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        self.hits += 1
        if self.redirect_to is not None:
            raise web.HTTPFound(self.redirect_to)
        if self.mode == "hang":
            await request.read()  # the client will have gone when this is released
            await self._unhang.wait()  # released by stop() or unhang()
            return web.json_response({"errorDetails": "released"}, status=503)
        if self.mode == "garbage":
            return web.Response(body=b"\x00<html>not json", content_type="application/json")
        if self.auth is not None and request.headers.get("Authorization") != self.auth:
            return web.json_response({"errorDetails": "unauthorized"}, status=401)
        if self.status_override is not None:
            return web.json_response({"errorDetails": "injected"}, status=self.status_override)
        try:
            body = await request.json()
            context = body.get("context", {}) if isinstance(body, dict) else None
            if not isinstance(context, dict):
                raise ValueError("context must be an object")
        except ValueError as exc:
            return _error(key, 400, "PARSE_ERROR", str(exc))
        self.requests.append((key, context))
        try:
            provider = FlagdFileProvider.from_bytes(json.dumps(self.flags).encode())
        except FlagFileError as exc:
            return _error(key, 500, "GENERAL", str(exc))
        attributes = {k: v for k, v in context.items() if k != "targetingKey"}
        target = context.get("targetingKey")
        ctx = EvaluationContext(targeting_key=target if isinstance(target, str) else None, attributes=attributes)
        flag = provider.flag_set.flags.get(key)
        try:
            variant, reason = provider.resolve_variant(key, ctx)
        except OpenFeatureError as exc:
            status = 404 if exc.error_code == "FLAG_NOT_FOUND" else 400
            return _error(key, status, str(exc.error_code), str(exc.error_message))
        if flag is None or variant is None:
            return _error(key, 404, "FLAG_NOT_FOUND", f"flag {key!r} is disabled or has no default")
        return web.json_response({"key": key, "value": flag.variants[variant], "variant": variant,
                                  "reason": str(reason), "metadata": dict(flag.metadata)})


def _error(key: str, status: int, code: str, details: str) -> web.Response:
    return web.json_response({"key": key, "errorCode": code, "errorDetails": details}, status=status)
