"""Route resolution on the raw path, done once.

# SECURITY: authorization and routing must see the same path. aiohttp decodes
# percent-escapes before matching, so ``/v2/models/a%2Fb`` and dot segments could mean
# one thing to the router and another to a policy. The gateway instead accepts only
# raw paths made of unreserved characters and resolves them itself; anything ambiguous
# is a 400, never a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.context import Action
from gateway.errors import MalformedRequest, MethodNotAllowed, NotFound
from gateway.stages.model_exposure import UNKNOWN_MODEL

_SAFE_PATH = re.compile(r"/[A-Za-z0-9_.\-/]{0,1023}")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
_VERSION = re.compile(r"[0-9]{1,19}")


@dataclass(frozen=True, slots=True)
class Route:
    kind: str  # live | ready | server | model_metadata | model_ready | infer | metrics
    template: str  # bounded label for metrics
    action: Action
    authenticated: bool
    model: str | None = None
    version: str = ""


_FIXED: dict[str, Route] = {
    "/v2/health/live": Route("live", "/v2/health/live", Action.SERVER, False),
    "/v2/health/ready": Route("ready", "/v2/health/ready", Action.SERVER, False),
    "/healthz": Route("live", "/healthz", Action.SERVER, False),
    "/readyz": Route("ready", "/readyz", Action.SERVER, False),
    "/metrics": Route("metrics", "/metrics", Action.SERVER, False),
    # The OpenAPI document (gateway/fronts/http/openapi.py): static, no policy or tenant data.
    "/openapi.json": Route("openapi", "/openapi.json", Action.SERVER, False),
    "/v2": Route("server", "/v2", Action.SERVER, True),
    "/v2/privacy/budget": Route("privacy_budget", "/v2/privacy/budget", Action.SERVER, True),
    "/v2/policy": Route("policy", "/v2/policy", Action.SERVER, True),
    "/v2/pii/unmask": Route("pii_unmask", "/v2/pii/unmask", Action.SERVER, True),
}

_METHODS = {"infer": "POST", "pii_unmask": "POST"}


def resolve(method: str, raw_path: str) -> Route:
    path = raw_path.split("?", 1)[0]
    if not _SAFE_PATH.fullmatch(path):
        raise MalformedRequest("invalid characters or encoding in path", reason="path_invalid")
    segments = path.split("/")[1:]
    if any(s in {"", ".", ".."} for s in segments) and path != "/":
        raise MalformedRequest("empty or dot segments in path", reason="path_invalid")
    route = _FIXED.get(path) or _model_route(segments)
    if route is None:
        raise NotFound(reason="route_unknown")
    allowed = _METHODS.get(route.kind, "GET")
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise MethodNotAllowed(f"use {allowed}", reason="method_not_allowed")
    return route


def _model_route(segments: list[str]) -> Route | None:
    # v2 / models / {m} [/ versions / {v}] [/ ready | / infer]
    if len(segments) < 3 or segments[0] != "v2" or segments[1] != "models":
        return None
    model = segments[2]
    # SECURITY: the same text as an unknown, foreign or hidden model (non-enumeration: a
    # name's spelling must not tell it apart by body or Content-Length).
    if not _NAME.fullmatch(model):
        raise NotFound(UNKNOWN_MODEL, reason="model_name_invalid")
    rest = segments[3:]
    version = ""
    template = "/v2/models/{model}"
    if len(rest) >= 2 and rest[0] == "versions":
        version = rest[1]
        if not _VERSION.fullmatch(version):
            raise NotFound(UNKNOWN_MODEL, reason="model_version_invalid")
        rest = rest[2:]
        template += "/versions/{version}"
    if not rest:
        return Route("model_metadata", template, Action.METADATA, True, model, version)
    if rest == ["ready"]:
        return Route("model_ready", template + "/ready", Action.METADATA, True, model, version)
    if rest == ["infer"]:
        return Route("infer", template + "/infer", Action.INFER, True, model, version)
    if rest == ["drift"] and not version:
        # Drift statistics: the model must be visible (metadata), plus drift:read in the service.
        return Route("model_drift", template + "/drift", Action.METADATA, True, model, version)
    return None
