"""Build the frozen :class:`Pipeline` of one policy revision.

Stage order is fixed here, in code: YAML only enables, configures or shadows. A later
stage relies on an earlier one (authorization needs the principal), so reordering is not
a policy decision.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.observability.metrics import Metrics
from gateway.pipeline import BoundStage, Pipeline
from gateway.policy.grant_outputs import check_grant_outputs, repo_outputs
from gateway.policy.loader import PolicyError, PolicyIssue, PolicySet
from gateway.policy.schema import IssuerPolicy
from gateway.secret_strength import text_secret_problem
from gateway.stages.adversarial import AdversarialDetector, DetectorMetrics, Reinfer, build_adversarial_stage
from gateway.stages.authn import (
    ApiKey,
    JwtAuthenticator,
    KeyResolver,
    StaticKeys,
    TrustedIssuer,
    VerifyKey,
    key_fits,
    signing_jwk_problem,
)
from gateway.stages.authz import build_authorizer, compile_grants
from gateway.stages.base import Mode
from gateway.stages.dp_noise import build_dp_stage
from gateway.stages.feature_flags import FlagsRuntime, build_flags_stage
from gateway.stages.model_exposure import ModelExposure
from gateway.stages.pii_mask import build_pii_stage
from gateway.stages.ratelimit import RateLimitMetrics, build_preauth_limiter, build_ratelimit_stage
from gateway.stages.sanitize import build_sanitize_stage
from gateway.state.base import SharedState
from gateway.state.memory import MemoryState
from privacy.dp.ledger import BudgetLedger, InMemoryBudgetLedger

# Builds (or reuses across revisions) a fetching key source for a JWKS/discovery issuer.
KeySourceFactory = Callable[[IssuerPolicy], KeyResolver]


T = TypeVar("T")


def _check_static_jwk(jwk: object, seen: dict[str | None, VerifyKey]) -> None:
    """Hold a JWK written into policy to the rules a fetched JWKS is held to.

    # SECURITY: a key set pasted into identity.yaml may carry an IdP's encryption key, a
    # private key or two keys under one kid as easily as a fetched one; here each is a
    # policy error (an operator can fix it) rather than a skipped key.
    """
    problem = signing_jwk_problem(jwk)
    if problem is not None:
        raise ValueError(f"keys.jwks: a key cannot verify tokens ({problem}); only public signature keys belong here")
    assert isinstance(jwk, dict)  # noqa: S101 - signing_jwk_problem checked it
    kid = jwk.get("kid")
    if kid in seen:
        raise ValueError(f"keys.jwks: two keys share the kid {kid!r}" if kid is not None
                         else "keys.jwks: more than one key without a kid")


def _static_keys(cfg: IssuerPolicy) -> StaticKeys:
    keys: dict[str | None, VerifyKey] = {}
    source = cfg.keys
    if source.pem is not None:
        loaded: Any = load_pem_public_key(source.pem.encode())
        keys[None] = loaded
    elif source.jwks is not None:
        raw_keys = source.jwks.get("keys")
        if not isinstance(raw_keys, list) or not raw_keys:
            raise ValueError("keys.jwks must be a JWK set with a non-empty 'keys' list")
        for jwk in raw_keys:
            _check_static_jwk(jwk, keys)
            parsed = jwt.PyJWK(jwk)
            keys[jwk.get("kid")] = parsed.key
    elif source.hs_secret_env is not None:
        secret = os.environ.get(source.hs_secret_env, "").encode()
        # SECURITY: HS is accepted only with a real shared secret: at least the hash size
        # (RFC 7518 §3.2) and not guessable (RFC 8725 §3.5), or any token it signed is forgeable.
        problem = text_secret_problem(secret)
        if problem is not None:
            raise ValueError(f"environment variable {source.hs_secret_env}: {problem}")
        keys[None] = secret
    for key in keys.values():
        if not all(key_fits(alg, key) for alg in cfg.algorithms):
            raise ValueError(f"a key of type {type(key).__name__} does not fit algorithms {list(cfg.algorithms)}")
    return StaticKeys(keys)


def build_issuers(policy: PolicySet, key_sources: KeySourceFactory | None) -> dict[str, TrustedIssuer]:
    issuers: dict[str, TrustedIssuer] = {}
    for index, cfg in enumerate(policy.identity.issuers):
        try:
            if cfg.keys.jwks_url is not None or cfg.keys.oidc_discovery is not None:
                if key_sources is None:
                    raise ValueError("JWKS issuers need the running gateway's key sources")  # noqa: TRY301
                resolver: KeyResolver = key_sources(cfg)
            else:
                resolver = _static_keys(cfg)
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            raise PolicyError([PolicyIssue("identity.yaml", 1, 1, f"issuers[{index}] ({cfg.issuer}): {exc}")]) from exc
        issuers[cfg.issuer] = TrustedIssuer(
            issuer=cfg.issuer, audiences=cfg.audiences, algorithms=cfg.algorithms, keys=resolver,
            subject_claim=cfg.subject_claim, tenant_claim=cfg.tenant_claim, roles_claim=cfg.roles_claim,
            required_claims=cfg.required_claims, leeway_s=cfg.leeway_s, max_lifetime_s=cfg.max_lifetime_s,
            token_types=tuple(t.lower() for t in cfg.token_types) if cfg.token_types is not None else None,
            required_scope=cfg.required_scope,
            allowed_roles=frozenset(cfg.allowed_roles) if cfg.allowed_roles is not None else None,
        )
    return issuers


@dataclass(frozen=True, slots=True)
class CompileEnv:
    """What a revision's stages need from the running process (shared across revisions)."""

    extra_issuers: tuple[TrustedIssuer, ...] = ()
    key_sources: KeySourceFactory | None = None
    # Where the models' profile.json files live (the local Triton repository).
    repo_dir: Path | None = None
    # A second upstream call for feature squeezing (never re-runs the pipeline).
    reinfer: Reinfer | None = None
    detector_metrics: DetectorMetrics | None = None
    # Keys of the PII operators (keyed pseudonyms, reversible tokens); from the state dir.
    pii_hmac_key: bytes = b""
    pii_token_key: bytes = b""
    # Canary statistics and rollback overrides outlive revisions.
    flags_runtime: FlagsRuntime = field(default_factory=FlagsRuntime.create)
    # Shared state for limits (Redis with --redis, else this process) and the local fallback.
    state: SharedState = field(default_factory=MemoryState)
    local_state: MemoryState = field(default_factory=MemoryState)
    limit_metrics: RateLimitMetrics | None = None
    # Privacy budgets: one ledger and one clock for every revision (in memory by default).
    dp_ledger: BudgetLedger = field(default_factory=InMemoryBudgetLedger)


