"""Routing happens once, on the raw path; ambiguous paths are refused, never guessed."""

from __future__ import annotations

import pytest

from gateway.errors import GatewayError, MalformedRequest, MethodNotAllowed, NotFound
from gateway.fronts.http.routes import resolve


@pytest.mark.parametrize(
    ("method", "path", "kind", "model", "version"),
    [
        ("GET", "/v2/health/live", "live", None, ""),
        ("GET", "/v2/health/ready", "ready", None, ""),
        ("GET", "/v2", "server", None, ""),
        ("GET", "/v2/models/digits", "model_metadata", "digits", ""),
        ("GET", "/v2/models/digits/versions/1", "model_metadata", "digits", "1"),
        ("GET", "/v2/models/digits/ready", "model_ready", "digits", ""),
        ("GET", "/v2/models/digits/versions/3/ready", "model_ready", "digits", "3"),
        ("POST", "/v2/models/digits/infer", "infer", "digits", ""),
        ("POST", "/v2/models/digits/versions/1/infer", "infer", "digits", "1"),
        ("POST", "/v2/models/digits/infer?x=1", "infer", "digits", ""),  # query string ignored
        ("GET", "/metrics", "metrics", None, ""),
    ],
)
def test_known_routes(method: str, path: str, kind: str, model: str | None, version: str) -> None:
    route = resolve(method, path)
    assert (route.kind, route.model, route.version) == (kind, model, version)


@pytest.mark.parametrize(
    ("method", "path", "error"),
    [
        ("POST", "/v2/models/a%2Fb/infer", MalformedRequest),  # encoded slash
        ("POST", "/v2/models/digits/%2e%2e/infer", MalformedRequest),  # encoded dots
        ("POST", "/v2/models/../models/digits/infer", MalformedRequest),  # dot segment
        ("POST", "/v2/models/./digits/infer", MalformedRequest),
        ("POST", "/v2//models/digits/infer", MalformedRequest),  # empty segment
        ("POST", "/v2/models/digits%0d%0aSet-Cookie:x/infer", MalformedRequest),  # header injection
        ("POST", "/v2/models/\u0440\u0430b/infer", MalformedRequest),  # Cyrillic look-alike
        ("POST", "/v2/models/" + "a" * 300 + "/infer", NotFound),  # over-long name
        ("POST", "/v2/models/digits/versions/x/infer", NotFound),  # non-numeric version
        ("GET", "/v2/repository/index", NotFound),  # admin surfaces are never proxied
        ("POST", "/v2/repository/models/digits/load", NotFound),
        ("POST", "/v2/systemsharedmemory/register", NotFound),
        ("GET", "/v2/trace/setting", NotFound),
        ("GET", "/v2/logging", NotFound),
        ("GET", "/v2/models/digits/stats", NotFound),
        ("GET", "/v2/models/digits/config", NotFound),
        ("GET", "/v2/models/digits/infer", MethodNotAllowed),
        ("POST", "/v2/models/digits", MethodNotAllowed),
        ("DELETE", "/v2", MethodNotAllowed),
    ],
)
def test_refused_routes(method: str, path: str, error: type[GatewayError]) -> None:
    with pytest.raises(error):
        resolve(method, path)
