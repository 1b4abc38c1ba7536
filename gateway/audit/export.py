"""Data-subject access reports (GDPR Art. 15, CCPA "right to know") and access summaries.

:func:`export_subject` finds every record linked to one person through their pseudonyms
(under every pseudonym key still held), decrypts their personal fields with their own
key, and writes the result as JSON and CSV. After crypto-shredding the same export still
lists the records (what was done, when, with which model) but their personal fields
read ``"[erased]"``: that is the proof the erasure worked.

:func:`access_report` summarizes access per model, tenant and purpose over a period,
without personal data (pseudonyms are only counted).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import secrets
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.audit.crypto import KeyStore, Unreadable, owner_for, unseal
from gateway.audit.records import iter_records, parse_time
from gateway.audit.verify import verify
from gateway.files import ensure_dir

ERASED = "[erased]"
# Columns shown first in the CSV; any other field follows in name order.
_LEADING = ("seq", "chain", "time", "type", "request_id", "tenant", "subject", "client", "roles", "model",
            "model_version", "action", "purpose", "decision", "reason", "status", "outcome", "outcome_cause",
            "latency_ms", "policy_revision")
_CHAIN_FIELDS = frozenset({"prev_hash", "mac", "key_id", "enc", "sig", "sig_key_id"})
# SECURITY: a cell starting with one of these is a formula in spreadsheet software
# (CSV injection); model names and request ids can be attacker-chosen.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n", "|", "%",
                  "\uff1d", "\uff0b", "\uff0d", "\uff20")  # and their fullwidth forms


@dataclass(frozen=True, slots=True)
class ExportResult:
    json_path: Path
    csv_path: Path
    records: int
    erased: int
    chain_ok: bool


def subject_records(log_dir: Path, keys: KeyStore, owner: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The owner's pseudonyms and every record about them, personal fields decrypted.

    One row per request, with its final ``outcome`` (see :func:`_pair_outcomes`). A
    subject owner is one tenant's person (crypto.subject_owner): the same ``sub`` in
    another tenant has other pseudonyms, so their records are never matched here.

    An address owner gets only the records where the address is the only identity
    (refusals before authentication): an authenticated request from that address is
    another person's record, sealed under their key, and an address is shared (NAT,
    proxies), so it never opens someone else's personal data.
    """
    pseudonyms = keys.all_pseudonyms(owner)
    wanted = set(pseudonyms)
    field = "client" if owner.startswith("addr:") else "subject"
    out: list[dict[str, Any]] = []
    abandoned: dict[int, dict[str, Any]] = {}
    undelivered: dict[str, dict[str, Any]] = {}
    for record in iter_records(log_dir):
        if record.get("type") == "abandoned":
            ref = record.get("ref_seq")
            if type(ref) is int:
                abandoned.setdefault(ref, record)
            continue
        if record.get("event") == "response_not_delivered":
            rid = record.get("request_id")
            if isinstance(rid, str):
                undelivered.setdefault(rid, record)
            continue
        if record.get("type") == "erasure":
            if wanted.intersection(p for p in record.get("pseudonyms") or [] if isinstance(p, str)):
                out.append({k: v for k, v in record.items() if k not in _CHAIN_FIELDS})
            continue
        if record.get(field) not in wanted and record.get("subject") not in wanted:
            continue
        # SECURITY: an address DSAR never discloses an authenticated person's records
        # (their subject id and activity) just because they shared the address.
        if field == "client" and record.get("subject") not in (None, *wanted):
            continue
        row = {k: v for k, v in record.items() if k not in _CHAIN_FIELDS}
        enc = record.get("enc")
        if isinstance(enc, Mapping):
            try:
                row.update(unseal(keys.subjects, enc, seq=int(record["seq"])))
                row["personal_data"] = "readable"
            except Unreadable:
                row["personal_data"] = ERASED
        out.append(row)
    _pair_outcomes(out, abandoned, undelivered)
    return pseudonyms, out


