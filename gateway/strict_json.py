"""JSON read one way only, for documents whose meaning must not depend on the parser.

Python's ``json`` keeps the last of two members with one name and accepts the ``NaN`` and
``Infinity`` literals; other parsers keep the first member or refuse both. A token, a key
set, a signed manifest or a model profile read differently by two parsers is two documents
(RFC 7515 §5.2, RFC 8259 §4 and §6), so these are refused here with ``ValueError``.
"""

from __future__ import annotations

import json
from typing import Any


def unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: an object, or ``ValueError`` when a member name repeats."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def no_constants(name: str) -> Any:
    """``parse_constant``: ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON numbers."""
    raise ValueError(f"{name} is not a JSON number")


def loads(text: str) -> Any:
    """``json.loads`` without duplicate members or the non-standard constants."""
    return json.loads(text, object_pairs_hook=unique_members, parse_constant=no_constants)
