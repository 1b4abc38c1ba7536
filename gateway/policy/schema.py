"""The shape of every policy file, as frozen pydantic models.

``extra="forbid"`` everywhere, so a misspelt key is an error rather than a silent
default; strict scalar types, so YAML 1.1's ``no`` never becomes a role or a model name.
Each file in ``policies/`` maps to one top-level model (see :data:`POLICY_FILES`).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from gateway.stages.base import Mode

NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$"
_NAME_RE = re.compile(NAME_PATTERN)

PositiveInt = Annotated[StrictInt, Field(gt=0)]
Seconds = Annotated[StrictFloat | StrictInt, Field(gt=0, le=3600)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LimitsPolicy(_Strict):
    """Hard caps applied while parsing, before any model or stage sees the request."""

    max_body_bytes: PositiveInt = Field(8 * 1024 * 1024, description="Body cap, also after decompression.")
    max_elements_per_tensor: PositiveInt = Field(1_048_576, description="Elements in one tensor.")
    max_dims: PositiveInt = Field(8, le=64, description="Rank of one tensor.")
    max_bytes_element: PositiveInt = Field(65_536, description="Bytes in one BYTES element.")
    max_inputs: PositiveInt = Field(64, description="Input tensors in one request.")


class UpstreamPolicy(_Strict):
    infer_timeout_s: Seconds = Field(10.0, description="Deadline of one inference call.")
    metadata_timeout_s: Seconds = Field(2.0, description="Deadline of metadata and readiness calls.")
    metadata_cache_s: Annotated[StrictFloat | StrictInt, Field(ge=0, le=3600)] = Field(
        30.0, description="How long model metadata is cached for request validation.",
    )


class ModelPolicy(_Strict):
    versions: tuple[Annotated[StrictStr, Field(pattern=r"^[0-9]{1,19}$")], ...] | None = Field(
        None, description="Versions that may be called explicitly; omitted = any the upstream serves.",
    )


class StageSwitch(_Strict):
    mode: Mode = Mode.ENFORCE


class StagesPolicy(_Strict):
    """Per-stage switches. Authentication has no switch: it is always enforced."""

    model_exposure: StageSwitch = StageSwitch()


class GatewayPolicy(_Strict):
    """``gateway.yaml``: limits, upstream deadlines and the models the gateway exposes."""

    limits: LimitsPolicy = LimitsPolicy()
    upstream: UpstreamPolicy = UpstreamPolicy()
    stages: StagesPolicy = StagesPolicy()
    models: dict[StrictStr, ModelPolicy] = Field(
        default_factory=dict,
        description="Models the gateway exposes; any other name is answered like an unknown model.",
    )

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, ModelPolicy]) -> dict[str, ModelPolicy]:
        for name in value:
            if not _NAME_RE.match(name):
                raise ValueError(f"model name {name!r} must match {NAME_PATTERN}")
        return value


Algorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]


class IssuerPolicy(_Strict):
    """A trusted token issuer with a static public key."""

    issuer: StrictStr = Field(min_length=1)
    audiences: tuple[StrictStr, ...] = Field(min_length=1)
    algorithms: tuple[Algorithm, ...] = Field(min_length=1)
    public_key_pem: StrictStr = Field(min_length=1, description="PEM SubjectPublicKeyInfo.")
    tenant_claim: StrictStr = "tenant"
    roles_claim: StrictStr = "roles"
    leeway_s: Annotated[StrictInt, Field(ge=0, le=300)] = 30
    max_lifetime_s: Annotated[StrictInt, Field(gt=0, le=86_400 * 7)] = 86_400


class IdentityPolicy(_Strict):
    """``identity.yaml``: who may call. The dev issuer is added by ``--dev`` only."""

    issuers: tuple[IssuerPolicy, ...] = ()
    allow_unauthenticated_health: StrictBool = Field(
        True, description="Health endpoints answer without a token (load balancers and probes).",
    )


POLICY_FILES: dict[str, type[_Strict]] = {
    "gateway.yaml": GatewayPolicy,
    "identity.yaml": IdentityPolicy,
}
