"""Build the frozen :class:`Pipeline` of one policy revision.

Stage order is fixed here, in code: YAML only enables, configures or shadows. A later
stage may rely on an earlier one (authorization needs the principal), so reordering is
not a policy decision.
"""

from __future__ import annotations

from gateway.errors import GatewayError
from gateway.observability.metrics import Metrics
from gateway.pipeline import BoundStage, Pipeline
from gateway.policy.loader import PolicyError, PolicyIssue, PolicySet
from gateway.stages.authn import JwtAuthenticator, TrustedIssuer
from gateway.stages.base import Mode
from gateway.stages.model_exposure import ModelExposure


def compile_pipeline(policy: PolicySet, metrics: Metrics, *, extra_issuers: tuple[TrustedIssuer, ...] = ()
                     ) -> Pipeline:
    """Compile stages; a key or setting that cannot be built is a :class:`PolicyError`."""
    issuers: dict[str, TrustedIssuer] = {}
    for index, cfg in enumerate(policy.identity.issuers):
        try:
            issuers[cfg.issuer] = TrustedIssuer.from_pem(
                cfg.public_key_pem,
                issuer=cfg.issuer,
                audiences=cfg.audiences,
                algorithms=cfg.algorithms,
                tenant_claim=cfg.tenant_claim,
                roles_claim=cfg.roles_claim,
                leeway_s=cfg.leeway_s,
                max_lifetime_s=cfg.max_lifetime_s,
            )
        except (ValueError, TypeError, GatewayError) as exc:
            raise PolicyError([PolicyIssue("identity.yaml", 1, 1, f"issuers[{index}]: {exc}")]) from exc
    for extra in extra_issuers:
        issuers[extra.issuer] = extra

    stages = (
        # SECURITY: authentication is always enforced; it has no policy switch.
        BoundStage(JwtAuthenticator(issuers=issuers), Mode.ENFORCE),
        BoundStage(ModelExposure(models=policy.gateway.models), policy.gateway.stages.model_exposure.mode),
    )
    return Pipeline(revision=policy.revision, stages=stages, metrics=metrics)
