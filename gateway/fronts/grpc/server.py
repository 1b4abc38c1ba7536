"""The KServe V2 gRPC front: Triton's ``inference.GRPCInferenceService``, translated to the service.

An unmodified ``tritonclient.grpc`` client (sync or aio) talks to this servicer as it
would to Triton. Like the REST front it only translates: every authenticated RPC pins
the policy snapshot, builds a :class:`RequestContext` (``transport="grpc"``, bearer from
the ``authorization`` metadata, ``traceparent``), and goes through
:meth:`InferenceService.call`: the same shedding, admission, stages and audit record as
HTTP. Audit records use the REST route templates (``/v2/models/{model}/infer``), so a
call is recorded the same way whichever front it came through, apart from ``transport``;
the request metrics use the same templates and the taxonomy's HTTP status as ``code``,
so the existing dashboards and alerts cover both fronts.

Served: ServerLive, ServerReady (open, like ``/v2/health/*``), ServerMetadata,
ModelMetadata, ModelReady, ModelInfer. Every other Triton RPC (streaming, model
control, shared memory, statistics, trace and log settings) is refused with
UNIMPLEMENTED, audited, before authentication (as the REST front answers an unknown path);
so is any method of another service or an unknown name (:class:`_UnknownMethods`).
Unary RPCs are registered as stream-unary so that a message gRPC refuses as over the size
limit still reaches the front, which records it as the REST front records a body over its
limit (413 ``input_too_large``; :func:`_first_message`).

Errors: ``context.abort`` with the taxonomy's gRPC code and the REST front's client
message; trailing metadata carries ``x-request-id``, ``www-authenticate`` for
UNAUTHENTICATED and ``retry-after`` where HTTP sends ``Retry-After``.

A message protobuf cannot parse reaches the handler as :class:`Undecodable` and is
refused as INVALID_ARGUMENT, audited (grpcio would answer UNKNOWN with the parser's
exception text, unaudited).

Wire limits, set on the server: message size both ways, metadata size, concurrent streams
per connection and RPCs per server, keepalive enforcement. The client's deadline bounds
the call (capped at :data:`MAX_CALL_S`); a call whose client leaves still runs to its end
so that it is audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn, TypeVar
from urllib.parse import unquote

import grpc  # type: ignore[import-untyped, unused-ignore]
import grpc.aio  # type: ignore[import-untyped, unused-ignore]
import structlog
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.context import Action, RequestContext, traceparent_for
from gateway.errors import (
    AuthenticationFailed,
    GatewayError,
    InsufficientScope,
    InternalError,
    MalformedRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    UpstreamBadResponse,
    UpstreamTimeout,
)
from gateway.fronts.client_addr import client_address
from gateway.fronts.decode_pool import PROCESS_DECODE_BYTES, DecodePool
from gateway.fronts.grpc.codec import (
    CodecLimits,
    check_model_ref,
    decode_model_infer_bytes,
    decode_model_infer_request,
    encode_model_infer_response,
)
from gateway.kserve import ModelMetadata, TensorSpec
from gateway.policy.store import Snapshot
from gateway.service import InferenceService
from gateway.tls import TlsSettings, grpc_server_credentials

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_CALL_S",
    "MAX_METADATA_BYTES",
    "GrpcFront",
    "RunningGrpcFront",
    "Undecodable",
    "WithWire",
    "add_front_to_server",
    "bearer_from_metadata",
    "server_options",
    "start_grpc_front",
]

log = structlog.get_logger("gateway.grpc")

R = TypeVar("R")
Metadata = Sequence[tuple[str, str | bytes]]
Work = Callable[[RequestContext, Snapshot], Awaitable[R]]

DEFAULT_MAX_MESSAGE_BYTES: Final = 8 * 1024 * 1024
# SECURITY: all request metadata together (HPACK size: names, values, 32 bytes each). The
# REST front's header limits are of the same order; a JWT larger than this is refused.
MAX_METADATA_BYTES: Final = 8 * 1024
# The longest any call may run, whatever deadline the client asks for (or none).
MAX_CALL_S: Final = 60.0
# Like the REST front: decoding a large message off the event loop keeps health probes
# and other calls responsive.
OFFLOAD_DECODE_BYTES: Final = 256 * 1024
# Connections the listener holds open (the policy's limits.max_connections is passed in at
# start; gRPC core fixes it for the server's life, so a policy reload does not change it).
DEFAULT_MAX_CONNECTIONS: Final = 4096
# A new connection's TLS + HTTP/2 handshake must complete within this (the HTTP front's
# header timeout: 10 s).
HANDSHAKE_TIMEOUT_S: Final = 10.0
# Server-wide ceiling on RPCs in progress, as a multiple of the per-connection stream cap.
RPCS_PER_STREAM_LIMIT: Final = 4
# A refused client-streaming call (ModelStreamInfer, an unknown streaming method) is
# answered once the client has finished sending, within these bounds (see _drain).
DRAIN_MESSAGES: Final = 64
DRAIN_BYTES: Final = 1024 * 1024
DRAIN_S: Final = 1.0

_UNAUTHENTICATED_CHALLENGE: Final = 'Bearer realm="infergate"'
_INVALID_TOKEN_CHALLENGE: Final = 'Bearer realm="infergate", error="invalid_token"'  # noqa: S105 - a header value


# ---------------------------------------------------------------------------------------
# Metadata, peers, errors: the one place gRPC wire details are read or written
# ---------------------------------------------------------------------------------------


def _metadata(context: Any) -> list[tuple[str, str | bytes]]:
    return [(str(item.key), item.value) for item in (context.invocation_metadata() or ())]


def _first(metadata: Metadata, key: str) -> str | None:
    for name, value in metadata:
        if name == key and isinstance(value, str):
            return value
    return None


def bearer_from_metadata(metadata: Metadata) -> str | None:
    """The token of a single ``authorization: Bearer <token>`` entry, ``None`` without one.

    # SECURITY: two entries are refused, not resolved: a proxy and the upstream could pick
    # different ones. Same answer as the REST front's two Authorization headers (AUTHN-23):
    # a malformed request (400, INVALID_ARGUMENT), not a credential that failed (401).
    """
    values = [value for name, value in metadata if name == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise MalformedRequest("more than one authorization metadata entry", reason="authn_malformed_header")
    value = values[0]
    scheme, _, token = value.partition(" ") if isinstance(value, str) else ("", "", "")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("expected a Bearer token", reason="authn_malformed_header")
    return token.strip()


def _peer_address(peer: str | None) -> str:
    """``ipv4:1.2.3.4:5``/``ipv6:%5B::1%5D:5`` -> the canonical address (as rate limits key it).

    gRPC has no forwarding header the gateway trusts: the peer is the client.
    gRPC core writes the peer as a URI, so an IPv6 peer's brackets (and a zone id's ``%``)
    arrive percent-encoded (``ipv6:%5B::ffff:1.2.3.4%5D:5``); older versions sent them raw.

    # SECURITY: read literally, every IPv6 peer (and every IPv4 client of a dual-stack
    # ``[::]`` listener) became ``unknown``: one shared pre-auth bucket that any single
    # client could exhaust for all the others.
    """
    if peer and peer.startswith(("ipv4:", "ipv6:")):
        return client_address(unquote(peer.partition(":")[2]))
    return client_address(None)


def error_details(exc: GatewayError, request_id: str) -> str:
    """The status message: the REST front's client message, word for word (PII masked)."""
    message = exc.public_text()
    if exc.http_status >= 500:
        message = f"{message} (request id {request_id})"
    return message


