"""Signed policy bundles: a policy directory the gateway loads only if a trusted key signed it.

A bundle is the policy directory plus one file, ``BUNDLE.sig``: a manifest (every file
the loader reads, with its SHA-256, the revision, the signer's key id and the signing
time) and a detached Ed25519 signature over the manifest's canonical JSON bytes.

Verification works on the bytes the loader has already read (``read_policy_dir``):
hash them, compare with the signed manifest, then parse those same bytes. A file
rewritten between the check and the parse cannot slip in (no TOCTOU), and so cannot a
file the manifest does not list: the loader reads no byte that was not verified.

Refusal reasons (the ``reason`` label of ``gateway_policy_reload_failures_total``):
``unsigned`` (no ``BUNDLE.sig``), ``untrusted`` (signed, but by no trusted key),
``tampered`` (signature does not match, or a file changed, appeared or disappeared
after signing), ``replayed`` (a trusted signature older than the active bundle's: a
rollback attack, refused while the gateway runs; across restarts and between workers
through gateway/policy/rollback.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import Field, StrictStr, ValidationError

from gateway.files import read_regular_file
from gateway.policy.loader import (
    PolicyError,
    PolicyIssue,
    PolicySet,
    load_policy_bytes,
    read_policy_dir,
    revision_of,
)
from gateway.policy.model import StrictModel
from gateway.strict_json import unique_members

BUNDLE_FILE = "BUNDLE.sig"
FORMAT = "infergate-policy-bundle/1"
MAX_BUNDLE_FILE_BYTES = 256 * 1024
PRIVATE_KEY_NAME = "policy-signing.key"
PUBLIC_KEY_NAME = "policy-signing.pub"

Reason = Literal["unsigned", "untrusted", "tampered", "replayed"]


class BundleError(PolicyError):
    """A bundle refused by signature checks; ``reason`` says which kind of refusal."""

    def __init__(self, reason: Reason, issues: list[PolicyIssue]) -> None:
        super().__init__(issues)
        self.reason = reason


class BundleManifest(StrictModel):
    """What the signer vouches for. ``files`` maps each file name to its SHA-256 (hex)."""

    format: Literal["infergate-policy-bundle/1"]
    revision: StrictStr
    files: dict[StrictStr, StrictStr]
    key_id: StrictStr = Field(pattern=r"^[0-9a-f]{16}$")
    signed_at: StrictStr


@dataclass(frozen=True, slots=True)
class BundleInfo:
    """The signature of the active revision, for ``GET /v2/policy`` and the logs."""

    key_id: str
    signed_at: str
    revision: str


_SUMMARIES = {
    "unsigned": "the policy bundle is not signed",
    "untrusted": "the policy bundle is not signed by a trusted key",
    "tampered": "the policy bundle does not match its signature",
    "replayed": "the policy bundle was signed before the active one",
    "error": "the policy could not be loaded",
}


def _signed_time(info: BundleInfo) -> datetime | None:
    try:
        return datetime.strptime(info.signed_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def check_not_replayed(active: BundleInfo | None, candidate: BundleInfo | None) -> None:
    """Refuse a candidate signed before the active bundle.

    # SECURITY: an attacker who can write the policy directory but holds no key can still
    # put back an older bundle a trusted key once signed (say, before a role was removed);
    # its signature is valid. Signing times only move forward (TUF's rollback rule), so a
    # deliberate return to an old policy is re-signed, and a replay is refused.
    """
    if active is None or candidate is None:
        return
    now, then = _signed_time(active), _signed_time(candidate)
    if then is None:
        raise _refuse("replayed", f"signed_at {candidate.signed_at!r} is not a signing time")
    if now is not None and then < now:
        raise _refuse("replayed", f"signed at {candidate.signed_at}, before the active bundle "
                                  f"(revision {active.revision}, signed at {active.signed_at}); "
                                  "re-sign the policy to go back to it")


def refusal_summary(exc: PolicyError) -> str:
    """One line for an operator: why this policy was not loaded."""
    return _SUMMARIES.get(exc.reason, "the policy is invalid")


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a key: the first 16 hex digits of SHA-256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def canonical(manifest: dict[str, Any]) -> bytes:
    """The signed bytes: sorted keys, no spaces, ASCII. The file itself may be pretty-printed."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def generate_keypair(out_dir: Path) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key pair; the private key 0600, never overwriting an existing one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    priv_path, pub_path = out_dir / PRIVATE_KEY_NAME, out_dir / PUBLIC_KEY_NAME
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    # SECURITY: created 0600 with O_EXCL: never readable by others, even briefly, and an
    # existing signing key is never silently replaced.
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public = private.public_key()
    pub_path.write_bytes(public.public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path, key_id(public)


KEY_FILE_MAX_BYTES = 64 * 1024


def read_key_file(path: Path) -> bytes:
    """A PEM key file's bytes: a regular file of at most 64 KiB, else :class:`ValueError`
    (:func:`gateway.files.read_regular_file`: a FIFO or /dev/zero never hangs or fills memory)."""
    return read_regular_file(path, KEY_FILE_MAX_BYTES)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(read_key_file(path), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(read_key_file(path))
    if not isinstance(key, Ed25519PublicKey):
        raise TypeError(f"{path}: not an Ed25519 public key")
    return key


def sign_bundle(directory: Path, private_key: Ed25519PrivateKey, *, now: datetime | None = None) -> BundleManifest:
    """Sign exactly what the loader would read now; refuses a policy that does not load."""
    raw = read_policy_dir(directory)
    load_policy_bytes(raw)  # raises PolicyError: signing an invalid policy helps nobody
    signed_at = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    manifest = BundleManifest(
        format=FORMAT, revision=revision_of(raw),
        files={name: hashlib.sha256(content).hexdigest() for name, content in sorted(raw.items())},
        key_id=key_id(private_key.public_key()), signed_at=signed_at,
    )
    body = manifest.model_dump()
    signature = private_key.sign(canonical(body))
    document = {"manifest": body, "signature": base64.b64encode(signature).decode()}
    # Written then renamed: a watcher never sees half a signature file.
    tmp = directory / f".{BUNDLE_FILE}.tmp"
    tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    tmp.replace(directory / BUNDLE_FILE)
    return manifest


def _refuse(reason: Reason, message: str, file: str = BUNDLE_FILE) -> BundleError:
    return BundleError(reason, [PolicyIssue(file, 1, 1, message)])


class BundleVerifier:
    """The trusted public keys; several at once so keys can be rotated without downtime."""

    def __init__(self, keys: list[Ed25519PublicKey]) -> None:
        if not keys:
            raise ValueError("a bundle verifier needs at least one trusted key")
        self.trusted = {key_id(k): k for k in keys}

    @classmethod
    def from_files(cls, paths: list[Path] | tuple[Path, ...]) -> BundleVerifier:
        """Read PEM public keys; an unreadable or non-Ed25519 key is a startup error."""
        keys: list[Ed25519PublicKey] = []
        issues: list[PolicyIssue] = []
        for path in paths:
            try:
                keys.append(load_public_key(path))
            except (OSError, ValueError, TypeError) as exc:
                issues.append(PolicyIssue(str(path), 1, 1, f"cannot use as a trusted policy key: {exc}"))
        if issues:
            raise PolicyError(issues)
        return cls(keys)

    def verify(self, directory: Path, raw: dict[str, bytes]) -> BundleInfo:
        """Check ``BUNDLE.sig`` against the files already read into ``raw``; raise :class:`BundleError`."""
        document = self._read_document(directory)
        manifest_obj, signature = document
        message = canonical(manifest_obj)
        signer = None
        for kid, key in self.trusted.items():
            try:
                key.verify(signature, message)
            except InvalidSignature:
                continue
            signer = kid
            break
        if signer is None:
            claimed = manifest_obj.get("key_id")
            if isinstance(claimed, str) and claimed in self.trusted:
                raise _refuse("tampered", "the bundle signature does not match its manifest")
            raise _refuse("untrusted", f"bundle signed by key {claimed!r}, which is not a trusted policy key")
        try:
            manifest = BundleManifest.model_validate(manifest_obj)
        except ValidationError as exc:
            raise _refuse("tampered", f"malformed manifest: {exc.error_count()} error(s)") from exc
        if manifest.key_id != signer:
            raise _refuse("tampered", "the manifest names another key than the one that signed it")
        issues = self._compare(manifest, raw)
        if issues:
            raise BundleError("tampered", issues)
        return BundleInfo(key_id=signer, signed_at=manifest.signed_at, revision=manifest.revision)

    @staticmethod
    def _read_document(directory: Path) -> tuple[dict[str, Any], bytes]:
        path = directory / BUNDLE_FILE
        try:
            with path.open("rb") as handle:
                content = handle.read(MAX_BUNDLE_FILE_BYTES + 1)
        except FileNotFoundError as exc:
            raise _refuse("unsigned", "policy bundle is not signed (no BUNDLE.sig); "
                                      "sign it with `infergate policy sign DIR --key KEY.pem`") from exc
        except OSError as exc:
            raise _refuse("unsigned", f"cannot read the bundle signature: {exc.strerror}") from exc
        if len(content) > MAX_BUNDLE_FILE_BYTES:
            raise _refuse("tampered", "bundle signature file too large")
        try:
            document = json.loads(content, object_pairs_hook=unique_members)
            manifest, signature = document["manifest"], document["signature"]
            decoded = base64.b64decode(signature, validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise _refuse("tampered", "malformed bundle signature file") from exc
        if set(document) != {"manifest", "signature"} or not isinstance(manifest, dict):
            raise _refuse("tampered", "malformed bundle signature file")
        return manifest, decoded

    @staticmethod
    def _compare(manifest: BundleManifest, raw: dict[str, bytes]) -> list[PolicyIssue]:
        issues: list[PolicyIssue] = []
        for name in sorted(set(raw) - set(manifest.files)):
            issues.append(PolicyIssue(name, 1, 1, "file is not in the signed bundle"))
        for name in sorted(set(manifest.files) - set(raw)):
            issues.append(PolicyIssue(name, 1, 1, "file of the signed bundle is missing"))
        for name in sorted(set(raw) & set(manifest.files)):
            if hashlib.sha256(raw[name]).hexdigest() != manifest.files[name]:
                issues.append(PolicyIssue(name, 1, 1, "file differs from the signed bundle"))
        if not issues and revision_of(raw) != manifest.revision:
            issues.append(PolicyIssue(BUNDLE_FILE, 1, 1, "revision differs from the signed bundle"))
        return issues


def load_bundle(directory: Path, verifier: BundleVerifier | None) -> tuple[PolicySet, BundleInfo | None]:
    """Read the policy once; with a verifier, parse only bytes a trusted key signed."""
    raw = read_policy_dir(directory)
    # SECURITY: verified on the in-memory bytes, before any YAML is parsed; the parser sees no other bytes.
    info = verifier.verify(directory, raw) if verifier is not None else None
    return load_policy_bytes(raw), info
