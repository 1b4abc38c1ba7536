"""``infergate audit …``: verify, erase, export, report (plus key rotation and retention).

Every command takes the log directory as ``DIR`` (default ``var/audit``, as ``serve``);
the anchor store and key store default to ``DIR-anchors`` and ``DIR-keys`` and can be
named with ``--anchors`` and ``--keys``. Exit status: 0 success, 1 failure (tampering
found, nothing to do), 2 usage or environment error.

``erase`` works whether or not a gateway is running on the log: the subject's keys are
destroyed at once either way; the signed erasure record is appended directly when the
log is free, or left (signed) in ``DIR/inbox/`` for the running gateway to append
within ``checkpoint_interval_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import functools
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.audit.anchors import AnchorKeys, load_public_pem, valid_anchor_kid
from gateway.audit.config import AuditConfig
from gateway.audit.crypto import KeyStore, KeyStoreError, owner_for
from gateway.audit.export import access_report, export_subject
from gateway.audit.log import INBOX, LOCK_FILE, AuditIntegrityError, AuditLog, KeyFamilyName, erasure_notice
from gateway.audit.records import canonical, parse_time, utc_now_iso
from gateway.audit.verify import verify
from gateway.files import ensure_dir, fsync_dir

DEFAULT_DIR = "var/audit"
_DESCRIPTION = """Audit trail tools. DIR is the log directory (default var/audit); the anchor
store and the key store default to DIR-anchors and DIR-keys (--anchors, --keys).
Exit status: 0 success, 1 failure (tampering found, nothing to do), 2 usage error."""


class _UsageError(Exception):
    """A bad argument or directory layout: a one-line message and exit 2, never a traceback."""


def _usage_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn a command's :class:`_UsageError` into ``error: …`` on stderr and exit status 2."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except _UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return run


def _config(args: argparse.Namespace, **extra: Any) -> AuditConfig:
    overrides: dict[str, Any] = dict(extra)
    if getattr(args, "anchors", None):
        overrides["anchor_dir"] = Path(args.anchors)
    if getattr(args, "keys", None):
        overrides["key_dir"] = Path(args.keys)
    try:
        return AuditConfig.for_dir(Path(args.dir), **overrides)
    except ValueError as exc:  # key store inside the log, retention not positive, ...
        raise _UsageError(str(exc)) from exc


def _time_arg(name: str, value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        raise _UsageError(f"--{name} {value!r}: not an ISO date or timestamp (e.g. 2025-03-01 or "
                          f"2025-03-01T10:00:00Z): {exc}") from exc


def _who_arg(value: str) -> str:
    """``--subject``/``--tenant``/``--client-addr``: an empty id names no one (and would match nothing)."""
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def _owner_arg(args: argparse.Namespace) -> str:
    """The owner ``--subject``/``--tenant`` or ``--client-addr`` name (a usage error otherwise).

    SECURITY: a ``sub`` is unique only within its tenant, so ``--subject`` alone would
    have to mean every tenant's person of that name: erase would shred someone else's
    records, export would disclose them. The tenant is required, never guessed.
    """
    if args.subject is not None and args.tenant is None:
        raise _UsageError("--subject needs --tenant (the subject's tenant): the same subject id in another "
                          "tenant is another person")
    if args.client_addr is not None and args.tenant is not None:
        raise _UsageError("--tenant goes with --subject only: a client address belongs to no tenant")
    try:
        return owner_for(subject_id=args.subject, tenant=args.tenant, client_addr=args.client_addr)
    except ValueError as exc:  # a control character in the subject or tenant
        raise _UsageError(str(exc)) from exc


def _days_arg(value: str) -> float:
    try:
        days = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of days") from exc
    if not math.isfinite(days) or days <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of days")
    return days


def _locked(log_dir: Path) -> bool:
    """True if a running gateway holds the log (its writer keeps an exclusive flock)."""
    path = log_dir / LOCK_FILE
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _no_log(config: AuditConfig) -> bool:
    """True (after saying so) if ``DIR`` is not an audit log directory.

    SECURITY: every command but verify would otherwise run on a mistyped path: an
    export or report of an empty "log" reads as "we hold nothing", and an erase would
    destroy the person's keys and record the erasure in a new log nobody reads.
    """
    if config.log_dir.is_dir():
        return False
    print(f"no audit log at {config.log_dir} (check DIR)", file=sys.stderr)
    return True


@_usage_errors
def cmd_verify(args: argparse.Namespace) -> int:
    config = _config(args)
    if not config.log_dir.is_dir():
        print(f"no audit log at {config.log_dir}", file=sys.stderr)
        return 1
    trusted = {}
    for item in args.trust_key or []:
        path = Path(item)
        if not valid_anchor_kid(path.stem):
            print(f"--trust-key {item}: the file must be named <key id>.pub (a-<16 hex>.pub)", file=sys.stderr)
            return 2
        trusted[path.stem] = load_public_pem(path.read_bytes())
    key_dir = config.key_dir if config.key_dir.is_dir() else None
    anchor_dir = None if args.no_anchors else config.anchor_dir
    result = verify(config.log_dir, anchor_dir=anchor_dir, key_dir=key_dir, trusted_keys=trusted)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2, sort_keys=True))
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if result.ok:
        if not args.json:
            span = f"seq {result.first_seq}..{result.last_seq}" if result.records else "empty"
            print(f"ok: {config.log_dir} verifies: {result.records} records ({span}), "
                  f"{result.checkpoints} signed checkpoints matched")
        return 0
    where = f"seq {result.first_bad_seq}" if result.first_bad_seq is not None else "the anchor store"
    print(f"TAMPERED: first bad record at {where} in {config.log_dir}: {result.problem}: {result.detail}",
          file=sys.stderr)
    return 1


@_usage_errors
def cmd_erase(args: argparse.Namespace) -> int:
    config = _config(args)
    owner = _owner_arg(args)
    subject_id, tenant, client_addr = args.subject, args.tenant, args.client_addr
    if _no_log(config):
        return 2
    if not config.key_dir.is_dir():
        print(f"no key store at {config.key_dir}: nothing recorded, nothing to erase", file=sys.stderr)
        return 1
    try:
        held = KeyStore(config.key_dir, create=False).holds(owner)
    except KeyStoreError as exc:
        print(f"cannot erase: {exc}", file=sys.stderr)
        return 2
    if not held:
        # Why not exit 0: a mistyped id would read as a completed erasure. Nothing is
        # written either: the trail holds nothing readable about this id.
        who = "subject of this tenant" if subject_id is not None else "client address"
        print(f"nothing to erase: no personal data of this {who} is held (never recorded, or erased "
              "already); check the id. Nothing was recorded.", file=sys.stderr)
        return 1
    if not _locked(config.log_dir):
        try:
            notice = asyncio.run(_erase_offline(config, subject_id, tenant, client_addr))
        except AuditIntegrityError as exc:
            print(f"warning: {exc}; erasing keys and leaving the notice in the inbox", file=sys.stderr)
        else:
            print(f"erased: {len(notice['key_ids'])} key(s) destroyed; erasure recorded at seq {notice['seq']}")
            return 0
    try:
        erasure = KeyStore(config.key_dir, create=False).erase_owner(owner)
        notice = erasure_notice(AnchorKeys(config.key_dir, create=False), erasure.owner_pseudonyms,
                                erasure.key_ids, utc_now_iso(time.time()))
    except KeyStoreError as exc:
        print(f"cannot erase: {exc}", file=sys.stderr)
        return 2
    inbox = config.log_dir / INBOX
    ensure_dir(inbox)
    name = f"erasure-{secrets.token_hex(8)}.json"
    tmp = inbox / f".{name}.tmp"
    tmp.write_bytes(canonical(notice))
    tmp.replace(inbox / name)
    fsync_dir(inbox)
    print(f"erased: {len(erasure.key_ids)} key(s) destroyed; the running gateway will record the erasure "
          f"(notice {name})")
    return 0


async def _erase_offline(config: AuditConfig, subject_id: str | None, tenant: str | None,
                         client_addr: str | None) -> dict[str, Any]:
    audit = AuditLog(config)
    await audit.start()
    try:
        notice = await audit.erase(subject_id=subject_id, tenant=tenant, client_addr=client_addr)
    finally:
        await audit.close()
    return notice


@_usage_errors
def cmd_export(args: argparse.Namespace) -> int:
    config = _config(args)
    _owner_arg(args)
    if _no_log(config):
        return 2
    if not config.key_dir.is_dir():
        print(f"no key store at {config.key_dir}", file=sys.stderr)
        return 2
    try:
        result = export_subject(config.log_dir, config.key_dir, Path(args.out), subject_id=args.subject,
                                tenant=args.tenant, client_addr=args.client_addr,
                                anchor_dir=config.anchor_dir if config.anchor_dir.is_dir() else None)
    except (OSError, KeyStoreError) as exc:
        print(f"cannot export: {exc}", file=sys.stderr)
        return 2
    print(f"{result.records} record(s) ({result.erased} with erased personal data) written to "
          f"{result.json_path} and {result.csv_path}")
    if not result.chain_ok:
        # Exit 1 as verify does: a script must not file this report as a clean one.
        print("TAMPERED: the audit chain does not verify; rows from the first bad record on are marked "
              "chain=UNVERIFIED; run `infergate audit verify`", file=sys.stderr)
        return 1
    return 0


@_usage_errors
def cmd_report(args: argparse.Namespace) -> int:
    config = _config(args)
    if _no_log(config):
        return 2
    since, until = _time_arg("since", args.since), _time_arg("until", args.until)
    if since is not None and until is not None and until <= since:
        raise _UsageError(f"--until {args.until} is not after --since {args.since}")
    report = access_report(config.log_dir, since=since, until=until)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    print(f"access report {report['since'] or 'beginning'} .. {report['until'] or 'now'}: "
          f"{report['requests']} requests")
    for name in ("model", "tenant", "purpose"):
        rows = report[f"by_{name}"]
        print(f"\nby {name}:")
        print(f"  {name:<24} {'requests':>9} {'allow':>9} {'deny':>9} {'subjects':>9}")
        for row in rows:
            print(f"  {str(row[name])[:24]:<24} {row.get('requests', 0):>9} {row.get('allow', 0):>9} "
                  f"{row.get('deny', 0):>9} {row['distinct_subjects']:>9}")
    return 0


@_usage_errors
def cmd_rotate_key(args: argparse.Namespace) -> int:
    config = _config(args)
    if _no_log(config):
        return 2
    if _locked(config.log_dir):
        print("the log is in use by a running gateway; rotate keys through it or stop it first", file=sys.stderr)
        return 2
    new_kid = asyncio.run(_rotate_offline(config, args.family))
    print(f"rotated {args.family} key: now {new_kid}")
    return 0


async def _rotate_offline(config: AuditConfig, family: KeyFamilyName) -> str:
    audit = AuditLog(config)
    try:
        return await audit.rotate_key(family)
    finally:
        await audit.close()


@_usage_errors
def cmd_retention(args: argparse.Namespace) -> int:
    config = _config(args, retention_s=args.days * 86_400.0)
    if _no_log(config):
        return 2
    if _locked(config.log_dir):
        print("the log is in use by a running gateway (it applies retention itself)", file=sys.stderr)
        return 2
    deleted = asyncio.run(_retention_offline(config))
    print(f"deleted {len(deleted)} segment(s) behind a signed tombstone" + (f": {', '.join(deleted)}"
                                                                          if deleted else ""))
    return 0


async def _retention_offline(config: AuditConfig) -> list[str]:
    audit = AuditLog(config)
    try:
        return await audit.apply_retention()
    finally:
        await audit.close()


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", nargs="?", default=DEFAULT_DIR, help=f"audit log directory (default {DEFAULT_DIR})")
    parser.add_argument("--anchors", help="anchor store directory (default DIR-anchors)")
    parser.add_argument("--keys", help="key store directory (default DIR-keys)")


def _who(parser: argparse.ArgumentParser) -> None:
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--subject", type=_who_arg,
                     help="the data subject's id (the token's sub); needs --tenant")
    who.add_argument("--client-addr", type=_who_arg, help="a client address (refusals before authentication)")
    parser.add_argument("--tenant", type=_who_arg,
                        help="the subject's tenant (required with --subject: the same sub in another tenant "
                             "is another person)")


def add_audit_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``audit`` and its subcommands to the ``infergate`` parser."""
    audit = subparsers.add_parser("audit", help="audit trail tools", description=_DESCRIPTION,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = audit.add_subparsers(dest="audit_command", required=True)

    p = sub.add_parser("verify", help="detect edits, deletions, reordering, truncation and rollback")
    _common(p)
    p.add_argument("--trust-key", action="append", metavar="PEM",
                   help="pin an anchor public key (<key id>.pub); repeatable; default: the key store's")
    p.add_argument("--no-anchors", action="store_true",
                   help="check the chain only (a copy without its anchor store): truncation goes unseen")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("erase", help="crypto-shred a data subject's personal fields (GDPR Art. 17)")
    _common(p)
    _who(p)
    p.set_defaults(func=cmd_erase)

    p = sub.add_parser("export", help="data-subject access report (JSON and CSV)")
    _common(p)
    _who(p)
    p.add_argument("--out", default=".", help="output directory (default .)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="access per model, tenant and purpose for a period")
    _common(p)
    p.add_argument("--since", help="start (ISO date or timestamp, UTC), inclusive")
    p.add_argument("--until", help="end (ISO date or timestamp, UTC), exclusive")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("rotate-key", help="rotate the anchor, chain-MAC or pseudonym key (gateway stopped)")
    _common(p)
    p.add_argument("--family", required=True, choices=["anchor", "mac", "pseudonym"])
    p.set_defaults(func=cmd_rotate_key)

    p = sub.add_parser("retention", help="delete segments older than --days behind a signed tombstone")
    _common(p)
    p.add_argument("--days", type=_days_arg, required=True)
    p.set_defaults(func=cmd_retention)
    return audit
