"""Process secrets kept in the state directory (dev issuer key, PII keys).

One way to create them: generated once, written 0600 under a private name and linked
into place (``gateway.files.write_private``), so nothing can read them in between and two
workers starting together agree on one key.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from gateway.files import write_private


def secret_file_problem(path: Path) -> str | None:
    """Why a secret file is unsafe to use, or ``None``.

    The rule (OpenSSH ``StrictModes`` style): the file (a symlink is judged by its target,
    as Kubernetes Secret volumes are symlinks) belongs to the gateway's user or to root,
    nobody else may read or write it, and its group may at most read it when that group
    is the gateway's own (a Kubernetes ``fsGroup`` with ``defaultMode: 0440``).
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (os.geteuid(), 0):
        return f"owned by uid {st.st_uid}, not by the gateway's user ({os.geteuid()}) or root"
    if mode & 0o007 or mode & 0o020 or (mode & 0o040 and st.st_gid != os.getegid()):
        return f"mode {mode:04o} lets other users read or change it; expected 0600"
    return None


class InsecureSecretFile(Exception):
    """An existing secret file other users can read or change (CATALOGUE SEC-04)."""


def read_or_create(path: Path, make: Callable[[], bytes], *, allow_insecure: bool = False,
                   check: Callable[[bytes], str | None] | None = None) -> bytes:
    """The file's bytes; on first use, ``make()`` is written there atomically.

    An existing file is refused when others may read or change it, unless ``allow_insecure``
    (the operator's ``--allow-insecure-secret-files``, reported by gateway/startup_checks.py),
    and when ``check`` finds a problem with what it holds.
    """
    if path.exists():
        problem = secret_file_problem(path)
        if problem is not None and not allow_insecure:
            # SECURITY: a key another user could read is already disclosed; one they could
            # write is theirs. Either way the gateway must not keep using it silently.
            raise InsecureSecretFile(f"{path}: {problem}")
        data = path.read_bytes()
        weak = check(data) if check is not None else None
        if weak is not None:
            # SECURITY: a key file an operator filled by hand ("aaaa...", a short hex string)
            # is no key; no override, as a permission problem has (the fix is one command).
            raise InsecureSecretFile(f"{path}: {weak}")
        return data
    path.parent.mkdir(parents=True, exist_ok=True)
    data = make()
    # SECURITY: created 0600; never world-readable, even briefly. Written whole under a
    # private name, then linked into place: another process (a second worker starting at
    # the same moment) sees no file or the whole key, never a half-written one. The link
    # fails if another process won the race; its key is the one everybody uses.
    if not write_private(path, data, replace=False):
        return path.read_bytes()
    return data
