"""Verify an audit trail and name the first bad record.

What is detected, and how:

====================  ===============================================================
edit a field          canonical form, record MAC (with the key store), hash link
delete a line         ``seq`` gap: the first missing ``seq`` is named
swap / reorder        ``seq`` out of order at the first misplaced position
truncate the tail     a signed checkpoint names a ``seq`` beyond the end of the log
remove a segment      middle: ``seq`` gap; oldest: no signed tombstone covers it;
                      newest: truncation against the anchors
rollback to an older  same as truncation: the anchors have signed a later head
valid copy
recompute the chain   record MACs (key not in the log directory) and checkpoint heads
forge a checkpoint    Ed25519 signature under a key the key store (or ``--trust-key``)
                      vouches for; checkpoints are chained (``n``, ``prev``)
replace anchor key    the published key differs from the trusted one
====================  ===============================================================

Limits, by design: records written after the newest checkpoint can be cut off together
with nothing else changing (at most ``checkpoint_every`` records or
``checkpoint_interval_s`` seconds; every clean shutdown signs a final checkpoint), and an
attacker who can roll back the log *and* the anchor store together is only caught by an
external copy of the anchors.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.audit.anchors import (
    CHECKPOINT_FILE,
    AnchorError,
    AnchorKeys,
    Checkpoint,
    check_signature,
    load_public_pem,
    load_published_keys,
    parse_checkpoint,
    public_raw,
    read_checkpoint_lines,
)
from gateway.audit.crypto import KeyStore, KeyStoreError
from gateway.audit.records import GENESIS, ParsedLine, RecordFormatError, iter_lines, list_segments, parse_line
from gateway.files import InsecurePermissions

_SIGNED_TYPES = frozenset({"tombstone", "erasure"})


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    first_bad_seq: int | None
    problem: str | None
    detail: str
    records: int
    first_seq: int | None
    last_seq: int
    head: str
    checkpoints: int
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["warnings"] = list(self.warnings)
        return out


@dataclass(frozen=True, slots=True)
class _Failure:
    seq: int | None
    problem: str
    detail: str

    def rank(self) -> tuple[int, int]:
        return (0, self.seq) if self.seq is not None else (1, 0)


class _Stop(Exception):
    def __init__(self, failure: _Failure) -> None:
        super().__init__(failure.detail)
        self.failure = failure


@dataclass
class _State:
    trusted: dict[str, Ed25519PublicKey]
    mac_keys: dict[str, bytes] | None
    by_seq: dict[int, list[Checkpoint]]
    warnings: list[str] = field(default_factory=list)
    records: int = 0
    first_seq: int | None = None
    first_prev: str = GENESIS
    last_seq: int = 0
    head: str = GENESIS
    checked: int = 0
    last_verified_checkpoint: int = 0
    tombstones: list[tuple[int, int, str]] = field(default_factory=list)


def verify(log_dir: Path, *, anchor_dir: Path | None = None, key_dir: Path | None = None,
           trusted_keys: Mapping[str, Ed25519PublicKey] | None = None) -> VerifyResult:
    """Check the whole trail; ``ok`` is False with the first bad ``seq`` on any tampering."""
    warnings: list[str] = []
    trusted: dict[str, Ed25519PublicKey] = dict(trusted_keys or {})
    mac_keys: dict[str, bytes] | None = None
    if key_dir is not None and key_dir.is_dir():
        try:
            mac_keys = KeyStore(key_dir, create=False).mac.all()
            trusted.update(AnchorKeys(key_dir, create=False).public_keys())
        except (KeyStoreError, InsecurePermissions, AnchorError, OSError, ValueError) as exc:
            warnings.append(f"key store unusable ({exc}): record MACs not checked")
            mac_keys = None
    else:
        warnings.append("no key store: record MACs not checked (an edit with a recomputed hash chain "
                        "is caught only up to the newest checkpoint)")
    failures: list[_Failure] = []
    checkpoints: list[Checkpoint] = []
    if anchor_dir is not None:
        if not (anchor_dir / CHECKPOINT_FILE).exists() and list_segments(log_dir):
            # The writer creates the checkpoint file before its first record: a log without
            # one had its anchor store deleted (or the wrong --anchors was given).
            failures.append(_Failure(None, "anchors_missing", f"no {CHECKPOINT_FILE} in {anchor_dir}"))
        checkpoints = _load_checkpoints(anchor_dir, failures, warnings)
        trusted = _check_published_keys(anchor_dir, trusted, checkpoints, failures, warnings)
    else:
        warnings.append("no anchor store: truncation and rollback cannot be detected")
    by_seq: dict[int, list[Checkpoint]] = {}
    for checkpoint in checkpoints:
        by_seq.setdefault(checkpoint.seq, []).append(checkpoint)
    state = _State(trusted=trusted, mac_keys=mac_keys, by_seq=by_seq, warnings=warnings)
    try:
        _stream(log_dir, state)
        _end_checks(state, checkpoints)
    except _Stop as stop:
        # Records before the first one present cannot be vouched for either (the tombstones
        # come later in the chain), but the first bad record *seen* is what is named.
        failures.append(stop.failure)
    if failures:
        worst = min(failures, key=_Failure.rank)
        return VerifyResult(False, worst.seq, worst.problem, worst.detail, state.records, state.first_seq,
                            state.last_seq, state.head, state.checked, tuple(warnings))
    if state.records == 0:
        warnings.append("the log holds no records")
    return VerifyResult(True, None, None, "ok", state.records, state.first_seq, state.last_seq, state.head,
                        state.checked, tuple(warnings))


def verify_audit(log_dir: Path, anchor_dir: Path | None, key_dir: Path | None = None) -> tuple[bool, int | None]:
    """The catalogue's fixture shape: ``(ok, first_bad_seq)``."""
    result = verify(log_dir, anchor_dir=anchor_dir, key_dir=key_dir)
    return result.ok, result.first_bad_seq


