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

import errno
import os
import stat
from pathlib import Path


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


_MAX_LINK_HOPS = 40  # Linux's own limit (ELOOP)


def _judge(folder: Path, entry: Path | None) -> str | None:
    """Why others could replace ``entry`` in ``folder`` (``None``: ``folder`` itself, judged strictly)."""
    st = folder.stat()
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        if not mode & stat.S_ISVTX or entry is None:
            return f"directory {folder} is world-writable"
        # Sticky: only the entry's owner (or root) may rename or delete it.
        owner = entry.lstat().st_uid
        if not _trusted_owner(owner):
            return f"{entry} in sticky directory {folder} belongs to uid {owner}"
    elif mode & stat.S_IWGRP and st.st_gid not in (0, os.getegid()):
        return f"directory {folder} is writable by group {st.st_gid}"
    return None


def _chain_problem(real: Path, entry: Path | None) -> str | None:
    """Judge every directory from ``/`` down to ``real`` (a path without links), then ``entry`` in it."""
    chain = [*reversed(real.parents), real]
    for index, folder in enumerate(chain):
        problem = _judge(folder, chain[index + 1] if index + 1 < len(chain) else entry)
        if problem is not None:
            return problem
    return None


def followed_links(path: Path) -> list[Path]:
    """Every symlink followed while resolving ``path``, each named by its real directory.

    Resolution is done by hand, one component at a time, so that a link reached through
    another link (``policies -> /tmp/x/pol``, ``access.yaml -> /tmp/x/acc -> /etc/acc``)
    is seen where it lives; :meth:`Path.resolve` would jump straight to the end.
    """
    links: list[Path] = []
    current = Path("/")
    todo = list(reversed(path.absolute().parts[1:]))
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            current = current.parent
            continue
        candidate = current / part
        if not candidate.is_symlink():
            current = candidate
            continue
        links.append(candidate)
        if len(links) > _MAX_LINK_HOPS:
            raise OSError(errno.ELOOP, "too many levels of symbolic links", str(path))
        target = candidate.readlink()
        if target.is_absolute():
            current = Path("/")
            todo.extend(reversed(target.parts[1:]))
        else:
            todo.extend(reversed(target.parts))
    return links


def unsafe_directory(path: Path) -> str | None:
    """Why ``path``, one of its ancestors, or a link on the way to it lets others replace what it holds.

    # SECURITY: not only the resolved path: every symlink followed to get there is judged in
    # the directory that holds it. A link in a world-writable directory (``--policies
    # /tmp/x/pol`` with ``/tmp/x`` mode 0777, or ``access.yaml -> /tmp/x/acc -> /etc/acc``)
    # can be swapped by anyone for a link to their own policy, however safe its target is.
    """
    for link in followed_links(path):
        problem = _chain_problem(link.parent, link)
        if problem is not None:
            return problem
    return _chain_problem(path.resolve(), None)


def unsafe_file(st: os.stat_result) -> str | None:
    """Why an opened policy file (``fstat`` of what was actually read) is not trustworthy."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        return f"world-writable (mode {mode:04o})"
    if mode & stat.S_IWGRP and st.st_gid not in (0, os.getegid()):
        return f"writable by group {st.st_gid} (mode {mode:04o})"
    return None


def unsafe_policy_file(path: Path, opened: os.stat_result) -> str | None:
    """The file's own mode, then every link on the way and the directories holding its real location."""
    problem = unsafe_file(opened)
    if problem is not None:
        return problem
    if path.is_symlink():
        return unsafe_directory(path.resolve().parent) or next(
            (p for link in followed_links(path) if (p := _chain_problem(link.parent, link)) is not None), None)
    return None
