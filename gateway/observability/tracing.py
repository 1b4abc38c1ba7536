"""Optional OpenTelemetry tracing: one span per call, a child per stage and per upstream call.

Off unless configured, and then free: the SDK is an optional extra (``.[tracing]``) that
is imported only when tracing is switched on, and with it off a traced call site costs
one ``ContextVar.get`` (``active()``). Switched on by the standard variables:
``OTEL_TRACES_EXPORTER=otlp|console`` or an ``OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT``
(OTLP over HTTP/protobuf; the exporter reads its own ``OTEL_EXPORTER_OTLP_*`` settings),
``OTEL_SERVICE_NAME`` (default ``infergate``); ``OTEL_SDK_DISABLED=true`` wins. Unlike
the SDK's own default, an unset ``OTEL_TRACES_EXPORTER`` means off, not OTLP.

The client's valid ``traceparent`` is the parent of the call's span, and the upstream
receives the upstream span's context, so Triton's spans hang below the gateway's.

# SECURITY: spans leave the process for a collector other people read. Attributes are
# codes the gateway chose (route template, model, stage, outcome, reason, revision,
# request id); never a token, a tensor, a tenant, a subject or a client address, and
# exceptions are not recorded (their text can carry input or upstream details).
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from gateway.errors import GatewayError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from gateway.context import RequestContext
    from gateway.kserve import InferRequest

T = TypeVar("T")

log = structlog.get_logger("gateway.tracing")

ATTR_PREFIX = "infergate."


@dataclass(frozen=True, slots=True)
class _Active:
    """The tracer of the call being served; set only while a traced call runs."""

    tracer: Tracer


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("infergate_tracing", default=None)


def active() -> bool:
    """Whether the current call is traced (the whole cost of a call site when tracing is off)."""
    return _ACTIVE.get() is not None


def _traceparent(span: Span) -> str:
    sc = span.get_span_context()
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def _end(span: Span, error: BaseException | None) -> None:
    from opentelemetry.trace import Status, StatusCode

    if isinstance(error, GatewayError):
        span.set_attribute(ATTR_PREFIX + "reason", error.reason)
        if error.http_status >= 500:
            span.set_status(Status(StatusCode.ERROR, error.reason))
    elif error is not None:
        # The type only: an exception's text may hold input or upstream details.
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    span.end()


async def _in_span(span: Span, call: Callable[[], Awaitable[T]]) -> T:
    from opentelemetry import trace

    with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
        try:
            result = await call()
        except BaseException as exc:
            _end(span, exc)
            raise
    _end(span, None)
    return result


class Tracing:
    """The process's tracing switch. ``Tracing()`` is off; see :meth:`from_env`."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider
        self._tracer: Tracer | None = provider.get_tracer("infergate") if provider is not None else None

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Tracing:
        """Off unless an exporter is configured (see the module docstring)."""
        env = os.environ if environ is None else environ
        exporter_name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or exporter_name == "none":
            return cls()
        if not exporter_name and not endpoint:
            return cls()
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
        except ImportError as exc:
            raise RuntimeError("tracing is configured (OTEL_*) but the OpenTelemetry SDK is not installed: "
                               "pip install 'infergate[tracing]'") from exc
        exporter: SpanExporter
        if exporter_name in ("", "otlp"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        elif exporter_name == "console":
            exporter = ConsoleSpanExporter()
        else:
            raise RuntimeError(f"OTEL_TRACES_EXPORTER={exporter_name!r}: only otlp, console or none")
        provider = TracerProvider(resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME")
                                                            or "infergate"}))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info("tracing_enabled", exporter=exporter_name or "otlp")
        return cls(provider)

    def shutdown(self) -> None:
        """Flush and stop the exporter (graceful shutdown)."""
        if self.provider is not None:
            self.provider.shutdown()

    async def request(self, ctx: RequestContext, route: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run one call under its server span, parented on the client's valid ``traceparent``."""
        if self._tracer is None:
            return await call()
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = TraceContextTextMapPropagator().extract({"traceparent": ctx.traceparent_in or ""})
        attributes: dict[str, str] = {ATTR_PREFIX + "route": route, ATTR_PREFIX + "transport": ctx.transport,
                                      ATTR_PREFIX + "request_id": ctx.request_id,
                                      ATTR_PREFIX + "policy_revision": ctx.revision}
        if ctx.model is not None:
            attributes[ATTR_PREFIX + "model"] = ctx.model
        if ctx.version:
            attributes[ATTR_PREFIX + "model_version"] = ctx.version
        span = self._tracer.start_span(route, context=parent, kind=SpanKind.SERVER, attributes=attributes)
        # The same ids everywhere: logs, the audit record and the upstream continue this span.
        ctx.traceparent = _traceparent(span)
        token = _ACTIVE.set(_Active(self._tracer))
        structlog.contextvars.bind_contextvars(trace_id=ctx.traceparent[3:35])
        try:
            return await _in_span(span, call)
        finally:
            structlog.contextvars.unbind_contextvars("trace_id")
            _ACTIVE.reset(token)


async def stage(name: str, call: Callable[[], Awaitable[T]], records: list[Any]) -> T:
    """One pipeline stage hook as a child span, annotated with the outcome it recorded."""
    current = _ACTIVE.get()
    if current is None:
        return await call()
    from opentelemetry import trace

    span = current.tracer.start_span(f"stage {name}", attributes={ATTR_PREFIX + "stage": name})
    before = len(records)
    error: BaseException | None = None
    with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
        try:
            return await call()
        except BaseException as exc:
            error = exc
            raise
        finally:
            if len(records) > before:
                record = records[-1]
                span.set_attribute(ATTR_PREFIX + "outcome", str(record.outcome))
                if record.reason:
                    span.set_attribute(ATTR_PREFIX + "reason", str(record.reason))
            _end(span, error)


async def upstream(operation: str, req: InferRequest, call: Callable[[], Awaitable[T]]) -> T:
    """The upstream call as a client span; the upstream receives this span as its parent."""
    current = _ACTIVE.get()
    if current is None:
        return await call()
    from opentelemetry.trace import SpanKind

    span = current.tracer.start_span(f"upstream {operation}", kind=SpanKind.CLIENT,
                                     attributes={ATTR_PREFIX + "upstream.operation": operation,
                                                 ATTR_PREFIX + "model": req.model})
    req.traceparent = _traceparent(span)
    return await _in_span(span, call)
