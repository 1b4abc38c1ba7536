"""The audit trail: tamper-evident, privacy-preserving, exportable and erasable.

One record per request that reached the gateway, allowed or refused, in append-only
segments of canonical JSON lines (``records``), hash-chained and MACed, made durable by
group commit before the response leaves (``log``), anchored by Ed25519-signed
checkpoints in a separate store (``anchors``), with personal fields encrypted under a
per-subject AES-GCM key that erasure destroys (``crypto``). ``verify`` names the first
bad record after any edit, deletion, reordering, truncation or rollback; ``export``
answers data-subject access requests and summarizes access; ``retention`` deletes old
segments behind a signed tombstone; ``aggregate`` keeps refusal floods from flooding
the trail; ``cli`` holds the ``infergate audit`` subcommands.

Three directories, kept apart on purpose (see :class:`AuditConfig`)::

    <log_dir>/seg-<first seq>.jsonl     the records (plus .lock, inbox/, quarantine/)
    <anchor_dir>/checkpoints.jsonl      signed checkpoints; keys/<kid>.pub published
    <key_dir>/{mac,pseudonym,anchor,subjects}/   the keys (0700 / 0600)
"""

from __future__ import annotations

from gateway.audit.aggregate import AuditAggregator
from gateway.audit.config import AuditConfig
from gateway.audit.crypto import KeyStore
from gateway.audit.export import ExportResult, access_report, export_subject
from gateway.audit.log import SUBJECT_TENANT, AuditIntegrityError, AuditLog, AuditStats
from gateway.audit.records import GENESIS, canonical, iter_records, list_segments
from gateway.audit.sinks import Sink, StdoutSink
from gateway.audit.verify import VerifyResult, verify, verify_audit

__all__ = [
    "GENESIS",
    "SUBJECT_TENANT",
    "AuditAggregator",
    "AuditConfig",
    "AuditIntegrityError",
    "AuditLog",
    "AuditStats",
    "ExportResult",
    "KeyStore",
    "Sink",
    "StdoutSink",
    "VerifyResult",
    "access_report",
    "canonical",
    "export_subject",
    "iter_records",
    "list_segments",
    "verify",
    "verify_audit",
]
