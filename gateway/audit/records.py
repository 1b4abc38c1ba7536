"""The on-disk form of an audit record: canonical JSON lines, hash-chained and MACed.

Canonical rule (what ``canonical`` produces and ``verify`` demands byte for byte):

- UTF-8 JSON, object keys sorted by code point, no insignificant whitespace
  (separators ``,`` and ``:``), every non-ASCII character and every control character
  escaped as ``\\uXXXX`` (so a record is exactly one line: a ``\\n`` smuggled into a
  model name or a user agent stays ``\\n`` text, never a new record);
- numbers: integers in the I-JSON safe range ``|n| <= 2**53 - 1``; a non-integral
  number is rounded to 6 decimal places and written in the shortest form that reads
  back to the same double (Python ``repr``, which is RFC 8785's form for
  ``1e-4 <= |x| < 1e16``); an integral float is written as an integer; NaN and
  infinities are refused. Consequently every number reads back to the value that was
  hashed, and re-encoding a parsed record reproduces the stored bytes;
- ``true``/``false``/``null``, strings, arrays (tuples become arrays, sets become
  sorted arrays) and objects with string keys; anything else is refused.

A line is ``canonical(body)`` with ``,"mac":"<64 hex>"`` spliced in before the closing
brace and a ``\\n`` after it. ``body`` holds ``seq``, ``prev_hash`` (the SHA-256 of the
previous record's body bytes, ``GENESIS`` for the first), ``time``, ``type``, ``key_id``
(the chain-MAC key) and the record's own fields. ``hash = sha256(body bytes)`` links the
chain; ``mac = HMAC-SHA256(mac_key, hash)`` makes recomputing the chain after an edit
impossible without the key store (Schneier & Kelsey), even for records newer than the
last signed checkpoint.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias

GENESIS = "0" * 64
MAX_SAFE_INT = 2**53 - 1
FLOAT_DECIMALS = 6
SEGMENT_RE = re.compile(r"seg-(\d{12})\.jsonl")
# Fields the log itself owns; a caller cannot set or forge them.
RESERVED = frozenset({"seq", "prev_hash", "mac", "key_id", "enc"})

_MAC_PREFIX = b',"mac":"'
_MAC_SUFFIX_LEN = len(_MAC_PREFIX) + 64 + 2  # ,"mac":"<64 hex>"}
_HEX64 = re.compile(rb"[0-9a-f]{64}")

JSONValue: TypeAlias = "None | bool | int | float | str | list[JSONValue] | dict[str, JSONValue]"


class RecordFormatError(ValueError):
    """A line is not a well-formed canonical audit record."""


def normalize(value: Any) -> JSONValue:
    """A deep copy of ``value`` restricted to what the canonical form can represent.

    Copying matters too: a record waits in the group-commit queue, and a caller mutating
    its dict afterwards must not change what gets hashed.
    """
    kind = type(value)
    if kind is str or kind is bool or value is None:  # the common cases first: this runs per field
        return value  # type: ignore[no-any-return]
    if kind is dict:
        return _normalize_dict(value)
    if kind is int:
        if -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
            return value  # type: ignore[no-any-return]
        raise ValueError("integer outside the I-JSON safe range")
    if kind is list or kind is tuple:
        return _normalize_list(value)
    return _normalize_other(value)


# The two container loops below handle the exact built-in scalar types in place instead of
# recursing (a request record has ~100 values; a call each cost more than the rest of the
# work), floats included: the body of _normalize_float is inlined (a gateway record holds
# ~20 of them) with the same result for every finite value. Anything else takes
# normalize(), so the result is the same value for value.


def _normalize_dict(value: dict[Any, Any]) -> dict[str, JSONValue]:
    out: dict[str, JSONValue] = {}
    for key, item in value.items():
        if type(key) is not str:
            raise TypeError("audit record keys must be strings")
        kind = type(item)
        if kind is str or kind is bool or item is None:
            out[key] = item
        elif kind is float:
            rounded = round(item, FLOAT_DECIMALS)
            if rounded.is_integer() and -MAX_SAFE_INT <= rounded <= MAX_SAFE_INT:
                out[key] = int(rounded)
            elif rounded - rounded == 0.0:  # finite (inf - inf and NaN - NaN are NaN)
                out[key] = rounded
            else:
                out[key] = _normalize_float(item)  # raises the one error message
        elif kind is dict:
            out[key] = _normalize_dict(item)
        elif kind is int and -MAX_SAFE_INT <= item <= MAX_SAFE_INT:
            out[key] = item
        elif kind is list:
            out[key] = _normalize_list(item)
        else:
            out[key] = normalize(item)
    return out


def _normalize_list(value: list[Any] | tuple[Any, ...]) -> list[JSONValue]:
    out: list[JSONValue] = []
    append = out.append
    for item in value:
        kind = type(item)
        if kind is str or kind is bool or item is None:
            append(item)
        elif kind is dict:
            append(_normalize_dict(item))
        elif kind is int and -MAX_SAFE_INT <= item <= MAX_SAFE_INT:
            append(item)
        else:
            append(normalize(item))
    return out


def _normalize_float(value: float) -> JSONValue:
    if not math.isfinite(value):
        raise ValueError("NaN and infinities have no canonical JSON form")
    rounded = round(value, FLOAT_DECIMALS)
    if rounded.is_integer() and abs(rounded) <= MAX_SAFE_INT:
        return int(rounded)
    return rounded


def _normalize_other(value: Any) -> JSONValue:
    if isinstance(value, bool | str):
        return bool(value) if isinstance(value, bool) else str(value)
    if isinstance(value, int):
        return normalize(int(value))
    if isinstance(value, float):
        return _normalize_float(value)
    if isinstance(value, enum.Enum):
        return normalize(value.value)
    if isinstance(value, Mapping):
        return normalize(dict(value))
    if isinstance(value, list | tuple):
        return [normalize(item) for item in value]
    if isinstance(value, set | frozenset):
        items = [normalize(item) for item in value]
        return sorted(items, key=canonical)
    raise TypeError(f"{type(value).__name__} is not allowed in an audit record")


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _not_serializable(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# The C encoder behind ``_ENCODER.encode``, built once instead of per call and without the
# circular-reference bookkeeping: a normalized value is a fresh tree (normalize copies
# every container), so it has no cycles. Same options, so the same bytes.
_C_MAKE_ENCODER = getattr(json.encoder, "c_make_encoder", None)
_C_ENCODE: Callable[[Any, int], list[str]] | None = (
    None if _C_MAKE_ENCODER is None else
    _C_MAKE_ENCODER(None, _not_serializable, json.encoder.encode_basestring_ascii, None, ":", ",",
                    True, False, False))


def canonical(value: Any) -> bytes:
    """The canonical bytes of an already normalized value."""
    if _C_ENCODE is None:
        return _ENCODER.encode(value).encode("ascii")
    return "".join(_C_ENCODE(value, 0)).encode("ascii")


def body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def encode_line(body: bytes, mac: str) -> bytes:
    """Splice the MAC into the canonical body: the line stays one JSON object."""
    return body[:-1] + _MAC_PREFIX + mac.encode("ascii") + b'"}\n'


@dataclass(frozen=True, slots=True)
class ParsedLine:
    record: dict[str, Any]
    body: bytes
    hash: str
    mac: str


def load_stored_json(raw: bytes, what: str) -> Any:
    """A stored line as JSON, or :class:`RecordFormatError`.

    # SECURITY: whoever can write the log or the anchor store writes these bytes. A line
    # nested 100,000 deep raised RecursionError out of ``json.loads``: ``audit verify``
    # died with a traceback instead of naming the tampered record.
    """
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise RecordFormatError(f"{what} is not JSON") from exc


def canonical_form_of(value: Any) -> bytes:
    """The canonical bytes of a stored value, or :class:`RecordFormatError` when it has
    none (NaN, integers outside the safe range, nesting too deep to copy)."""
    try:
        return canonical(normalize(value))
    except (TypeError, ValueError, RecursionError) as exc:
        raise RecordFormatError(f"not canonical: {exc}") from exc


def parse_line(raw: bytes) -> ParsedLine:
    """Split a stored line (without its ``\\n``) into record, body bytes, hash and MAC.

    Refuses anything that is not byte-for-byte what the writer would have produced, so
    cosmetic edits (whitespace, key order, ``1.0`` for ``1``, duplicate keys) count as
    edits too.
    """
    if len(raw) <= _MAC_SUFFIX_LEN or raw[-_MAC_SUFFIX_LEN:][: len(_MAC_PREFIX)] != _MAC_PREFIX:
        raise RecordFormatError("no trailing mac field")
    mac = raw[-_MAC_SUFFIX_LEN + len(_MAC_PREFIX): -2]
    if not _HEX64.fullmatch(mac) or raw[-2:] != b'"}':
        raise RecordFormatError("malformed mac field")
    body = raw[:-_MAC_SUFFIX_LEN] + b"}"
    record = load_stored_json(body, "record")
    if not isinstance(record, dict):
        raise RecordFormatError("not a JSON object")
    again = canonical_form_of(record)
    if again != body:
        raise RecordFormatError("not in canonical form")
    if not isinstance(record.get("seq"), int) or isinstance(record.get("seq"), bool):
        raise RecordFormatError("no integer seq")
    full = dict(record)
    full["mac"] = mac.decode("ascii")
    return ParsedLine(full, body, body_hash(body), full["mac"])


def utc_now_iso(ts: float) -> str:
    """``time`` field: UTC, microseconds, ``Z`` suffix. Informational only: order is ``seq``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str) -> datetime:
    """Read a ``time`` field or a CLI date (``2025-01-31`` or a full ISO timestamp)."""
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def segment_name(first_seq: int) -> str:
    return f"seg-{first_seq:012d}.jsonl"


@dataclass(frozen=True, slots=True)
class Segment:
    path: Path
    first_seq: int


def list_segments(log_dir: Path) -> list[Segment]:
    """Segments in chain order (by the first ``seq`` in their name)."""
    if not log_dir.is_dir():
        return []
    found = []
    for path in log_dir.iterdir():
        match = SEGMENT_RE.fullmatch(path.name)
        if match and path.is_file() and not path.is_symlink():
            found.append(Segment(path, int(match.group(1))))
    return sorted(found, key=lambda s: s.first_seq)


def iter_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(byte offset, line without ``\\n``, complete?) for each line of a file."""
    offset = 0
    with path.open("rb") as handle:
        for line in handle:
            complete = line.endswith(b"\n")
            yield offset, (line[:-1] if complete else line), complete
            offset += len(line)


def iter_records(log_dir: Path) -> Iterator[dict[str, Any]]:
    """Every parseable record, in order, without verification (for export and reports)."""
    for segment in list_segments(log_dir):
        for _offset, raw, complete in iter_lines(segment.path):
            if not complete:
                continue
            try:
                yield parse_line(raw).record
            except RecordFormatError:
                continue
