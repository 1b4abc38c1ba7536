"""KeySourceRegistry: policy's ``jwks_settings`` reach the key source; discovery faults fail closed.

Why here: the registry is where policy meets :class:`JwksKeySource`; a knob dropped on the
way (``max_stale_s``) or an eager discovery check that raises on the request path (a 500
that re-fetches the document for every request) would only show through the gateway.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.errors import DependencyUnavailable
from gateway.identity.jwks import JwksConfigError
from gateway.identity.registry import KeySourceRegistry
from gateway.policy.schema import IssuerPolicy

ISSUER = "https://idp.test/realms/prod"
ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


def issuer_policy(keys: dict[str, Any], **settings: Any) -> IssuerPolicy:
    return IssuerPolicy.model_validate({
        "issuer": ISSUER, "audiences": ["inference-gw"], "algorithms": ["RS256"], "keys": keys,
        "jwks_settings": {"allow_http": True, **settings},
    })


@pytest.fixture
async def registry() -> AsyncIterator[KeySourceRegistry]:
    reg = KeySourceRegistry()
    yield reg
    await reg.close()


async def test_policy_settings_reach_the_source(registry: KeySourceRegistry) -> None:
    cfg = issuer_policy({"jwks_url": "http://127.0.0.1:1/jwks.json"}, max_stale_s=600, fetch_timeout_s=1.5,
                        refresh_cooldown_s=10)
    source = await registry.build(cfg)
    assert (source.settings.max_stale_s, source.settings.fetch_timeout_s, source.settings.refresh_cooldown_s,
            source.settings.allow_http) == (600, 1.5, 10, True)
    # Another max_stale_s is another source (the registry key holds every knob).
    assert registry(cfg) is registry(cfg)
    assert registry(cfg) is not registry(issuer_policy({"jwks_url": "http://127.0.0.1:1/jwks.json"}))


def test_max_stale_defaults_to_a_day_and_refuses_junk() -> None:
    assert issuer_policy({"jwks_url": "https://idp.test/jwks.json"}).jwks_settings.max_stale_s == 86_400
    for bad in (-1, 604_801, "1h", True):
        with pytest.raises(ValueError, match="max_stale_s"):
            issuer_policy({"jwks_url": "https://idp.test/jwks.json"}, max_stale_s=bad)


async def test_discovery_naming_another_issuer_is_a_503_under_backoff(
    registry: KeySourceRegistry, aiohttp_server: ServerFactory
) -> None:
    hits = {"discovery": 0, "jwks": 0}

    async def discovery(request: web.Request) -> web.Response:
        hits["discovery"] += 1
        return web.json_response({"issuer": "https://evil.test/", "jwks_uri": str(request.url.with_path("/jwks"))})

    async def jwks(_: web.Request) -> web.Response:
        hits["jwks"] += 1
        return web.json_response({"keys": []})

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/jwks", jwks)
    server = await aiohttp_server(app)
    lazy = registry(issuer_policy({"oidc_discovery": str(server.make_url("/.well-known/openid-configuration"))}))
    for _ in range(10):
        with pytest.raises(DependencyUnavailable) as exc:
            await lazy.get_key("rs-1", "RS256")
        assert exc.value.reason == "jwks_unavailable"
    # One discovery fetch, then the failure backoff; the other issuer's keys are never fetched.
    assert hits == {"discovery": 1, "jwks": 0}


@pytest.mark.parametrize("keys", [{"jwks_url": "http://idp.example/jwks.json"},
                                  {"oidc_discovery": "ftp://idp.example/.well-known/openid-configuration"},
                                  {"jwks_url": "https://user:pw@idp.example/jwks.json"}])
def test_unbuildable_source_is_refused_at_policy_compile(keys: dict[str, Any]) -> None:
    # Refused when the revision is compiled (a PolicyError there), never a 500 per request later.
    cfg = IssuerPolicy.model_validate({"issuer": ISSUER, "audiences": ["inference-gw"], "algorithms": ["RS256"],
                                       "keys": keys})
    with pytest.raises(JwksConfigError):
        KeySourceRegistry()(cfg)
