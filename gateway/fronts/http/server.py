"""The KServe V2 HTTP/REST front: translate HTTP to the service and back, nothing more.

Every request takes the same path: resolve the route on the raw path, pin the policy
snapshot, authenticate (before any body byte is read), decode, run the service, encode,
then write exactly one audit record before the response leaves. A response whose audit
record cannot be written is replaced by a 503: nothing is answered that is not recorded.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from typing import Any, cast

import structlog
from aiohttp import HttpVersion10, web
from aiohttp.web_urldispatcher import AbstractRoute, UrlDispatcher, UrlMappingMatchInfo

from gateway.context import Action, RequestContext, traceparent_for
from gateway.errors import (
    AuthenticationFailed,
    ExpectationFailed,
    GatewayError,
    InsufficientScope,
    InternalError,
    MalformedRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    PermissionDenied,
    RequestTimeout,
    VersionNotSupported,
)
from gateway.fronts.client_addr import client_address
from gateway.fronts.decode_pool import PROCESS_DECODE_BYTES, DecodePool
from gateway.fronts.http.body import check_content_type, read_body
from gateway.fronts.http.codec import CodecLimits, decode_infer_request, encode_infer_response
from gateway.fronts.http.openapi import openapi_bytes
from gateway.fronts.http.protocol import (
    check_framing,
    check_header_size,
    check_host,
    check_target,
    check_version,
    request_host,
)
from gateway.fronts.http.routes import Route, resolve
from gateway.fronts.metrics_access import metrics_allowed
from gateway.fronts.metrics_access import render as render_metrics
from gateway.pii_unmask import MAX_BODY_BYTES as UNMASK_MAX_BYTES
from gateway.pii_unmask import unmask as pii_unmask
from gateway.policy.store import Snapshot
from gateway.service import InferenceService
from gateway.stages.dp_noise import HEADER_REMAINING, NOTE_REMAINING
from gateway.stages.feature_flags import variant_headers
from gateway.stages.ratelimit import LimitExceeded
from gateway.stages.ratelimit import response_headers as limit_headers

log = structlog.get_logger("gateway.http")

BODY_READ_TIMEOUT_S = 30.0
OFFLOAD_DECODE_BYTES = 256 * 1024
_JSON = "application/json"


def _json_response(status: int, payload: dict[str, Any], request_id: str,
                   extra: dict[str, str] | None = None) -> web.Response:
    headers = {"X-Request-ID": request_id}
    if extra:
        headers.update(extra)
    body = json.dumps(payload, separators=(",", ":")).encode()
    return web.Response(status=status, body=body, content_type=_JSON, headers=headers)


def error_response(exc: GatewayError, request_id: str) -> web.Response:
    """The one place a :class:`GatewayError` becomes HTTP."""
    extra: dict[str, str] = {}
    # SECURITY: error text reaches the client; PII in it is masked like any other output.
    message = exc.public_text()
    if isinstance(exc, AuthenticationFailed):
        extra["WWW-Authenticate"] = (
            'Bearer realm="infergate"' if exc.reason == "authn_missing_token"
            else 'Bearer realm="infergate", error="invalid_token"'
        )
    elif isinstance(exc, InsufficientScope):
        extra["WWW-Authenticate"] = exc.challenge()
    if isinstance(exc, MethodNotAllowed) and exc.detail and exc.detail.startswith("use "):
        extra["Allow"] = exc.detail[4:]
    if isinstance(exc, LimitExceeded):
        extra.update(exc.headers())
    if exc.retry_after_s is not None:
        extra["Retry-After"] = str(max(1, int(exc.retry_after_s + 0.999)))
    elif exc.http_status == 503:
        extra["Retry-After"] = "1"
    if exc.http_status >= 500:
        message = f"{message} (request id {request_id})"
    return _json_response(exc.http_status, {"error": message}, request_id, extra)


def _bearer(request: web.Request) -> str | None:
    values = request.headers.getall("Authorization", [])
    if not values:
        return None
    if len(values) > 1:
        # Two credentials is a malformed request (RFC 9110 §5.3: Authorization is a singleton).
        raise MalformedRequest("more than one Authorization header", reason="authn_malformed_header")
    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("expected a Bearer token", reason="authn_malformed_header")
    return token.strip()


class HttpFront:
    def __init__(self, service: InferenceService) -> None:
        self.service = service
        self.metrics = service.metrics
        self._in_flight = 0
        self.decode_pool = DecodePool()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = self.service.request_ids.assign(request.headers.get("X-Request-ID"))
        structlog.contextvars.bind_contextvars(request_id=request_id)
        route_label = "unmatched"
        route: Route | None = None
        answered: float | None = None
        response: web.StreamResponse
        self.metrics.in_flight.inc()
        try:
            try:
                check_version(request)
                check_header_size(request)
                check_target(request)
                check_framing(request)
                host = request_host(request)
                route = resolve(request.method, request.raw_path)
                route_label = route.template
                if route.authenticated:
                    # Health probes and /metrics answer whatever host a kubelet or scraper names.
                    check_host(host, self.service.pin().policy.gateway.http.allowed_hosts)
            except GatewayError as exc:
                if isinstance(exc, VersionNotSupported):
                    # aiohttp writes the status line in the request's version (cached by
                    # its reify): answer a version it does not speak as HTTP/1.0 instead
                    # of "HTTP/0.9 505", and close the connection (no keep-alive in 1.0).
                    request._cache["version"] = HttpVersion10
                response = await self._refuse_early(request, exc, request_id, route_label, route)
                if isinstance(exc, VersionNotSupported):
                    response.force_close()
            else:
                route_label = route.template
                if not route.authenticated:
                    response = await self._open_route(request, route, request_id)
                else:
                    response = await self._authenticated(request, route, request_id)
            if "Upgrade" in request.headers:
                # SECURITY: no protocol upgrade is ever honoured, but aiohttp's parser stops
                # parsing HTTP after a request that asks for one: what follows on the
                # connection (a pipelined request) would be swallowed unanswered, where a
                # proxy in front counts on an answer. The connection ends with this answer.
                response.force_close()
            answered = time.perf_counter()
            await self._deliver(request, response, route_label, request_id,
                                audited=route is not None and route.authenticated)
            return response
        finally:
            self.metrics.in_flight.dec()
            elapsed = (answered or time.perf_counter()) - started
            self.metrics.child(self.metrics.request_duration, route_label).observe(elapsed)
            structlog.contextvars.unbind_contextvars("request_id")

    async def _deliver(self, request: web.Request, response: web.StreamResponse, route_label: str,
                       request_id: str, *, audited: bool) -> None:
        """Write the response here, not in aiohttp, so a client that stops reading is cut off.

        aiohttp waits for the transport to drain without a deadline: a client that never
        reads would hold the connection, the handler and the response body for ever.
        """
        timeout_s = float(self.service.pin().policy.gateway.limits.write_timeout_s)
        try:
            # SECURITY: slow readers get write_timeout_s for the whole response, then the
            # connection is dropped (the response is already audited as answered).
            async with asyncio.timeout(timeout_s):
                await response.prepare(request)
                await response.write_eof()
        except TimeoutError:
            if request.transport is not None:
                request.transport.abort()
            await self._not_delivered(route_label, request_id, "write_timeout", audited=audited)
        except ConnectionError:
            await self._not_delivered(route_label, request_id, "client_gone", audited=audited)
        except asyncio.CancelledError:
            # The handler was cancelled mid-write (client gone, server stopping): recorded
            # like a reset, then the cancellation goes on.
            await self._not_delivered(route_label, request_id, "client_gone", audited=audited)
            raise

    async def _not_delivered(self, route_label: str, request_id: str, reason: str, *, audited: bool) -> None:
        self.metrics.response_write_aborts.labels(route=route_label, reason=reason).inc()
        log.warning("response_not_delivered", route=route_label, reason=reason)
        if not audited:
            return  # unauthenticated calls: the metric and the log line, no audit fsync to amplify
        try:
            await self.service.audit_log.append({"event": "response_not_delivered", "request_id": request_id,
                                                 "route": route_label, "reason": reason})
        except GatewayError as exc:
            self.metrics.audit_failures.inc()
            log.error("audit_write_failed", reason=exc.reason)  # noqa: TRY400 - expected outcome, no trace

    async def _open_route(self, request: web.Request, route: Route, request_id: str) -> web.StreamResponse:
        if route.kind == "metrics":
            response = self._metrics(request, request_id)
        elif route.kind == "openapi":
            response = web.Response(body=openapi_bytes(), content_type=_JSON, headers={"X-Request-ID": request_id})
        elif route.kind == "live":
            response = _json_response(200, {"live": True}, request_id)
        else:
            ready = await self.service.ready()
            response = _json_response(200 if ready else 503, {"ready": ready}, request_id)
        self.metrics.requests.labels(route=route.template, code=str(response.status)).inc()
        return response

    def _metrics(self, request: web.Request, request_id: str) -> web.Response:
        # SECURITY (SEC-09): /metrics only for gateway.yaml metrics.allow_from; X-Forwarded-For
        # is believed only from --trusted-proxy peers (fronts/metrics_access.py).
        allow_from = self.service.pin().policy.gateway.metrics.allow_from
        allowed, addr = metrics_allowed(request.remote, request.headers.getall("X-Forwarded-For", []),
                                        self.service.trusted_proxies, allow_from)
        if allowed:
            return render_metrics(self.metrics)
        self.metrics.metrics_denied.inc()
        log.warning("metrics_denied", client_addr=addr, request_id=request_id)
        return error_response(PermissionDenied("metrics are not served to this address",
                                               reason="metrics_forbidden"), request_id)

    async def _authenticated(self, request: web.Request, route: Route, request_id: str) -> web.StreamResponse:
        snap = self.service.pin()
        ctx = RequestContext(
            request_id=request_id,
            revision=snap.policy.revision,
            action=route.action,
            transport="http",
            client_addr=client_address(request.remote, request.headers.getall("X-Forwarded-For", []),
                                       self.service.trusted_proxies),
            model=route.model,
            version=route.version,
            traceparent=traceparent_for(request.headers.get("traceparent")),
            traceparent_in=request.headers.get("traceparent"),
        )
        try:
            ctx.bearer = _bearer(request)
        except GatewayError as exc:
            # Refused by the service, after the pre-auth limit (service._call).
            ctx.credential_error = exc
        try:
            response = await self.service.call(ctx, snap, route.template,
                                               lambda: self._dispatch(request, route, ctx, snap))
        except GatewayError as exc:
            response = error_response(exc, request_id)
        remaining = ctx.notes.get(NOTE_REMAINING)
        if remaining is not None:
            response.headers[HEADER_REMAINING] = str(remaining)
        if response.status < 400:
            # SECURITY: the flag stage routes before exposure and authorization decide, so a
            # refused call already carries the variant of a model the caller may not see.
            # Sent on an error, the header would tell "exists and is flagged" from "unknown"
            # (non-enumeration: every 404 must be byte-identical). Errors name no variant;
            # the audit record keeps it.
            response.headers.update(variant_headers(ctx))
            response.headers.update(limit_headers(ctx))
        self.metrics.child(self.metrics.requests, route.template, str(response.status)).inc()
        return response

    async def _dispatch(self, request: web.Request, route: Route, ctx: RequestContext,
                        snap: Snapshot) -> web.Response:
        rid = ctx.request_id
        if route.kind == "server":
            return _json_response(200, (await self.service.server_metadata(snap)).to_json(), rid)
        if route.kind == "model_metadata":
            return _json_response(200, (await self.service.caller_metadata(ctx, snap)).to_json(), rid)
        if route.kind == "privacy_budget":
            tenants = request.query.getall("tenant", [])
            if len(tenants) > 1:
                # SECURITY (AUTHZ-02): parameter pollution; first-wins here, last-wins in a
                # proxy or log parser: one tenant per question or a 400.
                raise MalformedRequest("more than one tenant query parameter", reason="query_duplicate")
            tenant = tenants[0] if tenants else None
            return _json_response(200, await self.service.privacy_budget(ctx, snap, tenant), rid)
        if route.kind == "policy":
            return _json_response(200, self.service.policy_status(ctx, snap), rid)
        if route.kind == "pii_unmask":
            limits = snap.policy.gateway.limits
            cap = min(limits.max_body_bytes, UNMASK_MAX_BYTES)
            answer = await pii_unmask(ctx, snap, lambda: check_content_type(request),
                                      lambda: _read_body_in_time(request, cap, float(limits.body_timeout_s)))
            return _json_response(200, answer, rid)
        if route.kind == "model_drift":
            return _json_response(200, self.service.model_drift(ctx, snap), rid)
        if route.kind == "model_ready":
            ready = await self.service.model_ready(ctx, snap)
            return _json_response(200 if ready else 400, {"ready": ready}, rid)
        if route.kind != "infer":
            raise InternalError(reason="internal_unrouted")
        limits = snap.policy.gateway.limits
        check_content_type(request)
        await _continue_if_expected(request, limits.max_body_bytes)
        body = await _read_body_in_time(request, limits.max_body_bytes, float(limits.body_timeout_s))
        assert route.model is not None  # noqa: S101 - infer routes always carry a model
        decode = functools.partial(
            decode_infer_request, route.model, route.version, body,
            header_length=_single_header(request, "Inference-Header-Content-Length"),
            limits=CodecLimits(
                max_elements_per_tensor=limits.max_elements_per_tensor,
                max_dims=limits.max_dims,
                max_bytes_element=limits.max_bytes_element,
                max_inputs=limits.max_inputs,
            ),
        )
        # A large body takes tens of milliseconds to parse: off the event loop, so other
        # requests (and health probes) are not stalled by one client's upload. A very large
        # one goes to a worker process: json.loads holds the GIL, a thread would still stall
        # the loop for the whole parse (AV-14, fronts/decode_pool.py).
        if len(body) > PROCESS_DECODE_BYTES:
            req = await self.decode_pool.run(decode)
        elif len(body) > OFFLOAD_DECODE_BYTES:
            req = await asyncio.to_thread(decode)
        else:
            req = decode()
        req.traceparent = ctx.traceparent
        resp = await self.service.infer(ctx, snap, req)
        payload, headers = encode_infer_response(resp, req.outputs, binary_default=req.binary_data_output)
        headers["X-Request-ID"] = rid
        return web.Response(status=200, body=payload, headers=headers)

    async def _refuse_early(self, request: web.Request, exc: GatewayError, request_id: str, route_label: str,
                      route: Route | None = None) -> web.Response:
        """A refusal before the pipeline ran (bad path, malformed header): still logged and audited."""
        answer = await self._record_early(exc, request_id, route_label, route, request.remote)
        return error_response(answer, request_id)

    async def record_parse_refusal(self, remote: str | None, exc: GatewayError) -> tuple[str, int]:
        """A request aiohttp's parser refused (fronts/http/protocol.py): audited, logged and
        counted like :meth:`_refuse_early`. Returns its request id and the status to answer."""
        request_id = self.service.request_ids.assign(None)
        answer = await self._record_early(exc, request_id, "unmatched", None, remote)
        return request_id, answer.http_status

    async def _record_early(self, exc: GatewayError, request_id: str, route_label: str, route: Route | None,
                            remote: str | None) -> GatewayError:
        """Audit, log and count an early refusal. Returns the error to answer with: the
        audit's own (a 503) when the record cannot be written (fail closed)."""
        ctx = RequestContext(
            request_id=request_id, revision=self.service.pin().policy.revision,
            action=route.action if route else Action.SERVER, transport="http", client_addr=remote or "",
            model=route.model if route else None, version=route.version if route else "",
        )
        answer = exc
        try:
            await self.service.audit(ctx, route=route_label, status=exc.http_status, error=exc)
        except GatewayError as audit_exc:
            answer = audit_exc
        self.service.log_refusal(ctx, exc, route_label)
        self.metrics.requests.labels(route=route_label, code=str(answer.http_status)).inc()
        return answer


