"""A deterministic audit-log workload whose segment bytes are pinned by a golden file.

Why: the writer's hot path is tuned for speed (issue 11), and the on-disk bytes (canonical
encoding, chain, MAC, encrypted personal fields) must not move by a single byte. Every
source of randomness is fixed here (chain-MAC, pseudonym and subject keys written up
front, the AES-GCM nonces, the wall clock), so the same records always produce the same
segment file, whichever version of the writer appends them.

Self-contained on purpose (no package-relative imports): it is loaded by file path to
regenerate the golden file, and can be run against an older tree for a comparison::

    PYTHONPATH=<tree> python tests/audit/equivalence_scenario.py OUT_FILE
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import itertools
import sys
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gateway.audit.crypto as audit_crypto
from gateway.audit import AuditConfig, AuditLog, list_segments
from gateway.audit.crypto import _pseudonym, address_owner, subject_owner
from gateway.errors import DependencyUnavailable
from gateway.files import ensure_dir, write_private

MAC_KID = "m-00112233445566aa"
PSEUDONYM_KID = "p-00112233445566bb"
FIXED_TIME = 1_764_000_000.25  # 2025-11-24T16:00:00.250000Z
JWT_LIKE = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSIsInRlbmFudCI6ImFjbWUifQ.c2lnbmF0dXJl"


def _key(label: str) -> bytes:
    return hashlib.sha256(b"infergate-equivalence|" + label.encode()).digest()


class Colour(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Tag(str):
    pass


SUBJECTS = ("alice", "bob", "carol")
TENANT = "acme"
ADDRESSES = ("10.0.0.7", "192.0.2.1")


def _write_keys(key_dir: Path) -> None:
    """Fixed chain-MAC, pseudonym and subject keys, laid out as the key store keeps them."""
    for family, kid in (("mac", MAC_KID), ("pseudonym", PSEUDONYM_KID)):
        ensure_dir(key_dir / family)
        write_private(key_dir / family / f"{kid}.key", _key(kid))
        write_private(key_dir / family / "CURRENT", kid.encode("ascii"))
    owners = [subject_owner(TENANT, s) for s in SUBJECTS] + [address_owner(a) for a in ADDRESSES]
    owners += [f"day:{day}" for day in ("2025-11-24", "2025-11-23")]
    ensure_dir(key_dir / "subjects")
    for owner in owners:
        pseudonym = _pseudonym(_key(PSEUDONYM_KID), owner)
        ensure_dir(key_dir / "subjects" / pseudonym)
        write_private(key_dir / "subjects" / pseudonym / "0123456789abcdef.key", _key("subject|" + owner))


@contextmanager
def fixed_nonces() -> Iterator[None]:
    """AES-GCM nonces from a counter instead of ``os.urandom`` (only inside the crypto module)."""
    counter = itertools.count()
    real_os = vars(audit_crypto)["os"]

    def urandom(size: int) -> bytes:
        return next(counter).to_bytes(size, "big")

    setattr(audit_crypto, "os", SimpleNamespace(urandom=urandom))  # noqa: B010 - not exported: no attribute access
    try:
        yield
    finally:
        setattr(audit_crypto, "os", real_os)  # noqa: B010


def gateway_record(n: int) -> dict[str, Any]:
    """The shape ``GatewayService.audit`` builds: stage list, notes, rounded floats."""
    return {
        "request_id": f"{n:032x}", "policy_revision": "553c67e4c311", "transport": "http",
        "route": "/v2/models/{model}/infer", "action": "infer", "model": "digits", "model_version": "1",
        "tenant": TENANT, "subject_id": SUBJECTS[n % len(SUBJECTS)], "subject_tenant": TENANT,
        "client_addr": ADDRESSES[n % 2],
        "roles": ["analyst", "auditor"], "decision": "allow", "reason": "ok", "status": 200,
        "latency_ms": round(4.967 + n / 7, 3),
        "stages": [{"stage": s, "outcome": "allowed", "reason": None, "us": round(7.4 * (i + 1) + n / 3, 1)}
                   for i, s in enumerate(("authn", "authz", "rate_limit", "sanitize", "adversarial", "dp_noise"))],
        "upstream_called": True,
        "notes": {"authz": "analyst:infer", "detectors": {"grid": 0, "mahalanobis": 7.4175 + n, "range": 0.0},
                  "dp": {"accounting": "basic", "cached": False, "epsilon": 0.01, "outputs": ["score"],
                         "rows": 1}, "pii": {"in": {}, "out": {"EMAIL": n}}, "rate_limit.cost": {"elements": 64}},
        "eps": 0.0 if n % 2 else 0.01, "flag": "digits-version", "variant": "stable",
    }


def edge_records() -> list[dict[str, Any]]:
    """Every value kind the canonical form accepts, including the ones it converts."""
    return [
        {"decision": "deny", "reason": "rate_limited", "status": 429, "client_addr": ADDRESSES[1],
         "subject_id": None, "tenant": None, "roles": None, "stages": []},
        {"type": "event", "event": "policy_reload", "ok": True, "revision": "abc", "time": "2025-11-23T01:02:03Z",
         "client_addr": "", "detail": "ünïcödé \u2028 \x00 \n \"quoted\" \\ </script>"},
        {"floats": [0.0, -0.0, 1.0, 2.5, 1e-7, 1.0000004, 123456.1234567, -3.14159265, 1e15, 1e20, 4.35],
         "ints": [0, -1, 2**53 - 1, -(2**53 - 1)], "bools": [True, False, None],
         "tuple": (1, "two", (3.0, None)), "set": {"b", "a", "c"}, "frozen": frozenset({3, 1, 2}),
         "enum": Colour.RED, "intenum": Level.HIGH, "tag": Tag("tagged"), "ordered": OrderedDict(z=1, a=2.0),
         "nested": {"deep": {"deeper": [{"x": 1.5}, [], {}]}}},
        {"authorization": "Bearer abc", "Token": "t", "note": JWT_LIKE, "subject_id": SUBJECTS[0],
         "subject_tenant": TENANT,
         "api_key": {"nested": "secret"}, "harmless": "eyJ.short"},
        {"subject_id": 12345, "reason": "personal data without a known person: per-day key"},
    ]


async def _scenario(root: Path) -> None:
    config = AuditConfig(log_dir=root / "log", anchor_dir=root / "anchors", key_dir=root / "keys",
                         checkpoint_every=7, checkpoint_interval_s=3600.0)
    _write_keys(config.key_dir)
    log = AuditLog(config, clock=lambda: FIXED_TIME)
    await log.start()
    for n in range(5):  # one record per batch
        await log.append(gateway_record(n))
    # Concurrent appends: group commit batches them; queue order is seq order.
    await asyncio.gather(*(log.append(gateway_record(n)) for n in range(5, 25)))
    for record in edge_records():
        await log.append(record)
    # A failed write: the request is refused, then recorded as the 503 it got (deferred).
    faults = iter([OSError(5, "injected")])

    def fail_once(op: str) -> None:
        if op == "write":
            fault = next(faults, None)
            if fault is not None:
                raise fault

    log.file_sink.fault_hook = fail_once
    try:
        await log.append(gateway_record(50))
    except DependencyUnavailable:
        pass
    else:
        raise AssertionError("the injected write failure was not reported")
    await log.append(gateway_record(51))
    # A caller mutating its record after append returns cannot touch what was hashed.
    record = gateway_record(99)
    pending = asyncio.ensure_future(log.append(record))
    await asyncio.sleep(0)
    record["stages"].append({"stage": "late", "outcome": "mutated"})
    record["notes"]["detectors"]["grid"] = 5
    await pending
    await log.close()


def write_scenario(root: Path) -> bytes:
    """Run the workload under ``root``; return the bytes of its (single) segment file."""
    with fixed_nonces():
        asyncio.run(_scenario(root))
    segments = list_segments(root / "log")
    if len(segments) != 1:
        raise AssertionError(f"expected one segment, got {[s.path.name for s in segments]}")
    return segments[0].path.read_bytes()


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        Path(sys.argv[1]).write_bytes(write_scenario(Path(tmp)))
