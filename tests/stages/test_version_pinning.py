"""Which versions a caller may reach, as the service pins a call that names none.

Triton serves an unversioned call from its version policy (by default the newest loaded
version). A grant for ``v1`` only, or a model exposed only in ``v1``, would be bypassed
by leaving the version out, so the service asks the stages which versions are allowed
(``visible_versions``) and names the newest allowed one the upstream serves
(``InferenceService.pin_version``; CATALOGUE AUTHZ-04, found by the session-6 probe).
End to end: security_tests/test_1_2_authz.py and tests/test_authz.py.
"""

from __future__ import annotations

from typing import Any

from gateway.context import Action, Principal, RequestContext
from gateway.kserve import newest_version
from gateway.observability.metrics import Metrics
from gateway.pipeline import BoundStage, Pipeline
from gateway.policy.schema import AccessPolicy, ModelPolicy
from gateway.stages.authz import build_authorizer, compile_grants
from gateway.stages.base import Mode
from gateway.stages.model_exposure import ModelExposure

POLICY = AccessPolicy.model_validate({
    "tenants": {"acme": {"models": ["fraud", "digits"]}},
    "roles": {
        "v1": [{"actions": ["infer", "metadata"], "models": ["fraud"], "versions": ["1"]}],
        "v13": [{"actions": ["infer"], "models": ["fraud"], "versions": ["1"]},
                {"actions": ["infer"], "models": ["fraud"], "versions": ["3"]}],
        "anyv": [{"actions": ["infer", "metadata"], "models": ["fraud"]}],
    },
})


def context(*roles: str, model: str = "fraud", action: Action = Action.INFER) -> RequestContext:
    ctx = RequestContext(request_id="r1", revision="rev", action=action, transport="http",
                         client_addr="127.0.0.1", model=model)
    ctx.principal = Principal(subject="s", tenant="acme", roles=frozenset(roles), issuer="i", credential_id="c")
    return ctx


def authorizer() -> Any:
    grants, role_actions = compile_grants(POLICY)
    return build_authorizer(grants, role_actions)


def test_newest_version_compares_numbers_not_text() -> None:
    assert newest_version(["9", "10", "2"]) == "10"


def test_grants_restrict_per_action_and_any_version_lifts_it() -> None:
    stage = authorizer()
    assert stage.visible_versions(context("v13")) == frozenset({"1", "3"})
    assert stage.visible_versions(context("v13", action=Action.METADATA)) == frozenset()
    assert stage.visible_versions(context("v1", "anyv")) is None


def test_exposure_restricts_only_models_with_listed_versions() -> None:
    stage = ModelExposure(models={"fraud": ModelPolicy(versions=("1", "2")), "digits": ModelPolicy()})
    assert stage.visible_versions(context("v1")) == frozenset({"1", "2"})
    assert stage.visible_versions(context("v1", model="digits")) is None
    assert stage.visible_versions(context("v1", model="ghost")) is None


def test_pipeline_intersects_the_stages() -> None:
    exposure = ModelExposure(models={"fraud": ModelPolicy(versions=("2", "3"))})
    stages = (BoundStage(exposure, Mode.ENFORCE), BoundStage(authorizer(), Mode.ENFORCE))
    pipeline = Pipeline(revision="r", stages=stages, metrics=Metrics())
    assert pipeline.visible_versions(context("v13")) == frozenset({"3"})
    assert pipeline.visible_versions(context("anyv")) == frozenset({"2", "3"})
