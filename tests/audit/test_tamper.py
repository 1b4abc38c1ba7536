"""Every way of tampering with the trail is detected, and ``verify`` names the right record.

Each test writes a clean trail (checkpoint every 10 records, segments of 25 records),
tampers in one way, and checks ``first_bad_seq`` and the problem code.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit import AuditConfig, AuditIntegrityError, AuditLog, list_segments
from gateway.audit.anchors import CHECKPOINT_FILE, public_pem, signing_bytes
from gateway.audit.records import body_hash, canonical, encode_line, normalize
from gateway.audit.verify import VerifyResult, verify

from . import all_lines, check, fill, find_line, make_config, records

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed, valid trail of 100 records in 4 segments, checkpoints every 10 records
    (written once per module; each test tampers with its own copy)."""
    root = tmp_path_factory.mktemp("trail")
    config = make_config(root, segment_max_records=25)

    async def write() -> None:
        log = AuditLog(config)
        await fill(log, 100)
        await log.close()

    asyncio.run(write())
    assert check(config).ok
    return root


@pytest.fixture
def trail(template: Path, tmp_path: Path) -> AuditConfig:
    for name in ("log", "anchors", "keys"):
        shutil.copytree(template / name, tmp_path / name)  # modes kept: keys stay 0600
    return make_config(tmp_path, segment_max_records=25)


def edit_line(config: AuditConfig, seq: int, old: bytes, new: bytes) -> None:
    path, index = find_line(config, seq)
    lines = path.read_bytes().splitlines(keepends=True)
    assert old in lines[index]
    lines[index] = lines[index].replace(old, new, 1)
    path.write_bytes(b"".join(lines))


class TestRecordTampering:
    async def test_edit_a_field(self, trail: AuditConfig) -> None:
        edit_line(trail, 37, b'"decision":"allow"', b'"decision":"deny"')
        result = check(trail)
        assert (result.ok, result.first_bad_seq, result.problem) == (False, 37, "edited")

    async def test_edit_is_named_even_without_the_key_store(self, trail: AuditConfig) -> None:
        edit_line(trail, 37, b'"status":200', b'"status":201')
        result = check(trail, keys=False)
        assert (result.ok, result.first_bad_seq) == (False, 37)

    async def test_cosmetic_edit_counts(self, trail: AuditConfig) -> None:
        edit_line(trail, 12, b'"decision":"allow"', b'"decision": "allow"')
        assert check(trail).first_bad_seq == 12

    async def test_recomputed_plain_hash_chain_is_caught_by_the_mac(self, trail: AuditConfig) -> None:
        """AUD-06: rewrite record 37 and re-link every later record with plain SHA-256."""
        rewrite_chain_from(trail, 37)
        result = check(trail)
        assert (result.first_bad_seq, result.problem) == (37, "edited")
        # Without the MAC key the next signed checkpoint still catches it, naming the range
        # that starts after the last checkpoint that matched.
        before = max(s for s in checkpoint_seqs(trail) if s < 37)
        no_keys = check(trail, keys=False)
        assert (no_keys.ok, no_keys.first_bad_seq, no_keys.problem) == (False, before + 1, "checkpoint_mismatch")

    async def test_delete_a_line(self, trail: AuditConfig) -> None:
        path, index = find_line(trail, 50)
        lines = path.read_bytes().splitlines(keepends=True)
        del lines[index]
        path.write_bytes(b"".join(lines))
        result = check(trail)
        assert (result.first_bad_seq, result.problem) == (50, "missing")

    async def test_swap_two_lines(self, trail: AuditConfig) -> None:
        path, index = find_line(trail, 40)
        lines = path.read_bytes().splitlines(keepends=True)
        lines[index], lines[index + 1] = lines[index + 1], lines[index]
        path.write_bytes(b"".join(lines))
        result = check(trail)
        assert (result.first_bad_seq, result.problem) == (40, "reordered")

    async def test_truncate_the_tail(self, trail: AuditConfig) -> None:
        path, lines = all_lines(trail)[-1]
        path.write_bytes(b"".join(lines[:-10]))  # records 91..100 gone
        result = check(trail)
        assert (result.first_bad_seq, result.problem) == (91, "truncated")

    async def test_cut_inside_the_last_line_is_truncation(self, trail: AuditConfig) -> None:
        path, lines = all_lines(trail)[-1]
        path.write_bytes(b"".join(lines[:-1]) + lines[-1][:40])
        result = check(trail)
        assert (result.first_bad_seq, result.problem) == (100, "truncated")

    async def test_a_record_nested_too_deep_to_parse_is_an_edit(self, trail: AuditConfig) -> None:
        """s8 probe: a line nested 100,000 deep made ``json.loads`` raise RecursionError
        and ``audit verify`` die with a traceback instead of naming the record."""
        edit_line(trail, 37, b'"decision":"allow"', b'"decision":"allow","x":' + b"[" * 100_000 + b"]" * 100_000)
        result = check(trail)
        assert (result.ok, result.first_bad_seq, result.problem) == (False, 37, "edited")

    async def test_log_injection_stays_one_record(self, tmp_path: Path) -> None:
        """AUD-07: a newline and a fake record inside a field stay text in one line."""
        config = make_config(tmp_path)
        log = AuditLog(config)
        evil = 'x\n{"seq":999,"decision":"allow"}\r\u2028'
        await log.append({"model": evil, "request_id": evil, "user_agent": evil, "decision": "deny"})
        await log.close()
        [(_path, lines)] = all_lines(config)
        assert len(lines) == 1
        assert json.loads(lines[0])["model"] == evil
        assert check(config).ok


