"""The gateway's OpenAPI 3.1 document, served as-is at ``GET /openapi.json``.

Written by hand, not derived from handlers: the document is a contract a client (and
schemathesis, in ``security_tests/fuzz/test_schemathesis.py``) holds the gateway to,
so it must not silently follow whatever the code happens to do. Every operation names
the route kind of :mod:`gateway.fronts.http.routes` it documents (``x-route-kind``);
``tests/fronts/test_openapi.py`` fails when a route kind has no operation here.

The document is built once and encoded once (:func:`openapi_bytes`): it holds no policy,
model or tenant data, so serving it unauthenticated reveals nothing a client of the
KServe V2 protocol does not already know.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Final

from gateway import __version__
from gateway.kserve import DTYPES

__all__ = ["OPENAPI_PATH", "openapi_bytes", "openapi_document"]

OPENAPI_PATH: Final = "/openapi.json"

_JSON: Final = "application/json"
_REF = "#/components/schemas/"

# Names and versions exactly as gateway/fronts/http/routes.py accepts them.
_MODEL_NAME_PATTERN: Final = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$"
_VERSION_PATTERN: Final = r"^[0-9]{1,19}$"
_TENSOR_NAME_PATTERN: Final = r"^[\x20-\x7e]{1,256}$"

_STATUS_TEXT: Final[dict[int, str]] = {
    400: "Malformed request: syntax of the path, headers, JSON or binary framing.",
    401: "Missing or invalid credentials (see WWW-Authenticate).",
    403: "Authenticated but not allowed.",
    404: "Unknown route or model, or one the caller may not see (non-enumeration).",
    405: "Method not allowed on this route (see Allow).",
    408: "The request body was not received in time.",
    413: "Body, decompressed body, tensor or element larger than the limits.",
    415: "Content-Type or Content-Encoding not accepted.",
    417: "Expect header other than 100-continue.",
    422: "A well-formed tensor the model or the input policy refuses.",
    429: "Rate limit or privacy budget exhausted (see Retry-After).",
    502: "The model server answered with something the gateway refuses to pass on.",
    503: "A dependency (model server, rate-limit store, audit log, budget ledger) is unavailable.",
    504: "The model server did not answer in time.",
}

_ERROR_HEADERS: Final[dict[int, dict[str, Any]]] = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer challenge (RFC 6750)."}},
    405: {"Allow": {"schema": {"type": "string"}, "description": "The method the route accepts."}},
    429: {"Retry-After": {"schema": {"type": "string", "pattern": "^[0-9]+$"}, "description": "Seconds."}},
    503: {"Retry-After": {"schema": {"type": "string", "pattern": "^[0-9]+$"}, "description": "Seconds."}},
}

# Refusals any authenticated route can give before its own work: framing and path (400),
# credentials (401), RBAC (403), hidden or unknown (404), method (405), rate limit (429),
# audit log or limiter store down (503).
_AUTHENTICATED_ERRORS: Final = (400, 401, 403, 404, 405, 429, 503)
_INFER_ERRORS: Final = (*_AUTHENTICATED_ERRORS, 408, 413, 415, 417, 422, 502, 504)
_OPEN_ERRORS: Final = (400, 405)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _errors(codes: tuple[int, ...]) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for code in codes:
        response = _json_body(_ref("Error"), _STATUS_TEXT[code])
        if code in _ERROR_HEADERS:
            response["headers"] = _ERROR_HEADERS[code]
        responses[str(code)] = response
    return responses


def _model_params(*, versioned: bool) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [{
        "name": "model_name", "in": "path", "required": True,
        "schema": {"type": "string", "pattern": _MODEL_NAME_PATTERN},
    }]
    if versioned:
        params.append({"name": "model_version", "in": "path", "required": True,
                       "schema": {"type": "string", "pattern": _VERSION_PATTERN}})
    return params


def _get(kind: str, summary: str, ok: dict[str, Any], errors: tuple[int, ...], *,
         authenticated: bool = True, params: list[dict[str, Any]] | None = None,
         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "operationId": kind, "x-route-kind": kind,
                          "responses": {**ok, **_errors(errors)}}
    if params:
        op["parameters"] = params
    if not authenticated:
        op["security"] = []
    if extra:
        op.update(extra)
    return op


def _operation_id(base: str, suffix: str) -> str:
    return f"{base}_{suffix}" if suffix else base


def _model_paths() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for versioned in (False, True):
        prefix = "/v2/models/{model_name}" + ("/versions/{model_version}" if versioned else "")
        suffix = "versioned" if versioned else ""
        params = _model_params(versioned=versioned)
        metadata = _get("model_metadata", "Model metadata (KServe V2)",
                        {"200": _json_body(_ref("ModelMetadata"), "Inputs, outputs and versions.")},
                        _AUTHENTICATED_ERRORS, params=params)
        ready = _get("model_ready", "Model readiness (KServe V2)",
                     {"200": _json_body(_ref("Ready"), "The model is ready."),
                      "400": _json_body({"oneOf": [_ref("Ready"), _ref("Error")]},
                                        "Not ready (KServe V2), or a malformed request.")},
                     tuple(c for c in _AUTHENTICATED_ERRORS if c != 400), params=params)
        infer = _infer_operation(params)
        for op in (metadata, ready, infer):
            op["operationId"] = _operation_id(op["operationId"], suffix)
        paths[prefix] = {"get": metadata}
        paths[prefix + "/ready"] = {"get": ready}
        paths[prefix + "/infer"] = {"post": infer}
    paths["/v2/models/{model_name}/drift"] = {"get": _get(
        "model_drift", "Input/output drift statistics of a model (needs drift:read)",
        {"200": _json_body(_ref("DriftReport"), "Drift windows of the model.")},
        _AUTHENTICATED_ERRORS, params=_model_params(versioned=False))}
    return paths


def _infer_operation(params: list[dict[str, Any]]) -> dict[str, Any]:
    header_param = {
        "name": "Inference-Header-Content-Length", "in": "header", "required": False,
        "description": "Binary tensor extension: length in bytes of the JSON header at the start of the "
                       "body; the rest holds the inputs whose parameters.binary_data_size add up to it.",
        "schema": {"type": "string", "pattern": "^[0-9]{1,10}$"},
    }
    binary_body = {
        "schema": {"type": "string", "contentMediaType": "application/octet-stream"},
        "x-binary-extension": "JSON InferRequest header (Inference-Header-Content-Length bytes) followed by "
                              "the raw little-endian tensors; BYTES elements as 4-byte length + bytes.",
    }
    ok_binary = {
        "schema": {"type": "string", "contentMediaType": "application/octet-stream"},
        "x-binary-extension": "JSON InferResponse header followed by the outputs requested with binary_data.",
    }
    return {
        "summary": "Run inference (KServe V2), JSON or Triton binary tensor extension",
        "operationId": "infer", "x-route-kind": "infer",
        "parameters": [*params, header_param,
                       {"name": "Content-Encoding", "in": "header", "required": False,
                        "schema": {"type": "string", "enum": ["identity", "gzip", "x-gzip", "deflate"]}}],
        "requestBody": {"required": True, "content": {
            _JSON: {"schema": _ref("InferRequest")},
            "application/octet-stream": binary_body,
        }},
        "responses": {
            "200": {
                "description": "Model outputs. Binary outputs use the binary tensor extension.",
                "headers": {"Inference-Header-Content-Length": {
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                    "description": "Present when the body is application/octet-stream."}},
                "content": {_JSON: {"schema": _ref("InferResponse")}, "application/octet-stream": ok_binary},
            },
            **_errors(_INFER_ERRORS),
        },
    }


def _schemas() -> dict[str, Any]:
    datatype = {"type": "string", "enum": list(DTYPES)}
    shape = {"type": "array", "maxItems": 8, "items": {"type": "integer", "minimum": 0}}
    scalar = {"type": ["number", "boolean", "string"]}
    data = {"type": "array", "description": "Row-major values, flat or nested to mirror the shape.",
            "items": {"anyOf": [scalar, {"type": "array"}]}}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}},
                  "additionalProperties": False},
        "Live": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}},
                 "additionalProperties": False},
        "Ready": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}},
                  "additionalProperties": False},
        "ServerMetadata": {
            "type": "object", "required": ["name", "version", "extensions"],
            "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                           "extensions": {"type": "array", "items": {"type": "string"}}}},
        "TensorMetadata": {
            "type": "object", "required": ["name", "datatype", "shape"],
            "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                           "shape": {"type": "array", "items": {"type": "integer", "minimum": -1}}}},
        "ModelMetadata": {
            "type": "object", "required": ["name", "inputs", "outputs"],
            "properties": {"name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
                           "platform": {"type": "string"},
                           "inputs": {"type": "array", "items": _ref("TensorMetadata")},
                           "outputs": {"type": "array", "items": _ref("TensorMetadata")}}},
        "InferInputTensor": {
            "type": "object", "required": ["name", "shape", "datatype"], "additionalProperties": False,
            "description": "Exactly one of data or parameters.binary_data_size (binary extension).",
            "properties": {
                "name": {"type": "string", "pattern": _TENSOR_NAME_PATTERN},
                "shape": shape, "datatype": datatype, "data": data,
                "parameters": {"type": "object", "additionalProperties": False,
                               "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}}}},
        "InferRequestedOutput": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {"name": {"type": "string", "pattern": _TENSOR_NAME_PATTERN},
                           "parameters": {"type": "object", "additionalProperties": False,
                                          "properties": {"binary_data": {"type": "boolean"}}}}},
        "InferRequest": {
            "type": "object", "required": ["inputs"], "additionalProperties": False,
            "description": "KServe V2 inference request. Fields and parameters other than those listed are "
                           "refused (400), never dropped or forwarded.",
            "properties": {
                "id": {"type": "string", "maxLength": 128},
                "parameters": {"type": "object", "additionalProperties": False,
                               "properties": {"binary_data_output": {"type": "boolean"}}},
                "inputs": {"type": "array", "minItems": 1, "maxItems": 64, "items": _ref("InferInputTensor")},
                "outputs": {"type": "array", "maxItems": 64, "items": _ref("InferRequestedOutput")}}},
        "InferOutputTensor": {
            "type": "object", "required": ["name", "datatype", "shape"],
            "properties": {"name": {"type": "string"}, "datatype": datatype, "shape": shape, "data": data,
                           "parameters": {"type": "object",
                                          "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}}}},
        "InferResponse": {
            "type": "object", "required": ["model_name", "outputs"],
            "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                           "id": {"type": "string"},
                           "outputs": {"type": "array", "items": _ref("InferOutputTensor")}}},
        "PrivacyBudget": {
            "type": "object", "required": ["tenant", "models"],
            "properties": {"tenant": {"type": "string"}, "models": {"type": "object"}}},
        "PolicyStatus": {
            "type": "object", "required": ["revision"],
            "properties": {"revision": {"type": "string"}, "applied_at": {"type": ["string", "null"]},
                           "reloads": {"type": "object"}}},
        "DriftReport": {
            "type": "object", "required": ["model", "status"],
            "properties": {"model": {"type": "string"}, "status": {"type": "string"}}},
        "UnmaskRequest": {
            "oneOf": [
                {"type": "object", "required": ["tokens"], "additionalProperties": False,
                 "properties": {"tokens": {"type": "array", "minItems": 1, "maxItems": 1000,
                                           "items": {"type": "string"}}}},
                {"type": "object", "required": ["text"], "additionalProperties": False,
                 "properties": {"text": {"type": "string"}}},
            ]},
        "UnmaskResponse": {
            "oneOf": [
                {"type": "object", "required": ["values"], "properties": {"values": {
                    "type": "array", "items": {"type": "object", "required": ["entity", "value"],
                                               "properties": {"entity": {"type": "string"},
                                                              "value": {"type": "string"}}}}}},
                {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}},
            ]},
    }


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the document (callers may mutate it)."""
    live = {"200": _json_body(_ref("Live"), "The process is up.")}
    ready = {"200": _json_body(_ref("Ready"), "Ready: policy loaded and model server reachable."),
             "503": {**_json_body(_ref("Ready"), "Not ready."), "headers": _ERROR_HEADERS[503]}}
    paths: dict[str, Any] = {
        "/v2/health/live": {"get": _get("live", "Liveness (KServe V2)", live, _OPEN_ERRORS, authenticated=False)},
        "/v2/health/ready": {"get": _get("ready", "Readiness (KServe V2)", ready, _OPEN_ERRORS,
                                         authenticated=False)},
        "/healthz": {"get": _get("live", "Liveness (Kubernetes probe alias)", live, _OPEN_ERRORS,
                                 authenticated=False, extra={"operationId": "live_probe"})},
        "/readyz": {"get": _get("ready", "Readiness (Kubernetes probe alias)", ready, _OPEN_ERRORS,
                                authenticated=False, extra={"operationId": "ready_probe"})},
        "/metrics": {"get": _get("metrics", "Prometheus metrics (text exposition format)",
                                 {"200": {"description": "Metrics.",
                                          "content": {"text/plain": {"schema": {"type": "string"}}}}},
                                 _OPEN_ERRORS, authenticated=False)},
        OPENAPI_PATH: {"get": _get("openapi", "This document",
                                   {"200": _json_body({"type": "object"}, "OpenAPI 3.1 document.")},
                                   _OPEN_ERRORS, authenticated=False)},
        "/v2": {"get": _get("server", "Server metadata (KServe V2)",
                            {"200": _json_body(_ref("ServerMetadata"), "Name, version, extensions.")},
                            _AUTHENTICATED_ERRORS)},
        "/v2/privacy/budget": {"get": _get(
            "privacy_budget", "Remaining differential-privacy budget of a tenant",
            {"200": _json_body(_ref("PrivacyBudget"), "Budget per DP-protected model.")},
            _AUTHENTICATED_ERRORS,
            params=[{"name": "tenant", "in": "query", "required": False,
                     "description": "Another tenant (needs budget:admin); default the caller's own.",
                     "schema": {"type": "string"}}])},
        "/v2/policy": {"get": _get("policy", "Active policy revision and reload history (needs policy:read)",
                                   {"200": _json_body(_ref("PolicyStatus"), "Policy status.")},
                                   _AUTHENTICATED_ERRORS)},
        "/v2/pii/unmask": {"post": {
            "summary": "Reversible PII tokens back to values (needs pii:unmask)",
            "operationId": "pii_unmask", "x-route-kind": "pii_unmask",
            "requestBody": {"required": True, "content": {_JSON: {"schema": _ref("UnmaskRequest")}}},
            "responses": {"200": _json_body(_ref("UnmaskResponse"), "Values, in request order, or the text."),
                          **_errors((*_AUTHENTICATED_ERRORS, 413, 415))},
        }},
        **_model_paths(),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "infergate",
            "version": __version__,
            "description": "KServe V2 inference gateway: JWT authentication, RBAC, rate limits, input checks, "
                           "PII masking and differential privacy in front of a Triton-compatible model server.",
        },
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                                               "description": "A JWT from a trusted issuer, or an igk_ API key."}},
            "schemas": _schemas(),
        },
    }


@functools.cache
def openapi_bytes() -> bytes:
    """The encoded document, built on first use and shared by every request."""
    return json.dumps(openapi_document(), separators=(",", ":"), sort_keys=True).encode()
