"""Wire the gateway together: the only module that knows every part.

Lifecycle (aiohttp ``cleanup_ctx``, unwound in reverse): upstream connected → policy
watcher running → serving; on shutdown the watcher stops, the upstream closes and the
audit trail is flushed to disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from gateway.audit import AuditAggregator, AuditConfig, AuditLog
from gateway.catalog import ModelCatalog
from gateway.devissuer import trusted_dev_issuer
from gateway.drift.monitor import DriftMonitor
from gateway.flags.rollback import RollbackTrip
from gateway.flags.shared import StateRollbackStore
from gateway.fronts.client_addr import TrustedProxies
from gateway.fronts.http.connection_cap import CappedRunner, GatedSite
from gateway.fronts.http.protocol import GatewayRunner, set_server_header
from gateway.fronts.http.server import HttpFront, no_automatic_continue, route_everything
from gateway.identity.registry import KeySourceRegistry
from gateway.keyfiles import read_or_create
from gateway.kserve import InferRequest, InferResponse
from gateway.observability.metrics import Metrics
from gateway.observability.tracing import Tracing
from gateway.policy.bundle import BundleVerifier
from gateway.policy.compile import CompileEnv
from gateway.policy.rollback import RollbackGuard
from gateway.policy.store import PolicyStore, Snapshot
from gateway.resilience.breaker import Breakers, State
from gateway.resilience.connection_gate import ConnectionGate
from gateway.resilience.loop_lag import monitor as loop_lag_monitor
from gateway.secret_strength import raw_key_problem
from gateway.service import InferenceService
from gateway.settings import Settings, parse_backend
from gateway.stages.authn import TrustedIssuer
from gateway.stages.feature_flags import FlagsRuntime
from gateway.startup_checks import report_startup_findings
from gateway.state import open_state
from gateway.state.dp_file_ledger import LEDGER_FILE, FileBudgetLedger
from gateway.state.dp_ledger import StateBudgetLedger
from gateway.tls import server_ssl_context
from gateway.upstream.base import Upstream
from privacy.dp.ledger import BudgetLedger

log = structlog.get_logger("gateway.app")

SERVICE_KEY = web.AppKey("service", InferenceService)
FRONT_KEY = web.AppKey("http_front", HttpFront)

# Wire-level limits of the HTTP parser (request target, one header, header count). The
# exact 8 KiB request-line and field-line limits are checked by the front
# (fronts/http/protocol.py check_header_size); these parser caps only bound the buffering.
# The two caps differ on purpose: aiohttp's LineTooLong names only the limit it hit, and
# that is how a parser refusal tells a long target (414) from a long field (431).
MAX_LINE_SIZE = 8192
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 100
HEADER_TIMEOUT_S = 10.0


def make_upstream(backend: str, *, threads: int = 2, settings: Settings | None = None) -> Upstream:
    """``local:DIR`` runs the repository in process; ``grpc://HOST:PORT`` calls Triton.

    The channel is built from :func:`parse_backend`'s value, the one the SEC-07 transport
    check judged, never from the raw string; anything else raises ``ValueError``.
    """
    target = parse_backend(backend)
    if target is None:
        from gateway.upstream.embedded import EmbeddedUpstream

        return EmbeddedUpstream(Path(backend.partition(":")[2]), workers=threads)
    from gateway.upstream.triton_grpc import TritonGrpcUpstream

    if settings is not None and settings.upstream_tls:
        return TritonGrpcUpstream(
            target.address, ssl=True,
            root_certificates=str(settings.upstream_ca) if settings.upstream_ca else None,
            private_key=str(settings.upstream_key) if settings.upstream_key else None,
            certificate_chain=str(settings.upstream_cert) if settings.upstream_cert else None,
        )
    return TritonGrpcUpstream(target.address)


class _FlagHooks:
    """Rollbacks are operator-visible events: a metric and an audit record of their own."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.audit_log: AuditLog | None = None
        self._pending: set[asyncio.Task[int]] = set()

    def rollback(self, trip: RollbackTrip) -> None:
        fields = trip.audit_fields()
        self.metrics.canary_rollbacks.labels(flag=str(fields.get("flag", "?"))).inc()
        log.warning("canary_rolled_back", **{k: str(v) for k, v in fields.items()})
        if self.audit_log is not None:
            task = asyncio.ensure_future(self.audit_log.append({"event": "canary_rollback", **fields}))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def evaluation_failed(self, flag: str, error: str) -> None:
        self.metrics.flag_evaluation_errors.labels(flag=flag).inc()
        log.warning("flag_evaluation_failed", flag=flag, error=error)


