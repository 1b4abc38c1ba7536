"""Role-based access control, tenant-scoped, deny by default (Envoy's RBAC filter).

Runs after authentication (it needs the principal) and before anything reads a body.
The policy is compiled once per revision into a lookup table, so a decision is a few
set look-ups: (tenant, role) -> model -> actions and versions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from gateway.context import Action, RequestContext
from gateway.errors import NotFound, PermissionDenied
from gateway.policy.schema import MODEL_ACTIONS, AccessPolicy
from gateway.stages.base import Stage
from gateway.stages.model_exposure import UNKNOWN_MODEL

ANY_VERSION: frozenset[str] = frozenset({"*"})


@dataclass(frozen=True, slots=True)
class ModelGrant:
    actions: frozenset[str]
    versions: frozenset[str]  # {"*"} = any


# tenant -> role -> model -> grants
GrantTable = Mapping[str, Mapping[str, Mapping[str, tuple[ModelGrant, ...]]]]


def compile_grants(policy: AccessPolicy) -> tuple[GrantTable, dict[str, frozenset[str]]]:
    """Expand ``*`` against each tenant's models once, so a request does no wildcard work."""
    table: dict[str, dict[str, dict[str, list[ModelGrant]]]] = {}
    global_actions: dict[str, set[str]] = {}
    for tenant, tenant_policy in policy.tenants.items():
        scope = set(tenant_policy.models)
        per_role = table.setdefault(tenant, {})
        for role, grants in policy.roles.items():
            per_model = per_role.setdefault(role, {})
            for grant in grants:
                actions = frozenset(grant.actions)
                if "*" in actions:
                    actions = frozenset({"infer", "metadata", "audit:read", "audit:erase", "budget:admin",
                                         "pii:unmask", "policy:read", "drift:read"})
                global_actions.setdefault(role, set()).update(a for a in actions if a not in MODEL_ACTIONS)
                if not actions & MODEL_ACTIONS:
                    continue  # a gateway-level grant (audit:read, ...) makes no model visible
                models = scope if "*" in grant.models else scope & set(grant.models)
                versions = frozenset(grant.versions) if grant.versions is not None else ANY_VERSION
                for model in models:
                    per_model.setdefault(model, []).append(ModelGrant(actions, versions))
    frozen: dict[str, dict[str, dict[str, tuple[ModelGrant, ...]]]] = {
        t: {r: {m: tuple(g) for m, g in models.items()} for r, models in roles.items()}
        for t, roles in table.items()
    }
    return frozen, {role: frozenset(actions) for role, actions in global_actions.items()}


@dataclass(frozen=True, slots=True)
class RoleAuthorizer(Stage):
    """Decides whether the principal may do ``ctx.action`` on ``ctx.model``/``ctx.version``."""

    name: ClassVar[str] = "authz"
    grants: GrantTable
    role_actions: Mapping[str, frozenset[str]]
    non_enumeration: bool = True

    async def on_call(self, ctx: RequestContext) -> None:
        principal = ctx.require_principal()
        tenant_table = self.grants.get(principal.tenant)
        if tenant_table is None:
            raise PermissionDenied(reason="authz_unknown_tenant")
        if ctx.action is Action.SERVER or ctx.model is None:
            return  # server metadata: any authenticated principal of a known tenant
        action = ctx.action.value
        visible = False
        for role in principal.roles:
            for grant in tenant_table.get(role, {}).get(ctx.model, ()):
                visible = True
                if action in grant.actions and (grant.versions is ANY_VERSION or not ctx.version
                                                or ctx.version in grant.versions):
                    ctx.note("authz", f"{role}:{action}")
                    return
        if not visible and self.non_enumeration:
            # SECURITY: a model outside the caller's reach looks exactly like one that does
            # not exist: same status, same body (non-enumeration).
            raise NotFound(UNKNOWN_MODEL, reason="authz_model_not_visible")
        raise PermissionDenied(f"not allowed to {action} this model", reason="authz_denied")

    def allows(self, ctx: RequestContext, permission: str) -> bool:
        """For gateway-level permissions (audit:read, budget:admin, ...), not model actions."""
        principal = ctx.require_principal()
        if principal.tenant not in self.grants:
            return False
        return any(permission in self.role_actions.get(role, frozenset()) for role in principal.roles)
