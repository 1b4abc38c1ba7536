"""Role-based access control, tenant-scoped, deny by default (Envoy's RBAC filter).

Runs after authentication (it needs the principal) and before anything reads a body.
The policy is compiled once per revision into a lookup table, so a decision is a few
set look-ups: (tenant, role) -> model -> actions, versions and released outputs.

Output restriction (OWASP API3, broken object property level authorization): a grant
may name the outputs it releases. The request side refuses asking for any other, and
narrows a request that names none to the released ones; the response side drops any
other output the upstream sends anyway, so a misbehaving model cannot widen a grant.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import structlog

from gateway.context import Action, RequestContext
from gateway.errors import NotFound, PermissionDenied
from gateway.kserve import InferRequest, InferResponse, RequestedOutput
from gateway.policy.schema import MODEL_ACTIONS, AccessPolicy
from gateway.stages.base import Stage
from gateway.stages.model_exposure import UNKNOWN_MODEL

ANY_VERSION: frozenset[str] = frozenset({"*"})
OUTPUT_DENIED = "authz_output_denied"
_SHOWN_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")

log = structlog.get_logger("gateway.authz")


@dataclass(frozen=True, slots=True)
class ModelGrant:
    actions: frozenset[str]
    versions: frozenset[str]  # {"*"} = any
    outputs: frozenset[str] | None = None  # None = every output


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
                outputs = frozenset(grant.outputs) if grant.outputs is not None else None
                for model in models:
                    per_model.setdefault(model, []).append(ModelGrant(actions, versions, outputs))
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

    def visible_versions(self, ctx: RequestContext) -> frozenset[str] | None:
        """Versions of ``ctx.model`` the caller's grants for ``ctx.action`` cover (None = any)."""
        principal = ctx.require_principal()
        versions: set[str] = set()
        for role in principal.roles:
            for grant in self.grants.get(principal.tenant, {}).get(role, {}).get(ctx.model or "", ()):
                if ctx.action.value not in grant.actions:
                    continue
                if grant.versions is ANY_VERSION:
                    return None
                versions |= grant.versions
        return frozenset(versions)

    def allows(self, ctx: RequestContext, permission: str) -> bool:
        """For gateway-level permissions (audit:read, budget:admin, ...), not model actions."""
        principal = ctx.require_principal()
        if principal.tenant not in self.grants:
            return False
        return any(permission in self.role_actions.get(role, frozenset()) for role in principal.roles)

    def released_outputs(self, ctx: RequestContext) -> frozenset[str] | None:
        """Outputs the caller may receive from ``ctx.model``: the union over every grant that
        allows this inference (None = no grant restricts, every output)."""
        principal = ctx.require_principal()
        tenant_table = self.grants.get(principal.tenant, {})
        released: set[str] = set()
        matched = False
        for role in principal.roles:
            for grant in tenant_table.get(role, {}).get(ctx.model or "", ()):
                if "infer" not in grant.actions or not (grant.versions is ANY_VERSION or not ctx.version
                                                        or ctx.version in grant.versions):
                    continue
                if grant.outputs is None:
                    return None
                matched = True
                released |= grant.outputs
        # SECURITY: no matching grant here means on_call did not admit this inference (a
        # wiring bug); release nothing rather than everything.
        return frozenset(released) if matched else frozenset()


@dataclass(frozen=True, slots=True)
class OutputAuthorizer(RoleAuthorizer):
    """:class:`RoleAuthorizer` plus the output allowlists, on both sides of the upstream.

    Built only when some grant names ``outputs:``, so a policy without them runs the plain
    authorizer (no per-inference hooks, no extra stage records). Same name: like every
    authorization, it can never be kill-switched.
    """

    async def on_request(self, ctx: RequestContext, req: InferRequest) -> InferRequest:
        released = self.released_outputs(ctx)
        if released is None:
            return req
        if req.outputs:
            refused = [out.name for out in req.outputs if out.name not in released]
            if refused:
                ctx.note("authz_outputs_refused", len(refused))
                # The names were checked against the model's declared outputs before this
                # stage (conformance), so naming them discloses nothing the metadata does not.
                shown = sorted(released if ctx.declared_outputs is None else released & set(ctx.declared_outputs))
                raise PermissionDenied(f"not allowed to receive output(s) {_names(refused)}; allowed: "
                                       f"{_names(shown) or 'none'}", reason=OUTPUT_DENIED)
            return req
        if ctx.declared_outputs is None:
            return req  # no metadata at hand: on_response drops what is not released
        wanted = [name for name in ctx.declared_outputs if name in released]
        if not wanted:
            raise PermissionDenied("no output of this model is released to your roles", reason=OUTPUT_DENIED)
        # SECURITY: ask the upstream only for what may be returned, so it never computes (and
        # DP never charges for) a withheld output; a new request object, the input stays untouched.
        return InferRequest(req.model, req.version, req.inputs, [RequestedOutput(name) for name in wanted],
                            req.id, req.binary_data_output, req.traceparent)

    async def on_response(self, ctx: RequestContext, resp: InferResponse) -> InferResponse:
        released = self.released_outputs(ctx)
        if released is None:
            return resp
        kept = [tensor for tensor in resp.outputs if tensor.name in released]
        if len(kept) == len(resp.outputs):
            return resp
        # SECURITY: the upstream sent an output the caller's grants withhold (it ignored the
        # requested outputs, or the request could not be narrowed): drop it before the answer
        # is built. Counted, never named: an unexpected name is the upstream's text.
        dropped = len(resp.outputs) - len(kept)
        ctx.note("authz_outputs_dropped", dropped)
        log.warning("authz_outputs_dropped", model=ctx.model, count=dropped)
        if not kept:
            raise PermissionDenied("no output of this model is released to your roles", reason=OUTPUT_DENIED)
        return InferResponse(resp.model_name, resp.model_version, kept, resp.id)


def build_authorizer(grants: GrantTable, role_actions: Mapping[str, frozenset[str]], *,
                     non_enumeration: bool = True) -> RoleAuthorizer:
    """The authorizer for a compiled grant table: with output hooks only where they can matter."""
    restricted = any(grant.outputs is not None for roles in grants.values() for models in roles.values()
                     for model_grants in models.values() for grant in model_grants)
    cls = OutputAuthorizer if restricted else RoleAuthorizer
    return cls(grants=grants, role_actions=role_actions, non_enumeration=non_enumeration)


def _names(names: list[str]) -> str:
    """Output names for an error message; anything not identifier-like is not echoed."""
    return ", ".join(f"'{n}'" if _SHOWN_NAME.fullmatch(n) else "'(unnamed)'" for n in names)
