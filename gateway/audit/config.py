"""Audit trail settings: where the three stores live and how durable writes must be.

The log, the anchors and the keys live in three directories on purpose. Someone who can
rewrite the log directory must not also hold the MAC key (to recompute the chain) or the
signed checkpoints (to hide a truncation or a rollback). In production, mount them
separately and give the anchor store to a different user or a write-once target.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

Durability = Literal["fsync", "write"]

DEFAULT_PERSONAL_FIELDS = frozenset({"subject_id", "client_addr"})


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """Validated, immutable settings of one audit trail.

    ``durability="fsync"`` (default): ``append`` returns only once the record is on
    stable storage (group commit: one fsync per batch). ``"write"``: it returns once the
    OS has the bytes, which survives a crash of the gateway but not of the machine; use
    it only where the policy says so explicitly.

    ``personal_fields`` are encrypted under the data subject's key (``enc``) and can be
    crypto-shredded; ``subject_id`` and ``client_addr`` additionally leave a keyed
    pseudonym in clear (``subject``, ``client``) so records stay linkable for review. A
    record's subject is the pair (``subject_tenant``, ``subject_id``): one ``sub`` in two
    tenants is two people (see ``crypto.subject_owner``).
    """

    log_dir: Path
    anchor_dir: Path
    key_dir: Path
    checkpoint_every: int = 100
    checkpoint_interval_s: float = 5.0
    segment_max_records: int = 100_000
    segment_max_bytes: int = 64 * 1024 * 1024
    segment_max_age_s: float = 86_400.0
    queue_max: int = 10_000
    batch_max: int = 512
    append_timeout_s: float = 2.0  # policy: gateway.yaml audit.append_timeout_s
    durability: Durability = "fsync"
    personal_fields: frozenset[str] = field(default=DEFAULT_PERSONAL_FIELDS)
    retention_s: float | None = None
    retention_check_s: float = 3600.0
    stdout: bool = False

    def __post_init__(self) -> None:
        for name in ("checkpoint_every", "segment_max_records", "segment_max_bytes", "queue_max", "batch_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"audit {name} must be at least 1")
        for name in ("checkpoint_interval_s", "segment_max_age_s", "append_timeout_s", "retention_check_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"audit {name} must be positive")
        if self.retention_s is not None and not self.retention_s > 0:
            raise ValueError("audit retention_s must be positive")
        if self.durability not in ("fsync", "write"):
            raise ValueError("audit durability must be 'fsync' or 'write'")
        log = self.log_dir.resolve()
        for name in ("anchor_dir", "key_dir"):
            other = getattr(self, name).resolve()
            # SECURITY: anchors or keys inside (or equal to) the log directory would be in
            # the reach of whoever can rewrite the log, defeating their purpose.
            if other == log or log in other.parents or other in log.parents:
                raise ValueError(f"audit {name} must be a separate directory, not inside or above the log")

    @classmethod
    def for_dir(cls, audit_dir: Path, **overrides: Any) -> AuditConfig:
        """Defaults for ``--audit-dir DIR``: anchors in ``DIR-anchors``, keys in ``DIR-keys``."""
        base = Path(audit_dir)
        config = cls(
            log_dir=base,
            anchor_dir=base.with_name(base.name + "-anchors"),
            key_dir=base.with_name(base.name + "-keys"),
        )
        return replace(config, **overrides) if overrides else config
