"""Signed checkpoints of the chain head, kept in a separate anchor store.

Every N records or T seconds the writer signs ``(seq, head hash)`` with an Ed25519 key
and appends the checkpoint to ``<anchor_dir>/checkpoints.jsonl``. A hash chain alone
cannot show that its tail was cut off or that the whole directory was replaced by an
older, perfectly valid copy (Ma & Tsudik's truncation attack); a signed checkpoint
naming a later ``seq`` than the log holds can.

Checkpoints are chained too (``n`` counts them, ``prev`` is the SHA-256 of the previous
checkpoint line), so deleting one from the middle of the anchor store shows.

Keys: ``<key_dir>/anchor/<kid>.key`` (PKCS#8 PEM, mode 0600, generated on first use),
``<kid>.pub`` next to it, ``CURRENT`` naming the signing key. The public half is also
published in ``<anchor_dir>/keys/<kid>.pub`` for readers without the key store, but
verification trusts the key store's copy (or keys pinned on the command line): an
attacker who swaps the published key to re-sign forged checkpoints is caught. Rotation
makes a new current key; old public keys stay, so old checkpoints keep verifying.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.audit.crypto import KeyStoreError
from gateway.audit.records import (
    GENESIS,
    RecordFormatError,
    canonical,
    canonical_form_of,
    load_stored_json,
    normalize,
)
from gateway.files import ensure_dir, fsync_dir, read_private, write_private

CHECKPOINT_FILE = "checkpoints.jsonl"
_ANCHOR_KID_RE = re.compile(r"a-[0-9a-f]{16}")
# Fields a chain record gets after it was signed (the record MAC covers them).
_CHAIN_FIELDS = frozenset({"seq", "prev_hash", "time", "key_id", "mac"})


class AnchorError(Exception):
    """The anchor store or its keys are unusable."""


def valid_anchor_kid(kid: object) -> bool:
    # SECURITY: ids read from checkpoints or records become file names: exact shape only.
    return isinstance(kid, str) and _ANCHOR_KID_RE.fullmatch(kid) is not None


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_pem(data: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise AnchorError("not an Ed25519 public key")
    return key


def signing_bytes(obj: Mapping[str, Any], *, in_chain: bool = False) -> bytes:
    """What a signature covers: every field but ``sig``.

    A signed chain record (tombstone, erasure, key rotation) is signed before the writer
    adds ``seq``, ``prev_hash``, ``time``, ``key_id`` and ``mac``, so those are left out
    when checking it (``in_chain``); a checkpoint is checked whole, ``seq`` included.
    """
    skip = _CHAIN_FIELDS if in_chain else frozenset()
    return canonical(normalize({k: v for k, v in obj.items() if k != "sig" and k not in skip}))


def check_signature(obj: Mapping[str, Any], trusted: Mapping[str, Ed25519PublicKey], *,
                    in_chain: bool = False) -> str | None:
    """None if ``obj`` carries a valid signature by a trusted key, else why not."""
    kid = obj.get("sig_key_id")
    sig = obj.get("sig")
    if not isinstance(kid, str) or not isinstance(sig, str):
        return "unsigned"
    key = trusted.get(kid)
    if key is None:
        return f"signed by unknown key {kid!r}"
    try:
        key.verify(base64.b64decode(sig, validate=True), signing_bytes(obj, in_chain=in_chain))
    except (InvalidSignature, ValueError, binascii.Error):
        return f"bad signature (key {kid})"
    return None


class AnchorKeys:
    """Ed25519 signing keys with ids; generated on first use, rotatable."""

    def __init__(self, key_dir: Path, *, create: bool = True) -> None:
        self.root = key_dir / "anchor"
        self.create = create
        self._lock = threading.Lock()
        self._current: tuple[str, Ed25519PrivateKey] | None = None

    def current(self) -> tuple[str, Ed25519PrivateKey]:
        with self._lock:
            if self._current is None:
                self._current = self._load_current()
            return self._current

    def _load_current(self) -> tuple[str, Ed25519PrivateKey]:
        pointer = self.root / "CURRENT"
        if pointer.exists():
            kid = read_private(pointer).decode("ascii").strip()
            if not valid_anchor_kid(kid):
                raise KeyStoreError(f"{pointer} holds no valid key id")
            key = serialization.load_pem_private_key(read_private(self.root / f"{kid}.key"), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise KeyStoreError(f"anchor key {kid} is not Ed25519")
            return kid, key
        if not self.create:
            raise KeyStoreError(f"no anchor signing key in {self.root}")
        return self._generate()

    def _generate(self) -> tuple[str, Ed25519PrivateKey]:
        ensure_dir(self.root.parent)
        ensure_dir(self.root)
        kid = f"a-{secrets.token_hex(8)}"
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        # SECURITY: the private key is created 0600 in a 0700 directory, never world-readable.
        write_private(self.root / f"{kid}.key", pem)
        write_private(self.root / f"{kid}.pub", public_pem(key.public_key()))
        write_private(self.root / "CURRENT", kid.encode("ascii"), replace=True)
        return kid, key

    def rotate(self) -> tuple[str, str]:
        """Make a new current key; return ``(old_kid, new_kid)``."""
        old, _key = self.current()
        with self._lock:
            self._current = self._generate()
            return old, self._current[0]

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        """Every public key the key store vouches for (the trust root of ``verify``)."""
        out: dict[str, Ed25519PublicKey] = {}
        if self.root.is_dir():
            for path in sorted(self.root.glob("a-*.pub")):
                if valid_anchor_kid(path.stem):
                    out[path.stem] = load_public_pem(path.read_bytes())
        return out

    def sign(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """``obj`` plus ``sig_key_id`` and ``sig`` (Ed25519 over :func:`signing_bytes`)."""
        kid, key = self.current()
        return sign_with(kid, key, obj)


def sign_with(kid: str, key: Ed25519PrivateKey, obj: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` signed by a given key (rotation records are signed by the outgoing key)."""
    signed = dict(obj)
    signed["sig_key_id"] = kid
    signed["sig"] = base64.b64encode(key.sign(signing_bytes(signed))).decode("ascii")
    return signed