def build_service(settings: Settings, *, upstream: Upstream | None = None) -> InferenceService:
    """Load policy (fatal if invalid) and assemble the transport-neutral service."""
    metrics = Metrics()
    # SECURITY: unsafe process configuration refuses start-up before any key is read
    # (StartupRefused; overrides only warn): SEC-04 secret files, SEC-07 upstream channel.
    report_startup_findings(settings, metrics, injected_upstream=upstream is not None)
    extra: tuple[TrustedIssuer, ...] = ()
    if settings.dev:
        # SECURITY: the dev issuer exists only under --dev; production never trusts it.
        extra = (trusted_dev_issuer(settings.state_dir, allow_insecure=settings.allow_insecure_secret_files),)
    key_sources = KeySourceRegistry()
    upstream = upstream or make_upstream(settings.backend, threads=settings.embedded_threads, settings=settings)
    timeouts: dict[str, float] = {"infer": 10.0}

    async def reinfer(req: InferRequest) -> InferResponse:
        """Feature squeezing's second upstream call: the upstream only, never the pipeline."""
        return await upstream.infer(req, timeout_s=timeouts["infer"])

    # No I/O here: the gateway starts while Redis is down and refuses (fail closed) meanwhile.
    state = open_state(settings.redis_url, observer=metrics)
    # SECURITY: with a shared store every replica spends the same privacy budget.
    # Without it, the ledger is a file in the state directory: a restart never refills budgets.
    dp_ledger: BudgetLedger = (StateBudgetLedger(state) if settings.redis_url
                               else FileBudgetLedger(settings.state_dir / LEDGER_FILE))
    flag_hooks = _FlagHooks(metrics)
    # SECURITY: with a shared store a canary rolled back on one replica is rolled back on all.
    rollbacks = StateRollbackStore(state) if settings.redis_url else None
    env = CompileEnv(dp_ledger=dp_ledger, flags_runtime=FlagsRuntime.create(flag_hooks, store=rollbacks), state=state,
                     limit_metrics=metrics,
                     extra_issuers=extra, key_sources=key_sources,
                     repo_dir=settings.profiles_dir(),
                     reinfer=reinfer, detector_metrics=metrics,
                     pii_hmac_key=read_or_create(settings.state_dir / "pii-hmac.key", lambda: os.urandom(32),
                                                 allow_insecure=settings.allow_insecure_secret_files,
                                                 check=raw_key_problem),
                     pii_token_key=read_or_create(settings.state_dir / "pii-token.key", lambda: os.urandom(32),
                                                  allow_insecure=settings.allow_insecure_secret_files,
                                                  check=raw_key_problem))

    drift = DriftMonitor(metrics, settings.profiles_dir())

    def on_change(snapshot: Snapshot) -> None:
        timeouts["infer"] = float(snapshot.policy.gateway.upstream.infer_timeout_s)
        drift.configure({model: p.drift for model, p in snapshot.policy.gateway.models.items()})

    verifier = BundleVerifier.from_files(settings.policy_trusted_keys) if settings.policy_trusted_keys else None
    rollback = (RollbackGuard(settings.state_dir, allow_insecure=settings.allow_insecure_secret_files)
                if verifier is not None else None)
    store = PolicyStore(settings.policies, metrics, env, on_change=on_change, verifier=verifier, rollback=rollback)
    store.load_initial()
    audit_policy = store.current.policy.gateway.audit
    overrides: dict[str, Any] = {"stdout": audit_policy.stdout,
                                 "append_timeout_s": float(audit_policy.append_timeout_s)}
    if audit_policy.retention_days is not None:
        overrides["retention_s"] = audit_policy.retention_days * 86_400.0
    if settings.audit_key_dir is not None:
        overrides["key_dir"] = settings.audit_key_dir
    audit_log = AuditLog(AuditConfig.for_dir(settings.audit_dir, **overrides),
                         on_fsync=metrics.audit_fsync_duration.observe)
    metrics.audit_queue_depth.set_function(lambda: float(audit_log.stats.queue_depth))
    metrics.scrape_hooks.append(lambda: metrics.copy_jwks_counters(key_sources.counters()))

    def circuit_changed(model: str, state: State) -> None:
        metrics.circuit_state.labels(model=model).set(int(state))
        log.warning("circuit_state_changed", model=model, state=state.name.lower())

    service = InferenceService(
        store=store,
        upstream=upstream,
        catalog=ModelCatalog(upstream),
        metrics=metrics,
        audit_log=audit_log,
        audit_aggregator=AuditAggregator(audit_log),
        key_sources=key_sources,
        breakers=Breakers(on_change=circuit_changed),
        dp_ledger=dp_ledger,
        state=state,
        trusted_proxies=TrustedProxies.parse(settings.trusted_proxies),
        tracing=Tracing.from_env(),
        drift=drift,
    )
    flag_hooks.audit_log = audit_log
    drift.audit = audit_log
    return service


