"""The audit key store: chain-MAC keys, pseudonym keys and one AES-GCM key per data subject.

Layout of the key directory (mode 0700, every key file 0600, one small file per key)::

    mac/<kid>.key, mac/CURRENT              HMAC-SHA256 keys of the record chain
    pseudonym/<kid>.key, pseudonym/CURRENT  HMAC-SHA256 keys of subject pseudonyms
    subjects/<pseudonym>/<gen>.key          AES-256-GCM key of one data subject
    anchor/...                              Ed25519 checkpoint keys (see anchors.py)

Crypto-shredding: a subject's personal fields are only ever stored encrypted under that
subject's key, so destroying the key file makes them unreadable while every record, its
hash and its MAC stay in place and the chain still verifies. Pseudonyms are keyed
HMACs: linkable across records for review, not reversible, and unlinkable for a whole
epoch once its pseudonym key is retired.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.audit.records import canonical
from gateway.files import ensure_dir, fsync_dir, read_private, secure_delete, write_private

ENC_ALG = "A256GCM"
_NONCE_BYTES = 12
_PSEUDONYM_HEX = 32  # 128 bits: collision-free at any realistic number of subjects
_PSEUDONYM_CACHE = 65_536
_FAMILY_KID_RE = re.compile(r"[a-z]-[0-9a-f]{16}")
_PSEUDONYM_RE = re.compile(r"[0-9a-f]{32}")
_SUBJECT_KID_RE = re.compile(r"([0-9a-f]{32})\.([0-9a-f]{16})")


class KeyStoreError(Exception):
    """The key store is missing, unreadable or inconsistent."""


# Between tenant and subject in an owner string: a control character, which neither holds
# (the gateway refuses a token whose sub or tenant has one; subject_owner refuses it too).
OWNER_SEPARATOR = "\x1f"


def subject_owner(tenant: str, subject_id: str) -> str:
    """The owner string of an authenticated data subject (namespaced, never an address).

    SECURITY: a person is (tenant, sub), never sub alone: each tenant has its own users, so
    ``alice`` of acme and ``alice`` of globex are two people. One owner for both would give
    them one pseudonym (linkable across tenants) and one key (erasing one shreds the other's
    audit evidence). The separator keeps the string injective: it is refused in either part.
    """
    if not tenant or not subject_id:
        raise ValueError("a data subject needs both a tenant and a subject id")
    if OWNER_SEPARATOR in tenant or OWNER_SEPARATOR in subject_id:
        raise ValueError("a tenant or subject id holds a control character (U+001F): it names no one")
    return "sub:" + tenant + OWNER_SEPARATOR + subject_id


def address_owner(client_addr: str) -> str:
    """The owner string of a client address (refusals before authentication)."""
    return "addr:" + client_addr


def owner_for(*, subject_id: str | None = None, tenant: str | None = None, client_addr: str | None = None) -> str:
    """The owner an erasure or access request names: a subject of a tenant, or an address.

    Raises ValueError for anything else: a subject without its tenant would have to mean
    every tenant's person of that name, and an address belongs to no tenant.
    """
    if (subject_id is None) == (client_addr is None):
        raise ValueError("name exactly one of subject_id or client_addr")
    if subject_id is not None:
        if tenant is None:
            raise ValueError("a subject id names a person only within a tenant: name the tenant too")
        return subject_owner(tenant, subject_id)
    if tenant is not None:
        raise ValueError("a client address belongs to no tenant: name no tenant with it")
    return address_owner(client_addr or "")


def valid_family_kid(kid: object) -> bool:
    # SECURITY: key ids come from records, which an attacker may have written; they are
    # used as file names, so only this exact shape is ever turned into a path.
    return isinstance(kid, str) and _FAMILY_KID_RE.fullmatch(kid) is not None


class KeyFamily:
    """Symmetric keys with ids, a ``CURRENT`` pointer, rotation and retirement.

    Thread-safe: the group-commit writer thread and the event loop both read keys.
    """

    def __init__(self, root: Path, prefix: str, *, create: bool) -> None:
        self.root = root
        self.prefix = prefix
        self.create = create
        self._lock = threading.Lock()
        self._keys: dict[str, bytes] = {}
        self._current: str | None = None

    def _path(self, kid: str) -> Path:
        return self.root / f"{kid}.key"

    def current(self) -> tuple[str, bytes]:
        with self._lock:
            if self._current is None:
                self._current = self._load_current()
            return self._current, self._keys[self._current]

    def _load_current(self) -> str:
        pointer = self.root / "CURRENT"
        if pointer.exists():
            kid = read_private(pointer).decode("ascii").strip()
            if not valid_family_kid(kid):
                raise KeyStoreError(f"{pointer} holds no valid key id")
            self._keys[kid] = self._read(kid)
            return kid
        if not self.create:
            raise KeyStoreError(f"no current key in {self.root}")
        return self._new_current()

    def _new_current(self) -> str:
        ensure_dir(self.root)
        kid = f"{self.prefix}-{secrets.token_hex(8)}"
        key = secrets.token_bytes(32)
        write_private(self._path(kid), key)
        write_private(self.root / "CURRENT", kid.encode("ascii"), replace=True)
        self._keys[kid] = key
        return kid

    def _read(self, kid: str) -> bytes:
        try:
            key = read_private(self._path(kid))
        except FileNotFoundError as exc:
            raise KeyStoreError(f"key {kid} is missing from {self.root}") from exc
        if len(key) != 32:
            raise KeyStoreError(f"key {kid} has the wrong length")
        return key

    def get(self, kid: str) -> bytes | None:
        """A key by id, or None if unknown, retired or not a valid id."""
        if not valid_family_kid(kid) or not kid.startswith(self.prefix + "-"):
            return None
        with self._lock:
            if kid not in self._keys:
                try:
                    self._keys[kid] = self._read(kid)
                except KeyStoreError:
                    return None
            return self._keys[kid]

    def all(self) -> dict[str, bytes]:
        """Every key still held (current and older ones)."""
        out: dict[str, bytes] = {}
        if self.root.is_dir():
            for path in sorted(self.root.glob(f"{self.prefix}-*.key")):
                key = self.get(path.stem)
                if key is not None:
                    out[path.stem] = key
        return out

    def rotate(self) -> str:
        """Make a new current key; older keys stay for verification until retired."""
        with self._lock:
            self._current = self._new_current()
            return self._current

    def retire(self, kid: str) -> bool:
        """Destroy an old key (never the current one)."""
        current, _key = self.current()
        if kid == current:
            raise KeyStoreError("the current key cannot be retired; rotate first")
        if not valid_family_kid(kid):
            return False
        with self._lock:
            self._keys.pop(kid, None)
            return secure_delete(self._path(kid))


@dataclass(frozen=True, slots=True)
class Erasure:
    owner_pseudonyms: tuple[str, ...]
    key_ids: tuple[str, ...]


class SubjectKeys:
    """One AES-256-GCM key per data subject (per pseudonym epoch), created on first use."""

    def __init__(self, root: Path, *, create: bool, cache_size: int = 4096) -> None:
        self.root = root
        self.create = create
        self._lock = threading.Lock()
        self._by_kid: OrderedDict[str, AESGCM] = OrderedDict()
        self._current: OrderedDict[str, str] = OrderedDict()  # pseudonym -> kid
        self._cache_size = cache_size

    def _remember(self, pseudonym: str, kid: str, aead: AESGCM) -> None:
        self._by_kid[kid] = aead
        self._current[pseudonym] = kid
        while len(self._by_kid) > self._cache_size:
            self._by_kid.popitem(last=False)
        while len(self._current) > self._cache_size:
            self._current.popitem(last=False)

    def for_pseudonym(self, pseudonym: str) -> tuple[str, AESGCM]:
        """The subject's current key, created (durably, 0600) if it has none yet."""
        if not _PSEUDONYM_RE.fullmatch(pseudonym):
            raise KeyStoreError("invalid pseudonym")
        with self._lock:
            kid = self._current.get(pseudonym)
            # An erasure by another process (`infergate audit erase` while the gateway runs)
            # deletes the file before the gateway reads its notice: a record sealed under the
            # cached, destroyed key would be unreadable at birth (missing from the person's
            # next access report), so the file is checked, as in get(), and a new key made.
            if (kid is not None and kid in self._by_kid
                    and (self.root / pseudonym / f"{kid.partition('.')[2]}.key").exists()):
                self._current.move_to_end(pseudonym)
                return kid, self._by_kid[kid]
            if kid is not None:
                self._by_kid.pop(kid, None)
                self._current.pop(pseudonym, None)
            folder = self.root / pseudonym
            existing = sorted(folder.glob("*.key")) if folder.is_dir() else []
            for path in existing:
                kid = f"{pseudonym}.{path.stem}"
                aead = self._load(kid)
                if aead is not None:
                    self._remember(pseudonym, kid, aead)
                    return kid, aead
            if not self.create:
                raise KeyStoreError("no key for this subject")
            ensure_dir(self.root)
            ensure_dir(folder)
            gen = secrets.token_hex(8)
            key = AESGCM.generate_key(bit_length=256)
            write_private(folder / f"{gen}.key", key)
            kid = f"{pseudonym}.{gen}"
            aead = AESGCM(key)
            self._remember(pseudonym, kid, aead)
            return kid, aead

    def _load(self, kid: str) -> AESGCM | None:
        match = _SUBJECT_KID_RE.fullmatch(kid)
        if match is None:
            return None
        try:
            key = read_private(self.root / match.group(1) / f"{match.group(2)}.key")
        except FileNotFoundError:
            return None
        return AESGCM(key) if len(key) == 32 else None

    def get(self, kid: str) -> AESGCM | None:
        """A subject key by id; None once it has been erased (or if the id is invalid)."""
        match = _SUBJECT_KID_RE.fullmatch(kid)
        if match is None:
            return None
        with self._lock:
            aead = self._by_kid.get(kid)
            # An erasure by another process deletes the file: never trust the cache alone.
            if aead is not None and (self.root / match.group(1) / f"{match.group(2)}.key").exists():
                return aead
            self._by_kid.pop(kid, None)
            aead = self._load(kid)
            if aead is not None:
                self._by_kid[kid] = aead
            return aead

    def evict(self, pseudonym: str) -> None:
        """Forget cached keys of a subject (after an erasure done by another process)."""
        with self._lock:
            self._current.pop(pseudonym, None)
            for kid in [k for k in self._by_kid if k.startswith(pseudonym + ".")]:
                del self._by_kid[kid]

    def held(self, pseudonym: str) -> bool:
        """True if any key of this pseudonym exists (its records can still be read)."""
        folder = self.root / pseudonym
        return bool(_PSEUDONYM_RE.fullmatch(pseudonym)) and folder.is_dir() and any(folder.glob("*.key"))

    def erase(self, pseudonym: str) -> list[str]:
        """Destroy every key of one pseudonym; return the destroyed key ids."""
        if not _PSEUDONYM_RE.fullmatch(pseudonym):
            raise KeyStoreError("invalid pseudonym")
        self.evict(pseudonym)
        folder = self.root / pseudonym
        destroyed: list[str] = []
        with self._lock:
            if folder.is_dir():
                for path in sorted(folder.glob("*.key")):
                    if secure_delete(path):
                        destroyed.append(f"{pseudonym}.{path.stem}")
                for leftover in folder.iterdir():
                    leftover.unlink()
                folder.rmdir()
                fsync_dir(self.root)
        return destroyed


