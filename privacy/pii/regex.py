"""A typed, byte-level face for RE2: the only regex engine that sees untrusted text here.

RE2 compiles to automata, so a search costs O(len(text) x len(pattern)) whatever the
text; no input can make it backtrack (the ReDoS class: CVE-2019-11358-style patterns,
Cloudflare's 2019 outage). Two rules keep the *whole* scan linear, not only each search:

- Patterns run on UTF-8 ``bytes`` encoded once per text. google-re2's ``str`` API
  re-encodes the text and re-counts characters up to ``pos`` on every call, which makes
  a loop of searches quadratic.
- Callers resume a loop of searches at or after the previous match's end, never before
  its start, so each byte is scanned a bounded number of times.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information

# RE2 keeps its DFA state cache within max_mem. 64 MiB lets the largest pattern set here
# (a few thousand instructions) cache many thousands of states, so the DFA never runs
# out of memory (RE2::Set has no NFA fallback when it does).
MAX_MEM: Final = 64 << 20
# Program sizes (RE2 instructions) over which a pattern, or a whole set, is refused at
# build time: far below what MAX_MEM holds, so a DFA state always fits.
MAX_PROGRAM_SIZE: Final = 40_000
MAX_SET_PROGRAM_SIZE: Final = 120_000


class PatternError(ValueError):
    """A pattern RE2 refuses, or one too large to keep its DFA cache comfortable."""


def _options() -> Any:
    options = re2.Options()
    options.max_mem = MAX_MEM
    options.log_errors = False
    return options


@dataclass(frozen=True, slots=True)
class Found:
    """One match: byte offsets of the whole match and of each capture group (-1 if unset)."""

    start: int
    end: int
    groups: tuple[tuple[int, int], ...]

    def group(self, index: int) -> tuple[int, int]:
        return (self.start, self.end) if index == 0 else self.groups[index - 1]


class Pattern:
    """One compiled RE2 pattern, searched over bytes."""

    __slots__ = ("_anchor", "_regexp", "program_size", "source", "spans", "spans_at")

    def __init__(self, source: str) -> None:
        try:
            compiled = re2.compile(source.encode("utf-8"), _options())
        except re2.error as exc:
            raise PatternError(f"RE2 refuses pattern {source[:60]!r}: {exc}") from exc
        if compiled.programsize > MAX_PROGRAM_SIZE:
            raise PatternError(f"pattern {source[:60]!r} compiles to {compiled.programsize} instructions")
        self.source = source
        self.program_size: int = compiled.programsize
        self._regexp = compiled._regexp  # the RE2 object itself: Match(anchor, bytes, pos, endpos)
        self._anchor = re2._Anchor.UNANCHORED
        # The hot path of a scan: ``spans(data, pos, endpos)`` is RE2's own call, the raw
        # spans of the leftmost match at or after ``pos`` (whole match, then each group;
        # ``(-1, -1)`` when unset or no match), with no Python frame or object per match: on
        # a short candidate those cost more than RE2's search itself.
        self.spans: Callable[[bytes, int, int], list[tuple[int, int]]] = partial(self._regexp.Match, self._anchor)
        # The same, for a match that starts exactly at ``pos``.
        self.spans_at: Callable[[bytes, int, int], list[tuple[int, int]]] = partial(
            self._regexp.Match, re2._Anchor.ANCHOR_START)


    def search(self, data: bytes, pos: int = 0) -> Found | None:
        """Leftmost-first match starting at or after ``pos`` (context before ``pos`` still counts)."""
        spans = self._regexp.Match(self._anchor, data, pos, len(data))
        start, end = spans[0]
        if start < 0:
            return None
        return Found(start, end, tuple(spans[1:]))

    def fullmatch(self, data: bytes) -> bool:
        spans = self._regexp.Match(re2._Anchor.ANCHOR_BOTH, data, 0, len(data))
        return bool(spans[0][0] >= 0)


class PatternSet:
    """Which of many patterns match anywhere in a text, in one DFA pass.

    SECURITY: RE2::Set reports "no match" both when nothing matches and when its DFA runs
    out of memory; it has no NFA fallback. The DFA in many-match mode never bails out for
    being slow, so running out of memory needs a cache too small for one state: ruled out
    by MAX_MEM against MAX_PROGRAM_SIZE (checked when the set is built). The engine still
    treats the set as a filter only: a pattern it skips is one the set proved absent.
    """

    __slots__ = ("_set", "size")

    def __init__(self, sources: Iterable[str]) -> None:
        self._set = re2.Set.SearchSet(_options())
        self.size = 0
        for source in sources:
            try:
                self._set.Add(source.encode("utf-8"))
            except re2.error as exc:
                raise PatternError(f"RE2 set refuses pattern {source[:60]!r}") from exc
            self.size += 1
        try:
            self._set.Compile()
        except re2.error as exc:
            raise PatternError("RE2 set does not compile within its memory budget") from exc

    def matching(self, data: bytes) -> list[int]:
        """Indexes (in insertion order) of the patterns that match somewhere in ``data``."""
        found: list[int] = self._set._set.Match(data)
        return found
