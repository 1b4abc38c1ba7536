"""The scan's own Python stays linear, not only its RE2 searches (PII-08).

Why: RE2 bounds every search, but the Python around it can still be quadratic. Asking
"is this digit already masked?" by looking through every reading found so far cost
O(readings) per question; on 64 KiB of phones glued back to back that was 790 ms
(issue 5). Counted work, not time: the lines of ``privacy/pii`` the interpreter runs
(a comprehension's lines count per item), at 5 KB and 50 KB of every pathological input.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from bench.pii_pathological import PATHOLOGICAL
from privacy.pii import PiiEngine, Replace
from privacy.pii.recognizers import ENTITIES

ENGINE = PiiEngine()
TAGS = {entity: Replace() for entity in ENTITIES}
PACKAGE = str(Path(sys.modules[PiiEngine.__module__].__file__ or "").parent)


def _lines_run(text: str) -> int:
    """Lines of privacy/pii executed by one ``mask`` of ``text``."""
    count = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename.startswith(PACKAGE) else None

    sys.settrace(tracer)
    try:
        ENGINE.mask(text, TAGS)
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize(("name", "make"), PATHOLOGICAL, ids=[p[0] for p in PATHOLOGICAL])
def test_python_work_grows_linearly(name: str, make: Callable[[int], str]) -> None:
    small, large = _lines_run(make(5_000)), _lines_run(make(50_000))
    # 10x the text: about 10x the lines; the quadratic version ran ~60x on glued phones.
    assert large <= 13 * max(small, 200), f"{name}: 5 KB {small} lines, 50 KB {large} lines"


def test_the_count_sees_the_scan() -> None:
    """The tracer counts the engine's lines (else the test above proves nothing)."""
    assert _lines_run(dict(PATHOLOGICAL)["phones glued by -"](5_000)) > 10_000