@dataclass(frozen=True, slots=True)
class Checkpoint:
    n: int
    seq: int
    head: str
    prev: str
    record: dict[str, Any]
    raw: bytes

    @property
    def line_hash(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()


def parse_checkpoint(raw: bytes) -> Checkpoint:
    """A checkpoint line (without ``\\n``), refused unless canonical and complete."""
    obj = load_stored_json(raw, "checkpoint")
    if not isinstance(obj, dict) or obj.get("type") != "checkpoint":
        raise RecordFormatError("not a checkpoint")
    # SECURITY: a checkpoint with no canonical form (NaN) is a corrupt anchor store, not a
    # usage error: ValueError escaped to the CLI as exit status 2 instead of 1.
    if canonical_form_of(obj) != raw:
        raise RecordFormatError("checkpoint not in canonical form")
    n, seq, head, prev = obj.get("n"), obj.get("seq"), obj.get("head"), obj.get("prev")
    if not (type(n) is int and type(seq) is int and isinstance(head, str) and isinstance(prev, str)):
        raise RecordFormatError("checkpoint fields missing")
    return Checkpoint(n, seq, head, prev, obj, raw)


def read_checkpoint_lines(anchor_dir: Path) -> list[tuple[bytes, bool]]:
    """Raw checkpoint lines (without ``\\n``) and whether each was complete."""
    path = anchor_dir / CHECKPOINT_FILE
    if not path.exists():
        return []
    out = []
    with path.open("rb") as handle:
        for line in handle:
            complete = line.endswith(b"\n")
            out.append((line[:-1] if complete else line, complete))
    return out


def load_published_keys(anchor_dir: Path) -> dict[str, bytes]:
    """``kid -> PEM`` as published in the anchor store (untrusted on its own)."""
    folder = anchor_dir / "keys"
    out: dict[str, bytes] = {}
    if folder.is_dir():
        for path in sorted(folder.glob("a-*.pub")):
            if valid_anchor_kid(path.stem) and not path.is_symlink():
                out[path.stem] = path.read_bytes()
    return out


class AnchorStore:
    """Appends signed checkpoints; used only by the writer thread of one AuditLog."""

    def __init__(self, anchor_dir: Path, keys: AnchorKeys) -> None:
        self.anchor_dir = anchor_dir
        self.keys = keys
        self._fd: int | None = None
        self._last: Checkpoint | None = None

    @property
    def last(self) -> Checkpoint | None:
        return self._last

    def open(self) -> Checkpoint | None:
        """Open for appending; drop a torn last line left by a crash; return the last checkpoint."""
        ensure_dir(self.anchor_dir, private=False)
        path = self.anchor_dir / CHECKPOINT_FILE
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
        if created:
            fsync_dir(self.anchor_dir)
        size = os.fstat(fd).st_size
        good = 0
        last: Checkpoint | None = None
        offset = 0
        for raw, complete in read_checkpoint_lines(self.anchor_dir):
            if not complete:
                break
            with contextlib.suppress(RecordFormatError):
                last = parse_checkpoint(raw)
            offset += len(raw) + 1
            good = offset
        if good < size:
            # A checkpoint is written before anything depends on it; a torn one is unsigned
            # noise from a crash, never evidence.
            os.ftruncate(fd, good)
            os.fsync(fd)
        self._fd, self._last = fd, last
        self.publish_current()
        return last

    def publish_current(self) -> None:
        kid, key = self.keys.current()
        folder = self.anchor_dir / "keys"
        target = folder / f"{kid}.pub"
        if not target.exists():
            ensure_dir(folder, private=False)
            tmp = folder / f".{kid}.{secrets.token_hex(4)}.tmp"
            tmp.write_bytes(public_pem(key.public_key()))
            tmp.replace(target)
            fsync_dir(folder)

    def write(self, *, seq: int, head: str, segment: str, time: str) -> Checkpoint:
        """Sign and durably append a checkpoint for ``(seq, head)``."""
        if self._fd is None:
            raise AnchorError("anchor store not open")
        n = self._last.n + 1 if self._last else 1
        prev = self._last.line_hash if self._last else GENESIS
        obj = self.keys.sign({"type": "checkpoint", "n": n, "seq": seq, "head": head, "prev": prev,
                              "segment": segment, "at": time})
        raw = canonical(normalize(obj))
        os.write(self._fd, raw + b"\n")
        os.fsync(self._fd)
        self._last = Checkpoint(n, seq, head, prev, obj, raw)
        return self._last

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
