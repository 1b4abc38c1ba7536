"""Keys, signed policy copies and the tampering a test applies to them."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.policy.bundle import (
    BUNDLE_FILE,
    FORMAT,
    canonical,
    generate_keypair,
    key_id,
    load_private_key,
    sign_bundle,
)
from gateway.policy.loader import read_policy_dir, revision_of

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_path: Path
    key_id: str

    @property
    def private(self) -> Ed25519PrivateKey:
        return load_private_key(self.private_path)


def make_keys(directory: Path) -> KeyPair:
    private, public, kid = generate_keypair(directory)
    return KeyPair(private, public, kid)


def signed_copy(target: Path, key: KeyPair, *, without: tuple[str, ...] = ()) -> Path:
    """A copy of the shipped policies (minus ``without``), signed by ``key``."""
    shutil.copytree(POLICIES, target, ignore=shutil.ignore_patterns("tests", BUNDLE_FILE))
    for name in without:
        (target / name).unlink()
    sign_bundle(target, key.private)
    return target


def force_sign(directory: Path, key: KeyPair) -> None:
    """Sign whatever is there, valid or not (``sign_bundle`` refuses an invalid policy):
    what an attacker holding a trusted key, or a careless signer with another tool, could do."""
    raw = read_policy_dir(directory)
    private = key.private
    manifest = {"format": FORMAT, "revision": revision_of(raw), "key_id": key_id(private.public_key()),
                "files": {n: hashlib.sha256(c).hexdigest() for n, c in raw.items()},
                "signed_at": "2030-01-01T00:00:00Z"}
    signature = base64.b64encode(private.sign(canonical(manifest))).decode()
    (directory / BUNDLE_FILE).write_text(json.dumps({"manifest": manifest, "signature": signature}))


def flip_one_byte(path: Path, needle: bytes = b"#") -> None:
    """Change one byte of a comment: still a valid policy, no longer the signed one."""
    data = bytearray(path.read_bytes())
    index = data.index(needle)
    data[index + 1] = ord("X") if data[index + 1] != ord("X") else ord("Y")
    path.write_bytes(bytes(data))


def valid_edit(directory: Path, marker: str = "edited") -> None:
    """A harmless, valid edit (a comment) that gives a new revision."""
    path = directory / "gateway.yaml"
    path.write_text(path.read_text() + f"# {marker}\n")


BROKEN_GATEWAY = "models:\n  digits: {}\n  digits: {}\n"  # duplicate key: refused by the loader