def build_app(settings: Settings, *, service: InferenceService | None = None,
              reuse_port: bool = False) -> web.Application:
    service = service or build_service(settings)
    # The body is read by the front itself, capped and decompressed under its own limits.
    app = web.Application(client_max_size=1024)
    app[SERVICE_KEY] = service
    front = app[FRONT_KEY] = HttpFront(service)
    # Every path, even one holding CR/LF after decoding, reaches the front (routes.py decides).
    route = app.router.add_route("*", "/{tail:(?s:.*)}", front.handle, expect_handler=no_automatic_continue)
    # ... and every request target that is no path at all (CONNECT, OPTIONS *) too.
    route_everything(app.router, route)
    app.on_response_prepare.append(set_server_header)

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        # An audit trail behind its signed anchors (truncated, rolled back) stops startup.
        await service.audit_log.start()
        service.audit_aggregator.start()
        await service.upstream.start()
        await service.state.start()
        # Operators see the loop's lag; the state layer reads the same monitor.
        loop_lag_monitor().add_sink(service.metrics.loop_lag)
        if service.drift is not None:
            service.drift.start()
        watcher = asyncio.create_task(service.store.watch(settings.policy_poll_s))
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP,
                                    lambda: asyncio.ensure_future(service.store.request_reload("sighup")))
        log.info("gateway_started", revision=service.store.current.policy.revision, backend=settings.backend)
        yield
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGHUP)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if service.drift is not None:
            await service.drift.stop()
        await front.decode_pool.aclose()
        await service.upstream.close()
        await service.store.env.flags_runtime.close()
        await service.state.close()
        await service.key_sources.close()
        # Last: every answered request's record is flushed and a final checkpoint signed.
        await service.audit_aggregator.close()
        await service.audit_log.close()
        service.tracing.shutdown()

    app.cleanup_ctx.append(lifecycle)

    async def grpc_front(_app: web.Application) -> AsyncIterator[None]:
        from gateway.fronts.grpc.server import DEFAULT_MAX_MESSAGE_BYTES, start_grpc_front

        assert settings.grpc_host is not None  # noqa: S101 - only appended when set
        limits = service.store.current.policy.gateway.limits
        max_bytes = max(DEFAULT_MAX_MESSAGE_BYTES, limits.max_body_bytes)
        # SECURITY (AV-09): the HTTP listener's connection cap applies to this one too.
        running = await start_grpc_front(service, settings.grpc_host, settings.grpc_port, tls=settings.tls,
                                         max_message_bytes=max_bytes, reuse_port=reuse_port,
                                         max_connections=limits.max_connections)
        log.info("grpc_front_started", port=running.port, tls=settings.tls is not None)
        yield
        await running.stop(grace_s=5.0)

    if settings.grpc_host is not None:
        # After the lifecycle: starts once the upstream is up, stops before it closes.
        app.cleanup_ctx.append(grpc_front)
    return app


def runner_for(app: web.Application, **extra: Any) -> web.AppRunner:
    # SECURITY: no automatic request decompression: the front decompresses itself with a
    # cap on the decompressed size (no gzip bombs).
    # A refused body is drained for at most a second, not aiohttp's default ten.
    # SECURITY: keepalive_timeout also bounds how long a connection may take to deliver
    # its request headers (aiohttp arms it at connect time): slowloris gets 10 s.
    # Parser refusals quote no input, in the answer or the log (fronts/http/protocol.py).
    # ``extra`` may override keepalive_timeout (the security suite's short header timeout).
    options: dict[str, Any] = {"keepalive_timeout": HEADER_TIMEOUT_S, **extra}
    common: dict[str, Any] = {"auto_decompress": False, "access_log": None, "max_line_size": MAX_LINE_SIZE,
                              "max_field_size": MAX_FIELD_SIZE, "max_headers": MAX_HEADERS, "lingering_time": 1.0}
    service = app.get(SERVICE_KEY)
    front = app.get(FRONT_KEY)
    if front is not None:
        # Requests the parser refuses are audited and counted like the front's own refusals.
        common["on_parse_refusal"] = front.record_parse_refusal
    if service is None:
        return GatewayRunner(app, **common, **options)
    # SECURITY (AV-09): limits.max_connections / max_connections_per_ip, refused at accept time.
    gate = ConnectionGate(limits=lambda: service.pin().policy.gateway.limits, metrics=service.metrics)
    return CappedRunner(app, gate=gate, **common, **options)