def error_trailers(exc: GatewayError, request_id: str) -> tuple[tuple[str, str], ...]:
    """What the REST front sends as headers with this error, as trailing metadata."""
    trailers = [("x-request-id", request_id)]
    if isinstance(exc, AuthenticationFailed):
        challenge = _UNAUTHENTICATED_CHALLENGE if exc.reason == "authn_missing_token" else _INVALID_TOKEN_CHALLENGE
        trailers.append(("www-authenticate", challenge))
    elif isinstance(exc, InsufficientScope):
        trailers.append(("www-authenticate", exc.challenge()))
    if exc.retry_after_s is not None:
        trailers.append(("retry-after", str(max(1, int(exc.retry_after_s + 0.999)))))
    elif exc.http_status == 503:
        trailers.append(("retry-after", "1"))
    return tuple(trailers)


async def _abort(context: Any, exc: GatewayError, request_id: str) -> NoReturn:
    """The one place a :class:`GatewayError` becomes a gRPC status."""
    await context.abort(grpc.StatusCode[exc.grpc_code.name], error_details(exc, request_id),
                        trailing_metadata=error_trailers(exc, request_id))
    raise RuntimeError("grpc abort() returned")  # it raises; this line is for the type checker


def _budget(remaining: float | None) -> float:
    """Seconds this call may take: the client's deadline, never more than MAX_CALL_S."""
    if remaining is None:
        return MAX_CALL_S
    return max(0.0, min(float(remaining), MAX_CALL_S))


