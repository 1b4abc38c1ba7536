"""JSON read one way only, for documents whose meaning must not depend on the parser.

Python's ``json`` keeps the last of two members with one name and accepts the ``NaN`` and
``Infinity`` literals; other parsers keep the first member or refuse both. A token, a key
set, a signed manifest or a model profile read differently by two parsers is two documents
(RFC 7515 §5.2, RFC 8259 §4 and §6), so these are refused here with ``ValueError``.

The same holds for a ``\\ud800`` escape that no second escape pairs: Python decodes it to a
lone surrogate, a ``str`` that is no Unicode text (it cannot be encoded as UTF-8), where other
parsers substitute U+FFFD or refuse (RFC 8259 §8.2; I-JSON, RFC 7493 §2.1, forbids it).
"""

from __future__ import annotations

import json
import re
from typing import Any

# An escape that can decode to a surrogate code point (a paired one becomes one astral
# character; what is left after decoding is unpaired). Checked on the raw text first, so a
# document without one costs a single scan.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


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


def refuse_lone_surrogates(doc: Any) -> None:
    """``ValueError`` when a string (a value or a member name) anywhere in ``doc`` holds an
    unpaired surrogate.

    # SECURITY: such a string is not text: the first ``.encode()`` of it raises (a token's
    # subject hashed for a flag, a Redis key, a log line), a 500 from client input, and it
    # compares unequal to what another parser made of the same bytes. Iterative: a document
    # nested as deep as the parser allows does not overflow the stack here.
    """
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise ValueError("a string holds an unpaired surrogate escape")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def loads(text: str) -> Any:
    """``json.loads`` without duplicate members, the non-standard constants or lone surrogates."""
    doc = json.loads(text, object_pairs_hook=unique_members, parse_constant=no_constants)
    if _SURROGATE_ESCAPE.search(text):
        refuse_lone_surrogates(doc)
    return doc