async def serve(settings: Settings, *, ready_message: str | None = None, reuse_port: bool = False) -> None:
    app = build_app(settings, reuse_port=reuse_port)
    runner = runner_for(app)
    await runner.setup()
    ssl_context = server_ssl_context(settings.tls) if settings.tls is not None else None
    # SECURITY (AV-09): TLS connections are counted against the cap before their handshake,
    # which must finish within the header timeout (fronts/http/connection_cap.py).
    site = GatedSite(runner, settings.host, settings.port, reuse_port=reuse_port or None, ssl_context=ssl_context,
                     handshake_timeout_s=HEADER_TIMEOUT_S)
    await site.start()
    metrics_runner: web.AppRunner | None = None
    if settings.metrics_host is not None:
        from gateway.fronts.metrics_access import start_metrics_site

        # SEC-09: a metrics-only listener (loopback unless told otherwise); with workers,
        # the first to bind serves (per-process metrics: scrape each pod/process directly).
        with contextlib.suppress(OSError) if reuse_port else contextlib.nullcontext():
            service = app[SERVICE_KEY]
            metrics_runner, _port = await start_metrics_site(
                service.metrics, settings.metrics_host, settings.metrics_port,
                lambda: service.pin().policy.gateway.http.allowed_hosts)
    if ready_message:
        print(ready_message, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("gateway_stopping")
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()


def _die_with(supervisor: int) -> None:
    """Have this worker get SIGTERM when its supervisor dies.

    A worker that outlives its supervisor (``kill -9``, an OOM kill) keeps serving the
    shared port and writing its audit segment, and nothing will ever forward it a signal
    to drain. Linux's parent-death signal makes it drain and exit like on a SIGTERM;
    elsewhere, or if the supervisor died before this ran, the check of the parent pid
    does it at once.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != supervisor:
        os.kill(os.getpid(), signal.SIGTERM)


def _worker(settings: Settings, log_level: str, supervisor: int) -> None:
    from gateway.observability.logging import configure_logging

    _die_with(supervisor)
    configure_logging(log_level)
    with contextlib.suppress(KeyboardInterrupt):
        from gateway.startup_checks import loop_debug

        asyncio.run(serve(settings, reuse_port=True), debug=loop_debug(settings))  # SEC-06


def serve_workers(settings: Settings, workers: int, *, log_level: str, ready_message: str | None) -> int:
    """N processes share the port (SO_REUSEPORT); shared state lives in Redis.

    The parent only supervises: it forwards SIGTERM/SIGINT and waits, so each worker
    drains its own in-flight requests and flushes its own audit segment.
    """
    import multiprocessing

    from gateway.audit import KeyStore
    from gateway.audit.anchors import AnchorKeys

    ctx = multiprocessing.get_context("spawn")
    # Each worker keeps its own hash chain (two writers interleaving one file would break
    # it) but all share one key store, created here first: one pseudonym per person, and
    # one erasure reaches every worker's records.
    key_dir = settings.audit_key_dir or settings.audit_dir.with_name(settings.audit_dir.name + "-keys")
    KeyStore(key_dir).mac.current()
    KeyStore(key_dir).pseudonyms.current()
    AnchorKeys(key_dir).current()
    procs = [
        ctx.Process(target=_worker, args=(dataclasses.replace(settings, audit_dir=settings.audit_dir / f"worker-{i}",
                                                              audit_key_dir=key_dir), log_level, os.getpid()),
                    name=f"infergate-{i}")
        for i in range(workers)
    ]
    for proc in procs:
        proc.start()
    if ready_message:
        print(ready_message, flush=True)

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for proc in procs:
        proc.join()
    return max((proc.exitcode or 0) for proc in procs)
