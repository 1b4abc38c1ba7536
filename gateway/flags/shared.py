"""Rollback trips shared by every replica, as documents in the shared state store (Redis).

One document per (flag, definition hash), written once by the replica that trips first
(compare-and-set on an absent document: a second replica's trip loses and changes
nothing) and never changed. Keying by the definition hash is what makes "until a person
edits the flag" hold everywhere: an edit gives a new hash, which has no document. Old
documents stay (the store's documents have no TTL); there is one per tripped definition.

# SECURITY: whoever can write the store can force a flag to stable (the safe direction)
# but not choose a variant; an unreadable document holds the flag on stable as well.
"""

from __future__ import annotations

import json
from typing import Final

import structlog

from gateway.flags.rollback import RollbackTrip
from gateway.state.base import DocumentConflict, SharedState, StateKey

__all__ = ["StateRollbackStore"]

log = structlog.get_logger("gateway.flags")

GROUP: Final = "flags"
KIND: Final = "canary_rollback"
UNREADABLE: Final = "unreadable_shared_trip"
_FLOATS: Final = ("observed", "threshold", "window_s", "at")
_STRINGS: Final = ("from_variant", "to_variant", "reason", "revision")


class StateRollbackStore:
    """:class:`~gateway.flags.rollback.RollbackStore` over :class:`~gateway.state.base.SharedState`.

    Raises :class:`~gateway.state.base.StateUnavailable` like the store; the tracker
    decides what an outage means (hold on stable).
    """

    def __init__(self, state: SharedState) -> None:
        self.state = state

    @staticmethod
    def key(flag: str, definition_hash: str) -> StateKey:
        return StateKey(GROUP, KIND, (flag, definition_hash))

    async def load(self, flag: str, definition_hash: str) -> RollbackTrip | None:
        document = await self.state.get_document(self.key(flag, definition_hash))
        if document is None:
            return None
        return decode(document.value, flag, definition_hash)

    async def save(self, trip: RollbackTrip) -> None:
        try:
            await self.state.put_document(self.key(trip.flag, trip.definition_hash), encode(trip),
                                          expected_version=None)
        except DocumentConflict:
            return  # another replica tripped this definition first; its record stands


def encode(trip: RollbackTrip) -> bytes:
    fields = {
        "v": 1, "flag": trip.flag, "definition_hash": trip.definition_hash,
        "from_variant": trip.from_variant, "to_variant": trip.to_variant, "reason": trip.reason,
        "observed": trip.observed, "threshold": trip.threshold, "requests": trip.requests,
        "window_s": trip.window_s, "revision": trip.revision, "at": trip.at,
    }
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def decode(raw: bytes, flag: str, definition_hash: str) -> RollbackTrip:
    """The stored trip; anything unreadable or for another key is still a trip (fail closed)."""
    try:
        data = json.loads(raw.decode("utf-8"))
        if not _well_formed(data, flag, definition_hash):
            raise ValueError("document does not hold a trip of its key")  # noqa: TRY301
        return RollbackTrip(flag=flag, definition_hash=definition_hash, from_variant=data["from_variant"][:64],
                            to_variant=data["to_variant"][:64], reason=data["reason"][:64],
                            observed=float(data["observed"]), threshold=float(data["threshold"]),
                            requests=data["requests"], window_s=float(data["window_s"]), revision=data["revision"][:64],
                            at=float(data["at"]))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        log.warning("canary_rollback_document_unreadable", flag=flag, error=str(exc)[:100])
        return RollbackTrip(flag=flag, definition_hash=definition_hash, from_variant="?", to_variant="?",
                            reason=UNREADABLE, observed=0.0, threshold=0.0, requests=0, window_s=0.0,
                            revision="", at=0.0)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _well_formed(data: object, flag: str, definition_hash: str) -> bool:
    return (isinstance(data, dict) and data.get("flag") == flag and data.get("definition_hash") == definition_hash
            and all(isinstance(data.get(k), str) for k in _STRINGS)
            and all(_number(data.get(k)) for k in _FLOATS)
            and isinstance(data.get("requests"), int) and not isinstance(data.get("requests"), bool))
