"""``POST /v2/pii/unmask``: reversible PII tokens back to values, for ``pii:unmask`` only.

Roles the PII policy gives ``tokenize`` receive ``[EMAIL:tok:...]`` tokens instead of
values (AES-GCM, :class:`privacy.pii.AesGcmTokenizer`). This is the one way back:

- body ``{"tokens": ["[EMAIL:tok:...]", ...]}`` -> ``{"values": [{"entity", "value"}, ...]}``
  in the same order, or ``{"text": "... [EMAIL:tok:...] ..."}`` -> ``{"text": "..."}``
  with every token replaced by its value;
- the permission is checked through the pipeline (``snap.pipeline.allows``), like the
  other operator surfaces; without it the route is refused like an unknown route under
  ``non_enumeration`` (404), otherwise 403;
- tokens open only for the tenant they were minted for (the tenant is in the AES-GCM
  associated data), so another tenant's, another key's, a forged or an edited token is
  a 400 naming which token, never echoing it; nothing is revealed from a request that
  holds a bad token;
- the audit record of the call gets the count and the entity types, never a value.

Transport-neutral: the HTTP front reads the body and calls :func:`unmask`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Final

from gateway import strict_json
from gateway.context import RequestContext
from gateway.errors import MalformedRequest, NotFound, PermissionDenied, UnsupportedMediaType
from gateway.policy.store import Snapshot
from gateway.stages.pii_mask import PiiMasker
from privacy.pii.operators import TOKEN_RE, AesGcmTokenizer

PERMISSION: Final = "pii:unmask"
NOTE_KEY: Final = "pii_unmask"
# A token of a 64-byte value is about 200 characters: 1 MiB holds thousands of them.
MAX_BODY_BYTES: Final = 1 << 20
MAX_TOKENS: Final = 1000
_JSON_MEDIA: Final = (None, "application/json")


async def unmask(ctx: RequestContext, snap: Snapshot, media_type: Callable[[], str | None],
                 read_body: Callable[[], Awaitable[bytes]]) -> dict[str, Any]:
    """The answer to one unmask call; raises a :class:`GatewayError` for any refusal.

    ``media_type`` and ``read_body`` come from the front; neither runs before the
    permission check, so a caller without ``pii:unmask`` never has a body read.
    """
    principal = ctx.require_principal()
    if not snap.pipeline.allows(ctx, PERMISSION):
        # SECURITY: an operator surface; hidden like an unknown route under non_enumeration.
        if snap.policy.access.non_enumeration:
            raise NotFound(reason="pii_unmask_denied")
        raise PermissionDenied(reason="pii_unmask_denied")
    if media_type() not in _JSON_MEDIA:
        raise UnsupportedMediaType("Content-Type must be application/json", reason="pii_unmask_media_type")
    opener = _masker(snap).token_opener(principal.tenant)
    tokens, text = _parse(await read_body())
    try:
        if tokens is not None:
            values = [_reveal(opener, token, f"tokens[{index}]") for index, token in enumerate(tokens)]
            answer: dict[str, Any] = {"values": [{"entity": entity, "value": value} for entity, value in values]}
            entities = [entity for entity, _ in values]
        else:
            assert text is not None  # noqa: S101 - _parse returns exactly one of the two
            answer, entities = _unmask_text(opener, text)
    except MalformedRequest:
        ctx.note(NOTE_KEY, {"count": 0, "refused": "invalid_token"})
        raise
    # SECURITY: counts and types only; the values exist in the answer and nowhere else.
    ctx.note(NOTE_KEY, {"count": len(entities), "entities": dict(sorted(Counter(entities).items()))})
    return answer


def _masker(snap: Snapshot) -> PiiMasker:
    for bound in snap.pipeline.stages:
        if isinstance(bound.stage, PiiMasker):
            return bound.stage
    raise NotFound("PII masking is not configured", reason="pii_unmask_no_masker")


def _parse(body: bytes) -> tuple[list[str] | None, str | None]:
    try:
        # SECURITY: one reading only, as for the inference body: strict UTF-8 (json.loads of
        # bytes would sniff UTF-16/32) and no repeated member ({"tokens": [a], "tokens": [b]}
        # is [a] to a first-wins proxy or log parser and [b] to Python).
        payload = strict_json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise MalformedRequest("body is not JSON", reason="pii_unmask_body") from exc
    if not isinstance(payload, dict) or len(payload) != 1 or not payload.keys() & {"tokens", "text"}:
        raise MalformedRequest('body must be {"tokens": [...]} or {"text": "..."}', reason="pii_unmask_body")
    if "text" in payload:
        if not isinstance(payload["text"], str):
            raise MalformedRequest('"text" must be a string', reason="pii_unmask_body")
        return None, payload["text"]
    tokens = payload["tokens"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise MalformedRequest('"tokens" must be a non-empty list of strings', reason="pii_unmask_body")
    if len(tokens) > MAX_TOKENS:
        raise MalformedRequest(f"at most {MAX_TOKENS} tokens per call", reason="pii_unmask_too_many")
    return tokens, None


def _reveal(opener: AesGcmTokenizer, token: str, where: str) -> tuple[str, str]:
    try:
        return opener.reveal(token.strip())
    except ValueError:
        # SECURITY: one message for forged, edited, other-key and other-tenant tokens (a
        # distinction would tell a prober which tenant a token belongs to); never the token.
        raise MalformedRequest(f"{where} is not a valid PII token for this tenant",
                               reason="pii_token_invalid") from None


def _unmask_text(opener: AesGcmTokenizer, text: str) -> tuple[dict[str, Any], list[str]]:
    pieces: list[str] = []
    entities: list[str] = []
    position = 0
    for index, match in enumerate(TOKEN_RE.finditer(text)):
        if len(entities) >= MAX_TOKENS:
            raise MalformedRequest(f"at most {MAX_TOKENS} tokens per call", reason="pii_unmask_too_many")
        entity, value = _reveal(opener, match.group(0), f"token {index} of the text (at character {match.start()})")
        pieces += (text[position:match.start()], value)
        entities.append(entity)
        position = match.end()
    pieces.append(text[position:])
    return {"text": "".join(pieces)}, entities
