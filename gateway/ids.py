"""Random identifiers for the request path, without a system call per identifier.

``secrets.token_hex`` calls ``os.urandom``, which releases the GIL around ``getrandom``;
when an executor thread (audit writer, onnxruntime) holds the GIL, the event loop then
waits up to the interpreter's switch interval (5 ms) to get it back. Profiling the
gateway under load showed 8-12 % of the event loop's samples there. The bytes below are
still the kernel's CSPRNG output, drawn 4 KiB at a time.
"""

from __future__ import annotations

import os
import threading

_BATCH = 4096


class _Pool:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        # SECURITY: called in a forked child too: it must not replay its parent's unused bytes.
        self._lock = threading.Lock()
        self._buf = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        if n > _BATCH:
            return os.urandom(n)
        with self._lock:
            # SECURITY: every byte is handed out once; the lock keeps two threads from
            # reading the same slice (identifiers must not collide).
            if self._pos + n > len(self._buf):
                self._buf = os.urandom(_BATCH)
                self._pos = 0
            out = self._buf[self._pos:self._pos + n]
            self._pos += n
            return out


_POOL = _Pool()


def random_hex(nbytes: int) -> str:
    """``nbytes`` of kernel randomness as hex, like :func:`secrets.token_hex`."""
    return _POOL.take(nbytes).hex()


os.register_at_fork(after_in_child=_POOL.reset)