def rewrite_chain_from(config: AuditConfig, seq: int) -> None:
    """The attacker's best effort without the MAC key: edit, then re-link by plain SHA-256."""
    head = None
    for path, lines in all_lines(config):
        out = []
        for line in lines:
            record = json.loads(line)
            if record["seq"] >= seq:
                if record["seq"] == seq:
                    record["decision"] = "deny"
                record["prev_hash"] = head
                mac = record.pop("mac")
                body = canonical(normalize(record))
                head = body_hash(body)
                out.append(encode_line(body, mac))
            else:
                out.append(line)
                record.pop("mac")
                head = body_hash(canonical(normalize(record)))
        path.write_bytes(b"".join(out))


class TestSegments:
    async def test_remove_a_middle_segment(self, trail: AuditConfig) -> None:
        segments = list_segments(trail.log_dir)
        assert [s.first_seq for s in segments] == [1, 26, 51, 76]
        segments[1].path.unlink()
        result = check(trail)
        assert (result.first_bad_seq, result.problem) == (26, "missing")

    async def test_remove_the_oldest_segment(self, trail: AuditConfig) -> None:
        list_segments(trail.log_dir)[0].path.unlink()
        result = check(trail)
        assert (result.first_bad_seq, result.problem) == (1, "missing")

    async def test_remove_the_newest_segment(self, trail: AuditConfig) -> None:
        list_segments(trail.log_dir)[-1].path.unlink()
        result = check(trail)
        assert (result.first_bad_seq, result.problem) == (76, "truncated")

    async def test_rename_a_segment(self, trail: AuditConfig) -> None:
        segment = list_segments(trail.log_dir)[1]
        segment.path.rename(segment.path.with_name("seg-000000000027.jsonl"))
        assert check(trail).first_bad_seq == 26


class TestRollback:
    async def test_older_valid_copy_is_detected_via_the_anchors(self, tmp_path: Path) -> None:
        config = make_config(tmp_path)
        log = AuditLog(config)
        await fill(log, 30)
        await log.close()
        snapshot = tmp_path / "snapshot"
        shutil.copytree(config.log_dir, snapshot)
        log = AuditLog(config)
        await fill(log, 25, start=30)
        await log.close()
        shutil.rmtree(config.log_dir)
        shutil.copytree(snapshot, config.log_dir)  # the old copy is itself a perfectly valid chain
        assert check(config, anchors=False).ok
        result = check(config)
        assert (result.ok, result.first_bad_seq, result.problem) == (False, 31, "truncated")
        # The writer refuses to continue (and fork) a rolled-back log.
        with pytest.raises(AuditIntegrityError, match="truncated or rolled back"):
            await AuditLog(config).start()


