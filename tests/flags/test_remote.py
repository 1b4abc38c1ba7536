"""Flag providers chosen by policy: OFREP against a real HTTP flag service, and Python classes.

The local ``flags.json`` keeps every route at 100 % stable; the remote service sends
everyone to the canary, so each assertion tells who decided. Fail-closed: the service
down, erroring or unknown serves the stable variant; kill switches only where the file
allows them, never for a protected stage, whatever the service answers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp.test_utils import BaseTestServer
from pydantic import ValidationError

from gateway.app import build_app
from gateway.flags.ofrep import OfrepProvider, ProviderUnavailable
from gateway.flags.remote import GuardedProvider
from gateway.policy.loader import PolicyError, PolicySet, build_policy_set
from gateway.policy.schema import FlagsPolicy, OfrepFlagProvider
from gateway.settings import Settings
from gateway.stages.feature_flags import FeatureFlags, FlagsRuntime, build_flags_stage
from tests.conftest import DIGITS_BODY, Client, GatewayTestServer
from tests.flags import RecordingHooks, context, doc, principal, route_flag, split
from tests.support.ofrep_server import OfrepServer

SWITCH = {"state": "ENABLED", "variants": {"on": True, "off": False}, "defaultVariant": "on"}
REMOTE_OFF = {"state": "ENABLED", "variants": {"on": True, "off": False}, "defaultVariant": "off"}
# What the remote flag service holds: canary for everyone, and every stage "off".
REMOTE: dict[str, Any] = {"flags": {
    "digits-version": route_flag(split(0, 100)),
    **{f"stage.{stage}.enabled": REMOTE_OFF for stage in
       ("authn", "authz", "model_exposure", "pii_mask", "dp_noise", "sanitize", "adversarial")},
}}
# The reviewed file: stable for everyone, a kill switch for sanitize only.
LOCAL = doc({"digits-version": route_flag(split(100, 0)), "stage.sanitize.enabled": SWITCH})


@pytest.fixture
async def service() -> AsyncIterator[OfrepServer]:
    server = await OfrepServer.start(REMOTE)
    yield server
    await server.stop()


Runtimes = Callable[..., FlagsRuntime]


@pytest.fixture
async def runtimes() -> AsyncIterator[Runtimes]:
    """Makes FlagsRuntimes and closes their remote providers (connection pools) afterwards."""
    made: list[FlagsRuntime] = []

    def make(hooks: RecordingHooks | None = None) -> FlagsRuntime:
        made.append(FlagsRuntime(hooks=hooks) if hooks is not None else FlagsRuntime())
        return made[-1]

    yield make
    for runtime in made:
        await runtime.close()


def with_provider(provider: str) -> PolicySet:
    """A PolicySet whose gateway.yaml exposes digits/other/green and names a flags provider."""
    gateway = f"models:\n  digits: {{}}\n  other: {{}}\n  green: {{}}\nflags:\n  provider: {provider}\n".encode()
    return build_policy_set({"gateway.yaml": gateway})


def ofrep(url: str, **extra: Any) -> PolicySet:
    return with_provider(json.dumps({"kind": "ofrep", "url": url, **extra}))


async def decide(flags: FeatureFlags, who: str = "alice") -> tuple[str, str]:
    ctx = context(principal(who))
    await flags.on_call(ctx)
    return ctx.notes["flags"]["variant"], ctx.notes["flags"]["reason"]


class TestOfrepRouting:
    async def test_the_remote_service_chooses_the_variant(self, runtimes: Runtimes,
                                                          service: OfrepServer) -> None:
        flags = build_flags_stage(LOCAL, ofrep(service.url), runtimes())
        assert await decide(flags) == ("canary", "targeting_match")
        key, sent = service.requests[-1]
        assert key == "digits-version"
        assert sent["tenant"] == "acme" and sent["roles"] == ["analyst"] and len(sent["targetingKey"]) == 32
        # SECURITY: the raw subject never leaves the gateway, only its pseudonym
        assert "alice" not in json.dumps(sent)

    async def test_service_down_serves_stable_with_metric_hook_and_log(self, runtimes: Runtimes,
                                                                       service: OfrepServer) -> None:
        hooks = RecordingHooks()
        flags = build_flags_stage(LOCAL, ofrep(service.url, cooldown_s=60), runtimes(hooks))
        assert await decide(flags) == ("canary", "targeting_match")
        await service.stop()
        with structlog.testing.capture_logs() as logs:
            assert await decide(flags) == ("stable", "error")
        # both the route and the kill switch failed safe (stable variant, stage kept on)
        assert set(hooks.failures) == {("digits-version", "GENERAL"), ("stage.sanitize.enabled", "GENERAL")}
        assert [e for e in logs if e["event"] == "flag_provider_unavailable"][0]["fallback"] == "stable_variant"
        # the service is back, but the guard does not ask during its cool-down: no latency per call
        await service.restart()
        asked = len(service.requests)
        assert await decide(flags) == ("stable", "error")
        assert len(service.requests) == asked

    async def test_recovers_after_the_cooldown(self, runtimes: Runtimes,
                                               service: OfrepServer) -> None:
        flags = build_flags_stage(LOCAL, ofrep(service.url, cooldown_s=0), runtimes())
        service.status_override = 500
        assert await decide(flags) == ("stable", "error")
        service.status_override = None
        assert await decide(flags) == ("canary", "targeting_match")

    @pytest.mark.parametrize(("remote", "error"), [
        ({"flags": {}}, "FLAG_NOT_FOUND"),  # the service does not know the flag
        # a variant the reviewed file does not have
        ({"flags": {"digits-version": route_flag(split(0, 100), variants={"stable": "1", "canary": "7"})}},
         "UNKNOWN_VARIANT"),
    ])
    async def test_answers_outside_the_file_serve_stable(self, runtimes: Runtimes, service: OfrepServer,
                                                         remote: dict[str, Any], error: str) -> None:
        service.flags = remote
        hooks = RecordingHooks()
        flags = build_flags_stage(LOCAL, ofrep(service.url), runtimes(hooks))
        assert (await decide(flags))[0] == "stable"
        assert ("digits-version", error) in hooks.failures

    async def test_auth_header_from_the_environment(self, runtimes: Runtimes, monkeypatch: pytest.MonkeyPatch) -> None:
        server = await OfrepServer.start(REMOTE, auth="Bearer s3cret-token")
        try:
            policy = ofrep(server.url, auth_env="INFERGATE_TEST_OFREP_TOKEN")
            with pytest.raises(PolicyError, match="INFERGATE_TEST_OFREP_TOKEN is not set"):
                build_flags_stage(LOCAL, policy, runtimes())  # never a provider without its key
            monkeypatch.setenv("INFERGATE_TEST_OFREP_TOKEN", "Bearer wrong")
            assert await decide(build_flags_stage(LOCAL, policy, runtimes())) == ("stable", "error")
            monkeypatch.setenv("INFERGATE_TEST_OFREP_TOKEN", "Bearer s3cret-token")
            assert await decide(build_flags_stage(LOCAL, policy, runtimes())) == ("canary", "targeting_match")
        finally:
            await server.stop()

    async def test_one_provider_per_configuration_across_revisions(self, runtimes: Runtimes,
                                                                   service: OfrepServer) -> None:
        runtime = runtimes()
        first = build_flags_stage(LOCAL, ofrep(service.url), runtime)
        second = build_flags_stage(LOCAL, ofrep(service.url), runtime)
        other = build_flags_stage(LOCAL, ofrep(service.url, timeout_s=1), runtime)
        assert first.provider is second.provider and other.provider is not first.provider
        assert isinstance(first.provider, GuardedProvider)
        await decide(first)
        inner = first.provider.inner
        assert isinstance(inner, OfrepProvider) and inner._session is not None
        await runtime.close()
        assert inner._session is None


class TestOfrepKillSwitches:
    async def test_only_the_files_switches_are_asked_and_protected_ones_never(self, runtimes: Runtimes,
                                                                              service: OfrepServer) -> None:
        flags = build_flags_stage(LOCAL, ofrep(service.url), runtimes())
        ctx = context()
        await flags.on_call(ctx)
        everything = ("authn", "feature_flags", "model_exposure", "authz", "rate_limit", "sanitize",
                      "adversarial", "pii_mask", "dp_noise")
        # SECURITY: the service says "off" for authn, authz, PII, DP, exposure and adversarial too
        assert flags.kill_switched_stages(ctx, everything) == frozenset({"sanitize"})
        asked = {key for key, _ in service.requests}
        assert asked == {"digits-version", "stage.sanitize.enabled"}

    async def test_the_file_cannot_list_a_protected_switch_for_the_service_to_turn(self, runtimes: Runtimes,
                                                                                   service: OfrepServer) -> None:
        for stage in ("authn", "pii_mask", "dp_noise"):
            with pytest.raises(PolicyError, match=f"stage '{stage}' cannot have a kill switch"):
                build_flags_stage(doc({f"stage.{stage}.enabled": SWITCH}), ofrep(service.url), runtimes())

    async def test_service_down_keeps_every_stage_on(self, runtimes: Runtimes,
                                                     service: OfrepServer) -> None:
        flags = build_flags_stage(LOCAL, ofrep(service.url), runtimes())
        await service.stop()
        ctx = context()
        await flags.on_call(ctx)
        assert flags.kill_switched_stages(ctx, ("sanitize",)) == frozenset()


class TestPythonProvider:
    async def test_the_official_ofrep_package_in_worker_threads(self, runtimes: Runtimes, service: OfrepServer,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
        """Any installed OpenFeature provider class; here ``openfeature-provider-ofrep``, whose
        blocking ``requests`` calls run in the guard's threads (and which cross-checks that the
        test service speaks OFREP as the reference client expects)."""
        monkeypatch.setenv("INFERGATE_TEST_FLAGS_URL", service.url)
        provider = json.dumps({"kind": "python", "factory": "openfeature.contrib.provider.ofrep:OFREPProvider",
                               "config": {"timeout": 2.0}, "secret_env": {"base_url": "INFERGATE_TEST_FLAGS_URL"}})
        runtime = runtimes()
        flags = build_flags_stage(LOCAL, with_provider(provider), runtime)
        try:
            assert await decide(flags) == ("canary", "targeting_match")
            ctx = context()
            await flags.on_call(ctx)
            assert flags.kill_switched_stages(ctx, ("sanitize", "authn")) == frozenset({"sanitize"})
            await service.stop()
            assert await decide(flags) == ("stable", "error")
        finally:
            await runtime.close()

    @pytest.mark.parametrize(("factory", "fragment"), [
        ("subprocess:run", "not an OpenFeature provider class"),
        ("os:system", "not an OpenFeature provider class"),
        ("gateway.flags.provider:parse_flag_file", "not an OpenFeature provider class"),
        ("gateway.flags.provider:FlagSet", "not an OpenFeature provider class"),
        ("no_such_module_here:Provider", "cannot be imported"),
        ("gateway.flags.ofrep:NoSuchClass", "cannot be imported"),
        ("gateway.flags.ofrep:OfrepProvider", "refused its config"),  # no url given
    ])
    def test_refused_factories(self, runtimes: Runtimes, factory: str, fragment: str) -> None:
        """SECURITY: a policy edit may pick a provider class, never call arbitrary code."""
        policy = with_provider(json.dumps({"kind": "python", "factory": factory, "config": {"args": ["true"]}}))
        with pytest.raises(PolicyError, match=fragment) as info:
            build_flags_stage(LOCAL, policy, runtimes())
        assert info.value.issues[0].file == "gateway.yaml"


class TestSchema:
    def test_file_is_the_default(self) -> None:
        assert FlagsPolicy().provider.kind == "file"

    @pytest.mark.parametrize(("config", "fragment"), [
        ({"kind": "ofrep", "url": "http://flagd.internal:8016"}, "must be https"),
        ({"kind": "ofrep", "url": "https://user:pw@flagd:8016"}, "pattern"),
        ({"kind": "ofrep", "url": "https://flagd:8016", "auth_env": "lower"}, "pattern"),
        ({"kind": "ofrep", "url": "https://flagd:8016", "token": "x"}, "Extra inputs"),
        ({"kind": "ofrep", "url": "https://flagd:8016", "timeout_s": 60}, "less than or equal"),
        ({"kind": "python", "factory": "os.system"}, "pattern"),
        ({"kind": "python", "factory": "a.b:C", "config": {"k": 1}, "secret_env": {"k": "K"}}, "both"),
        ({"kind": "flagd"}, "does not match any of the expected tags"),
    ])
    def test_refused(self, config: dict[str, Any], fragment: str) -> None:
        with pytest.raises(ValidationError, match=fragment):
            FlagsPolicy.model_validate({"provider": config})

    @pytest.mark.parametrize("url", ["http://127.0.0.1:8016", "http://localhost:8016", "https://flagd:8016/base"])
    def test_accepted(self, url: str) -> None:
        provider = FlagsPolicy.model_validate({"provider": {"kind": "ofrep", "url": url}}).provider
        assert isinstance(provider, OfrepFlagProvider)
        assert FlagsPolicy.model_validate(
            {"provider": {"kind": "ofrep", "url": "http://flagd:8016", "allow_http": True}}).provider.kind == "ofrep"


async def test_ofrep_provider_refuses_synchronous_use() -> None:
    """A synchronous call would block the event loop on the network: refused, so stable."""
    provider = OfrepProvider("http://127.0.0.1:9")
    with pytest.raises(Exception, match="async only"):
        provider.resolve_string_details("f", "1")
    with pytest.raises(ProviderUnavailable):  # nothing listens on the discard port
        await provider.resolve_string_details_async("f", "1")
    await provider.close()


@pytest.mark.parametrize("fault", ["redirect", "garbage", "hang", "500"])
async def test_ofrep_faults_are_unavailable_and_redirects_not_followed(service: OfrepServer, fault: str) -> None:
    """Every failure is ProviderUnavailable (the caller serves stable); a 302 is one, not a hop."""
    other = await OfrepServer.start(REMOTE)  # where a followed redirect would land
    if fault == "redirect":
        service.redirect_to = other.url + "/ofrep/v1/evaluate/flags/digits-version"
    elif fault == "500":
        service.status_override = 500
    else:
        service.mode = fault
    provider = OfrepProvider(service.url, timeout_s=0.3, headers={"Authorization": "Bearer secret"})
    try:
        with pytest.raises(ProviderUnavailable):
            await provider.resolve_string_details_async("digits-version", "1")
        assert service.hits == 1 and other.hits == 0
    finally:
        service.unhang()
        await provider.close()
        await other.stop()


# -- the whole gateway, pointed at the flag service by gateway.yaml --------------------------------


async def test_gateway_through_an_ofrep_service(settings: Settings, policy_dir: Path, two_version_repo: Path,
                                                service: OfrepServer, token: Callable[..., str],
                                                aiohttp_client: Callable[..., Awaitable[Client]]) -> None:
    gateway_yaml = policy_dir / "gateway.yaml"
    shipped = gateway_yaml.read_text()
    assert shipped.count("flags:\n  provider:\n    kind: file\n") == 1  # the shipped default
    gateway_yaml.write_text(shipped.replace("flags:\n  provider:\n    kind: file\n", "flags:\n  provider:\n"
                                            f"    kind: ofrep\n    url: {service.url}\n    cooldown_s: 0\n"))
    local = json.loads((policy_dir / "flags.json").read_text())  # the shipped file: 100 % stable
    assert local["flags"]["digits-version"]["targeting"] == {"fractional": [["stable", 100], ["canary", 0]]}
    app = build_app(Settings(policies=policy_dir, backend=f"local:{two_version_repo}", audit_dir=settings.audit_dir,
                             state_dir=settings.state_dir, dev=True))
    server: BaseTestServer = GatewayTestServer(app)
    gw = await aiohttp_client(server)
    headers = {"Authorization": f"Bearer {token()}"}

    resp = await gw.post("/v2/models/digits/infer", json=DIGITS_BODY, headers=headers)
    assert resp.status == 200, await resp.text()
    assert (resp.headers["X-Model-Variant"], (await resp.json())["model_version"]) == ("canary", "2")

    # the service says stage.authn.enabled = false: still no call without a credential
    assert (await gw.post("/v2/models/digits/infer", json=DIGITS_BODY)).status == 401

    await service.stop()
    with structlog.testing.capture_logs() as logs:
        resp = await gw.post("/v2/models/digits/infer", json=DIGITS_BODY, headers=headers)
    assert resp.status == 200 and resp.headers["X-Model-Variant"] == "stable"
    assert any(e["event"] == "flag_provider_unavailable" for e in logs)
    metrics = await (await gw.get("/metrics")).text()
    assert 'gateway_flag_evaluation_errors_total{flag="digits-version"} 1.0' in metrics
