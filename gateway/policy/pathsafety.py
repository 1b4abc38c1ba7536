"""Policy files others could have written are not policy (CATALOGUE SEC-10).

A policy file, or the target of a symlink in the policy directory, that any local user
may write lets that user switch every protection off at the next reload. So does a
directory on the way to it that others may write: they can swap the file (or the link)
for their own. The loader refuses both.

What stays loadable: Kubernetes ConfigMap volumes (``name -> ..data/name``, ``..data ->
..2025_01_01...``, root-owned, read-only), and paths through sticky world-writable
directories like ``/tmp`` whose next entry belongs to root or the gateway's user
(others cannot rename or replace entries they do not own there; OpenSSH ``StrictModes``
judges them the same way). A group-writable directory is accepted only when its group
is root's or the gateway's own (per-user groups, a Kubernetes ``fsGroup``). Owners are
not judged otherwise: a read-only bind mount of the operator's checkout belongs to the
operator, not to the gateway's user, and is fine.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def unsafe_directory(path: Path) -> str | None:
    """Why ``path`` (resolved) or one of its ancestors lets others replace what it holds."""
    resolved = path.resolve()
    chain = [*reversed(resolved.parents), resolved]
    for index, folder in enumerate(chain):
        st = folder.stat()
        mode = stat.S_IMODE(st.st_mode)
        if mode & stat.S_IWOTH:
            if not mode & stat.S_ISVTX or index == len(chain) - 1:
                return f"directory {folder} is world-writable"
            # Sticky: only the entry's owner (or root) may rename or delete it.
            owner = chain[index + 1].stat().st_uid
            if not _trusted_owner(owner):
                return f"{chain[index + 1]} in sticky directory {folder} belongs to uid {owner}"
        elif mode & stat.S_IWGRP and st.st_gid not in (0, os.getegid()):
            return f"directory {folder} is writable by group {st.st_gid}"
    return None


def unsafe_file(st: os.stat_result) -> str | None:
    """Why an opened policy file (``fstat`` of what was actually read) is not trustworthy."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        return f"world-writable (mode {mode:04o})"
    if mode & stat.S_IWGRP and st.st_gid not in (0, os.getegid()):
        return f"writable by group {st.st_gid} (mode {mode:04o})"
    return None


def unsafe_policy_file(path: Path, opened: os.stat_result) -> str | None:
    """The file's own mode, then the directories leading to its real location."""
    problem = unsafe_file(opened)
    if problem is not None:
        return problem
    if path.is_symlink():
        return unsafe_directory(path.resolve().parent)
    return None
