"""PII detection and masking: linear-time recognizers, Unicode-proof, typed operators.

Pure library (no aiohttp, Redis or gateway imports). The gateway's ``pii_mask`` stage
and its log/error redaction call into it.
"""

from privacy.pii.engine import Detection, PiiEngine
from privacy.pii.operators import AesGcmTokenizer, HmacPseudonym, Mask, Operator, Redact, Replace
from privacy.pii.recognizers import DEFAULT_ENTITIES, ENTITIES, PRIORITY

__all__ = [
    "DEFAULT_ENTITIES",
    "ENTITIES",
    "PRIORITY",
    "AesGcmTokenizer",
    "Detection",
    "HmacPseudonym",
    "Mask",
    "Operator",
    "PiiEngine",
    "Redact",
    "Replace",
]
