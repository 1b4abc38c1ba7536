"""Per-grant output allowlists (CATALOGUE AUTHZ-10, OWASP API3 BOPLA): schema, compile,
the authorization stage on both sides of the upstream, and ``policy check``.

The world: tenant ``acme`` with model ``scorer`` (outputs label, logits, embedding);
role ``labeler`` may receive only ``label``, role ``analyst`` everything.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from gateway.cli import main
from gateway.context import Action, Principal, RequestContext
from gateway.errors import PermissionDenied
from gateway.kserve import InferRequest, InferResponse, RequestedOutput, Tensor
from gateway.observability.metrics import Metrics
from gateway.pipeline import BoundStage, Pipeline
from gateway.policy.grant_outputs import check_grant_outputs, repo_outputs
from gateway.policy.schema import AccessPolicy, Grant
from gateway.stages.authz import OUTPUT_DENIED, OutputAuthorizer, RoleAuthorizer, build_authorizer, compile_grants
from gateway.stages.base import Mode

from ..conftest import POLICIES, TRITON_REPO

DECLARED = ("label", "logits", "embedding")


def access(**roles: list[dict[str, Any]]) -> AccessPolicy:
    return AccessPolicy.model_validate({
        "tenants": {"acme": {"models": ["scorer", "digits"]}, "globex": {"models": ["scorer"]}},
        "roles": roles or {
            "labeler": [{"actions": ["infer", "metadata"], "models": ["scorer"], "outputs": ["label"]}],
            "analyst": [{"actions": ["infer", "metadata"], "models": ["scorer", "digits"]}],
            "two": [{"actions": ["infer"], "models": ["scorer"], "outputs": ["label"]},
                    {"actions": ["infer"], "models": ["scorer"], "outputs": ["logits"]}],
        },
    })


def authorizer(policy: AccessPolicy | None = None) -> OutputAuthorizer:
    grants, role_actions = compile_grants(policy or access())
    stage = build_authorizer(grants, role_actions)
    assert isinstance(stage, OutputAuthorizer)
    return stage


def context(*roles: str, declared: tuple[str, ...] | None = DECLARED, model: str = "scorer") -> RequestContext:
    ctx = RequestContext(request_id="r1", revision="rev", action=Action.INFER, transport="http",
                         client_addr="127.0.0.1", model=model)
    ctx.principal = Principal(subject="s", tenant="acme", roles=frozenset(roles), issuer="i", credential_id="c")
    ctx.declared_outputs = declared
    return ctx


def request(*outputs: str) -> InferRequest:
    x = Tensor("x", "FP32", (1, 4), np.array([[0.1, 0.2, 0.3, 0.4]], dtype=np.float32))
    return InferRequest("scorer", "", [x], [RequestedOutput(name) for name in outputs])


def response(*names: str) -> InferResponse:
    tensors = [Tensor(name, "FP32", (1, 2), np.full((1, 2), 7.25, dtype=np.float32)) for name in names]
    return InferResponse("scorer", "1", tensors, "id-1")


class TestSchema:
    def test_outputs_are_optional_and_default_to_every_output(self) -> None:
        """Omitted keeps today's behaviour: the grant releases every output."""
        assert Grant.model_validate({"actions": ["infer"]}).outputs is None

    @pytest.mark.parametrize(("outputs", "actions", "message"), [
        ([], ["infer"], "at least 1"),                       # an empty allowlist would release nothing
        (["label", "label"], ["infer"], "listed twice"),     # a repeat is a typo, not a grant
        (["label"], ["metadata"], "does not grant infer"),  # outputs restrict inference only
        (["bad name"], ["infer"], "pattern"),                # not a tensor name the fronts accept
    ])
    def test_invalid_outputs_are_refused(self, outputs: list[str], actions: list[str], message: str) -> None:
        with pytest.raises(ValidationError, match=message):
            Grant.model_validate({"actions": actions, "outputs": outputs})

    def test_star_action_may_carry_outputs(self) -> None:
        assert Grant.model_validate({"actions": ["*"], "outputs": ["label"]}).outputs == ("label",)


