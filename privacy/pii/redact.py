"""Redaction for log lines and error messages: every entity type, replaced by its tag.

Logs and errors are the side doors for PII (aiohttp parser errors quote ~100 bytes of
input; exceptions quote values). This is the fast path the logging processor and error
rendering call: one engine built on first use, the ``replace`` operator only, and a
refusal to ever return text it could not check.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any, Final

from privacy.pii.engine import PiiEngine
from privacy.pii.operators import Operator, Replace
from privacy.pii.recognizers import ENTITIES

# What a value becomes when redaction itself fails: never the value.
REDACTION_FAILED: Final = "[REDACTION_FAILED]"
_TAGS: Final[Mapping[str, Operator]] = {entity: Replace() for entity in ENTITIES}
_MAX_DEPTH: Final = 8
# Shorter than the shortest entity ("::1" is three characters): nothing to find.
_MIN_LENGTH: Final = 3


@cache
def _engine() -> PiiEngine:
    return PiiEngine(ENTITIES)


def redact_text(text: str) -> str:
    """``text`` with every detected entity replaced by ``[TYPE]``.

    SECURITY: fails closed. If detection raises, the whole text is replaced by
    ``[REDACTION_FAILED]``; a log line losing its message is better than one leaking.
    """
    if len(text) < _MIN_LENGTH:
        return text
    try:
        return _engine().mask(text, _TAGS)[0]
    except Exception:  # noqa: BLE001 - any failure must end in the safe value, not the raw text
        return REDACTION_FAILED


def redact_value(value: Any, _depth: int = 0) -> Any:
    """Redact strings inside a log event's values (str, bytes, lists, tuples, dicts).

    Keys are kept (they are the log schema), other scalars pass, anything nested deeper
    than a few levels is replaced rather than walked.
    """
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes | bytearray):
        return redact_text(bytes(value).decode("utf-8", "replace"))
    if _depth >= _MAX_DEPTH:
        return REDACTION_FAILED if isinstance(value, list | tuple | dict) else value
    if isinstance(value, dict):
        return {key: redact_value(item, _depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_value(item, _depth + 1) for item in value]
    if isinstance(value, tuple):
        return tuple(redact_value(item, _depth + 1) for item in value)
    return value
