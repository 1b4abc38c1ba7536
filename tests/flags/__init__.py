"""Tests of gateway/flags and the feature_flags stage; small builders shared by them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gateway.context import Action, Principal, RequestContext
from gateway.flags.rollback import RollbackTrip
from gateway.policy.loader import PolicySet, build_policy_set

ROUTE_META: dict[str, Any] = {"gateway.model": "digits", "gateway.stable": "stable"}


def route_flag(targeting: Any = None, *, variants: dict[str, Any] | None = None, default: str | None = "stable",
               state: str = "ENABLED", **metadata: Any) -> dict[str, Any]:
    """A routing flag for ``digits``; ``metadata`` keys use ``__`` for ``.`` (rollback__window_s)."""
    flag: dict[str, Any] = {
        "state": state,
        "variants": variants if variants is not None else {"stable": "1", "canary": "2"},
        "defaultVariant": default,
        "metadata": {**ROUTE_META, **{k.replace("__", "."): v for k, v in metadata.items()}},
    }
    if targeting is not None:
        flag["targeting"] = targeting
    return flag


def split(stable: int, canary: int) -> dict[str, Any]:
    return {"fractional": [["stable", stable], ["canary", canary]]}


def doc(flags: dict[str, Any], **top: Any) -> bytes:
    return json.dumps({"flags": flags, **top}).encode()


def policy(models: str = "digits: {}\n  other: {}\n  green: {}", revision_salt: str = "") -> PolicySet:
    """A PolicySet whose gateway.yaml exposes ``models`` (YAML lines under ``models:``)."""
    gateway = f"models:\n  {models}\n# {revision_salt}\n".encode()
    return build_policy_set({"gateway.yaml": gateway})


def principal(sub: str = "alice", tenant: str = "acme", roles: tuple[str, ...] = ("analyst",)) -> Principal:
    return Principal(subject=sub, tenant=tenant, roles=frozenset(roles), issuer="test", credential_id="c")


def context(who: Principal | None = None, *, model: str | None = "digits", version: str = "",
            action: Action = Action.INFER) -> RequestContext:
    return RequestContext(request_id="r1", revision="rev", action=action, transport="test", client_addr="",
                          model=model, version=version, principal=who or principal())


@dataclass
class RecordingHooks:
    """Stands in for the lead's audit and metrics hooks."""

    trips: list[RollbackTrip] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def rollback(self, trip: RollbackTrip) -> None:
        self.trips.append(trip)

    def evaluation_failed(self, flag: str, error: str) -> None:
        self.failures.append((flag, error))