def _load_checkpoints(anchor_dir: Path, failures: list[_Failure], warnings: list[str]) -> list[Checkpoint]:
    out: list[Checkpoint] = []
    lines = read_checkpoint_lines(anchor_dir)
    prev = GENESIS
    for index, (raw, complete) in enumerate(lines):
        if not complete:
            if index == len(lines) - 1:
                warnings.append("torn last checkpoint line ignored (crash while signing)")
                break
            failures.append(_Failure(None, "anchor_corrupt", f"checkpoint line {index + 1} is cut"))
            break
        try:
            checkpoint = parse_checkpoint(raw)
        except RecordFormatError as exc:
            failures.append(_Failure(None, "anchor_corrupt", f"checkpoint line {index + 1}: {exc}"))
            break
        if checkpoint.n != len(out) + 1 or checkpoint.prev != prev:
            failures.append(_Failure(checkpoint.seq, "checkpoint_chain",
                                     f"checkpoint n={checkpoint.n} does not follow the previous one "
                                     "(a checkpoint was removed or altered)"))
        if out and checkpoint.seq < out[-1].seq:
            failures.append(_Failure(checkpoint.seq, "checkpoint_order", "checkpoints out of seq order"))
        out.append(checkpoint)
        prev = hashlib.sha256(raw).hexdigest()
    return out


def _check_published_keys(anchor_dir: Path, trusted: dict[str, Ed25519PublicKey], checkpoints: list[Checkpoint],
                          failures: list[_Failure], warnings: list[str]) -> dict[str, Ed25519PublicKey]:
    published: dict[str, Ed25519PublicKey] = {}
    for kid, pem in load_published_keys(anchor_dir).items():
        try:
            published[kid] = load_public_pem(pem)
        except (AnchorError, ValueError):
            failures.append(_Failure(_first_signed_by(kid, checkpoints), "anchor_key_replaced",
                                     f"published anchor key {kid} is not a valid Ed25519 key"))
    if not trusted:
        warnings.append("anchor keys not pinned (no key store, no --trust-key): trusting the published keys, "
                        "so a replaced anchor key cannot be detected")
        return published
    for kid, key in published.items():
        if kid in trusted and public_raw(trusted[kid]) != public_raw(key):
            failures.append(_Failure(_first_signed_by(kid, checkpoints), "anchor_key_replaced",
                                     f"published anchor key {kid} differs from the trusted key"))
    return trusted