async def _within(deadline: float, call: Awaitable[R]) -> R:
    """Await ``call`` until the loop-time ``deadline``; past it, an audited 504/DEADLINE_EXCEEDED."""
    timeout = asyncio.timeout_at(deadline)
    try:
        async with timeout:
            return await call
    except TimeoutError:
        if timeout.expired():
            raise UpstreamTimeout("the call's deadline passed", reason="client_deadline") from None
        raise


async def _drain(requests: AsyncIterator[Any] | None) -> None:
    """Read, unparsed, what a streaming client is still sending before it is refused.

    Triton never ends a stream before the client has half-closed it, and grpcio's aio
    client breaks if the server does: a request written while the refusal's trailers are
    on their way fails inside the client (``Failed "execute_batch"``) and the call ends
    INTERNAL "Internal error from Core" instead of the refusal, at random (a
    ``tritonclient.grpc.aio`` ``stream_infer`` of two requests, one time in six). Reading
    until the client's half-close makes the answer the refusal every time.
    """
    if requests is None:
        return

    async def read() -> None:
        messages = received = 0
        async for message in requests:
            messages += 1
            received += len(message) if isinstance(message, bytes) else 0
            # SECURITY: this happens before authentication: the bounds cap what an
            # anonymous client can make the front read (the bytes are never parsed) and
            # how long it holds the stream; past them it is refused all the same.
            if messages >= DRAIN_MESSAGES or received >= DRAIN_BYTES:
                return

    # A client that keeps the stream open, or whose stream breaks, is answered anyway;
    # the call is refused whatever happened here.
    with contextlib.suppress(TimeoutError, grpc.RpcError):
        await asyncio.wait_for(read(), DRAIN_S)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Done callback for a call whose client left: its outcome is audited, nobody awaits it."""
    if not task.cancelled():
        task.exception()


# ---------------------------------------------------------------------------------------
# Routes: the REST templates, so audit records and metrics do not depend on the front
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Route:
    template: str
    action: Action
    model: str | None = None
    version: str = ""


_SERVER_ROUTE: Final = _Route("/v2", Action.SERVER)


@dataclass(frozen=True, slots=True)
class Undecodable:
    """Stands in for a request message protobuf could not parse (see :func:`add_front_to_server`)."""

    rpc: str


@dataclass(frozen=True, slots=True)
class WithWire:
    """A large request message with the bytes it was parsed from (see :func:`_lenient`)."""

    message: Any
    wire: bytes


def _decodable(request: Any) -> Any:
    if isinstance(request, Undecodable):
        raise MalformedRequest("the message is not a valid protobuf request", reason="request_invalid_protobuf")
    return request


def _server_route(request: Any) -> _Route:
    _decodable(request)
    return _SERVER_ROUTE


def _model_route(suffix: str, action: Action, request: Any) -> _Route:
    request = _decodable(request)
    if action is Action.INFER:
        name, version = str(request.model_name), str(request.model_version)
    else:
        name, version = str(request.name), str(request.version)
    check_model_ref(name, version)
    template = "/v2/models/{model}" + ("/versions/{version}" if version else "") + suffix
    return _Route(template, action, name, version)


def _tensor_metadata(spec: TensorSpec) -> Any:
    return service_pb2.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype,
                                                            shape=list(spec.shape))


def _metadata_response(meta: ModelMetadata) -> Any:
    return service_pb2.ModelMetadataResponse(
        name=meta.name, versions=list(meta.versions), platform=meta.platform,
        inputs=[_tensor_metadata(s) for s in meta.inputs], outputs=[_tensor_metadata(s) for s in meta.outputs],
    )


# ---------------------------------------------------------------------------------------
# The servicer
# ---------------------------------------------------------------------------------------


class GrpcFront(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]  # generated, untyped
    """Triton's generated servicer with the six RPCs the gateway serves; the rest refused.

    Every RPC of the base class is overridden: the generated defaults answer
    ``Unexpected <class 'NotImplementedError'>``, unaudited.
    """

    def __init__(self, service: InferenceService, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.service = service
        self.metrics = service.metrics
        self.max_message_bytes = max_message_bytes
        self._calls: set[asyncio.Task[Any]] = set()
        self.decode_pool = DecodePool()

    # ------------------------------------------------------------------ open (health)

    # Method names are gRPC's (the generated servicer's), hence CamelCase.
    async def ServerLive(self, request: Any, context: Any) -> Any:
        started = time.perf_counter()
        live = await self.service.live()
        self._done("/v2/health/live", 200, started)
        return service_pb2.ServerLiveResponse(live=live)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        started = time.perf_counter()
        ready = await self.service.ready()
        self._done("/v2/health/ready", 200 if ready else 503, started)
        return service_pb2.ServerReadyResponse(ready=ready)

    # ------------------------------------------------------------------ authenticated

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        async def work(_ctx: RequestContext, snap: Snapshot) -> Any:
            meta = await self.service.server_metadata(snap)
            return service_pb2.ServerMetadataResponse(name=meta.name, version=meta.version,
                                                      extensions=list(meta.extensions))

        return await self._serve(context, functools.partial(_server_route, request), work)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        async def work(ctx: RequestContext, snap: Snapshot) -> Any:
            return _metadata_response(await self.service.caller_metadata(ctx, snap))

        route = functools.partial(_model_route, "", Action.METADATA, request)
        return await self._serve(context, route, work)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        async def work(ctx: RequestContext, snap: Snapshot) -> Any:
            return service_pb2.ModelReadyResponse(ready=await self.service.model_ready(ctx, snap))

        route = functools.partial(_model_route, "/ready", Action.METADATA, request)
        return await self._serve(context, route, work)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        wire = None
        if isinstance(request, WithWire):
            request, wire = request.message, request.wire
        route = functools.partial(_model_route, "/infer", Action.INFER, request)
        return await self._serve(context, route, functools.partial(self._infer, request, wire))

    async def _infer(self, request: Any, wire: bytes | None, ctx: RequestContext, snap: Snapshot) -> Any:
        limits = snap.policy.gateway.limits
        size = int(request.ByteSize())
        # The server option bounds the message for every call; the policy's body limit
        # (hot-reloadable) applies here too, so both fronts take the same largest request.
        if size > limits.max_body_bytes:
            raise PayloadTooLarge(f"message larger than {limits.max_body_bytes} bytes")
        codec_limits = CodecLimits(
            max_elements_per_tensor=limits.max_elements_per_tensor,
            max_dims=limits.max_dims,
            max_bytes_element=limits.max_bytes_element,
            max_inputs=limits.max_inputs,
        )
        # As the REST front (AV-14): converting typed contents to arrays holds the GIL
        # (~280 ms for 8 MB of fp32_contents), so a thread would still stall the loop; a
        # very large message is decoded again, from its wire bytes, in a worker process.
        if wire is not None and size > PROCESS_DECODE_BYTES:
            req = await self.decode_pool.run(functools.partial(decode_model_infer_bytes, wire, limits=codec_limits))
        elif size > OFFLOAD_DECODE_BYTES:
            req = await asyncio.to_thread(decode_model_infer_request, request, limits=codec_limits)
        else:
            req = decode_model_infer_request(request, limits=codec_limits)
        req.traceparent = ctx.traceparent
        resp = await self.service.infer(ctx, snap, req)
        message = encode_model_infer_response(resp)
        if message.ByteSize() > self.max_message_bytes:
            # Refused here, audited, rather than failed by gRPC after an "allowed" record.
            raise UpstreamBadResponse(f"the response is larger than {self.max_message_bytes} bytes",
                                      reason="response_too_large")
        return message

    # ------------------------------------------------------------------ refused (UNIMPLEMENTED)

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> NoReturn:
        await self._unimplemented(context, "ModelStreamInfer", request_iterator)

    async def ModelConfig(self, request: Any, context: Any) -> NoReturn:
        await self._unimplemented(context, "ModelConfig")

    async def ModelStatistics(self, request: Any, context: Any) -> NoReturn:
        await self._unimplemented(context, "ModelStatistics")

    async def RepositoryIndex(self, request: Any, context: Any) -> NoReturn:
        await self._unimplemented(context, "RepositoryIndex")

    async def RepositoryModelLoad(self, request: Any, context: Any) -> NoReturn:
        await self._unimplemented(context, "RepositoryModelLoad")

    async def RepositoryModelUnload(self, request: Any, context: Any) -> NoReturn:
        await self._unimplemented(context, "RepositoryModelUnload")

    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> NoReturn:
        await self._unimplemented(context, "SystemSharedMemoryStatus")

    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> NoReturn:
        await self._unimplemented(context, "SystemSharedMemoryRegister")

    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> NoReturn:
        await self._unimplemented(context, "SystemSharedMemoryUnregister")

    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> NoReturn:
        await self._unimplemented(context, "CudaSharedMemoryStatus")

    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> NoReturn:
        await self._unimplemented(context, "CudaSharedMemoryRegister")

    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> NoReturn:
        await self._unimplemented(context, "CudaSharedMemoryUnregister")

    async def TraceSetting(self, request: Any, context: Any) -> NoReturn:
        await self._unimplemented(context, "TraceSetting")

    async def LogSettings(self, request: Any, context: Any) -> NoReturn:
        await self._unimplemented(context, "LogSettings")

    async def refuse_missing_message(self, context: Any, rpc: str) -> NoReturn:
        """A unary RPC whose request message never arrived: gRPC refused it as larger than
        the message limit (then gRPC has already answered RESOURCE_EXHAUSTED and only the
        record and log line are added here), or a hand-made client sent none."""
        request_id = self.service.request_ids.assign(_first(_metadata(context), "x-request-id"))
        # SECURITY: the REST front's answer and reason for a body over the limit, so an
        # oversized or compressed-bomb message leaves a record whichever front it came to.
        exc = PayloadTooLarge(f"message larger than {self.max_message_bytes} bytes, or no message",
                              reason="input_too_large")
        label = "unmatched"  # the model is in the message that never arrived
        self.metrics.requests.labels(route=label, code=str(exc.http_status)).inc()
        # gRPC has usually ended the call already and cancels this handler: the record is
        # written to its end regardless (a refusal, not an abandoned answer).
        answer = await asyncio.shield(self._refused_early(context, exc, request_id, label, None))
        await _abort(context, answer, request_id)

    async def refuse_unknown_method(self, context: Any, requests: AsyncIterator[Any] | None = None) -> NoReturn:
        """A method of no service this front serves; see :class:`_UnknownMethods`."""
        request_id = self.service.request_ids.assign(_first(_metadata(context), "x-request-id"))
        # The method name is the client's: kept out of the metric label, record and log.
        label = "grpc:unknown"
        exc = MethodNotAllowed("this method is not available through this gateway", reason="rpc_unimplemented")
        answer = await self._refused_early(context, exc, request_id, label, None)
        self.metrics.requests.labels(route=label, code=str(answer.http_status)).inc()
        await _drain(requests)  # after the record: a client that leaves now is recorded
        await _abort(context, answer, request_id)

    async def _unimplemented(self, context: Any, rpc: str, requests: AsyncIterator[Any] | None = None) -> NoReturn:
        # SECURITY: model control, shared memory and settings RPCs would let a client
        # reconfigure or read the upstream; none is forwarded, for anyone.
        request_id = self.service.request_ids.assign(_first(_metadata(context), "x-request-id"))
        label = f"grpc:{rpc}"  # bounded: the generated servicer's fixed set of names
        exc = MethodNotAllowed(f"{rpc} is not available through this gateway", reason="rpc_unimplemented")
        answer = await self._refused_early(context, exc, request_id, label, None)
        self.metrics.requests.labels(route=label, code=str(answer.http_status)).inc()
        await _drain(requests)  # after the record: a client that leaves now is recorded
        await _abort(context, answer, request_id)

    # ------------------------------------------------------------------ the call path

    async def _serve(self, context: Any, route_of: Callable[[], _Route], work: Work[R]) -> R:
        """Resolve, authenticate, run through the service, answer; errors become statuses."""
        started = time.perf_counter()
        metadata = _metadata(context)
        request_id = self.service.request_ids.assign(_first(metadata, "x-request-id"))
        deadline = asyncio.get_running_loop().time() + _budget(context.time_remaining())
        structlog.contextvars.bind_contextvars(request_id=request_id)
        label = "unmatched"
        self.metrics.in_flight.inc()
        error: GatewayError
        try:
            try:
                route = route_of()
            except GatewayError as exc:
                raise await self._refused_early(context, exc, request_id, label, None) from None
            label = route.template
            response = await self._authenticated(context, metadata, request_id, route, deadline, work)
        except GatewayError as exc:  # already audited and logged
            error = exc
        except Exception:  # a bug in this module; the client gets an id, the log the trace
            log.exception("grpc_front_internal_error", route=label)
            error = InternalError(reason="internal")
        else:
            self.metrics.requests.labels(route=label, code="200").inc()
            context.set_trailing_metadata((("x-request-id", request_id),))
            return response
        finally:
            self.metrics.in_flight.dec()
            self.metrics.request_duration.labels(route=label).observe(time.perf_counter() - started)
            structlog.contextvars.unbind_contextvars("request_id")
        self.metrics.requests.labels(route=label, code=str(error.http_status)).inc()
        return await _abort(context, error, request_id)

    async def _authenticated(self, context: Any, metadata: Metadata, request_id: str, route: _Route,
                             deadline: float, work: Work[R]) -> R:
        snap = self.service.pin()
        ctx = RequestContext(
            request_id=request_id,
            revision=snap.policy.revision,
            action=route.action,
            transport="grpc",
            client_addr=_peer_address(context.peer()),
            model=route.model,
            version=route.version,
            traceparent=traceparent_for(_first(metadata, "traceparent")),
            traceparent_in=_first(metadata, "traceparent"),
        )
        try:
            ctx.bearer = bearer_from_metadata(metadata)
        except GatewayError as exc:
            # Refused by the service, after the pre-auth limit (service._call).
            ctx.credential_error = exc
        task = asyncio.ensure_future(
            self.service.call(ctx, snap, route.template, lambda: _within(deadline, work(ctx, snap))))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # SECURITY: the client cancelled or its deadline passed and gRPC cancelled this
            # handler. The call itself runs on (bounded by the same deadline) so that what
            # the gateway did is audited; only the answer is dropped, and an allowed call's
            # record is marked abandoned (no 2xx reached anyone).
            task.add_done_callback(_retrieve)
            task.add_done_callback(functools.partial(self._undelivered, ctx))
            raise

    async def _refused_early(self, context: Any, exc: GatewayError, request_id: str, label: str,
                             route: _Route | None) -> GatewayError:
        """A refusal before the service ran (bad name, malformed credential, refused RPC):
        audited and logged like the REST front's. Returns the error to answer with: a 503
        instead when the audit record cannot be written."""
        ctx = RequestContext(
            request_id=request_id, revision=self.service.pin().policy.revision,
            action=route.action if route else Action.SERVER, transport="grpc",
            client_addr=_peer_address(context.peer()),
            model=route.model if route else None, version=route.version if route else "",
        )
        answer = exc
        try:
            await self.service.audit(ctx, route=label, status=exc.http_status, error=exc)
        except GatewayError as audit_exc:
            answer = audit_exc
        self.service.log_refusal(ctx, exc, label)
        return answer

    def _undelivered(self, ctx: RequestContext, task: asyncio.Task[Any]) -> None:
        """Done callback of a call whose client left: follow its allow record with a marker."""
        if task.cancelled() or task.exception() is not None:
            return  # refused (its record says so) or not finished (the service marked it)
        seq = ctx.notes.get("_audit_seq")
        if isinstance(seq, int):
            self.service.audit_log.mark_abandoned(seq, ctx.request_id, "client_gone")

    def _done(self, label: str, status: int, started: float) -> None:
        self.metrics.requests.labels(route=label, code=str(status)).inc()
        self.metrics.request_duration.labels(route=label).observe(time.perf_counter() - started)

    async def drain(self, timeout_s: float) -> None:
        """Wait for calls whose clients left (they finish to be audited); cancel what remains."""
        pending = set(self._calls)
        if pending:
            _, still = await asyncio.wait(pending, timeout=max(timeout_s, 0.0))
            for task in still:
                task.cancel()
            if still:
                log.warning("grpc_calls_abandoned", count=len(still))
                await asyncio.wait(still, timeout=1.0)


# ---------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------


def server_options(*, max_message_bytes: int, max_concurrent_streams: int,
                   reuse_port: bool = False, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                   handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S) -> list[tuple[str, int]]:
    """The gRPC core channel arguments of the front, each one a limit."""
    return [
        # SECURITY (AV-09): the HTTP listener's connection cap, on this listener too. Without
        # it 3,000 idle HTTP/2 connections were all held (max_connection_idle: 5 min) and
        # enough of them exhaust the process's descriptors, the HTTP front's included.
        # Beyond the cap gRPC core closes a new connection at accept, before reading it.
        ("grpc.max_allowed_incoming_connections", max_connections),
        # SECURITY (AV-09): a connection that has not completed its handshake (TLS, then the
        # HTTP/2 preface and SETTINGS) is closed after this, as the HTTP front's header
        # timeout closes a slowloris (gRPC's default: 120 s).
        ("grpc.server_handshake_timeout_ms", int(handshake_timeout_s * 1000)),
        # SECURITY: a message is buffered whole before the handler runs; this is the cap
        # (gRPC applies it after decompression too, so a gzip bomb is refused).
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # SECURITY: soft == hard limit, so every request over it is refused (between the
        # two, gRPC refuses only a random sample).
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.max_concurrent_streams", max_concurrent_streams),
        # SECURITY: keepalive enforcement: a client pinging more often than every 5 min
        # without data gets GOAWAY after 2 strikes (ping floods cost CPU, CVE-2019-9512).
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 300_000),
        ("grpc.http2.max_ping_strikes", 2),
        # Find dead peers while calls are open; drop connections idle for 5 minutes.
        ("grpc.keepalive_time_ms", 120_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.max_connection_idle_ms", 300_000),
        # SECURITY: gRPC sets SO_REUSEPORT by default, letting another process of the same
        # user bind this port and take a share of the connections. Off unless asked for
        # (several gateway workers sharing one port).
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]


_SERVICE_NAME: Final = "inference.GRPCInferenceService"


def _lenient(message_class: Any, rpc: str, data: bytes) -> Any:
    """Parse a request; an unparseable one becomes :class:`Undecodable` for the handler.

    grpcio answers a deserializer exception itself, with UNKNOWN and the exception's text
    ("Unexpected <class 'google.protobuf.message.DecodeError'>"), unaudited. This way the
    front refuses it like any other malformed request: INVALID_ARGUMENT, audited.
    """
    try:
        message = message_class.FromString(data)
    except DecodeError:
        return Undecodable(rpc)
    if rpc == "ModelInfer" and len(data) > PROCESS_DECODE_BYTES:
        # Parsing itself is fast (upb); the model name is needed to route and authorize.
        # The bytes are kept for the decode worker (:meth:`GrpcFront._infer`).
        return WithWire(message, data)
    return message


def _first_message(front: GrpcFront, rpc: str) -> Callable[[AsyncIterator[Any], Any], Awaitable[Any]]:
    """A unary RPC served as client-streaming, so that a message gRPC refused is seen.

    Registered as unary, a message over ``grpc.max_receive_message_length`` (plain or
    once decompressed) is answered by gRPC core and the handler never runs: no audit
    record, no log line, no request id. Served as stream-unary (the same wire format:
    a unary client sends one message on an HTTP/2 stream), the handler runs and sees no
    message, and refuses the call like the REST front refuses a body over its limit.
    Only the first message is read, as a unary handler would.
    """
    method = getattr(front, rpc)

    async def handler(requests: AsyncIterator[Any], context: Any) -> Any:
        async for request in requests:
            return await method(request, context)
        return await front.refuse_missing_message(context, rpc)

    return handler


class _UnknownMethods(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpcio is untyped
    """Every method no registered handler serves (another service, a misspelt RPC, the
    standard health or reflection services): refused UNIMPLEMENTED, audited and logged,
    as the REST front answers an unknown path. gRPC's own answer would be unaudited."""

    def __init__(self, front: GrpcFront) -> None:
        self.front = front

    def service(self, handler_call_details: Any) -> Any:
        async def refuse(requests: AsyncIterator[Any], context: Any) -> NoReturn:
            await self.front.refuse_unknown_method(context, requests)

        # Stream-stream with no deserializer: whatever the client's method type, nothing
        # is parsed (a unary client has half-closed after its one message; see _drain).
        return grpc.stream_stream_rpc_method_handler(refuse)


