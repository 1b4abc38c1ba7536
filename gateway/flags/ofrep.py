"""An OpenFeature provider for OFREP (the OpenFeature Remote Evaluation Protocol), on aiohttp.

This is how the gateway uses a flagd daemon (flagd serves OFREP on port 8016) or any
vendor that speaks OFREP, without ``openfeature-provider-flagd`` (it needs protobuf 7,
which ``tritonclient[grpc]`` cannot run with).

Why not ``openfeature-provider-ofrep`` (0.3.0): it evaluates with ``requests``, i.e. a
blocking HTTP call on the event loop for every routed request; with the daemon down each
call would freeze the whole gateway for its timeout. This one is async only, shares one
connection pool, never follows redirects, and reads bounded, strictly checked answers.
The ``python`` provider kind can still load that package (in worker threads).

Protocol (OFREP v1, single-flag evaluation)::

    POST {url}/ofrep/v1/evaluate/flags/{key}   {"context": {"targetingKey": ..., ...}}
    200 {"key", "value", "reason", "variant", "metadata"}
    400/404 {"key", "errorCode", "errorDetails"}; 401/403; 429 + Retry-After; 5xx

Failures are OpenFeature errors. Those that say the service cannot answer now (network,
timeout, 5xx, 429, 401/403, an unreadable answer) are :class:`ProviderUnavailable`, so
the guard in :mod:`gateway.flags.remote` can stop asking for a while; the caller always
falls back to the flag's stable variant.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import quote

import aiohttp
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import (
    ErrorCode,
    FlagNotFoundError,
    GeneralError,
    InvalidContextError,
    OpenFeatureError,
    ParseError,
    TargetingKeyMissingError,
    TypeMismatchError,
)
from openfeature.flag_evaluation import FlagResolutionDetails, Reason
from openfeature.provider import Metadata

from gateway.flags.async_only import AsyncOnlyProvider

__all__ = ["MAX_ANSWER_BYTES", "OfrepProvider", "ProviderUnavailable"]

MAX_ANSWER_BYTES: Final = 64 * 1024
MAX_RETRY_AFTER_S: Final = 300.0

_CHECKS: Final = {
    "boolean": lambda v: isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "object": lambda v: isinstance(v, dict | list),
}
_REASONS: Final = {r.value: r for r in Reason}


class ProviderUnavailable(GeneralError):
    """The flag service cannot answer now (as opposed to: it answered, with an error)."""


class OfrepProvider(AsyncOnlyProvider):
    """Async-only OFREP client; the synchronous resolve methods refuse (they would block)."""

    sync_refusal = "the OFREP provider is async only"

    def __init__(self, url: str, *, timeout_s: float = 0.5, headers: Mapping[str, str] | None = None,
                 clock: Any = time.monotonic) -> None:
        super().__init__()
        self.endpoint = url.rstrip("/") + "/ofrep/v1/evaluate/flags/"
        self.timeout_s = timeout_s
        self._headers = dict(headers or {})
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._paused_until = 0.0

    def get_metadata(self) -> Metadata:
        return Metadata(name="infergate-ofrep")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the exchange -----------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # trust_env=False: no proxy from the environment sees tenants and roles unasked.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=64), trust_env=False,
                headers={"Accept": "application/json", **self._headers},
            )
        return self._session

    async def _resolve_async(self, flag_type: str, flag_key: str, default_value: Any,
                             ctx: EvaluationContext | None) -> FlagResolutionDetails[Any]:
        if self._clock() < self._paused_until:
            raise ProviderUnavailable("the flag service asked to wait (429 Retry-After)")
        body = {"context": _context(ctx)}
        try:
            # SECURITY: no redirects: one would carry the context and the auth header elsewhere.
            async with self._client().post(self.endpoint + quote(flag_key, safe=""), json=body,
                                           allow_redirects=False) as resp:
                raw = await resp.content.read(MAX_ANSWER_BYTES + 1)
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # noqa: UP041 - aiohttp raises either
            raise ProviderUnavailable(f"flag service unreachable: {type(exc).__name__}") from exc
        if len(raw) > MAX_ANSWER_BYTES:
            raise ProviderUnavailable("flag service answer too large")
        if status == 200:
            return _details(_json(raw), flag_key, flag_type)
        if status == 429:
            self._paused_until = self._clock() + _retry_after(retry_after)
            raise ProviderUnavailable("flag service rate-limited us")
        if status in {401, 403}:
            raise ProviderUnavailable(f"flag service refused our credentials ({status})")
        if status in {400, 404}:
            raise _error(_json(raw), status)
        raise ProviderUnavailable(f"flag service answered {status}")


def _context(ctx: EvaluationContext | None) -> dict[str, Any]:
    if ctx is None:
        return {}
    data: dict[str, Any] = dict(ctx.attributes)
    if ctx.targeting_key:
        data["targetingKey"] = ctx.targeting_key
    return data


def _json(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProviderUnavailable("flag service answer is not JSON") from exc
    if not isinstance(data, dict):
        raise ProviderUnavailable("flag service answer is not a JSON object")
    return data


def _details(data: Mapping[str, Any], flag_key: str, flag_type: str) -> FlagResolutionDetails[Any]:
    if data.get("key", flag_key) != flag_key:
        raise ProviderUnavailable("flag service answered for another flag")
    if "errorCode" in data:  # some servers answer 200 with an error body
        raise _error(data, 200)
    if "value" not in data:
        raise ParseError("OFREP answer without a value")
    value = data["value"]
    if not _CHECKS[flag_type](value):
        raise TypeMismatchError(f"flag {flag_key!r} is not of type {flag_type}")
    variant = data.get("variant")
    metadata = data.get("metadata")
    reason = data.get("reason")
    return FlagResolutionDetails(
        value=value,
        variant=variant if isinstance(variant, str) else None,
        reason=_REASONS.get(reason, Reason.UNKNOWN) if isinstance(reason, str) else Reason.UNKNOWN,
        flag_metadata={k: v for k, v in metadata.items() if isinstance(v, bool | int | float | str)}
        if isinstance(metadata, dict) else {},
    )


def _error(data: Mapping[str, Any], status: int) -> OpenFeatureError:
    code = data.get("errorCode")
    details = str(data.get("errorDetails", ""))[:200]
    if code == ErrorCode.FLAG_NOT_FOUND or status == 404:
        return FlagNotFoundError(details)
    if code == ErrorCode.TARGETING_KEY_MISSING:
        return TargetingKeyMissingError(details)
    if code == ErrorCode.INVALID_CONTEXT:
        return InvalidContextError(details)
    if code == ErrorCode.PARSE_ERROR:
        return ParseError(details)
    if code == ErrorCode.TYPE_MISMATCH:
        return TypeMismatchError(details)
    return GeneralError(details or f"OFREP error {code!r}")


def _retry_after(value: str | None) -> float:
    """Seconds to wait; a missing or unreadable value (or an HTTP date) waits one second."""
    if value is not None and value.strip().isdigit():
        return min(float(value.strip()), MAX_RETRY_AFTER_S)
    return 1.0