class TestCompile:
    def test_outputs_compile_per_model_and_none_means_all(self) -> None:
        grants, _ = compile_grants(access())
        assert [g.outputs for g in grants["acme"]["labeler"]["scorer"]] == [frozenset({"label"})]
        assert [g.outputs for g in grants["acme"]["analyst"]["scorer"]] == [None]

    def test_output_hooks_only_when_some_grant_restricts(self) -> None:
        """A policy without outputs: keeps the plain authorizer (no per-inference hooks or records)."""
        plain = access(analyst=[{"actions": ["infer"], "models": ["scorer"]}])
        stage = build_authorizer(*compile_grants(plain))
        assert type(stage) is RoleAuthorizer and not stage.overrides("on_request")
        restricted = authorizer()
        assert restricted.name == "authz" and restricted.overrides("on_response")


class TestRequestSide:
    async def test_named_withheld_outputs_are_refused_and_named(self) -> None:
        """The catalogue's request: logits and embedding for a label-only role -> 403."""
        ctx = context("labeler")
        with pytest.raises(PermissionDenied) as caught:
            await authorizer().on_request(ctx, request("logits", "embedding"))
        assert caught.value.reason == OUTPUT_DENIED
        assert "'logits', 'embedding'" in str(caught.value) and "allowed: 'label'" in str(caught.value)
        assert ctx.notes["authz_outputs_refused"] == 2

    async def test_one_withheld_among_allowed_is_refused(self) -> None:
        with pytest.raises(PermissionDenied, match="'logits'"):
            await authorizer().on_request(context("labeler"), request("label", "logits"))

    async def test_allowed_output_passes_unchanged(self) -> None:
        req = request("label")
        assert await authorizer().on_request(context("labeler"), req) is req

    async def test_no_outputs_named_is_narrowed_to_the_released_ones_in_model_order(self) -> None:
        """The upstream is asked only for what may be returned; the client's object is untouched."""
        req = request()
        narrowed = await authorizer().on_request(context("two"), req)
        assert [o.name for o in narrowed.outputs] == ["label", "logits"]  # union of two grants
        assert req.outputs == [] and narrowed.inputs is req.inputs

    async def test_model_with_none_of_the_released_outputs_is_refused_before_the_upstream(self) -> None:
        with pytest.raises(PermissionDenied) as caught:
            await authorizer().on_request(context("labeler", declared=("probabilities",)), request())
        assert caught.value.reason == OUTPUT_DENIED

    async def test_without_metadata_the_request_is_left_to_the_response_side(self) -> None:
        req = request()
        assert await authorizer().on_request(context("labeler", declared=None), req) is req

    async def test_an_unrestricted_role_adds_up_to_everything(self) -> None:
        """Roles are a union: labeler plus analyst may receive every output."""
        req = request("logits", "embedding")
        assert await authorizer().on_request(context("labeler", "analyst"), req) is req

    async def test_withheld_name_that_is_not_identifier_like_is_not_echoed(self) -> None:
        with pytest.raises(PermissionDenied) as caught:
            await authorizer().on_request(context("labeler"), request("078-05-1120 x"))
        assert "078-05-1120" not in str(caught.value) and "(unnamed)" in str(caught.value)