def add_front_to_server(front: GrpcFront, server: Any) -> None:
    """Register ``front`` for every RPC of Triton's service, as the generated
    ``add_GRPCInferenceServiceServicer_to_server`` does, but with :func:`_lenient` parsing,
    unary RPCs read as streams (:func:`_first_message`) and unknown methods audited."""
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers: dict[str, Any] = {}
    for method in service.methods:
        request_class = getattr(service_pb2, method.input_type.name)
        response_class = getattr(service_pb2, method.output_type.name)
        deserializer = functools.partial(_lenient, request_class, method.name)
        if method.client_streaming:
            # Refused (ModelStreamInfer): read as raw bytes by _drain, never parsed.
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                getattr(front, method.name), response_serializer=response_class.SerializeToString)
        else:
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                _first_message(front, method.name), request_deserializer=deserializer,
                response_serializer=response_class.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE_NAME, handlers),
                                     _UnknownMethods(front)))
    server.add_registered_method_handlers(_SERVICE_NAME, handlers)


@dataclass(slots=True)
class RunningGrpcFront:
    """A started gRPC front: the bound ``port`` and :meth:`stop`."""

    front: GrpcFront
    server: Any
    port: int

    async def stop(self, grace_s: float) -> None:
        """Stop accepting calls, let calls in progress finish for ``grace_s``, then cancel."""
        await self.server.stop(grace_s)
        await self.front.drain(grace_s)
        await self.front.decode_pool.aclose()