def _stage(pipeline: Pipeline | None, cls: type[T]) -> T | None:
    if pipeline is None:
        return None
    for bound in pipeline.stages:
        if isinstance(bound.stage, cls):
            return bound.stage
    return None


def compile_pipeline(policy: PolicySet, metrics: Metrics, env: CompileEnv | None = None, *,
                     previous: Pipeline | None = None) -> Pipeline:
    """Compile stages; a key or setting that cannot be built is a :class:`PolicyError`.

    ``previous`` is the pipeline being replaced: stages with memory (query history)
    carry it over, so a reload does not give an attacker a clean slate.
    """
    env = env or CompileEnv()
    issuers = build_issuers(policy, env.key_sources)
    for extra in env.extra_issuers:
        issuers[extra.issuer] = extra
    api_keys = {k.sha256: ApiKey(k.id, k.tenant, frozenset(k.roles)) for k in policy.identity.api_keys}
    grants, role_actions = compile_grants(policy.access)
    if env.repo_dir is not None:
        output_problems = check_grant_outputs(policy.access, repo_outputs(env.repo_dir))
        if output_problems:
            raise PolicyError([PolicyIssue("access.yaml", 1, 1, message, hint) for message, hint in output_problems])
    try:
        sanitizer = build_sanitize_stage(policy.inputs.sanitize, env.repo_dir)
        adversarial = build_adversarial_stage(
            policy.inputs.adversarial, env.repo_dir or Path("triton_repo"), env.reinfer, env.detector_metrics,
            previous=_stage(previous, AdversarialDetector),
        )
    except ValueError as exc:
        raise PolicyError([PolicyIssue("inputs.yaml", 1, 1, str(exc))]) from exc
    try:
        unmask_roles = {role for role, actions in role_actions.items() if "pii:unmask" in actions}
        pii = build_pii_stage(policy.pii, hmac_key=env.pii_hmac_key, token_key=env.pii_token_key,
                              unmask_roles=unmask_roles)
    except ValueError as exc:
        raise PolicyError([PolicyIssue("pii.yaml", 1, 1, str(exc))]) from exc
    try:
        dp = build_dp_stage(policy.privacy, env.dp_ledger, metrics=metrics)
    except ValueError as exc:
        raise PolicyError([PolicyIssue("privacy.yaml", 1, 1, str(exc))]) from exc
    try:
        limiter = build_ratelimit_stage(policy.limits, env.state, env.limit_metrics, local_state=env.local_state)
        preauth = build_preauth_limiter(policy.limits, env.state, env.limit_metrics, local_state=env.local_state)
    except ValueError as exc:
        raise PolicyError([PolicyIssue("limits.yaml", 1, 1, str(exc))]) from exc
    flags = build_flags_stage(policy.flags_raw, policy, env.flags_runtime)
    stages = (
        # SECURITY: authentication and authorization are always enforced; no policy switch.
        BoundStage(JwtAuthenticator(issuers=issuers, api_keys=api_keys), Mode.ENFORCE),
        # Routing before exposure and authorization: a request is authorized for the model
        # and version it is actually routed to. Enforce only (shadow would split the rewrite).
        BoundStage(flags, Mode.ENFORCE),
        BoundStage(ModelExposure(models=policy.gateway.models), policy.gateway.stages.model_exposure.mode),
        BoundStage(build_authorizer(grants, role_actions, non_enumeration=policy.access.non_enumeration),
                   Mode.ENFORCE),
        # Limits count only callers the policy admits, per tenant/subject/role/model.
        BoundStage(limiter, Mode.ENFORCE),
        # Sanitizing runs before anything reads text (PII masking needs normalized input).
        BoundStage(sanitizer, policy.inputs.sanitize.mode),
        BoundStage(adversarial, Mode.ENFORCE),  # per-model modes live inside the stage
        # PII masking sees normalized text on the way in; on the way out it runs after the
        # model and before anything reaches the client (response stages run in reverse).
        BoundStage(pii, policy.pii.mode),
        # SECURITY: DP is always enforced (shadow would release raw outputs). Last on the way
        # in (it charges only requests every other stage admitted), first on the way out.
        BoundStage(dp, Mode.ENFORCE),
    )
    return Pipeline(revision=policy.revision, stages=stages, metrics=metrics, preauth=preauth)
