"""``infergate policy keygen|sign|verify``: the security team's side of signed bundles.

Exit codes: 0 done, 1 refused (invalid policy, bad or untrusted signature), 2 usage
problems argparse reports itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.policy.bundle import (
    BUNDLE_FILE,
    BundleVerifier,
    generate_keypair,
    load_bundle,
    load_private_key,
    refusal_summary,
    sign_bundle,
)
from gateway.policy.loader import PolicyError


def _report(exc: PolicyError) -> int:
    print(f"refused: {refusal_summary(exc)} ({exc.reason})", file=sys.stderr)
    for issue in exc.issues:
        print(f"  {issue}", file=sys.stderr)
    return 1


def _keygen(args: argparse.Namespace) -> int:
    try:
        private, public, kid = generate_keypair(Path(args.out))
    except FileExistsError:
        print(f"refused: {Path(args.out)} already holds a signing key; not overwriting it", file=sys.stderr)
        return 1
    print(f"key id {kid}\n  private key (keep secret, 0600): {private}\n  public key (give to gateways): {public}")
    print(f"  serve with: infergate serve --policy-trusted-key {public}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    try:
        key = load_private_key(Path(args.key))
    except (OSError, ValueError, TypeError) as exc:
        print(f"refused: cannot use {args.key} as a signing key: {exc}", file=sys.stderr)
        return 1
    try:
        manifest = sign_bundle(Path(args.dir), key)
    except PolicyError as exc:
        return _report(exc)
    print(f"signed revision {manifest.revision} with key {manifest.key_id}: "
          f"{len(manifest.files)} file(s) -> {Path(args.dir) / BUNDLE_FILE}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    try:
        verifier = BundleVerifier.from_files([Path(p) for p in args.trusted_key])
        policy, info = load_bundle(Path(args.dir), verifier)
    except PolicyError as exc:
        return _report(exc)
    assert info is not None  # noqa: S101 - a verifier always yields the signature it checked
    print(f"ok: revision {policy.revision} signed by key {info.key_id} at {info.signed_at}")
    return 0


def add_bundle_commands(policy_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register keygen, sign and verify under ``infergate policy``."""
    keygen = policy_sub.add_parser("keygen", help="make an Ed25519 key pair for signing policy bundles")
    keygen.add_argument("--out", required=True, help="directory for policy-signing.key and policy-signing.pub")
    keygen.set_defaults(func=_keygen)

    sign = policy_sub.add_parser("sign", help=f"validate a policy directory and write its {BUNDLE_FILE}")
    sign.add_argument("dir")
    sign.add_argument("--key", required=True, help="PEM Ed25519 private key")
    sign.set_defaults(func=_sign)

    verify = policy_sub.add_parser("verify", help="check a policy directory's signature as the gateway would")
    verify.add_argument("dir")
    verify.add_argument("--trusted-key", action="append", required=True, metavar="PUB.pem",
                        help="a trusted public key (repeatable)")
    verify.set_defaults(func=_verify)
