"""The catalogue's test world (CATALOGUE §0.1/§0.2) on one background event loop.

Why a thread: the gateway, the scriptable fake Triton, the IdP (JWKS with a hit counter)
and the attacker server must outlive pytest-asyncio's per-test loops, and protocol cases
need a real TCP listener built with production's runner (``runner_for``). Tests talk to
them over loopback from any loop; each case gets its own client source address
(127.0.x.y) so the per-address pre-auth limit (20/s) never couples two cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import structlog
from aiohttp import web

from gateway.app import SERVICE_KEY, build_app, runner_for
from gateway.audit import iter_records
from gateway.kserve import ModelMetadata, TensorSpec
from gateway.observability.logging import redact
from gateway.service import InferenceService
from gateway.settings import Settings
from gateway.stages.authn import JwtAuthenticator
from security_tests.support.jwtforge import Keys, TokenFactory, ec_jwk, rsa_jwk
from tests.support.fake_triton import FakeTriton

T = TypeVar("T")
WORLD_DIR = Path(__file__).resolve().parent.parent / "world"
ROOT = WORLD_DIR.parent.parent
CANARIES = ("john.doe@example.com", "078-05-1120", "4111111111111111", "4111 1111 1111 1111")
SVC_ENV = "SECTEST_SVC_SECRET"

# Real digits (integers 0..16); constant/off-grid inputs are refused by the sanitizer.
DIGIT_ZERO = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8,
              8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10,
              0, 0, 0]


def _spec(name: str, datatype: str, *shape: int) -> TensorSpec:
    return TensorSpec(name, datatype, tuple(shape))


MODELS = (
    ModelMetadata("pub_clf", ("1", "2"), "onnxruntime_onnx", (_spec("x", "FP32", -1, 4),),
                  (_spec("probs", "FP32", -1, 3), _spec("logits", "FP32", -1, 3)), 64),
    ModelMetadata("alpha_fraud", ("1", "2"), "onnxruntime_onnx", (_spec("x", "FP32", -1, 4),),
                  (_spec("probs", "FP32", -1, 3),), 64),
    ModelMetadata("beta_fraud", ("1",), "onnxruntime_onnx", (_spec("x", "FP32", -1, 4),),
                  (_spec("probs", "FP32", -1, 3),), 64),
    ModelMetadata("txt_echo", ("1",), "onnxruntime_onnx", (_spec("text", "BYTES", -1),),
                  (_spec("text", "BYTES", -1),), 0),
    ModelMetadata("tab_dp", ("1",), "onnxruntime_onnx", (_spec("x", "FP32", -1, 20),),
                  (_spec("probs", "FP32", -1, 10),), 64),
    ModelMetadata("digits_clf", ("1",), "onnxruntime_onnx", (_spec("pixels", "FP32", -1, 64),),
                  (_spec("probabilities", "FP32", -1, 10),), 64),
    # AUTHZ-10 (BOPLA): role `labeler` may receive only `label`; logits/embedding are withheld.
    ModelMetadata("scorer", ("1",), "onnxruntime_onnx", (_spec("x", "FP32", -1, 4),),
                  (_spec("label", "INT32", -1, 1), _spec("logits", "FP32", -1, 3),
                   _spec("embedding", "FP32", -1, 8)), 64),
)
UPSTREAM_MODELS = frozenset(m.name for m in MODELS)

PUB_BODY: dict[str, Any] = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                        "data": [0.1, 0.2, 0.3, 0.4]}]}
DIGITS_BODY: dict[str, Any] = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
                                           "data": DIGIT_ZERO}]}


def text_body(*texts: str) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": list(texts)}]}


class LoopThread:
    """An event loop in a daemon thread; ``run`` submits a coroutine and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sectest-world", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class KeyServer:
    """A loopback JWKS server with a hit counter; ``mode`` scripts faults (AUTHN-24)."""

    jwks: dict[str, Any]
    hits: int = 0
    mode: str = "ok"  # ok | http500 | nonjson | empty | hang | redirect (302 to redirect_to)
    redirect_to: str = ""
    port: int = 0
    extra: dict[str, bytes] = field(default_factory=dict)
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if request.path in self.extra:
            return web.Response(body=self.extra[request.path])
        if self.mode == "redirect":
            raise web.HTTPFound(self.redirect_to)
        if self.mode == "http500":
            return web.Response(status=500, text="boom")
        if self.mode == "nonjson":
            return web.Response(text="<html>not json</html>", content_type="text/html")
        if self.mode == "empty":
            return web.json_response({"keys": []})
        if self.mode == "hang":
            # 30 s, or until the case heals the server (mode back to "ok"): a healed IdP
            # must not keep answering the gateway's old, abandoned requests for half a minute.
            for _ in range(300):
                if self.mode != "hang":
                    break
                await asyncio.sleep(0.1)
        return web.json_response(self.jwks, headers={"Cache-Control": "max-age=300"})