class FallbackRouter(UrlDispatcher):
    """A router whose every miss resolves to one fallback route (the front's catch-all).

    # SECURITY (HTTP-08): the catch-all path route cannot match request targets that are
    # not paths (``CONNECT gw:80``, ``OPTIONS *``); aiohttp then answered them itself (a
    # bare 404: no request id, no log line, no audit record) after sending ``100 Continue``
    # to an ``Expect`` it had not looked at. Resolved to the front, they are refused by it
    # (fronts/http/protocol.py check_target), recorded, and no body is invited.
    """

    fallback: AbstractRoute | None = None

    async def resolve(self, request: web.Request) -> UrlMappingMatchInfo:
        match = await super().resolve(request)
        if match.http_exception is not None and self.fallback is not None:
            return UrlMappingMatchInfo({}, self.fallback)
        return match


def route_everything(router: UrlDispatcher, route: AbstractRoute) -> None:
    """Make ``router`` resolve every request it cannot match to ``route``."""
    # Same object and state; only ``resolve`` differs (as GatewayRunner does for Server).
    router.__class__ = FallbackRouter
    cast(FallbackRouter, router).fallback = route


async def no_automatic_continue(_request: web.Request) -> None:
    """Expect handler: never send ``100 Continue`` before the request is authenticated
    and its declared size is checked (the handler sends it itself)."""
    return


async def _continue_if_expected(request: web.Request, max_bytes: int) -> None:
    expect = request.headers.get("Expect")
    if expect is None:
        return
    if expect.lower() != "100-continue":
        raise ExpectationFailed(reason="expect_unsupported")
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        # SECURITY: refuse before inviting the body (RFC 9110 §10.1.1); it is never read.
        raise PayloadTooLarge(f"body larger than {max_bytes} bytes", reason="input_too_large")
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0


async def _read_body_in_time(request: web.Request, max_bytes: int, timeout_s: float) -> bytes:
    """The body (:func:`read_body`), or 408 once ``timeout_s`` has passed.

    # SECURITY: slow-body clients (HTTP-13) hold a connection for body_timeout_s at most, on
    # every route that reads a body: /v2/pii/unmask read its body without any deadline, so
    # a client that sent one byte held the connection and its handler indefinitely.
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await read_body(request, max_bytes=max_bytes)
    except TimeoutError as exc:
        raise RequestTimeout("request body not received in time", reason="body_timeout") from exc


def _single_header(request: web.Request, name: str) -> str | None:
    values = request.headers.getall(name, [])
    if len(values) > 1:
        raise MalformedRequest(f"more than one {name} header", reason="header_duplicate")
    return values[0] if values else None