class TestAnchors:
    async def test_forged_checkpoint_signature(self, trail: AuditConfig) -> None:
        path = trail.anchor_dir / CHECKPOINT_FILE
        lines = path.read_bytes().splitlines(keepends=True)
        index = checkpoint_seqs(trail).index(60)
        target = json.loads(lines[index])
        sig = bytearray(base64.b64decode(target["sig"]))
        sig[0] ^= 1
        target["sig"] = base64.b64encode(bytes(sig)).decode()
        lines[index] = canonical(normalize(target)) + b"\n"
        path.write_bytes(b"".join(lines))
        result = check(trail)
        assert (result.first_bad_seq, result.problem) == (60, "checkpoint_signature")

    async def test_replaced_anchor_key_and_resigned_checkpoints(self, trail: AuditConfig) -> None:
        """Swap the published key for the attacker's, re-sign every checkpoint, cut the tail."""
        attacker = Ed25519PrivateKey.generate()
        [published] = list((trail.anchor_dir / "keys").glob("*.pub"))
        published.write_bytes(public_pem(attacker.public_key()))
        resign_checkpoints(trail, attacker, drop_after_seq=80)
        path, lines = all_lines(trail)[-1]
        path.write_bytes(b"".join(lines[:-20]))  # records 81..100 gone, anchors re-signed to match
        result = check(trail)
        assert (result.ok, result.first_bad_seq) == (False, 10)
        assert result.problem in {"anchor_key_replaced", "checkpoint_signature"}
        # Trusting only what the anchor store publishes, the forgery would pass: pinning matters.
        assert verify_without_pin(trail).ok

    async def test_deleted_checkpoint_breaks_the_anchor_chain(self, trail: AuditConfig) -> None:
        path = trail.anchor_dir / CHECKPOINT_FILE
        lines = path.read_bytes().splitlines(keepends=True)
        seqs = checkpoint_seqs(trail)
        index = seqs.index(60)
        del lines[index]
        path.write_bytes(b"".join(lines))
        result = check(trail)
        assert (result.first_bad_seq, result.problem) == (seqs[index + 1], "checkpoint_chain")

    async def test_deleting_the_anchor_store_is_not_a_way_out(self, trail: AuditConfig) -> None:
        path, lines = all_lines(trail)[-1]
        path.write_bytes(b"".join(lines[:-10]))
        shutil.rmtree(trail.anchor_dir)
        result = check(trail)
        assert (result.ok, result.problem) == (False, "anchors_missing")

    @pytest.mark.parametrize("line", [b"[" * 100_000 + b"]" * 100_000, b"NaN",
                                      b'{"head":"x","n":NaN,"prev":"y","seq":1,"type":"checkpoint"}'],
                             ids=["deep", "bare_nan", "nan_member"])
    async def test_an_unparsable_checkpoint_is_a_corrupt_anchor_store(self, trail: AuditConfig,
                                                                       line: bytes) -> None:
        """s8 probe: a checkpoint nested too deep raised RecursionError out of verify, one
        holding NaN a ValueError the CLI reported as a usage error (exit 2, not 1)."""
        path = trail.anchor_dir / CHECKPOINT_FILE
        path.write_bytes(path.read_bytes() + line + b"\n")
        result = check(trail)
        assert (result.ok, result.problem) == (False, "anchor_corrupt")

    async def test_checkpoint_with_a_forged_head(self, trail: AuditConfig) -> None:
        path = trail.anchor_dir / CHECKPOINT_FILE
        lines = path.read_bytes().splitlines(keepends=True)
        index = checkpoint_seqs(trail).index(60)
        target = json.loads(lines[index])
        target["head"] = "f" * 64
        lines[index] = canonical(normalize(target)) + b"\n"
        path.write_bytes(b"".join(lines))
        result = check(trail)
        assert (result.first_bad_seq, result.problem) == (60, "checkpoint_signature")


def checkpoint_seqs(config: AuditConfig) -> list[int]:
    """Checkpoints fall every 10 records, at each segment roll (25, 50, 75) and at close."""
    path = config.anchor_dir / CHECKPOINT_FILE
    return [json.loads(line)["seq"] for line in path.read_bytes().splitlines()]


def resign_checkpoints(config: AuditConfig, key: Ed25519PrivateKey, *, drop_after_seq: int) -> None:
    path = config.anchor_dir / CHECKPOINT_FILE
    prev = "0" * 64
    out = []
    for line in path.read_bytes().splitlines():
        checkpoint = json.loads(line)
        if checkpoint["seq"] > drop_after_seq:
            break
        checkpoint["prev"] = prev
        checkpoint["sig"] = base64.b64encode(key.sign(signing_bytes(checkpoint))).decode()
        raw = canonical(normalize(checkpoint))
        prev = hashlib.sha256(raw).hexdigest()
        out.append(raw + b"\n")
    path.write_bytes(b"".join(out))


def verify_without_pin(config: AuditConfig) -> VerifyResult:
    return verify(config.log_dir, anchor_dir=config.anchor_dir, key_dir=None)


class TestCli:
    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        code = "import sys, argparse\nfrom gateway.audit.cli import add_audit_parser\n" \
               "p = argparse.ArgumentParser(); s = p.add_subparsers(dest='c', required=True)\n" \
               "add_audit_parser(s); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                              check=False, timeout=30)

    async def test_verify_ok_then_tampered(self, trail: AuditConfig) -> None:
        args = ("audit", "verify", str(trail.log_dir), "--anchors", str(trail.anchor_dir),
                "--keys", str(trail.key_dir))
        ok = self.run(*args)
        assert ok.returncode == 0, ok.stderr
        assert "100 records" in ok.stdout
        edit_line(trail, 64, b'"reason":"ok"', b'"reason":"ko"')
        bad = self.run(*args)
        assert bad.returncode == 1
        assert "first bad record at seq 64" in bad.stderr
        as_json = self.run(*args, "--json")
        assert json.loads(as_json.stdout)["first_bad_seq"] == 64

    async def test_a_checkpoint_holding_nan_is_tampering_not_a_usage_error(self, trail: AuditConfig) -> None:
        path = trail.anchor_dir / CHECKPOINT_FILE
        lines = path.read_bytes().splitlines(keepends=True)
        lines[-1] = lines[-1].replace(b'"n":', b'"n":NaN,"m":', 1)
        path.write_bytes(b"".join(lines))
        bad = self.run("audit", "verify", str(trail.log_dir), "--anchors", str(trail.anchor_dir),
                       "--keys", str(trail.key_dir))
        assert bad.returncode == 1, bad.stderr
        assert "Traceback" not in bad.stderr and "anchor_corrupt" in bad.stderr


def test_records_helper_reads_everything(tmp_path: Path) -> None:
    assert records(make_config(tmp_path)) == []
