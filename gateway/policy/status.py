"""The body of ``GET /v2/policy``: which revision serves, who signed it, how reloads went.

Transport-neutral (a dict), so a gRPC or CLI view can show the same thing. Times are
RFC 3339 UTC strings; error texts are the loader's ``file:line:col: message`` lines,
which never quote secret values.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gateway.policy.store import PolicyStore, Snapshot


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def policy_status(store: PolicyStore, snap: Snapshot) -> dict[str, Any]:
    """``snap`` is the caller's pinned snapshot: the revision its own audit record carries."""
    failure = store.last_failure
    return {
        "revision": snap.policy.revision,
        "applied_at": _iso(snap.applied_at),
        "signatures_required": store.verifier is not None,
        "signer_key_id": snap.bundle.key_id if snap.bundle else None,
        "signed_at": snap.bundle.signed_at if snap.bundle else None,
        # The latest attempt's error; null once a later reload succeeded.
        "last_error": store.last_error,
        # The last refusal, kept after later successes.
        "last_failure": None if failure is None else {
            "reason": failure.reason, "error": failure.error, "at": _iso(failure.at),
        },
        "reloads": dict(store.reload_counts),
    }