class LogBuffer(io.StringIO):
    """Everything the gateway logged (structlog JSON lines and stdlib records), thread-safe."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        with self._lock:
            return super().write(s)

    def text(self) -> str:
        with self._lock:
            return self.getvalue()


class _StdlibHandler(logging.Handler):
    def __init__(self, buffer: LogBuffer) -> None:
        super().__init__(logging.INFO)
        self.buffer = buffer

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.buffer.write(f"[stdlib {record.levelname} {record.name}] {text}\n")


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    raw_headers: tuple[tuple[bytes, bytes], ...] = ()

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class CaseLedger:
    """What one case saw: responses (for NL and NO-LEAK) and whether a 500 is expected."""

    responses: list[tuple[str, str, Response]] = field(default_factory=list)
    allow_internal_fault: bool = False
    extra_secrets: list[str] = field(default_factory=list)
    # Protection-off proofs (test_protection_off.py) only: invariants this case breaches on
    # purpose, e.g. {"I3:upstream"}; the invariant check then demands that the breach happened.
    expected_breach: set[str] = field(default_factory=set)


class World:
    """Everything of §0.1 that lives across cases; built once per session."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.keys = Keys.generate()
        self.now_offset = 0.0
        self.frozen: float | None = None
        self.tokens = TokenFactory(self.keys, clock=self.clock)
        self.loop = LoopThread()
        self.idp = KeyServer({"keys": [rsa_jwk(self.keys.rs1, "rs-1")]})
        self.attacker = KeyServer({"keys": [rsa_jwk(self.keys.attacker_rs, "evil-1")]})
        self.fake = FakeTriton(MODELS)
        self.logs = LogBuffer()
        self.ledger = CaseLedger()
        self._addr = itertools.count(1)
        self.lag_samples: list[float] = []
        self.lag_by_case: dict[str, float] = {}
        self.case_id = ""
        self.gateway_port = 0
        self._runner: web.AppRunner | None = None
        self._lag_task: asyncio.Future[None] | None = None
        self.service: InferenceService | None = None
        self.settings: Settings | None = None

    # ------------------------------------------------------------------ time

    def clock(self) -> float:
        """The injectable clock (§0.1 ``clock``): wall time plus a test-controlled offset."""
        if self.frozen is not None:
            return self.frozen
        return time.time() + self.now_offset

    # ------------------------------------------------------------------ lifecycle

    def render_policies(self, target: Path) -> Path:
        shutil.copytree(WORLD_DIR / "policies", target)
        template = (WORLD_DIR / "identity.yaml.tmpl").read_text()
        es_jwks = json.dumps({"keys": [ec_jwk(self.keys.es1, "es-1")]})
        (target / "identity.yaml").write_text(template.replace("{idp_port}", str(self.idp.port))
                                              .replace("{es_jwks}", es_jwks))
        return target

    def profiles(self, target: Path) -> Path:
        """digits_clf uses the shipped digits profile (range/grid detectors), renamed."""
        (target / "digits_clf").mkdir(parents=True)
        doc = json.loads((ROOT / "triton_repo" / "digits" / "profile.json").read_text())
        doc["model"] = "digits_clf"
        (target / "digits_clf" / "profile.json").write_text(json.dumps(doc))
        return target

    def start(self) -> None:
        os.environ[SVC_ENV] = self.keys.hs_secret_text
        self._configure_logging()
        self.loop.run(self._start_servers())
        policies = self.render_policies(self.workdir / "policies")
        self.settings = Settings(
            policies=policies, backend=f"grpc://{self.fake.url}", audit_dir=self.workdir / "audit",
            state_dir=self.workdir / "state", dev=False, policy_poll_s=0.2,
            profiles=self.profiles(self.workdir / "profiles"),
        )
        self.service = self.loop.run(self._start_gateway(self.settings))
        self.install_clock()

    async def _start_servers(self) -> None:
        await self.idp.start()
        await self.attacker.start()
        await self.fake.start()
        self._lag_task = asyncio.ensure_future(self._measure_lag())

    async def _start_gateway(self, settings: Settings) -> InferenceService:
        app = build_app(settings)
        runner = runner_for(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runner = runner
        self.gateway_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return app[SERVICE_KEY]

    async def _measure_lag(self) -> None:
        """§0.1 ``loop_lag``: how late a 10 ms timer fires on the gateway's loop."""
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.01)
            self.lag_samples.append(max(0.0, time.perf_counter() - start - 0.01))

    def stop(self) -> None:
        async def down() -> None:
            if self._lag_task is not None:
                self._lag_task.cancel()
            if self._runner is not None:
                await self._runner.cleanup()
            await self.fake.stop()
            await self.idp.stop()
            await self.attacker.stop()
        with contextlib.suppress(Exception):
            self.loop.run(down())
        self.loop.stop()
        structlog.configure(**self._old_structlog)
        logging.getLogger().removeHandler(self._handler)
        logging.getLogger().setLevel(self._old_level)

    def _configure_logging(self) -> None:
        # SEC-03: the whole suite runs with DEBUG logging, through the production redactor.
        self._old_structlog = structlog.get_config()
        structlog.configure(
            processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                        structlog.processors.TimeStamper(fmt="iso", utc=True),
                        structlog.processors.format_exc_info, redact, structlog.processors.JSONRenderer()],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
            logger_factory=structlog.PrintLoggerFactory(file=self.logs),
            cache_logger_on_first_use=False,
        )
        self._handler = _StdlibHandler(self.logs)
        root = logging.getLogger()
        self._old_level = root.level
        root.addHandler(self._handler)
        root.setLevel(logging.INFO)

    # ------------------------------------------------------------------ gateway internals (fault flags)

    def install_clock(self) -> None:
        """Point the active revision's authenticator at :meth:`clock` (re-done after reloads)."""
        assert self.service is not None
        for bound in self.service.store.current.pipeline.stages:
            if isinstance(bound.stage, JwtAuthenticator):
                bound.stage.clock = self.clock

    def reload(self) -> bool:
        assert self.service is not None
        changed = self.loop.run(self.service.store.reload("test"))
        self.install_clock()
        return changed

    # ------------------------------------------------------------------ clients

    def next_addr(self) -> str:
        n = next(self._addr)
        return f"127.{1 + n // 62500}.{(n // 250) % 250}.{n % 250 + 1}"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def audit_records(self) -> list[dict[str, Any]]:
        assert self.settings is not None
        return list(iter_records(self.settings.audit_dir))

    def upstream_calls(self) -> int:
        """UP=n of §0.5: inference requests the fake Triton received in this case."""
        return int(self.fake.counts["ModelInfer"])

    def audit_for(self, resp: Response) -> list[dict[str, Any]]:
        """The audit records of one answered request (by its X-Request-ID)."""
        rid = resp.headers.get("X-Request-ID")
        return [r for r in self.audit_records() if rid is not None and r.get("request_id") == rid]

    def audit_bytes(self) -> bytes:
        assert self.settings is not None
        return b"".join(p.read_bytes() for p in sorted(self.settings.audit_dir.rglob("*")) if p.is_file())


