"""The gateway's error taxonomy: one class per way a request can end badly.

Every refusal is a :class:`GatewayError`. Each class carries, as class variables, the
gRPC code (chosen first, from ``google/rpc/code.proto``), the HTTP status and the public
message a client may see; an instance carries a stable ``reason`` code for logs, audit
records and metrics, plus a ``detail`` that is safe to show (it never echoes secrets or
raw input). Fronts map errors to the wire in exactly one place each.

Tree::

    GatewayError
    ├── MalformedRequest          400  INVALID_ARGUMENT  (syntax: JSON, headers, path)
    ├── AuthenticationFailed      401  UNAUTHENTICATED
    ├── PermissionDenied          403  PERMISSION_DENIED
    ├── NotFound                  404  NOT_FOUND
    ├── MethodNotAllowed          405  UNIMPLEMENTED
    ├── RequestTimeout            408  DEADLINE_EXCEEDED  (slow client)
    ├── PayloadTooLarge           413  RESOURCE_EXHAUSTED
    ├── UnsupportedMediaType      415  INVALID_ARGUMENT
    ├── ExpectationFailed         417  INVALID_ARGUMENT
    ├── InputRejected             422  INVALID_ARGUMENT  (semantics: tensor vs model)
    ├── RateLimited               429  RESOURCE_EXHAUSTED (+ Retry-After)
    ├── UpstreamBadResponse       502  INTERNAL
    ├── DependencyUnavailable     503  UNAVAILABLE        (+ Retry-After)
    ├── UpstreamUnavailable       503  UNAVAILABLE        (+ Retry-After)
    ├── UpstreamTimeout           504  DEADLINE_EXCEEDED
    └── InternalError             500  INTERNAL           (a bug of ours, never attacker input)

The statuses follow the security catalogue's conventions (422 for a semantically
invalid tensor, 502 for a bad upstream) where they differ from gRPC's HTTP mapping.
"""

from __future__ import annotations

import enum
from typing import ClassVar

from privacy.pii.redact import redact_text