def _pair_outcomes(rows: list[dict[str, Any]], abandoned: Mapping[int, Mapping[str, Any]],
                   undelivered: Mapping[str, Mapping[str, Any]]) -> None:
    """Give each request row the outcome its client really had.

    The log states a request's decision in its record and, separately and later, that
    the answer never reached the client: an ``abandoned`` marker (``ref_seq``: the
    waiter gave up at the audit deadline and got a 503, or went away) or a
    ``response_not_delivered`` event (same ``request_id``: the write failed). Neither
    names the person, so on their own they would be missing from the report, and the
    record alone would read as answered. Paired here: ``outcome`` is ``answered`` or
    ``abandoned``/``not_delivered`` with ``outcome_cause``; an ``answered_status`` says
    what the client got instead when the marker knows it (503 after an audit timeout).
    """
    for row in rows:
        if row.get("type") != "request" or "decision" not in row:
            continue
        seq, rid = row.get("seq"), row.get("request_id")
        marker = abandoned.get(seq) if type(seq) is int else None
        event = undelivered.get(rid) if isinstance(rid, str) else None
        if marker is not None:
            row["outcome"], row["outcome_cause"] = "abandoned", marker.get("cause")
            if "status" in marker:
                row["answered_status"] = marker["status"]
        elif event is not None:
            row["outcome"], row["outcome_cause"] = "not_delivered", event.get("reason")
        else:
            row["outcome"] = "answered"


