"""Structured JSON logs: one line per event, request id bound from context.

Never log a token, a secret or a raw input; stages log reason codes and counts. The
``redact`` processor is a last line of defence for keys that must never appear.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Final

import structlog

from privacy.pii.redact import redact_text, redact_value

# Fields the gateway itself fills with identifiers and codes, never client text.
_SAFE_KEYS = frozenset({"event", "level", "timestamp", "request_id", "route", "reason", "status", "transport",
                        "revision", "active_revision", "model", "stage", "operation", "code"})
_FORBIDDEN_KEYS = frozenset({"authorization", "token", "bearer", "password", "secret", "api_key"})


# A number with a fraction or an exponent, or a long digit run: what a model's output
# looks like when an upstream quotes it in an error text.
_VALUE_RE = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?\d+[eE][-+]?\d+|\d{6,}")
UPSTREAM_TEXT_MAX: Final = 300


def upstream_text(raw: str) -> str:
    """An upstream's (or model runtime's) error text as it may be logged.

    Why: that text is written by code we do not control and may quote tensor values, and
    a DP-protected model's raw output must not reach a log line any more than a response
    (catalogue DP-09, NO-LEAK). Values become ``<num>`` (short integers such as shapes and
    dimensions stay, for the operator), and the text is cut to a bounded length.
    """
    return _VALUE_RE.sub("<num>", raw[: UPSTREAM_TEXT_MAX * 4])[:UPSTREAM_TEXT_MAX]


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # SECURITY: credentials never reach a log line, whoever passed them by mistake, and
    # PII in any logged value (an upstream's error text, an exception message) is masked.
    for key in list(event):
        if key.lower() in _FORBIDDEN_KEYS:
            event[key] = "[redacted]"
        elif key not in _SAFE_KEYS:
            event[key] = redact_value(event[key])
    return event


class RedactingFormatter(logging.Formatter):
    """Stdlib records (aiohttp, grpc, asyncio) as they are written, PII masked.

    Why: those libraries log exceptions with their tracebacks, and an exception message may
    quote a value ("could not convert string to float: '078-05-1120'"); the structlog
    redactor never sees these records.
    """

    def format(self, record: logging.LogRecord) -> str:
        # SECURITY: the whole rendered line, traceback included.
        return redact_text(super().format(record))


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # SECURITY: the traceback is rendered first, so ``redact`` masks it too: an
            # exception message may quote the input that caused it.
            structlog.processors.format_exc_info,
            redact,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
