"""Per-request state shared by the pipeline's stages. No transport imports.

:class:`RequestContext` is the only mutable object a request carries through the
pipeline (Envoy's dynamic metadata). Each front builds one, pins it to one policy
revision, and emits one audit record from it in a ``finally`` block.
"""

from __future__ import annotations

import enum
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from gateway.errors import GatewayError, InternalError
from gateway.ids import random_hex
from privacy.pii.redact import redact_text

# The model name the client asked for, when a routing flag sent the call to another model
# (a ``_`` note: per-request working state, never audited). Limits scoped to a model apply
# to calls for it under either name, so a blue-green flag is no way around a query cap.
NOTE_REQUESTED_MODEL: Final = "_requested_model"


# SECURITY: a client-supplied request id is echoed in headers, logs and audit records,
# so only a short, header-safe token is accepted; anything else is replaced.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


# W3C Trace Context: version 00, 16-byte trace id, 8-byte parent id, flags; all-zero ids invalid.
_TRACEPARENT_RE = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")


def _holds_pii(value: str) -> bool:
    """Whether the PII recognizers find anything in a client-chosen identifier (one rule for
    the request id and the trace id, which both travel unmasked)."""
    return redact_text(value) != value


def traceparent_for(offered: str | None) -> str:
    """Continue the client's trace when its header is valid and holds no PII, else start one.

    Why the PII check: the trace id is the one client-chosen value forwarded to the upstream
    (its ``traceparent``) and logged; 32 hex digits can spell a card number
    (``4111111111111111abcd...``), which would reach the model server past the masking every
    tensor gets. Same rule as the request id (:func:`new_request_id`).
    """
    valid = offered is not None and _TRACEPARENT_RE.fullmatch(offered)
    trace_id = offered[3:35] if valid and offered else ""
    # SECURITY: a trace id the PII recognizers find anything in is replaced, never forwarded.
    if not trace_id or _holds_pii(trace_id):
        trace_id = random_hex(16)
    return f"00-{trace_id}-{random_hex(8)}-01"


def new_request_id(offered: str | None = None) -> str:
    """Accept the client's ``X-Request-ID`` only when it is well-formed and holds no PII.

    Why the PII check: the id is copied verbatim into every log line, audit record, response
    header and gRPC trailer of the request (the log redactor trusts ``request_id`` as a
    gateway-made identifier), so an SSN, card number, phone number or IP address offered as
    an id (``078-05-1120`` is well-formed) would reach them all unmasked (catalogue I3).
    """
    # SECURITY: a client id the PII recognizers find anything in is replaced, never echoed.
    if offered is not None and _REQUEST_ID_RE.fullmatch(offered) and not _holds_pii(offered):
        return offered
    return random_hex(16)


class RequestIds:
    """Request ids of one gateway process: the client's when well-formed and not seen lately.

    Why: the request id keys the audit trail (one terminal record per request, catalogue
    NL) and a data subject's export. A client replaying an id (a retry, or another
    tenant's id read from somewhere) would give two requests one key; such a request gets
    a fresh id instead, echoed as usual in ``X-Request-ID``. The memory is bounded (the
    last ``window`` accepted ids), so a replay older than that is echoed again.
    """

    def __init__(self, window: int = 16384) -> None:
        self.window = window
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def assign(self, offered: str | None) -> str:
        request_id = new_request_id(offered)
        if request_id != offered:
            return request_id  # generated: 128 random bits, never a collision worth a lookup
        with self._lock:
            if request_id in self._recent:
                # SECURITY: one id, one request in the audit trail; a replayed id is replaced.
                return random_hex(16)
            self._recent[request_id] = None
            if len(self._recent) > self.window:
                self._recent.popitem(last=False)
        return request_id


class Action(enum.StrEnum):
    """What a call asks to do; the unit RBAC grants permissions on."""

    INFER = "infer"
    METADATA = "metadata"
    SERVER = "server"  # server metadata and health


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as established by authentication. Never holds the credential."""

    subject: str
    tenant: str
    roles: frozenset[str]
    issuer: str
    credential_id: str  # short hash of the credential, for correlation, never the token
    scopes: frozenset[str] = frozenset()  # the token's `scope` claim, split on spaces


class StageRecord(NamedTuple):
    """One stage hook's outcome, for the audit record and the trace span.

    A NamedTuple, not a frozen dataclass: as immutable, and about half the cost to build
    (a full pipeline makes ~16 per request).
    """

    stage: str
    outcome: str  # allowed | denied | shadow_denied | failure_mode_allowed | error
    reason: str | None
    duration_s: float


@dataclass(slots=True)
class RequestContext:
    """Everything a stage may read or note about the current call."""

    request_id: str
    revision: str
    action: Action
    transport: str
    client_addr: str
    model: str | None = None
    version: str = ""
    traceparent: str | None = None
    # The client's own traceparent header as received (the parent of the call's span when tracing is on).
    traceparent_in: str | None = None
    # SECURITY: the raw bearer credential lives here only for the authentication stage;
    # it is cleared once verified and is never logged or audited.
    bearer: str | None = None
    # A credential the front could not even parse (two Authorization headers, a Basic
    # scheme): refused by the service after the per-address pre-auth limit has counted
    # it, like any other bad credential.
    credential_error: GatewayError | None = None
    principal: Principal | None = None
    started: float = field(default_factory=time.monotonic)
    records: list[StageRecord] = field(default_factory=list)
    skipped: frozenset[str] = frozenset()  # stages kill-switched for this call
    notes: dict[str, Any] = field(default_factory=dict)
    # The model's declared outputs (from its metadata), set before the request stages run;
    # lets authorization narrow an inference that names no outputs. None = not known.
    declared_outputs: tuple[str, ...] | None = None

    def require_principal(self) -> Principal:
        """For stages that run after authentication; a missing principal is a wiring bug."""
        if self.principal is None:
            raise InternalError(reason="internal_no_principal")
        return self.principal

    def note(self, key: str, value: Any) -> None:
        """Record a fact for the audit record (counts, scores, never raw values)."""
        self.notes[key] = value
