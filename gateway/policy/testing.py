"""``infergate policy test DIR``: policy unit tests as data, run through the real pipeline.

Like ``opa test``: each case in ``DIR/tests/*.yaml`` gives a principal and a request and
states what must happen (allow or deny and the reason code, the masked output, the limits
that counted the call, the flag variant, the ε charged). The decision is never
re-implemented here: the runner compiles the directory with :func:`compile_pipeline`,
runs the call through the compiled stages in the order the service does (admit, model
metadata and conformance, request stages, the embedded onnxruntime upstream on the model
repository, response stages, completion), and compares what the stages did.

Each case gets a fresh compilation and fresh state (limits, budgets, canary statistics),
so cases are independent; ``repeat`` sends the same call several times within a case
(the expectations are about the last one), which is how a limit or a budget is tested.

Credentials are minted for the run: tokens from an ephemeral issuer trusted only by
this run's pipelines, and, for ``api_key: ID``, an ephemeral key bound to the compiled
entry of that id (its tenant and roles come from ``identity.yaml``). The PII keys are
fixed test keys, never the gateway's.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TextIO

import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from gateway.conformance import check_request
from gateway.context import Action, RequestContext
from gateway.errors import GatewayError, InternalError, NotFound
from gateway.fronts.http.codec import CodecLimits, decode_infer_request
from gateway.kserve import InferRequest, InferResponse
from gateway.observability.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.policy.compile import CompileEnv, compile_pipeline
from gateway.policy.loader import PolicyError, PolicyIssue, PolicySet, load_policy_dir, parse_yaml_document
from gateway.policy.model import StrictModel
from gateway.stages.authn import API_KEY_PREFIX, JwtAuthenticator, StaticKeys, TrustedIssuer, api_key_hash
from gateway.stages.feature_flags import served_variant
from gateway.stages.model_exposure import UNKNOWN_MODEL
from gateway.stages.ratelimit import LimitExceeded, response_headers
from gateway.upstream.base import Upstream

TEST_ISSUER = "infergate-policy-test"
TEST_AUDIENCE = "infergate-policy-test"
# Fixed, public test keys: masking is exercised, no real pseudonym or token is produced.
TEST_PII_HMAC_KEY = b"infergate-policy-test-hmac-key!!"
TEST_PII_TOKEN_KEY = b"infergate-policy-test-aes-key!!!"
MAX_REPEAT = 10_000
UPSTREAM_TIMEOUT_S = 10.0

# -- the test-file format ------------------------------------------------------------------


class TestPrincipal(StrictModel):
    """Who calls: a token's claims (sub, tenant, roles), or a service account of identity.yaml."""

    sub: StrictStr | None = Field(None, min_length=1, description="Subject of the token.")
    tenant: StrictStr | None = Field(None, min_length=1, description="Tenant claim of the token.")
    roles: tuple[StrictStr, ...] = Field((), description="Roles claim of the token.")
    api_key: StrictStr | None = Field(
        None, description="Call as the identity.yaml api_keys entry with this id (its tenant and roles).",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> TestPrincipal:
        if self.api_key is not None:
            if self.sub is not None or self.tenant is not None or self.roles:
                raise ValueError("give either api_key, or sub/tenant/roles, not both")
        elif self.sub is None or self.tenant is None:
            raise ValueError("a token principal needs sub and tenant (roles may be empty)")
        return self


class TestRequest(StrictModel):
    """The call. Inference inputs come from ``text``, ``inputs`` or ``inputs_file`` (one of them)."""

    model: StrictStr = Field(min_length=1)
    version: StrictStr = Field("", description="Explicit version; empty = the default.")
    action: Literal["infer", "metadata"] = "infer"
    text: StrictStr | tuple[StrictStr, ...] | None = Field(
        None, description="Shorthand for one BYTES input (the model's first input), shape [n].",
    )
    inputs: tuple[dict[StrictStr, Any], ...] | None = Field(
        None, description="KServe v2 JSON input tensors, exactly as in an HTTP request body.",
    )
    inputs_file: StrictStr | None = Field(
        None, description="A KServe v2 JSON request body, relative to the test file (within the tests dir).",
    )
    repeat: Annotated[StrictInt, Field(ge=1, le=MAX_REPEAT)] = Field(
        1, description="Send the call this many times; the expectations are about the last one.",
    )

    @model_validator(mode="after")
    def _inputs(self) -> TestRequest:
        given = [n for n in ("text", "inputs", "inputs_file") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of text, inputs, inputs_file, not {given}")
        if self.action == "infer" and not given:
            raise ValueError("an infer request needs text, inputs or inputs_file")
        return self


class ExpectedRateLimit(StrictModel):
    limit: StrictInt | None = Field(None, description="RateLimit-Limit of the tightest limit.")
    remaining: StrictInt | None = Field(None, description="RateLimit-Remaining of the tightest limit.")


class TestExpect(StrictModel):
    """What must happen. Only what is written is checked (``decision`` always)."""

    decision: Literal["allow", "deny"]
    reason: StrictStr | None = Field(None, description="The refusal's reason code (gateway/errors.py).")
    status: StrictInt | None = Field(None, description="The HTTP status a client would get.")
    stage: StrictStr | None = Field(None, description="The stage that refused (authn, authz, rate_limit, ...).")
    outputs: dict[StrictStr, tuple[Any, ...]] | None = Field(
        None, description="Exact output values by name (flattened; BYTES as text).",
    )
    output_contains: tuple[StrictStr, ...] = Field((), description="Texts some BYTES output must contain.")
    output_excludes: tuple[StrictStr, ...] = Field((), description="Texts no BYTES output may contain.")
    limits: tuple[StrictStr, ...] | None = Field(
        None, description="Names of the limits of limits.yaml that counted this call (any order).",
    )
    ratelimit: ExpectedRateLimit | None = None
    variant: StrictStr | None = Field(
        None, description="The variant a routing flag chose; \"\" = no flag routed the call.",
    )
    epsilon: Annotated[StrictFloat | StrictInt, Field(ge=0)] | None = Field(
        None, description="Privacy budget (ε) charged for the call.",
    )
    noised: StrictBool | None = Field(None, description="Whether the DP stage released a noised answer.")


class TestCase(StrictModel):
    name: StrictStr = Field(min_length=1)
    principal: TestPrincipal | None = Field(None, description="Omitted: no credential at all.")
    request: TestRequest
    expect: TestExpect


class TestFile(StrictModel):
    """``policies/tests/*.yaml``: unit tests of the policy next to it."""

    cases: tuple[TestCase, ...] = Field(min_length=1)


# -- results ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Observed:
    """What the compiled stages did with one call."""

    decision: str
    reason: str
    status: int
    stage: str | None
    outputs: dict[str, list[Any]] = field(default_factory=dict)
    limits: tuple[str, ...] = ()
    ratelimit: dict[str, int] = field(default_factory=dict)
    variant: str = ""
    epsilon: float = 0.0
    noised: bool = False

    def describe(self) -> str:
        parts = [self.decision if self.decision == "allow" else f"deny {self.reason} ({self.status})"]
        if self.stage:
            parts.append(f"stage={self.stage}")
        if self.limits:
            parts.append(f"limits={','.join(self.limits)}")
        if self.ratelimit:
            parts.append(f"ratelimit={self.ratelimit.get('limit')}/{self.ratelimit.get('remaining')} left")
        if self.variant:
            parts.append(f"variant={self.variant}")
        if self.epsilon:
            parts.append(f"epsilon={self.epsilon:g}")
        texts = {k: v for k, v in self.outputs.items() if v and all(isinstance(x, str) for x in v)}
        if texts:
            parts.append(f"outputs={json.dumps(texts, ensure_ascii=False)}")
        return " ".join(parts)


@dataclass(slots=True)
class CaseResult:
    file: str
    line: int
    name: str
    failures: list[str]
    observed: Observed | None
    duration_s: float
    error: str | None = None

    @property
    def passed(self) -> bool:
        return not self.failures and self.error is None


@dataclass(slots=True)
class SuiteResult:
    cases: list[CaseResult] = field(default_factory=list)
    issues: list[PolicyIssue] = field(default_factory=list)  # unreadable tests or policy

    @property
    def ok(self) -> bool:
        return not self.issues and bool(self.cases) and all(c.passed for c in self.cases)


# -- running -------------------------------------------------------------------------------


class _LimitRecorder:
    """The rate-limit stage's own report of which limits decided the call (RateLimitMetrics)."""

    def __init__(self) -> None:
        self.decided: list[tuple[str, str]] = []

    def limit_decision(self, limit: str, outcome: str) -> None:
        self.decided.append((limit, outcome))


@dataclass(frozen=True, slots=True)
class _Loaded:
    path: Path
    display: str
    case: TestCase
    line: int


class PolicyTestRunner:
    """Runs test files against one policy directory on one upstream (started by the caller)."""

    def __init__(self, policy: PolicySet, upstream: Upstream, *, repo_dir: Path) -> None:
        self.policy = policy
        self.upstream = upstream
        self.repo_dir = repo_dir
        self._key = Ed25519PrivateKey.generate()
        self._issuer = TrustedIssuer(issuer=TEST_ISSUER, audiences=(TEST_AUDIENCE,), algorithms=("EdDSA",),
                                     keys=StaticKeys({None: self._key.public_key()}))
        self._api_keys = {k.id for k in policy.identity.api_keys}

    def _compile(self, recorder: _LimitRecorder) -> Pipeline:
        upstream = self.upstream

        async def reinfer(req: InferRequest) -> InferResponse:
            return await upstream.infer(req, timeout_s=UPSTREAM_TIMEOUT_S)

        env = CompileEnv(extra_issuers=(self._issuer,), repo_dir=self.repo_dir, reinfer=reinfer,
                         pii_hmac_key=TEST_PII_HMAC_KEY, pii_token_key=TEST_PII_TOKEN_KEY, limit_metrics=recorder)
        return compile_pipeline(self.policy, Metrics(), env)

    def _credential(self, principal: TestPrincipal | None, pipeline: Pipeline) -> str | None:
        if principal is None:
            return None
        if principal.api_key is not None:
            authn = next(b.stage for b in pipeline.stages if isinstance(b.stage, JwtAuthenticator))
            entry = next((e for e in authn.api_keys.values() if e.id == principal.api_key), None)
            if entry is None:
                raise _CaseError(f"no api_keys entry with id {principal.api_key!r} in identity.yaml "
                                 f"(ids: {sorted(self._api_keys)})")
            key = API_KEY_PREFIX + secrets.token_urlsafe(32)
            # The compiled entry (tenant, roles) under an ephemeral key: the real API-key path.
            authn.api_keys = {**authn.api_keys, api_key_hash(key): entry}
            return key
        now = int(time.time())
        claims = {"iss": TEST_ISSUER, "aud": TEST_AUDIENCE, "sub": principal.sub, "tenant": principal.tenant,
                  "roles": list(principal.roles), "iat": now, "exp": now + 600}
        return jwt.encode(claims, self._key, algorithm="EdDSA")

    async def run_case(self, loaded: _Loaded) -> CaseResult:
        case = loaded.case
        start = time.perf_counter()
        recorder = _LimitRecorder()
        try:
            pipeline = self._compile(recorder)
            body = _request_body(case.request, loaded.path) if case.request.action == "infer" else b""
            observed: Observed | None = None
            for _ in range(case.request.repeat):
                recorder.decided.clear()
                token = self._credential(case.principal, pipeline)
                observed = await self._call(pipeline, case.request, token, body, recorder)
        except _CaseError as exc:
            return CaseResult(loaded.display, loaded.line, case.name, [], None, time.perf_counter() - start,
                              error=str(exc))
        assert observed is not None  # noqa: S101 - repeat >= 1
        return CaseResult(loaded.display, loaded.line, case.name, compare(case.expect, observed), observed,
                          time.perf_counter() - start)

    async def _call(self, pipeline: Pipeline, request: TestRequest, token: str | None, body: bytes,
                    recorder: _LimitRecorder) -> Observed:
        """One call in the service's order (gateway/service.py ``call`` and ``infer``)."""
        ctx = RequestContext(request_id=secrets.token_hex(8), revision=pipeline.revision,
                             action=Action(request.action), transport="policy-test", client_addr="127.0.0.1",
                             model=request.model, version=request.version, bearer=token)
        error: GatewayError | None = None
        resp: InferResponse | None = None
        try:
            if pipeline.preauth is not None:
                await pipeline.preauth.admit(ctx.client_addr, ctx)
            await pipeline.admit(ctx)
            resp = await self._work(pipeline, ctx, request, body)
        except GatewayError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - reported as the case's outcome, like the service's 500
            error = InternalError(f"{type(exc).__name__}: {exc}", reason="internal")
        finally:
            await pipeline.complete(ctx, error)
        return _observe(ctx, error, resp, recorder)

    async def _work(self, pipeline: Pipeline, ctx: RequestContext, request: TestRequest,
                    body: bytes) -> InferResponse | None:
        assert ctx.model is not None  # noqa: S101 - set from the request
        limits = self.policy.gateway.limits
        try:
            meta = await self.upstream.model_metadata(ctx.model, ctx.version, timeout_s=UPSTREAM_TIMEOUT_S)
        except NotFound as exc:
            raise NotFound(UNKNOWN_MODEL, reason="model_unknown") from exc
        if request.action == "metadata":
            return None
        req = decode_infer_request(request.model, request.version, body, header_length=None, limits=CodecLimits(
            max_elements_per_tensor=limits.max_elements_per_tensor, max_dims=limits.max_dims,
            max_bytes_element=limits.max_bytes_element, max_inputs=limits.max_inputs))
        check_request(req, meta)
        ctx.declared_outputs = tuple(spec.name for spec in meta.outputs)  # as gateway/service.py infer
        upstream = self.upstream

        async def call_upstream(c: RequestContext, r: InferRequest) -> InferResponse:
            c.notes["upstream_called"] = True
            try:
                return await upstream.infer(r, timeout_s=UPSTREAM_TIMEOUT_S)
            except NotFound as exc:
                raise NotFound(UNKNOWN_MODEL, reason="model_unknown") from exc

        return await pipeline.infer(ctx, req, call_upstream)


class _CaseError(Exception):
    """A case that cannot run (bad inputs file, unknown API key id): reported, counted as failed."""


def _request_body(request: TestRequest, test_file: Path) -> bytes:
    if request.text is not None:
        texts = [request.text] if isinstance(request.text, str) else list(request.text)
        return json.dumps({"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES",
                                       "data": texts}]}).encode()
    if request.inputs is not None:
        return json.dumps({"inputs": list(request.inputs)}).encode()
    assert request.inputs_file is not None  # noqa: S101 - the model validator requires one
    base = test_file.parent.resolve()
    path = (base / request.inputs_file).resolve()
    if not path.is_relative_to(base):
        raise _CaseError(f"inputs_file {request.inputs_file!r} is outside {base}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _CaseError(f"inputs_file {request.inputs_file!r}: {exc.strerror}") from exc


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def _observe(ctx: RequestContext, error: GatewayError | None, resp: InferResponse | None,
             recorder: _LimitRecorder) -> Observed:
    denied = [r.stage for r in ctx.records if r.outcome == "denied"]
    outputs = {t.name: [_plain(v) for v in t.data.ravel().tolist()] for t in resp.outputs} if resp else {}
    if isinstance(error, LimitExceeded):
        rate = {"limit": error.limit, "remaining": max(0, error.remaining)}
    else:
        headers = response_headers(ctx)
        rate = {"limit": int(headers["RateLimit-Limit"]), "remaining": int(headers["RateLimit-Remaining"])} \
            if "RateLimit-Limit" in headers else {}
    served = served_variant(ctx)
    dp = ctx.notes.get("dp")
    epsilon = float(dp.get("epsilon", 0.0)) if isinstance(dp, dict) else 0.0
    return Observed(
        decision="allow" if error is None else "deny",
        reason="ok" if error is None else error.reason,
        status=200 if error is None else error.http_status,
        stage=denied[-1] if denied else None,
        outputs=outputs,
        limits=tuple(sorted({name for name, _ in recorder.decided})),
        ratelimit=rate,
        variant=served[1] if served else "",
        epsilon=epsilon,
        noised=error is None and isinstance(dp, dict) and bool(dp.get("outputs")),
    )


def compare(expect: TestExpect, seen: Observed) -> list[str]:
    """Every difference between what a case expects and what the stages did."""
    failures = []
    if expect.decision != seen.decision:
        got = "allow" if seen.decision == "allow" else f"deny with reason {seen.reason} ({seen.status})"
        failures.append(f"expected {expect.decision}, got {got}")
    if expect.reason is not None and expect.reason != seen.reason:
        failures.append(f"expected reason {expect.reason}, got {seen.reason}")
    if expect.status is not None and expect.status != seen.status:
        failures.append(f"expected status {expect.status}, got {seen.status}")
    if expect.stage is not None and expect.stage != seen.stage:
        failures.append(f"expected the refusal from stage {expect.stage}, got {seen.stage or 'none'}")
    if expect.outputs is not None:
        for name, values in expect.outputs.items():
            if seen.outputs.get(name) != list(values):
                failures.append(f"output {name}: expected {list(values)!r}, got {seen.outputs.get(name)!r}")
    texts = [v for values in seen.outputs.values() for v in values if isinstance(v, str)]
    failures.extend(f"no output contains {needle!r} (outputs: {texts!r})"
                    for needle in expect.output_contains if not any(needle in t for t in texts))
    failures.extend(f"an output contains {needle!r}, which must not be released"
                    for needle in expect.output_excludes if any(needle in t for t in texts))
    if expect.limits is not None and set(expect.limits) != set(seen.limits):
        failures.append(f"expected limits {sorted(expect.limits)}, got {list(seen.limits)}")
    if expect.ratelimit is not None:
        for key in ("limit", "remaining"):
            want = getattr(expect.ratelimit, key)
            if want is not None and seen.ratelimit.get(key) != want:
                failures.append(f"expected RateLimit-{key.capitalize()} {want}, got {seen.ratelimit.get(key)}")
    if expect.variant is not None and expect.variant != seen.variant:
        failures.append(f"expected variant {expect.variant or '(none)'}, got {seen.variant or '(none)'}")
    if expect.epsilon is not None and not math.isclose(float(expect.epsilon), seen.epsilon, abs_tol=1e-9):
        failures.append(f"expected epsilon {expect.epsilon:g} charged, got {seen.epsilon:g}")
    if expect.noised is not None and expect.noised != seen.noised:
        failures.append(f"expected {'a noised' if expect.noised else 'no noised'} answer")
    return failures


def load_test_files(tests_dir: Path) -> tuple[list[_Loaded], list[PolicyIssue]]:
    """Every case of ``tests_dir/*.yaml``, with its line; unreadable files become issues."""
    cases: list[_Loaded] = []
    issues: list[PolicyIssue] = []
    files = sorted([*tests_dir.glob("*.yaml"), *tests_dir.glob("*.yml")]) if tests_dir.is_dir() else []
    if not files:
        return [], [PolicyIssue(str(tests_dir), 1, 1, "no test files (*.yaml) found",
                                "write policy tests as tests/*.yaml next to the policy files")]
    for path in files:
        display = f"{tests_dir.name}/{path.name}"
        try:
            parsed, node = parse_yaml_document(path.read_text(encoding="utf-8"), display, TestFile)
        except PolicyError as exc:
            issues.extend(exc.issues)
            continue
        except (OSError, UnicodeDecodeError) as exc:
            issues.append(PolicyIssue(display, 1, 1, f"cannot read: {exc}", "save the file as UTF-8"))
            continue
        lines = _case_lines(node)
        cases.extend(_Loaded(path, display, case, lines[i] if i < len(lines) else 1)
                     for i, case in enumerate(parsed.cases))
    return cases, issues


def _case_lines(node: yaml.Node | None) -> list[int]:
    if not isinstance(node, yaml.MappingNode):
        return []
    for key, value in node.value:
        if isinstance(key, yaml.ScalarNode) and key.value == "cases" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


async def run_suite(policy_dir: Path, tests_dir: Path, upstream: Upstream, *, repo_dir: Path,
                    only: re.Pattern[str] | None = None) -> SuiteResult:
    """Load the policy and the tests, run every case (or those whose name matches ``only``)."""
    result = SuiteResult()
    try:
        policy = load_policy_dir(policy_dir)
    except PolicyError as exc:
        result.issues.extend(exc.issues)
        return result
    cases, issues = load_test_files(tests_dir)
    result.issues.extend(issues)
    runner = PolicyTestRunner(policy, upstream, repo_dir=repo_dir)
    for loaded in cases:
        if only is None or only.search(loaded.case.name):
            result.cases.append(await runner.run_case(loaded))
    return result


def report(result: SuiteResult, out: TextIO, *, verbose: bool = False) -> None:
    """opa-test-like output: failures (every case with ``verbose``), then PASS/FAIL counts."""
    for issue in result.issues:
        print(f"ERROR: {issue}", file=out)
    current = None
    for case in result.cases:
        if not verbose and case.passed:
            continue
        if case.file != current:
            current = case.file
            print(f"{case.file}:", file=out)
        status = "PASS" if case.passed else ("ERROR" if case.error else "FAIL")
        print(f"{case.file}:{case.line}: {case.name}: {status} ({case.duration_s * 1000:.1f}ms)", file=out)
        if case.error:
            print(f"    {case.error}", file=out)
        for failure in case.failures:
            print(f"    {failure}", file=out)
        if verbose and case.observed is not None:
            print(f"    observed: {case.observed.describe()}", file=out)
    total = len(result.cases)
    passed = sum(c.passed for c in result.cases)
    print("-" * 80, file=out)
    if total:
        print(f"PASS: {passed}/{total}", file=out)
        if passed != total:
            print(f"FAIL: {total - passed}/{total}", file=out)
    if result.issues:
        print(f"ERROR: {len(result.issues)} problem(s) in the test files or the policy", file=out)


def schema_of_tests() -> Mapping[str, Any]:
    """JSON Schema of the test files (for editors), from :class:`TestFile`."""
    return TestFile.model_json_schema(mode="validation")
