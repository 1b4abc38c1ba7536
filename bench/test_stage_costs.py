"""CPU cost of each pipeline stage, per model, with pytest-benchmark.

Each benchmark times one stage's hooks for one call (``on_call``, ``on_request``,
``on_response``, ``on_complete``) on the shipped policies (limits raised so nothing is
refused, in-memory state). The setup of every round, untimed, builds a fresh context and
runs the stages before it, so each stage sees exactly what it sees in the gateway. The
``noop`` row is the harness's own overhead (one event-loop turn): subtract it.

In the test suite (``--benchmark-disable``, the default in pyproject) every benchmark runs
once, so the file cannot rot; ``make bench`` runs it with timing:

    .venv/bin/pytest bench/test_stage_costs.py --benchmark-enable --benchmark-only \
        --benchmark-columns=median,iqr,ops --benchmark-sort=name
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from gateway.context import Action, RequestContext, new_request_id  # noqa: E402
from gateway.devissuer import issue_token, trusted_dev_issuer  # noqa: E402
from gateway.fronts.http.codec import CodecLimits, decode_infer_request  # noqa: E402
from gateway.kserve import InferRequest, InferResponse  # noqa: E402
from gateway.observability.metrics import Metrics  # noqa: E402
from gateway.pipeline import BoundStage, Pipeline, StageMeter  # noqa: E402
from gateway.policy.compile import CompileEnv, compile_pipeline  # noqa: E402
from gateway.policy.loader import load_policy_dir  # noqa: E402
from gateway.upstream.embedded import EmbeddedUpstream  # noqa: E402

MODELS = ("digits", "text_echo", "risk")
STAGES = ("authn", "feature_flags", "model_exposure", "authz", "rate_limit", "sanitize", "adversarial",
          "pii_mask", "dp_noise")


class World:
    """A compiled pipeline on the bench policies and one decoded request stream per model."""

    def __init__(self, tmp: Path) -> None:
        import harness  # bench/harness.py: the same policies and request mix as the HTTP benchmark

        self.loop = asyncio.new_event_loop()
        policies = harness.bench_policies(tmp / "policies", auth_only=False)
        state_dir = tmp / "state"
        self.env = CompileEnv(extra_issuers=(trusted_dev_issuer(state_dir),), repo_dir=ROOT / "triton_repo",
                              pii_hmac_key=bytes(range(32)), pii_token_key=bytes(range(32, 64)))
        self.pipeline = compile_pipeline(load_policy_dir(policies), Metrics(), self.env)
        self.token = issue_token(state_dir, sub="bench", tenant="acme", roles=["analyst"])
        self.upstream = EmbeddedUpstream(ROOT / "triton_repo")
        self.loop.run_until_complete(self.upstream.start())
        by_model: dict[str, list[InferRequest]] = {m: [] for m in MODELS}
        for path, body in harness.workload():
            model = path.split("/")[3]
            by_model[model].append(decode_infer_request(model, "", body, header_length=None, limits=CodecLimits()))
        self.requests = {m: itertools.cycle(reqs) for m, reqs in by_model.items()}
        self.responses: dict[int, InferResponse] = {}
        # One meter per stage, as a pipeline keeps them (their metric children resolve once).
        self.meters = {b.name: StageMeter(b.name, self.pipeline.metrics) for b in self.pipeline.stages}

    def close(self) -> None:
        self.loop.run_until_complete(self.upstream.close())
        self.loop.close()

    def index(self, stage: str) -> int:
        names = [b.name for b in self.pipeline.stages]
        return next(i for i, n in enumerate(names) if n.startswith(stage) or stage in n)

    def prepare(self, model: str, upto: int) -> tuple[RequestContext, InferRequest, InferResponse]:
        """A context and request as stage ``upto`` receives them, and the upstream's answer."""
        ctx = RequestContext(request_id=new_request_id(), revision=self.pipeline.revision, action=Action.INFER,
                             transport="http", client_addr="127.0.0.1", model=model)
        ctx.bearer = self.token
        req = copy.deepcopy(next(self.requests[model]))
        key = id(req)

        async def run() -> tuple[InferRequest, InferResponse]:
            prior = Pipeline(revision=self.pipeline.revision, stages=self.pipeline.stages[:upto],
                             metrics=self.pipeline.metrics)
            await prior.admit(ctx)
            r = req
            for bound in prior.stages:
                if bound.stage.overrides("on_request"):
                    r = await bound.run(ctx, self.meters[bound.name], bound.stage.on_request(ctx, r), r)
            resp = await self.upstream.infer(r, timeout_s=10.0)
            return r, resp

        req, resp = self.loop.run_until_complete(run())
        self.responses[key] = resp
        return ctx, req, resp

    def run_stage(self, bound: BoundStage, ctx: RequestContext, req: InferRequest, resp: InferResponse) -> None:
        meter = self.meters[bound.name]

        async def hooks() -> None:
            stage = bound.stage
            if stage.overrides("on_call"):
                await bound.run(ctx, meter, stage.on_call(ctx), None)
            if stage.overrides("on_request"):
                await bound.run(ctx, meter, stage.on_request(ctx, req), req)
            if stage.overrides("on_response"):
                await bound.run(ctx, meter, stage.on_response(ctx, resp), resp)
            if stage.overrides("on_complete"):
                await stage.on_complete(ctx, None)

        self.loop.run_until_complete(hooks())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("stage-costs"))
    yield w
    w.close()


def _rounds(benchmark: Any) -> int:
    return 1 if benchmark.disabled else 300


def test_noop(benchmark: Any, world: World) -> None:
    async def nothing() -> None:
        return None

    benchmark.pedantic(lambda: world.loop.run_until_complete(nothing()), rounds=_rounds(benchmark), iterations=1)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stage", STAGES)
def test_stage(benchmark: Any, world: World, stage: str, model: str) -> None:
    index = world.index(stage)
    bound = world.pipeline.stages[index]
    seen: list[RequestContext] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        ctx, req, resp = world.prepare(model, index)
        seen.append(ctx)
        return (bound, ctx, req, resp), {}

    benchmark.pedantic(world.run_stage, setup=setup, rounds=_rounds(benchmark), iterations=1)
    # The stage really ran and admitted the call (a refusal would be a cheaper, wrong number).
    assert seen
    outcomes = [r for r in seen[-1].records if r.stage == bound.name]
    assert all(getattr(r, "outcome", "allow") != "deny" for r in outcomes), outcomes


def test_codec_decode(benchmark: Any, world: World) -> None:
    body = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
                                   "data": [float(i % 17) for i in range(64)]}]}).encode()
    decode: Callable[[], InferRequest] = lambda: decode_infer_request(  # noqa: E731
        "digits", "", body, header_length=None, limits=CodecLimits())
    result = benchmark.pedantic(decode, rounds=_rounds(benchmark), iterations=1)
    assert result.inputs[0].shape == (1, 64)