def _first_signed_by(kid: str, checkpoints: list[Checkpoint]) -> int | None:
    return next((c.seq for c in checkpoints if c.record.get("sig_key_id") == kid), None)


class _Peekable:
    def __init__(self, it: Iterator[tuple[int, bytes, bool]]) -> None:
        self._it = it
        self._next: tuple[int, bytes, bool] | None = None

    def __iter__(self) -> _Peekable:
        return self

    def __next__(self) -> tuple[int, bytes, bool]:
        if self._next is not None:
            item, self._next = self._next, None
            return item
        return next(self._it)

    def peek_seq(self) -> int | None:
        if self._next is None:
            self._next = next(self._it, None)
        if self._next is None or not self._next[2]:
            return None
        try:
            return int(parse_line(self._next[1]).record["seq"])
        except RecordFormatError:
            return None


def _stream(log_dir: Path, st: _State) -> None:
    segments = list_segments(log_dir)
    expected: int | None = None
    for index, segment in enumerate(segments):
        lines = _Peekable(iter_lines(segment.path))
        first_in_segment = True
        for _offset, raw, complete in lines:
            position = expected if expected is not None else segment.first_seq
            if not complete:
                if index == len(segments) - 1 and lines.peek_seq() is None:
                    st.warnings.append(f"torn last line in {segment.path.name} (crash or write in progress); "
                                       "it holds no acknowledged record")
                    break
                raise _Stop(_Failure(position, "malformed", f"cut line inside {segment.path.name}"))
            try:
                parsed = parse_line(raw)
            except RecordFormatError as exc:
                raise _Stop(_Failure(position, "edited", f"record not readable as written: {exc}")) from exc
            seq = int(parsed.record["seq"])
            if expected is None:
                if seq < 1:
                    raise _Stop(_Failure(seq, "malformed", "seq numbers start at 1"))
                expected, st.first_seq = seq, seq
                st.first_prev = str(parsed.record.get("prev_hash"))
                st.head = st.first_prev
                if seq == 1 and st.first_prev != GENESIS:
                    raise _Stop(_Failure(1, "edited", "first record does not start from the genesis hash"))
            if seq != expected:
                following = lines.peek_seq()
                kind = "reordered" if following == expected or seq < expected else "missing"
                raise _Stop(_Failure(expected, kind, f"expected seq {expected}, found {seq} in {segment.path.name}"))
            if first_in_segment and seq != segment.first_seq:
                raise _Stop(_Failure(seq, "segment_renamed", f"{segment.path.name} does not start at seq {seq}"))
            first_in_segment = False
            _check_record(parsed, seq, st)
            expected += 1