@dataclass
class Client:
    """A case's HTTP client: its own source address, every response recorded for the invariants."""

    world: World
    addr: str

    async def request(self, method: str, path: str, *, json_body: Any = None, data: bytes | None = None,
                      headers: dict[str, str] | None = None, token: str | None = None,
                      timeout_s: float = 60.0) -> Response:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        if json_body is not None:
            data = json.dumps(json_body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        connector = aiohttp.TCPConnector(local_addr=(self.addr, 0), force_close=True)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                         skip_auto_headers=("Accept-Encoding", "User-Agent")) as session:
            payload: Any = io.BytesIO(data) if data is not None and len(data) > 65536 else data
            async with session.request(method, self.world.base + path, data=payload, headers=hdrs,
                                       allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                transport = r.connection.transport if r.connection is not None else None
                body = await r.read()
                resp = Response(r.status, dict(r.headers), body, tuple(r.raw_headers))
            # A refusal can arrive before a large body is sent; a graceful close would then wait
            # for the unsent bytes to drain into a peer that has gone, and the socket outlive the
            # test. The answer is in hand, so drop what is left.
            if transport is not None and transport.get_write_buffer_size():
                transport.abort()
        await asyncio.sleep(0)
        self.world.ledger.responses.append((method, path, resp))
        return resp

    async def infer(self, model: str, body: Any, *, token: str | None, version: str | None = None,
                    headers: dict[str, str] | None = None) -> Response:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        return await self.request("POST", path, json_body=body, token=token, headers=headers)

    async def raw(self, data: bytes, *, timeout_s: float = 3.0, chunks: list[bytes] | None = None,
                  chunk_delay_s: float = 0.0) -> bytes:
        """§0.1 ``raw_http``: bytes in, every byte the gateway sent until close/timeout out."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.world.gateway_port,
                                                       local_addr=(self.addr, 0))
        received = bytearray()
        try:
            writer.write(data)
            for chunk in chunks or ():
                await asyncio.sleep(chunk_delay_s)
                writer.write(chunk)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(timeout_s):
                    while chunk := await reader.read(65536):
                        received += chunk
        finally:
            # Abort, not close: unsent bytes (a refused upload) must not keep the socket alive.
            writer.transport.abort()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
        raw = bytes(received)
        self.world.ledger.responses.append(("RAW", "", _parse_raw(raw)))
        return raw


_STATUS_RE = re.compile(rb"HTTP/1\.[01] (\d{3})")


def _parse_raw(raw: bytes) -> Response:
    m = _STATUS_RE.match(raw)
    return Response(int(m.group(1)) if m else 0, {}, raw)


def statuses(raw: bytes) -> list[int]:
    """Every status line in a raw byte stream (pipelined answers)."""
    return [int(s) for s in re.findall(rb"HTTP/1\.[01] (\d{3}) ", raw)]


async def gather_limited(n: int, make: Callable[[int], Awaitable[T]], limit: int = 50) -> list[T]:
    sem = asyncio.Semaphore(limit)

    async def one(i: int) -> T:
        async with sem:
            return await make(i)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def iter_text(values: Iterator[Any]) -> Iterator[str]:
    for v in values:
        yield v if isinstance(v, str) else repr(v)


__all__ = ["CANARIES", "DIGITS_BODY", "PUB_BODY", "Client", "Response", "World", "replace", "statuses",
           "text_body", "gather_limited", "iter_text"]
