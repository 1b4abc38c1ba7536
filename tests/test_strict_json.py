"""gateway.strict_json: one reading of a token, key set, manifest or profile whatever the parser."""

from __future__ import annotations

import json

import pytest

from gateway import strict_json


@pytest.mark.parametrize("text", [
    '{"sub": "u1\\ud800"}',  # a high surrogate with nothing after it
    '{"sub": "\\udfff"}',  # a low surrogate alone
    '{"sub": "\\udc00\\ud800"}',  # the two halves in the wrong order
    '{"x\\uDBFF": 1}',  # in a member name, upper-case hex
    '{"keys": [{"kid": ["a", {"b": "\\ud834"}]}]}',  # nested in arrays and objects
])
def test_lone_surrogate_is_refused(text: str) -> None:
    """Python decodes these escapes to a ``str`` that cannot be encoded (a 500 at its first
    ``.encode()``); other parsers substitute U+FFFD or refuse. Refused (RFC 7493 §2.1)."""
    with pytest.raises(ValueError, match="surrogate"):
        strict_json.loads(text)


@pytest.mark.parametrize(("text", "value"), [
    ('{"sub": "\\ud83d\\ude00"}', "\U0001F600"),  # a pair is one character
    ('{"sub": "\\\\ud800"}', "\\ud800"),  # an escaped backslash: six characters of text
    ('{"sub": "\U0001F600"}', "\U0001F600"),
])
def test_text_is_kept(text: str, value: str) -> None:
    assert strict_json.loads(text) == {"sub": value}
    value.encode("utf-8")  # text, encodable


def test_deeply_nested_document_is_checked_without_recursion() -> None:
    depth = 900  # within json's own recursion limit
    text = "[" * depth + '"\\ud800"' + "]" * depth
    json.loads(text)  # the plain parser takes it
    with pytest.raises(ValueError, match="surrogate"):
        strict_json.loads(text)