class GrpcCode(enum.IntEnum):
    """The numbers of ``google/rpc/code.proto``, so this module imports no gRPC."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class GatewayError(Exception):
    """Base of every refusal; raising one stops the pipeline.

    ``detail`` is shown to the client after the public message, so it must be written
    for an untrusted reader: name the input and the rule, never echo the value.
    """

    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[GrpcCode] = GrpcCode.INTERNAL
    public_message: ClassVar[str] = "internal error"
    default_reason: ClassVar[str] = "internal"

    def __init__(
        self,
        detail: str | None = None,
        *,
        reason: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.detail = detail
        self.reason = reason or self.default_reason
        self.retry_after_s = retry_after_s
        super().__init__(self.client_message())

    def client_message(self) -> str:
        """The public message, then the safe detail (the exception's own text)."""
        if self.detail:
            return f"{self.public_message}: {self.detail}"
        return self.public_message

    def public_text(self) -> str:
        """The text every front sends to the client: :meth:`client_message`, PII masked.

        Why one method: a detail names the input that broke a rule, and a name the rules
        let through may still be an entity (an input named like a GitHub token, an output
        named like a card number); the REST front masked it and the gRPC front sent it as
        it was. SECURITY: every front renders errors through this, never client_message.
        """
        return redact_text(self.client_message())


class MalformedRequest(GatewayError):
    http_status = 400
    grpc_code = GrpcCode.INVALID_ARGUMENT
    public_message = "malformed request"
    default_reason = "input_malformed"


class AuthenticationFailed(GatewayError):
    http_status = 401
    grpc_code = GrpcCode.UNAUTHENTICATED
    public_message = "authentication required"
    default_reason = "authn_invalid_token"


class PermissionDenied(GatewayError):
    http_status = 403
    grpc_code = GrpcCode.PERMISSION_DENIED
    public_message = "forbidden"
    default_reason = "authz_denied"


class InsufficientScope(PermissionDenied):
    """A valid token whose ``scope`` lacks what the call needs (RFC 6750 §3.1).

    The fronts add the challenge RFC 6750 §3 requires when a token does not enable access:
    ``WWW-Authenticate: Bearer error="insufficient_scope", scope="<needed>"`` (a 403, so a
    client asks its IdP for the scope instead of retrying the same token).
    """

    default_reason = "authz_scope"

    def __init__(self, detail: str | None = None, *, scope: str, reason: str | None = None) -> None:
        self.scope = scope
        super().__init__(detail, reason=reason)

    def challenge(self) -> str:
        # The scope comes from policy (a scope token: printable ASCII, no quote or backslash).
        shown = self.scope if all(0x21 <= ord(c) <= 0x7E and c not in '"\\' for c in self.scope) else ""
        scope = f', scope="{shown}"' if shown else ""
        return f'Bearer realm="infergate", error="insufficient_scope"{scope}'


class NotFound(GatewayError):
    http_status = 404
    grpc_code = GrpcCode.NOT_FOUND
    public_message = "not found"
    default_reason = "not_found"


class MethodNotAllowed(GatewayError):
    http_status = 405
    grpc_code = GrpcCode.UNIMPLEMENTED
    public_message = "method not allowed"
    default_reason = "method_not_allowed"


class RequestTimeout(GatewayError):
    http_status = 408
    grpc_code = GrpcCode.DEADLINE_EXCEEDED
    public_message = "request not received in time"
    default_reason = "client_timeout"


class ExpectationFailed(GatewayError):
    http_status = 417
    grpc_code = GrpcCode.INVALID_ARGUMENT
    public_message = "expectation failed"
    default_reason = "expect_unsupported"


class MisdirectedRequest(GatewayError):
    """The request names a host this gateway does not serve (RFC 9110 §15.5.20)."""

    http_status = 421
    grpc_code = GrpcCode.INVALID_ARGUMENT
    public_message = "misdirected request"
    default_reason = "http_host_not_allowed"


class PayloadTooLarge(GatewayError):
    http_status = 413
    grpc_code = GrpcCode.RESOURCE_EXHAUSTED
    public_message = "request too large"
    default_reason = "input_too_large"


class HeadersTooLarge(GatewayError):
    """The request's header section is larger than the gateway accepts (RFC 6585 §5)."""

    http_status = 431
    grpc_code = GrpcCode.RESOURCE_EXHAUSTED
    public_message = "request header fields too large"
    default_reason = "http_headers_too_large"


class UriTooLong(GatewayError):
    """The request line is longer than the gateway accepts (RFC 9110 §15.5.15)."""

    http_status = 414
    grpc_code = GrpcCode.RESOURCE_EXHAUSTED
    public_message = "request line too long"
    default_reason = "http_request_line_too_long"


class NotImplementedByGateway(GatewayError):
    """A method or transfer coding the gateway does not implement (RFC 9110 §15.6.2)."""

    http_status = 501
    grpc_code = GrpcCode.UNIMPLEMENTED
    public_message = "not implemented"
    default_reason = "http_not_implemented"


class VersionNotSupported(GatewayError):
    """An HTTP version other than 1.0 and 1.1 on the HTTP/1 port (RFC 9110 §15.6.6)."""

    http_status = 505
    grpc_code = GrpcCode.INVALID_ARGUMENT
    public_message = "HTTP version not supported"
    default_reason = "http_version"


class UnsupportedMediaType(GatewayError):
    http_status = 415
    grpc_code = GrpcCode.INVALID_ARGUMENT
    public_message = "unsupported media type"
    default_reason = "input_media_type"


class InputRejected(GatewayError):
    http_status = 422
    grpc_code = GrpcCode.INVALID_ARGUMENT
    public_message = "request rejected by input policy"
    default_reason = "input_invalid"


class RateLimited(GatewayError):
    http_status = 429
    grpc_code = GrpcCode.RESOURCE_EXHAUSTED
    public_message = "rate limit exceeded"
    default_reason = "ratelimit_exceeded"


class UpstreamBadResponse(GatewayError):
    http_status = 502
    grpc_code = GrpcCode.INTERNAL
    public_message = "bad response from the model server"
    default_reason = "upstream_bad_response"


class DependencyUnavailable(GatewayError):
    http_status = 503
    grpc_code = GrpcCode.UNAVAILABLE
    public_message = "temporarily unavailable"
    default_reason = "dependency_unavailable"


class UpstreamUnavailable(GatewayError):
    http_status = 503
    grpc_code = GrpcCode.UNAVAILABLE
    public_message = "model temporarily unavailable"
    default_reason = "upstream_unavailable"


class UpstreamTimeout(GatewayError):
    http_status = 504
    grpc_code = GrpcCode.DEADLINE_EXCEEDED
    public_message = "upstream timeout"
    default_reason = "upstream_timeout"


class ClientGone(GatewayError):
    """The caller went away before its answer (client disconnected, server stopping).

    Never sent (nobody is listening): it names the outcome in the audit record (nginx's
    499, ``client_gone``) and tells the stages' completion hooks the call did not finish.
    """

    http_status = 499
    grpc_code = GrpcCode.CANCELLED
    public_message = "client closed request"
    default_reason = "client_gone"


class InternalError(GatewayError):
    """A bug of ours. The client sees only the request id; the log has the trace."""

    http_status = 500
    grpc_code = GrpcCode.INTERNAL
    public_message = "internal error"
    default_reason = "internal"
