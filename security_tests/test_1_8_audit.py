"""CATALOGUE §1.8 Audit integrity: schema, tampering of a copy of the live trail, log injection."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import shutil
import subprocess  # nosec B404 - mount/umount of a test tmpfs, fixed argv
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditLog
from gateway.audit.verify import verify_audit
from security_tests.conftest import Tokens
from security_tests.support.side import SideGateway
from security_tests.support.world import PUB_BODY, Client, Response, World, gather_limited


def trail_copy(world: World, tmp: Path) -> tuple[Path, Path, Path]:
    """A copy of the live log, its anchors and keys, with a checkpoint signed over the head."""
    assert world.service is not None and world.settings is not None
    world.loop.run(world.service.audit_log.checkpoint())
    cfg = world.service.audit_log.config
    dirs = []
    for name, src in (("log", cfg.log_dir), ("anchors", cfg.anchor_dir), ("keys", cfg.key_dir)):
        dst = tmp / name
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.lock"))
        dirs.append(dst)
    return dirs[0], dirs[1], dirs[2]


def segment(log_dir: Path) -> Path:
    return sorted(log_dir.glob("seg-*.jsonl"))[-1]


async def traffic(gw: Client, world: World, tokens: Tokens, n: int = 20) -> None:
    tok = tokens.u1()
    for i in range(n):
        await gw.infer("pub_clf" if i % 3 else "beta_fraud", PUB_BODY, token=tok)


async def test_aud_01_schema(gw: Client, world: World, tokens: Tokens) -> None:
    await traffic(gw, world, tokens, 12)
    recs = [r for r in world.audit_records() if r.get("type") == "request"][-12:]
    seqs = [r["seq"] for r in world.audit_records()]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    for rec in recs:
        for key in ("seq", "time", "request_id", "tenant", "model", "decision", "reason", "status", "eps",
                    "prev_hash", "mac", "key_id"):
            assert key in rec, key
        assert rec["time"].endswith("Z")
        assert "subject_id" not in rec and tokens.sub("u1") not in json.dumps(rec)  # pseudonymous subject


@pytest.mark.parametrize("attack", ["delete", "edit", "swap", "truncate", "rechain"])
async def test_aud_02_06_tamper(gw: Client, world: World, tokens: Tokens, tmp_path: Path, attack: str) -> None:
    await traffic(gw, world, tokens, 12)
    log_dir, anchors, keys = trail_copy(world, tmp_path)
    assert verify_audit(log_dir, anchors, keys) == (True, None)
    seg = segment(log_dir)
    lines = seg.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 12
    mid = len(lines) - 6
    target_seq = json.loads(lines[mid])["seq"]
    if attack == "delete":
        del lines[mid]
    elif attack == "edit":
        lines[mid] = lines[mid].replace(b'"decision":"deny"', b'"decision":"allow"').replace(
            b'"status":200', b'"status":201')
    elif attack == "swap":
        lines[mid], lines[mid + 1] = lines[mid + 1], lines[mid]
    elif attack == "truncate":
        lines = lines[:-10]
    else:
        import hashlib

        rec = json.loads(lines[mid])
        rec["status"] = 999
        body = {k: v for k, v in rec.items() if k != "mac"}
        raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        rec["mac"] = hashlib.sha256(raw).hexdigest()  # plain SHA-256 "MAC": no key
        lines[mid] = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    seg.write_bytes(b"".join(lines))
    ok, bad = verify_audit(log_dir, anchors, keys)
    assert ok is False
    if attack in ("delete", "edit", "rechain"):
        assert bad == target_seq


@pytest.mark.parametrize("where", ["user_agent", "model", "id"])
async def test_aud_07_log_injection(gw: Client, world: World, tokens: Tokens, where: str) -> None:
    # A seq no real record can have (a long session's trail does reach 999).
    evil = 'x\n{"seq":-7,"decision":"allow"}'
    before = len(world.audit_records())
    if where == "user_agent":
        r = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1(), headers={"User-Agent": evil.replace("\n", " ")})
    elif where == "model":
        r = await gw.request("POST", "/v2/models/x%0a%7B%22seq%22%3A-7%7D/infer", json_body=PUB_BODY,
                             token=tokens.u1())
    else:
        r = await gw.infer("pub_clf", {**PUB_BODY, "id": evil}, token=tokens.u1())
    # One record for this request (other cases' background records may land meanwhile),
    # and no line the injected text could have made.
    assert len(world.audit_for(r)) == 1
    new = world.audit_records()[before:]
    assert all(isinstance(rec["seq"], int) and rec["seq"] > 0 for rec in new)


async def test_aud_10_minimisation(gw: Client, world: World, tokens: Tokens) -> None:
    await audit_minimised(gw, world, tokens)


async def audit_minimised(gw: Client, world: World, tokens: Tokens) -> None:
    """AUD-10's attack and expectation (also run with the personal fields kept in clear:
    test_protection_off)."""
    tok = tokens.u1()
    r = await gw.infer("pub_clf", PUB_BODY, token=tok)
    rec = world.audit_for(r)[0]
    text = json.dumps(rec)
    assert tok not in text and "0.1, 0.2" not in text and tokens.sub("u1") not in text
    assert rec["subject"] and rec["subject"] != tokens.sub("u1")


async def test_aud_12_concurrency_no_forks(gw: Client, world: World, tokens: Tokens, tmp_path: Path) -> None:
    clients = [Client(world, world.next_addr()) for _ in range(20)]
    toks = [world.tokens.rs(sub=f"c{i}.{tokens.suffix}") for i in range(20)]
    await gather_limited(200, lambda i: clients[i % 20].infer("pub_clf", PUB_BODY, token=toks[i % 20]), limit=100)
    log_dir, anchors, keys = trail_copy(world, tmp_path)
    assert verify_audit(log_dir, anchors, keys) == (True, None)
    seqs = [r["seq"] for r in world.audit_records()]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


# -- AUD-08: audit sink failure; AUD-11: wall clock steps (side gateways with their own trail) -------


class SinkFaults:
    """A FileSink fault hook (the side's writer thread): raise an errno on one operation, or stall fsync."""

    def __init__(self) -> None:
        self.fail: dict[str, int] = {}
        self.stall_s = 0.0
        self.stalling = threading.Event()
        self.stall_over = threading.Event()
        self.cancel = threading.Event()

    def __call__(self, op: str) -> None:
        if op == "fsync" and self.stall_s and not self.stall_over.is_set():
            self.stalling.set()
            self.cancel.wait(self.stall_s)  # the disk does not answer for stall_s
            self.stall_over.set()
        code = self.fail.get(op)
        if code is not None:
            raise OSError(code, os.strerror(code))


@dataclasses.dataclass
class AuditSide:
    gw: SideGateway
    faults: SinkFaults
    tmpfs: Path | None  # the side's log directory is a tiny tmpfs (else faults come from the hook)

    @property
    def log(self) -> AuditLog:
        assert self.gw.service is not None
        return self.gw.service.audit_log

    def client(self) -> Client:
        return self.gw.client()

    def token(self, world: World, tokens: Tokens, name: str) -> str:
        return world.tokens.rs(sub=f"{name}.{tokens.suffix}")

    def fill_disk(self) -> None:
        """Disk full: a real full filesystem when we could mount one, else ENOSPC on write."""
        if self.tmpfs is None:
            self.faults.fail["write"] = errno.ENOSPC
            return
        fd = os.open(self.tmpfs / "filler", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for _ in range(1024):  # at most 4 MiB into a 256 KiB filesystem
                try:
                    os.write(fd, b"\0" * 4096)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    return
        finally:
            os.close(fd)
        raise AssertionError("the tmpfs never filled up")

    def heal_disk(self) -> None:
        self.faults.fail.pop("write", None)
        if self.tmpfs is not None:
            (self.tmpfs / "filler").unlink(missing_ok=True)


def _mount_tmpfs(target: Path) -> bool:
    """A 256 KiB tmpfs on ``target`` (root with mount permission only); False where not possible."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(target)],
                          capture_output=True, check=False, timeout=10)
    return proc.returncode == 0


@pytest.fixture
def audit_side(world: World, tmp_path: Path) -> Iterator[AuditSide]:
    log_dir = tmp_path / "side" / "audit"
    log_dir.mkdir(parents=True)
    mounted = _mount_tmpfs(log_dir)
    faults = SinkFaults()
    gw = SideGateway(world, tmp_path / "side")
    try:
        gw.start()
        assert gw.service is not None
        gw.service.audit_log.file_sink.fault_hook = faults
        yield AuditSide(gw, faults, log_dir if mounted else None)
        gw.check_nl()
    finally:
        faults.cancel.set()
        faults.fail.clear()
        gw.stop()
        if mounted:
            subprocess.run(["umount", str(log_dir)], check=False, timeout=10)


def _verify_after_stop(side: AuditSide, tmp: Path) -> None:
    """Stop the side (drain, final checkpoint) and verify a copy of its trail with anchors and keys."""
    cfg = side.log.config
    side.gw.stop()
    dirs = []
    for name, src in (("log", cfg.log_dir), ("anchors", cfg.anchor_dir), ("keys", cfg.key_dir)):
        dst = tmp / f"verify-{name}"
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.lock", "filler"))
        dirs.append(dst)
    assert verify_audit(dirs[0], dirs[1], dirs[2]) == (True, None)


def _records_of(recs: list[dict[str, Any]], rid: str | None) -> list[dict[str, Any]]:
    return [r for r in recs if rid is not None and r.get("request_id") == rid and r.get("type") == "request"]


def _strict_nl(side: AuditSide, answered: list[Response], refused: list[Response]) -> None:
    """NL: allow records not followed by an ``abandoned`` marker == the 2xx answers; each audit
    503 has exactly one truthful record (deny / 503 / audit_unavailable) and no unmarked allow."""
    recs = side.gw.audit_records()
    abandoned = {r["ref_seq"]: r for r in recs if r.get("type") == "abandoned"}
    allow = [r["request_id"] for r in recs if r.get("decision") == "allow" and r["seq"] not in abandoned]
    assert sorted(allow) == sorted(r.headers["X-Request-ID"] for r in answered)
    for resp in refused:
        mine = _records_of(recs, resp.headers["X-Request-ID"])
        denies = [r for r in mine if r["decision"] == "deny"]
        allows = [r for r in mine if r["decision"] == "allow"]
        if allows:  # written after its 503: the marker says what the client got
            [rec] = allows
            assert (abandoned[rec["seq"]]["status"], abandoned[rec["seq"]]["reason"]) == (503, "audit_unavailable")
            assert not denies
        else:
            [rec] = denies
            assert (rec["status"], rec["reason"], rec["deferred"]["decision"]) == (503, "audit_unavailable", "allow")
    seqs = [r["seq"] for r in recs]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def _wait_records(side: AuditSide, refused: list[Response]) -> None:
    """Refusals are recorded by the writer once the sink heals (its next tick): bounded wait."""
    for _ in range(100):
        recs = side.gw.audit_records()
        if all(_records_of(recs, r.headers["X-Request-ID"]) for r in refused) and not side.log.stats.queue_depth:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("refused requests were never recorded after the sink healed")


def _audit_503(resp: Response) -> bool:
    return resp.status == 503 and "audit trail unavailable" in resp.json()["error"] and "Retry-After" in resp.headers


async def test_aud_08_disk_full(audit_side: AuditSide, world: World, tokens: Tokens, tmp_path: Path) -> None:
    side, gw = audit_side, audit_side.client()
    answered = [await gw.infer("pub_clf", PUB_BODY, token=side.token(world, tokens, f"a{i}")) for i in range(3)]
    assert [r.status for r in answered] == [200] * 3
    side.fill_disk()
    refused: list[Response] = []
    full = side.client()
    for i in range(8):  # what still fits in the last page of the segment is written and answered
        r = await full.infer("pub_clf", PUB_BODY, token=side.token(world, tokens, f"f{i}"))
        if r.status == 200:
            answered.append(r)
            continue
        assert _audit_503(r), (r.status, r.body)
        refused.append(r)
        if len(refused) == 3:
            break
    assert len(refused) == 3, "the full disk never refused a request"
    side.heal_disk()  # space again: no restart
    healed = side.client()
    after = [await healed.infer("pub_clf", PUB_BODY, token=side.token(world, tokens, f"h{i}")) for i in range(2)]
    assert [r.status for r in after] == [200, 200]
    answered += after
    await _wait_records(side, refused)
    _strict_nl(side, answered, refused)
    _verify_after_stop(side, tmp_path)


async def test_aud_08_fsync_error_then_eacces(audit_side: AuditSide, world: World, tokens: Tokens,
                                              tmp_path: Path) -> None:
    side, gw = audit_side, audit_side.client()
    answered = [await gw.infer("pub_clf", PUB_BODY, token=side.token(world, tokens, f"a{i}")) for i in range(2)]
    segments_before = len(list(side.log.config.log_dir.glob("seg-*.jsonl")))
    side.faults.fail["fsync"] = errno.EIO  # the device reports a write-back error
    refused = [await gw.infer("pub_clf", PUB_BODY, token=side.token(world, tokens, "eio"))]
    del side.faults.fail["fsync"]
    # The failed segment is retired; its replacement cannot be created (directory not writable).
    side.faults.fail["open"] = errno.EACCES
    refused.append(await gw.infer("pub_clf", PUB_BODY, token=side.token(world, tokens, "eacces")))
    assert all(_audit_503(r) for r in refused), [(r.status, r.body) for r in refused]
    del side.faults.fail["open"]
    after = await side.client().infer("pub_clf", PUB_BODY, token=side.token(world, tokens, "healed"))
    assert after.status == 200
    answered.append(after)
    await _wait_records(side, refused)
    _strict_nl(side, answered, refused)
    assert len(list(side.log.config.log_dir.glob("seg-*.jsonl"))) == segments_before + 1
    _verify_after_stop(side, tmp_path)


async def test_aud_08_stalled_fsync_is_bounded(audit_side: AuditSide, world: World, tokens: Tokens,
                                               tmp_path: Path) -> None:
    side = audit_side
    assert side.log.config.append_timeout_s == 2.0  # policy default (gateway.yaml audit.append_timeout_s)
    warm = await side.client().infer("pub_clf", PUB_BODY, token=side.token(world, tokens, "warm"))
    assert warm.status == 200
    side.faults.stall_s = 5.0
    started = time.monotonic()
    first = await side.client().infer("pub_clf", PUB_BODY, token=side.token(world, tokens, "s1"))
    first_s = time.monotonic() - started
    assert side.faults.stalling.is_set() and not side.faults.stall_over.is_set()  # answered inside the stall
    started = time.monotonic()
    second = await side.client().infer("pub_clf", PUB_BODY, token=side.token(world, tokens, "s2"))
    second_s = time.monotonic() - started
    assert not side.faults.stall_over.is_set()
    refused = [first, second]
    assert all(_audit_503(r) for r in refused), [(r.status, r.body) for r in refused]
    print(f"AUD-08 stall: first 503 after {first_s:.2f} s (deadline 2 s), next after {second_s:.3f} s")
    for _ in range(100):  # the disk answers again (5 s stall): the writer moves on by itself
        if side.faults.stall_over.is_set() and not side.log.stalled:
            break
        await asyncio.sleep(0.1)
    after = await side.client().infer("pub_clf", PUB_BODY, token=side.token(world, tokens, "s3"))
    assert after.status == 200
    await _wait_records(side, refused)
    for _ in range(50):  # the marker for the record that reached the disk after its 503
        if side.log.stats.abandoned and any(r.get("type") == "abandoned" for r in side.gw.audit_records()):
            break
        await asyncio.sleep(0.1)
    _strict_nl(side, [warm, after], refused)
    recs = side.gw.audit_records()
    [late] = _records_of(recs, first.headers["X-Request-ID"])
    assert late["decision"] == "allow"  # reached the disk after the deadline...
    assert any(r.get("type") == "abandoned" and r["ref_seq"] == late["seq"] and r["status"] == 503 for r in recs)
    [queued] = _records_of(recs, second.headers["X-Request-ID"])
    assert queued["decision"] == "deny" and queued["deferred"]["cause"] in ("audit_stalled", "audit_timeout")
    _verify_after_stop(side, tmp_path)


async def test_aud_11_wall_clock_steps(audit_side: AuditSide, world: World, tokens: Tokens, tmp_path: Path) -> None:
    side = audit_side
    gw = side.client()
    side.log.file_sink.max_records = 2  # small segments, so retention has something it could delete
    before = [await gw.infer("pub_clf", PUB_BODY, token=side.token(world, tokens, f"b{i}")) for i in range(4)]
    side.log.clock = lambda: time.time() - 3600.0  # stepped back 1 h mid-run
    back = [await gw.infer("pub_clf", PUB_BODY, token=side.token(world, tokens, f"k{i}")) for i in range(3)]
    assert [r.status for r in before + back] == [200] * 7
    recs = side.gw.audit_records()
    seqs = [r["seq"] for r in recs]
    assert seqs == list(range(1, len(seqs) + 1))  # seq monotonic and contiguous across the step
    t_before = side.gw.audit_for(before[-1])[0]["time"]
    t_back = side.gw.audit_for(back[0])[0]["time"]
    assert t_back < t_before  # ts went backwards; order is seq, verification ignores ts
    # Stepped forward a year: retention (7 days here) must not delete the fresh segments.
    side.log.config = dataclasses.replace(side.log.config, retention_s=7 * 86_400.0)
    side.log.clock = lambda: time.time() + 365 * 86_400.0
    segments = sorted(p.name for p in side.log.config.log_dir.glob("seg-*.jsonl"))
    assert len(segments) >= 3
    assert world.loop.run(side.log.apply_retention()) == []
    assert sorted(p.name for p in side.log.config.log_dir.glob("seg-*.jsonl")) == segments
    ahead = await gw.infer("pub_clf", PUB_BODY, token=side.token(world, tokens, "fwd"))
    assert ahead.status == 200
    _strict_nl(side, [*before, *back, ahead], [])
    _verify_after_stop(side, tmp_path)


async def test_aud_01_replayed_request_id_keys_one_request(gw: Client, world: World, tokens: Tokens) -> None:
    """A client-chosen X-Request-ID is echoed once; a replay (a retry, or an id seen on
    another tenant's request) gets a fresh id, so each request id keys exactly one record."""
    rid = f"replay-{tokens.suffix}"
    first = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1(), headers={"X-Request-ID": rid})
    again = await gw.infer("pub_clf", PUB_BODY, token=tokens.u2(), headers={"X-Request-ID": rid})
    assert first.status == again.status == 200
    assert first.headers["X-Request-ID"] == rid
    assert again.headers["X-Request-ID"] != rid and len(again.headers["X-Request-ID"]) == 32
    mine = [r for r in world.audit_records() if r.get("request_id") == rid]
    assert [r["tenant"] for r in mine] == ["alpha"]
    assert [r["tenant"] for r in world.audit_for(again)] == ["beta"]


def _audit_cli(*args: str) -> tuple[int, str]:
    """``infergate audit ...`` as a privacy officer runs it (its own process)."""
    import sys

    proc = subprocess.run([sys.executable, "-m", "gateway", "audit", *args], capture_output=True, text=True,
                          timeout=120, check=False)
    return proc.returncode, proc.stdout + proc.stderr


async def test_aud_10_officer_export_erase_verify(side_gateways: Any, world: World, tokens: Tokens,
                                                  tmp_path: Path) -> None:
    """Export a subject, erase them, verify: still ok, their personal fields unreadable; an
    unknown or already-erased subject is a clear exit 1 that records nothing. The same sub
    in another tenant is another person (s8 probe: erasing one shredded both): untouched."""
    side: SideGateway = side_gateways("officer")
    client, subject = side.client(), tokens.sub("officer-victim")
    for i in range(4):
        await client.infer("pub_clf", PUB_BODY, token=world.tokens.rs(sub=subject) if i % 2 else tokens.u1())
    namesake = await client.infer("beta_fraud", PUB_BODY, token=world.tokens.rs(sub=subject, tenant="beta"))
    assert namesake.status == 200
    assert side.service is not None
    cfg = side.service.audit_log.config
    side.stop()  # the log is free: erasure records are appended directly
    where = [str(cfg.log_dir), "--anchors", str(cfg.anchor_dir), "--keys", str(cfg.key_dir)]
    alpha = ["--subject", subject, "--tenant", "alpha"]

    # A sub alone names no one (which tenant's person?): a usage error that touches nothing.
    for argv in (["erase", *where, "--subject", subject],
                 ["export", *where, "--subject", subject, "--out", str(tmp_path / "no-tenant")]):
        code, out = _audit_cli(*argv)
        assert code == 2 and "--subject needs --tenant" in out and "Traceback" not in out
    assert not (tmp_path / "no-tenant").exists()

    code, out = _audit_cli("export", *where, *alpha, "--out", str(tmp_path / "before"))
    assert code == 0 and "2 record(s) (0 with erased" in out
    assert subject in (tmp_path / "before").joinpath(next(p.name for p in (tmp_path / "before").glob("*.csv"))
                                                     ).read_text()
    records_before = len(side.audit_records())

    code, out = _audit_cli("erase", *where, "--subject", f"nobody-{tokens.suffix}", "--tenant", "alpha")
    assert code == 1 and "nothing to erase" in out
    assert len(side.audit_records()) == records_before  # nothing recorded for a mistyped id

    code, out = _audit_cli("erase", *where, *alpha)
    assert code == 0 and "1 key(s) destroyed" in out
    code, out = _audit_cli("verify", *where)
    assert code == 0 and out.startswith("ok")

    code, out = _audit_cli("export", *where, *alpha, "--out", str(tmp_path / "after"))
    assert code == 0 and "(2 with erased personal data)" in out
    assert subject not in (tmp_path / "after").joinpath(next(p.name for p in (tmp_path / "after").glob("*.csv"))
                                                        ).read_text()
    assert subject.encode() not in b"".join(p.read_bytes() for p in cfg.log_dir.rglob("*") if p.is_file())

    code, out = _audit_cli("erase", *where, *alpha)
    assert code == 1 and "erased already" in out
    code, out = _audit_cli("export", *where, "--subject", subject, "--tenant", "beta", "--out", str(tmp_path / "b"))
    assert code == 0 and "1 record(s) (0 with erased personal data)" in out  # beta's namesake kept


async def test_aud_08_not_ready_while_the_sink_fails(audit_side: AuditSide, world: World, tokens: Tokens) -> None:
    """/live stays 200 (a restart fixes nothing) but /ready is 503 while every inference
    could only be a 503 audit_unavailable, so a load balancer drains the gateway; ready
    again once the disk heals, without a restart."""
    from tests.support.liveness import eventually

    side, gw = audit_side, audit_side.client()
    assert (await gw.request("GET", "/v2/health/ready")).status == 200
    answered = [await gw.infer("pub_clf", PUB_BODY, token=side.token(world, tokens, "ok"))]
    side.faults.fail["write"] = errno.ENOSPC
    refused = [await gw.infer("pub_clf", PUB_BODY, token=side.token(world, tokens, "full"))]
    assert _audit_503(refused[0]), (refused[0].status, refused[0].body)
    assert (await gw.request("GET", "/v2/health/ready")).status == 503
    assert (await gw.request("GET", "/v2/health/live")).status == 200
    del side.faults.fail["write"]
    await eventually(lambda: side.log.healthy, "audit writer healthy again after the disk healed", expected_s=2.0)
    assert (await gw.request("GET", "/v2/health/ready")).status == 200
    answered.append(await gw.infer("pub_clf", PUB_BODY, token=side.token(world, tokens, "healed")))
    assert answered[-1].status == 200
    await _wait_records(side, refused)
    _strict_nl(side, answered, refused)


async def test_aud_10_officer_scoped_exports_leak_no_one_else(side_gateways: Any, world: World, tokens: Tokens,
                                                               tmp_path: Path) -> None:
    """Through a real gateway: one sub in two tenants, and a client address shared by an
    authenticated user and anonymous refusals. A tenant-scoped export holds nothing of the
    other tenant; an address export holds the refusals only, never the user behind the
    same address; both are 0600 and hold no masked PII."""
    side: SideGateway = side_gateways("officer-scope")
    client, shared = side.client(), tokens.sub("shared")
    text = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                        "data": ["Contact john.doe@example.com, SSN 078-05-1120"]}]}
    statuses = [
        (await client.infer("pub_clf", PUB_BODY, token=world.tokens.rs(sub=shared, tenant="alpha",
                                                                        roles=("predictor",)))).status,
        (await client.infer("beta_fraud", PUB_BODY, token=world.tokens.rs(sub=shared, tenant="beta",
                                                                           roles=("predictor",)))).status,
        (await client.infer("txt_echo", text, token=world.tokens.rs(sub=shared, tenant="alpha",
                                                                     roles=("predictor",)))).status,
        (await client.infer("pub_clf", PUB_BODY, token="not.a.token")).status,  # noqa: S106 - garbage on purpose
    ]
    assert statuses == [200, 200, 200, 401]
    assert side.service is not None
    cfg = side.service.audit_log.config
    addr = side.audit_records()[-1]["client"]
    assert all(r["client"] == addr for r in side.audit_records())  # one address for all four
    side.stop()
    where = [str(cfg.log_dir), "--anchors", str(cfg.anchor_dir), "--keys", str(cfg.key_dir)]

    code, out = _audit_cli("export", *where, "--subject", shared, "--tenant", "alpha", "--out", str(tmp_path / "a"))
    assert code == 0 and "2 record(s)" in out
    files = list((tmp_path / "a").iterdir())
    dump = "".join(p.read_text() for p in files)
    assert "beta" not in dump and shared in dump
    assert "john.doe" not in dump and "078-05-1120" not in dump
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in files)

    client_addr = next(iter(json.loads(next((tmp_path / "a").glob("*.json")).read_text())["records"]))["client_addr"]
    code, out = _audit_cli("export", *where, "--client-addr", client_addr, "--out", str(tmp_path / "addr"))
    assert code == 0 and "1 record(s)" in out
    dump = "".join(p.read_text() for p in (tmp_path / "addr").iterdir())
    assert shared not in dump and "authn" in dump
