"""Which file of ``policies/`` holds which section, and the model that validates it.

One place to see the whole policy surface. Each stage module owns its section's model
(config next to the behaviour it configures); this registry only maps file names.
"""

from __future__ import annotations

from pydantic import BaseModel

from gateway.policy.schema import AccessPolicy, GatewayPolicy, IdentityPolicy
from gateway.stages.adversarial import InputsPolicy
from gateway.stages.dp_noise import DpPolicy
from gateway.stages.pii_mask import PiiPolicy
from gateway.stages.ratelimit import RateLimitPolicy

# file name -> (PolicySet field, model)
POLICY_FILES: dict[str, tuple[str, type[BaseModel]]] = {
    "gateway.yaml": ("gateway", GatewayPolicy),
    "identity.yaml": ("identity", IdentityPolicy),
    "access.yaml": ("access", AccessPolicy),
    "inputs.yaml": ("inputs", InputsPolicy),
    "limits.yaml": ("limits", RateLimitPolicy),
    "pii.yaml": ("pii", PiiPolicy),
    "privacy.yaml": ("privacy", DpPolicy),
}