async def start_grpc_front(
    service: InferenceService,
    host: str,
    port: int,
    *,
    tls: TlsSettings | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_concurrent_streams: int = 256,
    reuse_port: bool = False,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> RunningGrpcFront:
    """Listen on ``host:port`` (``port`` 0: a free one, see ``.port``), TLS when ``tls`` is given.

    Raises ``OSError`` when the address cannot be bound, ``OSError``/``ValueError``-like
    gRPC errors when the certificate files are unusable: a front that cannot serve as
    configured does not start.
    """
    front = GrpcFront(service, max_message_bytes=max_message_bytes)
    server = grpc.aio.server(
        options=server_options(max_message_bytes=max_message_bytes, max_concurrent_streams=max_concurrent_streams,
                               reuse_port=reuse_port, max_connections=max_connections),
        maximum_concurrent_rpcs=max_concurrent_streams * RPCS_PER_STREAM_LIMIT,
    )
    add_front_to_server(front, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls is not None:
            bound = server.add_secure_port(address, grpc_server_credentials(tls))
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio raises RuntimeError("Failed to bind ...")
        with contextlib.suppress(Exception):
            await server.stop(None)
        raise OSError(f"cannot listen for gRPC on {address}") from exc
    if not bound:
        await server.stop(None)
        raise OSError(f"cannot listen for gRPC on {address}")
    await server.start()
    log.info("grpc_front_started", address=address, port=int(bound), tls=tls is not None,
             client_certificates="required" if tls is not None and tls.require_client_cert else "no")
    return RunningGrpcFront(front=front, server=server, port=int(bound))