class KeyStore:
    """All symmetric audit keys, in one private directory apart from the log."""

    def __init__(self, directory: Path, *, create: bool = True) -> None:
        self.directory = directory
        if create:
            ensure_dir(directory)
        elif not directory.is_dir():
            raise KeyStoreError(f"no key store at {directory}")
        self.mac = KeyFamily(directory / "mac", "m", create=create)
        self.pseudonyms = KeyFamily(directory / "pseudonym", "p", create=create)
        self.subjects = SubjectKeys(directory / "subjects", create=create)
        self._pseudonym_cache: dict[tuple[str, str], str] = {}

    def pseudonym(self, owner: str) -> str:
        """HMAC-SHA256 of the owner string under the current pseudonym key (128-bit hex)."""
        kid, key = self.pseudonyms.current()
        cache_key = (kid, owner)
        value = self._pseudonym_cache.get(cache_key)
        if value is None:
            value = _pseudonym(key, owner)
            if len(self._pseudonym_cache) >= _PSEUDONYM_CACHE:
                self._pseudonym_cache.clear()  # cheap bound; a miss only costs one HMAC
            self._pseudonym_cache[cache_key] = value
        return value

    def all_pseudonyms(self, owner: str) -> list[str]:
        """The owner's pseudonym under every pseudonym key still held (for export, erasure)."""
        return sorted({_pseudonym(key, owner) for key in self.pseudonyms.all().values()})

    def holds(self, owner: str) -> bool:
        """True if personal data of this owner can still be read (some subject key exists)."""
        return any(self.subjects.held(p) for p in self.all_pseudonyms(owner))

    def erase_owner(self, owner: str) -> Erasure:
        """Crypto-shred every subject key of an owner, across pseudonym epochs."""
        pseudonyms = tuple(self.all_pseudonyms(owner))
        destroyed: list[str] = []
        for pseudonym in pseudonyms:
            destroyed.extend(self.subjects.erase(pseudonym))
        return Erasure(pseudonyms, tuple(destroyed))