def _check_record(parsed: ParsedLine, seq: int, st: _State) -> None:
    record = parsed.record
    if st.mac_keys is not None:
        key = st.mac_keys.get(str(record.get("key_id")))
        if key is None:
            raise _Stop(_Failure(seq, "mac_key_unknown", f"record MAC key {record.get('key_id')!r} is unknown"))
        want = hmac.new(key, bytes.fromhex(parsed.hash), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, parsed.mac):
            raise _Stop(_Failure(seq, "edited", f"record {seq} does not match its MAC"))
    if record.get("prev_hash") != st.head:
        culprit = seq - 1 if st.first_seq is not None and seq > st.first_seq else seq
        raise _Stop(_Failure(culprit, "edited",
                             f"record {seq} does not link to record {seq - 1} (one of them was altered)"))
    kind = record.get("type")
    if kind in _SIGNED_TYPES or (kind == "key_rotation" and record.get("family") == "anchor"):
        problem = check_signature(record, st.trusted, in_chain=True)
        if problem:
            raise _Stop(_Failure(seq, "signature", f"{kind} record {seq}: {problem}"))
    if kind == "tombstone":
        entries = record.get("segments")
        for entry in entries if isinstance(entries, list) else []:
            first, last, last_hash = (entry.get(k) for k in ("first_seq", "last_seq", "last_hash")) \
                if isinstance(entry, dict) else (None, None, None)
            if not (type(first) is int and type(last) is int and isinstance(last_hash, str)):
                raise _Stop(_Failure(seq, "malformed", f"tombstone {seq} lists a malformed segment"))
            st.tombstones.append((first, last, last_hash))
    if kind == "key_rotation" and record.get("family") == "anchor":
        _learn_rotated_key(record, seq, st)
    st.head = parsed.hash
    st.last_seq = seq
    st.records += 1
    for checkpoint in st.by_seq.get(seq, []):
        problem = check_signature(checkpoint.record, st.trusted)
        if problem:
            raise _Stop(_Failure(seq, "checkpoint_signature", f"checkpoint at seq {seq}: {problem}"))
        if checkpoint.head != st.head:
            start = max(st.last_verified_checkpoint + 1, st.first_seq or 1)
            raise _Stop(_Failure(start, "checkpoint_mismatch",
                                 f"records {start}..{seq} differ from the signed checkpoint at seq {seq}"))
        st.last_verified_checkpoint = seq
        st.checked += 1


def _learn_rotated_key(record: Mapping[str, Any], seq: int, st: _State) -> None:
    """A rotation signed by a trusted key vouches for the next key."""
    kid, public = record.get("new_key_id"), record.get("public")
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(str(public), validate=True))
    except (ValueError, binascii.Error) as exc:
        raise _Stop(_Failure(seq, "signature", "key rotation carries no valid public key")) from exc
    if not isinstance(kid, str):
        raise _Stop(_Failure(seq, "signature", "key rotation names no key id"))
    known = st.trusted.get(kid)
    if known is not None and public_raw(known) != public_raw(key):
        raise _Stop(_Failure(seq, "anchor_key_replaced", f"rotation to {kid} names a different key than trusted"))
    st.trusted[kid] = key


def _end_checks(st: _State, checkpoints: list[Checkpoint]) -> None:
    _coverage(st)
    _anchor_end(st, checkpoints)


def _coverage(st: _State) -> None:
    """A log starting after seq 1 needs signed tombstones for everything before it."""
    if st.first_seq is not None and st.first_seq > 1:
        covered = 1
        for first, last, _hash in sorted(st.tombstones):
            if first > covered:
                break
            covered = max(covered, last + 1)
        if covered < st.first_seq:
            raise _Stop(_Failure(covered, "missing",
                                 f"records {covered}..{st.first_seq - 1} are gone and no signed tombstone covers them"))
        links = {h for _first, last, h in st.tombstones if last == st.first_seq - 1}
        if st.first_prev not in links:
            raise _Stop(_Failure(st.first_seq, "edited", "first remaining record does not link to the tombstone"))


def _anchor_end(st: _State, checkpoints: list[Checkpoint]) -> None:
    """Checkpoints outside the records present: deleted by retention, or beyond the end."""
    for checkpoint in checkpoints:
        first = st.first_seq or 1
        if checkpoint.seq < first or checkpoint.seq > st.last_seq:
            problem = check_signature(checkpoint.record, st.trusted)
            if problem:
                raise _Stop(_Failure(checkpoint.seq, "checkpoint_signature",
                                     f"checkpoint at seq {checkpoint.seq}: {problem}"))
    beyond = [c.seq for c in checkpoints if c.seq > st.last_seq]
    if beyond:
        raise _Stop(_Failure(st.last_seq + 1, "truncated",
                             f"the log ends at seq {st.last_seq} but a signed checkpoint covers seq {max(beyond)} "
                             "(tail cut off or directory rolled back to an older copy)"))
