"""Small, careful filesystem operations for private, durable files (audit trail, keys,
the DP ledger, the policy high-water mark).

A record is durable when its bytes *and* the directory entry of the file holding them
have reached stable storage, so every file we create is followed by an fsync of its
directory. Secrets are written to a temporary name, fsynced, then renamed into place,
so a crash never leaves half a key behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

_DIR_MODE = 0o700
_FILE_MODE = 0o600


class InsecurePermissions(Exception):
    """A key file or key directory is readable or writable by other users."""


def ensure_dir(path: Path, *, private: bool = True) -> None:
    """Create ``path`` (and parents) if missing; private directories get mode 0700."""
    if path.is_symlink():
        # SECURITY: a symlinked audit or key directory lets whoever controls the link
        # target redirect where records or keys are written.
        raise InsecurePermissions(f"{path} is a symbolic link")
    if not path.exists():
        path.mkdir(parents=True, mode=_DIR_MODE if private else 0o755, exist_ok=True)
        fsync_dir(path.parent)
    if private:
        mode = path.stat().st_mode
        if stat.S_IMODE(mode) & 0o077:
            path.chmod(_DIR_MODE)


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (new, renamed, removed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_private_file(path: Path) -> None:
    """Refuse a key file that other users can read or write (or that is a symlink)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise InsecurePermissions(f"{path} is a symbolic link")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise InsecurePermissions(f"{path} has mode {stat.S_IMODE(st.st_mode):o}; expected 600")


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """A regular file's bytes, at most ``max_bytes``, else :class:`ValueError` (OSError as is).

    # SECURITY: opened non-blocking and checked with fstat before reading, so a FIFO given
    # as a path never hangs a command and /dev/zero (or a huge file) never fills memory.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path}: not a regular file")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path}: larger than {max_bytes} bytes")
    return data


def read_private(path: Path) -> bytes:
    """Read a secret, refusing symlinks and loose permissions."""
    check_private_file(path)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def write_private(path: Path, data: bytes, *, replace: bool = False) -> bool:
    """Write a secret durably with mode 0600; return False if it exists and not ``replace``.

    The bytes go to a temporary file first, so a reader (or a crash) never sees a
    partial key; without ``replace`` the final name is claimed with ``link``, which fails
    if another writer got there first.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, _FILE_MODE)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            tmp.replace(path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                tmp.unlink()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return True


def secure_delete(path: Path) -> bool:
    """Overwrite a small secret file with random bytes, fsync, unlink, fsync the directory.

    SECURITY: overwriting in place is best effort: on SSDs (wear levelling), copy-on-write
    or journalling-data filesystems and in backups the old blocks may survive. Keep the
    key store on an encrypted volume excluded from backups, or in a KMS, so that deleting
    the key is what makes the data unreadable.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        os.write(fd, secrets.token_bytes(max(size, 32)))
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()
    fsync_dir(path.parent)
    return True