def _pseudonym(key: bytes, owner: str) -> str:
    return hmac.digest(key, owner.encode("utf-8", "surrogatepass"), "sha256").hex()[:_PSEUDONYM_HEX]


def aad_for(seq: int, kid: str) -> bytes:
    """Associated data binding a ciphertext to its record: it cannot be moved elsewhere."""
    return f"infergate-audit/v1|{seq}|{kid}".encode("ascii")


def seal(aead: AESGCM, kid: str, fields: Mapping[str, Any], *, seq: int) -> dict[str, str]:
    """Encrypt personal fields (canonical JSON of normalized values) with a fresh random 96-bit nonce."""
    nonce = os.urandom(_NONCE_BYTES)
    ciphertext = aead.encrypt(nonce, canonical(fields), aad_for(seq, kid))
    return {
        "alg": ENC_ALG,
        "kid": kid,
        "n": base64.b64encode(nonce).decode("ascii"),
        "ct": base64.b64encode(ciphertext).decode("ascii"),
    }


class Unreadable(Exception):
    """The personal fields cannot be decrypted: key erased, wrong key or tampered blob."""


def unseal(keys: SubjectKeys, enc: Mapping[str, Any], *, seq: int) -> dict[str, Any]:
    """Decrypt an ``enc`` blob; raise :class:`Unreadable` if its key is gone or it is bad."""
    kid = enc.get("kid")
    if enc.get("alg") != ENC_ALG or not isinstance(kid, str):
        raise Unreadable("unsupported enc blob")
    aead = keys.get(kid)
    if aead is None:
        raise Unreadable("key erased")
    try:
        nonce = base64.b64decode(str(enc.get("n", "")), validate=True)
        ciphertext = base64.b64decode(str(enc.get("ct", "")), validate=True)
        plain = aead.decrypt(nonce, ciphertext, aad_for(seq, kid))
    except (InvalidTag, ValueError, binascii.Error) as exc:
        raise Unreadable("ciphertext does not authenticate") from exc
    value = json.loads(plain)
    if not isinstance(value, dict):
        raise Unreadable("decrypted value is not an object")
    return value