def export_subject(log_dir: Path, key_dir: Path, out_dir: Path, *, subject_id: str | None = None,
                   tenant: str | None = None, client_addr: str | None = None, anchor_dir: Path | None = None,
                   now: datetime | None = None) -> ExportResult:
    """Write ``dsar-<pseudonym>.json`` and ``.csv`` (mode 0600) into ``out_dir``.

    A subject is named with its ``tenant`` (the subject's tenant, required: ValueError
    without it); a client address without one. Raises FileNotFoundError if ``log_dir``
    is not a directory: an empty report for a mistyped path would read as "we hold
    nothing about this person".
    """
    owner = owner_for(subject_id=subject_id, tenant=tenant, client_addr=client_addr)
    if not log_dir.is_dir():
        raise FileNotFoundError(f"no audit log at {log_dir}")
    keys = KeyStore(key_dir, create=False)
    pseudonyms, rows = subject_records(log_dir, keys, owner)
    check = verify(log_dir, anchor_dir=anchor_dir, key_dir=key_dir)
    if not check.ok:
        # SECURITY: never pass a possibly forged record off as genuine: every row from the
        # first bad record on (all rows if the break is in the anchors) says so, in the
        # CSV too, where the report's "chain" header is out of sight.
        bad = check.first_bad_seq
        for row in rows:
            seq = row.get("seq")
            if bad is None or (type(seq) is int and seq >= bad):
                row["chain"] = "UNVERIFIED"
    erased = sum(1 for r in rows if r.get("personal_data") == ERASED)
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    report = {
        "kind": "data_subject_access_report",
        "generated_at": stamp,
        "subject": ({"subject_id": subject_id, "tenant": tenant} if subject_id is not None
                    else {"client_addr": client_addr}),
        "pseudonyms": pseudonyms,
        "chain": {"ok": check.ok, "records": check.records, "first_bad_seq": check.first_bad_seq,
                  "problem": check.problem},
        "categories": data_categories(rows),
        "records": rows,
        "count": len(rows),
        "erased_records": erased,
    }
    ensure_dir(out_dir)
    tag = pseudonyms[0][:16] if pseudonyms else "none"
    json_path = out_dir / f"dsar-{tag}.json"
    csv_path = out_dir / f"dsar-{tag}.csv"
    _write_private_text(json_path, json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    _write_private_text(csv_path, to_csv(rows))
    return ExportResult(json_path, csv_path, len(rows), erased, check.ok)


def data_categories(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The categories of personal information the report holds (CCPA "right to know":
    categories, sources, purposes), derived from the rows themselves, not a fixed text:
    only what is really held is named, and an erased person's identifiers are not."""
    rows = list(rows)
    requests = [r for r in rows if r.get("type") == "request"]
    purposes = sorted({str(r.get("purpose") or r.get("action") or "unspecified") for r in requests})
    readable = [r for r in requests if r.get("personal_data") == "readable"]
    source = "collected by the gateway from the person's own requests"
    out: list[dict[str, Any]] = []
    identifiers = [name for field, name in (("subject_id", "account identifier (the token's subject)"),
                                            ("client_addr", "IP address"))
                   if any(r.get(field) for r in readable)]
    if identifiers:
        out.append({"category": "identifiers", "items": identifiers, "source": source, "purposes": purposes,
                    "protection": "encrypted under the person's own key; erasable (crypto-shredding)"})
    if requests:
        out.append({"category": "internet or other electronic network activity",
                    "items": ["time of each request", "model and version used", "action and purpose",
                              "access decision and status", "tenant and roles"],
                    "source": source, "purposes": purposes,
                    "protection": "linked only through a keyed pseudonym; no inputs, outputs or tokens kept"})
    if any(r.get("eps") for r in requests):
        out.append({"category": "privacy budget use", "items": ["differential-privacy epsilon spent per request"],
                    "source": source, "purposes": purposes, "protection": "counts only"})
    return out


def _write_private_text(path: Path, text: str) -> None:
    """Write a new owner-only file at ``path``, replacing whatever was there.

    SECURITY: a DSAR holds decrypted personal data: owner-only from the first byte. It
    is always a fresh inode, created exclusively (O_EXCL, O_NOFOLLOW) under a random
    name and renamed over ``path``: a file someone pre-created there (mode 0666, in a
    shared directory) keeps its mode on O_TRUNC and would have stayed readable to them,
    and a symlink planted at ``path`` is replaced, never followed.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _cell(value: Any) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
    # Spreadsheets skip leading blanks before a formula (" =1+1"): look past them.
    if text.startswith(_FORMULA_START) or text.lstrip(" \u00a0\u3000\x0b\x0c").startswith(_FORMULA_START):
        return "'" + text
    return text


def to_csv(rows: Iterable[Mapping[str, Any]]) -> str:
    rows = list(rows)
    names = {k for row in rows for k in row}
    columns = [c for c in _LEADING if c in names] + sorted(names.difference(_LEADING))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return buffer.getvalue()


def access_report(log_dir: Path, *, since: datetime | None = None, until: datetime | None = None) -> dict[str, Any]:
    """Counts per model, tenant and purpose (and decision) for requests in ``[since, until)``."""
    groups: dict[str, dict[str, Counter[str]]] = {"model": defaultdict(Counter), "tenant": defaultdict(Counter),
                                                  "purpose": defaultdict(Counter)}
    subjects: dict[str, dict[str, set[str]]] = {name: defaultdict(set) for name in groups}
    total = 0
    first: str | None = None
    last: str | None = None
    for record in iter_records(log_dir):
        kind = record.get("type")
        if kind not in ("request", "denial_aggregate"):
            continue
        stamp = record.get("time")
        if not isinstance(stamp, str):
            continue
        when = parse_time(stamp)
        if (since is not None and when < since) or (until is not None and when >= until):
            continue
        count = record.get("count")
        weight = count if kind == "denial_aggregate" and type(count) is int and count > 0 else 1
        total += weight
        first = first or stamp
        last = stamp
        purpose = record.get("purpose") or record.get("action") or "unspecified"
        keys = {"model": record.get("model") or "-", "tenant": record.get("tenant") or "-", "purpose": purpose}
        decision = str(record.get("decision") or "-")
        who = record.get("subject") or record.get("client")
        for name, value in keys.items():
            bucket = groups[name][str(value)]
            bucket["requests"] += weight
            bucket[decision] += weight
            if isinstance(who, str):
                subjects[name][str(value)].add(who)
    def table(name: str) -> list[dict[str, Any]]:
        rows = []
        for value, counts in sorted(groups[name].items()):
            row: dict[str, Any] = {name: value, **dict(sorted(counts.items()))}
            row["distinct_subjects"] = len(subjects[name][value])
            rows.append(row)
        return rows

    return {
        "kind": "access_report",
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        "first_record_time": first,
        "last_record_time": last,
        "requests": total,
        "by_model": table("model"),
        "by_tenant": table("tenant"),
        "by_purpose": table("purpose"),
    }