class TestResponseSide:
    async def test_a_call_no_grant_admitted_releases_nothing(self) -> None:
        """Fail closed if the stage were ever reached without an admitting grant (a wiring bug)."""
        stage = authorizer()
        assert stage.released_outputs(context("viewer")) == frozenset()
        with pytest.raises(PermissionDenied):
            await stage.on_response(context("viewer"), response("label"))

    async def test_extra_outputs_from_the_upstream_are_dropped(self) -> None:
        ctx = context("labeler")
        out = await authorizer().on_response(ctx, response("label", "logits", "embedding"))
        assert [t.name for t in out.outputs] == ["label"]
        assert out.id == "id-1" and ctx.notes["authz_outputs_dropped"] == 2

    async def test_nothing_released_is_refused_not_answered_empty(self) -> None:
        with pytest.raises(PermissionDenied) as caught:
            await authorizer().on_response(context("labeler"), response("logits", "embedding"))
        assert caught.value.reason == OUTPUT_DENIED

    async def test_unrestricted_response_is_passed_through(self) -> None:
        resp = response("label", "logits")
        assert await authorizer().on_response(context("analyst"), resp) is resp

    async def test_pipeline_drops_what_an_upstream_sends_regardless_of_the_request(self) -> None:
        """Whatever the upstream sends, the answer holds only the released outputs."""
        stage = authorizer()
        pipeline = Pipeline(revision="rev", stages=(BoundStage(stage, Mode.ENFORCE),), metrics=Metrics())
        asked: list[list[str]] = []

        async def careless_upstream(_ctx: RequestContext, req: InferRequest) -> InferResponse:
            asked.append([o.name for o in req.outputs])
            return response(*DECLARED)  # ignores the requested outputs

        ctx = context("labeler")
        await pipeline.admit(ctx)
        out = await pipeline.infer(ctx, request(), careless_upstream)
        assert asked == [["label"]]
        assert [t.name for t in out.outputs] == ["label"]
        assert [(r.stage, r.outcome) for r in ctx.records][-1] == ("authz", "allowed")


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    for model in ("digits", "risk"):
        (repo / model).mkdir(parents=True)
        shutil.copy(TRITON_REPO / model / "config.pbtxt", repo / model / "config.pbtxt")
    return repo


class TestPolicyCheck:
    def test_names_are_checked_against_known_configs(self, tmp_path: Path) -> None:
        policy = AccessPolicy.model_validate({
            "tenants": {"acme": {"models": ["digits", "risk", "remote"]}},
            "roles": {
                "ok": [{"actions": ["infer"], "models": ["digits"], "outputs": ["probabilities"]}],
                "typo": [{"actions": ["infer"], "models": ["digits"], "outputs": ["probabilites"]}],
                "mixed": [{"actions": ["infer"], "models": ["digits", "risk"], "outputs": ["score"]}],
                "remote": [{"actions": ["infer"], "models": ["remote"], "outputs": ["anything"]}],
                "star": [{"actions": ["infer"], "models": ["*"], "outputs": ["score"]}],
            },
        })
        problems = check_grant_outputs(policy, repo_outputs(_repo(tmp_path)))
        messages = [m for m, _hint in problems]
        assert any("roles.typo[0].outputs: 'probabilites'" in m for m in messages)
        assert any("roles.mixed[0].outputs" in m and "'digits'" in m for m in messages)
        # Unknown configs (a remote-only model) cannot be checked; "*" tolerates models without the name.
        assert not any("roles.ok" in m or "roles.remote" in m or "roles.star" in m for m in messages)
        hints = dict(problems)
        assert any("probabilities" in hints[m] for m in messages if "typo" in m)

    def test_a_broken_config_is_left_to_the_backend(self, tmp_path: Path) -> None:
        repo = _repo(tmp_path)
        (repo / "risk" / "config.pbtxt").write_text("output { nme: 1 }\n")
        lookup = repo_outputs(repo)
        assert lookup("risk") is None and lookup("digits") == frozenset({"probabilities"})
        assert lookup("absent") is None

    def test_policy_check_cli_refuses_a_misspelt_output(self, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
        target = tmp_path / "policies"
        shutil.copytree(POLICIES, target, ignore=shutil.ignore_patterns("tests", "schema"))
        text = (target / "access.yaml").read_text()
        text = text.replace("  viewer:\n", "  scorer_reader:\n    - actions: [infer]\n      models: [risk]\n"
                                           "      outputs: [scroe]\n  viewer:\n", 1)
        (target / "access.yaml").write_text(text)
        assert main(["policy", "check", str(target), "--profiles", str(TRITON_REPO)]) == 1
        err = capsys.readouterr().err
        assert "roles.scorer_reader[0].outputs: 'scroe' is not an output" in err and "risk: score" in err
