"""Process secrets kept in the state directory (dev issuer key, PII keys).

One way to create them: generated once, written 0600 with O_EXCL so nothing can read
them in between and two workers starting together agree on one key.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def read_or_create(path: Path, make: Callable[[], bytes]) -> bytes:
    """The file's bytes; on first use, ``make()`` is written there atomically."""
    if path.exists():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = make()
    # SECURITY: created 0600 atomically; never world-readable, even briefly. O_EXCL: if another
    # process won the race, its key is the one everybody uses.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return data
