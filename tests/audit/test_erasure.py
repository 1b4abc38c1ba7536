"""Crypto-shredding: erasure makes a person's personal fields unreadable, the chain still verifies."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest

from gateway.audit import AuditLog, export_subject
from gateway.audit.cli import cmd_erase
from gateway.audit.config import AuditConfig
from gateway.audit.crypto import KeyStore, Unreadable, subject_owner, unseal
from gateway.errors import DependencyUnavailable

from . import check, fill, make_config, records, request_record


def export(config: AuditConfig, out: Path, subject: str, tenant: str = "acme") -> dict[str, object]:
    result = export_subject(config.log_dir, config.key_dir, out, subject_id=subject, tenant=tenant,
                            anchor_dir=config.anchor_dir)
    report: dict[str, object] = json.loads(result.json_path.read_text())
    return report


def cli_args(config: AuditConfig, **who: str | None) -> argparse.Namespace:
    return argparse.Namespace(dir=str(config.log_dir), anchors=str(config.anchor_dir), keys=str(config.key_dir),
                              subject=who.get("subject"), tenant=who.get("tenant"), client_addr=who.get("client_addr"))


class TestCryptoShredding:
    async def test_export_before_and_after_erasure(self, tmp_path: Path) -> None:
        config = make_config(tmp_path)
        log = AuditLog(config)
        await fill(log, 9)  # subjects user-0, user-1, user-2 in turn
        await log.close()

        before = export(config, tmp_path / "before", "user-1")
        rows = before["records"]
        assert isinstance(rows, list) and [r["seq"] for r in rows] == [2, 5, 8]
        assert all(r["subject_id"] == "user-1" and r["client_addr"] == "10.0.0.7" for r in rows)
        assert all(r["personal_data"] == "readable" for r in rows)

        assert await asyncio.to_thread(cmd_erase, cli_args(config, subject="user-1", tenant="acme")) == 0

        after = export(config, tmp_path / "after", "user-1")
        rows = after["records"]
        assert isinstance(rows, list)
        erased = [r for r in rows if r.get("type") == "request"]
        assert [r["seq"] for r in erased] == [2, 5, 8]  # still listed: what was done, when, by which model
        assert all("subject_id" not in r and "client_addr" not in r for r in erased)
        assert all(r["personal_data"] == "[erased]" for r in erased)
        [notice] = [r for r in rows if r.get("type") == "erasure"]
        assert notice["key_ids"] and notice["pseudonyms"]
        assert after["chain"] == {"ok": True, "records": 10, "first_bad_seq": None, "problem": None}
        # Other people are untouched.
        other = export(config, tmp_path / "other", "user-2")
        other_rows = other["records"]
        assert isinstance(other_rows, list)
        assert all(r["personal_data"] == "readable" for r in other_rows)
        assert check(config).ok

    async def test_erased_key_file_is_gone_and_new_records_use_a_new_key(self, tmp_path: Path) -> None:
        config = make_config(tmp_path)
        log = AuditLog(config)
        await fill(log, 3)
        old_kid = records(config)[0]["enc"]["kid"]
        notice = await log.erase(subject_id="user-0", tenant="acme")
        assert notice["key_ids"] == [old_kid]
        pseudonym = log.pseudonym("acme", "user-0")
        assert not (config.key_dir / "subjects" / pseudonym).exists()
        await log.append(request_record(3))  # user-0 again, after erasure
        await log.close()
        kept = records(config)
        assert kept[-1]["subject"] == pseudonym and kept[-1]["enc"]["kid"] != old_kid
        assert kept[3]["type"] == "erasure" and kept[3]["seq"] == notice["seq"]
        assert check(config).ok

    async def test_erasure_while_the_gateway_runs_goes_through_the_inbox(self, tmp_path: Path) -> None:
        config = make_config(tmp_path, checkpoint_interval_s=0.1)
        log = AuditLog(config)
        await fill(log, 3)
        # The gateway holds the log: the keys are shredded now, the record follows via the inbox.
        assert await asyncio.to_thread(cmd_erase, cli_args(config, subject="user-2", tenant="acme")) == 0
        assert not (config.key_dir / "subjects" / log.pseudonym("acme", "user-2")).exists()
        for _ in range(60):
            await asyncio.sleep(0.05)
            if any(r["type"] == "erasure" for r in records(config)):
                break
        await log.close()
        assert [r["type"] for r in records(config)] == ["request"] * 3 + ["erasure"]
        assert not list((config.log_dir / "inbox").glob("*.json"))
        assert check(config).ok

    async def test_forged_inbox_notice_is_rejected(self, tmp_path: Path) -> None:
        config = make_config(tmp_path, checkpoint_interval_s=0.1)
        log = AuditLog(config)
        await fill(log, 1)
        inbox = config.log_dir / "inbox"
        inbox.mkdir()
        (inbox / "evil.json").write_text(json.dumps({"type": "erasure", "pseudonyms": [], "key_ids": [],
                                                     "sig_key_id": "a-0000000000000000", "sig": "AAAA"}))
        for _ in range(60):
            await asyncio.sleep(0.05)
            if (inbox / "evil.json.rejected").exists():
                break
        await log.close()
        assert (inbox / "evil.json.rejected").exists()
        assert [r["type"] for r in records(config)] == ["request"]

    async def test_address_owner_can_be_erased_too(self, tmp_path: Path) -> None:
        config = make_config(tmp_path)
        log = AuditLog(config)
        await log.append({"decision": "deny", "reason": "authn_missing_token", "client_addr": "192.0.2.9"})
        await log.close()
        assert await asyncio.to_thread(cmd_erase, cli_args(config, client_addr="192.0.2.9")) == 0
        result = export_subject(config.log_dir, config.key_dir, tmp_path / "out", client_addr="192.0.2.9")
        assert result.records == 2 and result.erased == 1
        assert check(config).ok

    async def test_pseudonym_epochs_are_all_found_and_all_erased(self, tmp_path: Path) -> None:
        config = make_config(tmp_path)
        log = AuditLog(config)
        await log.append(request_record(0))
        await log.rotate_key("pseudonym")
        await log.append(request_record(3))  # same person (user-0), new pseudonym epoch
        await log.close()
        subjects = [r["subject"] for r in records(config) if r["type"] == "request"]
        assert subjects[0] != subjects[1]
        keys = KeyStore(config.key_dir, create=False)
        assert sorted(keys.all_pseudonyms(subject_owner("acme", "user-0"))) == sorted(subjects)
        erasure = keys.erase_owner(subject_owner("acme", "user-0"))
        assert len(erasure.key_ids) == 2

    async def test_moved_ciphertext_is_refused(self, tmp_path: Path) -> None:
        """AES-GCM binds each blob to its record (seq in the associated data)."""
        config = make_config(tmp_path)
        log = AuditLog(config)
        await fill(log, 4)
        await log.close()
        first, _, _, fourth = records(config)
        keys = KeyStore(config.key_dir, create=False)
        assert unseal(keys.subjects, fourth["enc"], seq=4)["subject_id"] == "user-0"
        with pytest.raises(Unreadable):
            unseal(keys.subjects, fourth["enc"], seq=first["seq"])


class TestEraseWhileRunning:
    async def test_a_record_written_after_an_outside_erasure_gets_a_new_key(self, tmp_path: Path) -> None:
        """``audit erase`` from another process while the gateway writes: the person's next
        record is sealed under a fresh key (readable in their next report, erasable by the
        next erase), never under the cached key that was just destroyed."""
        config = make_config(tmp_path)
        log = AuditLog(config)
        await log.append(request_record(0, subject_id="s"))
        assert await asyncio.to_thread(cmd_erase, cli_args(config, subject="s", tenant="acme")) == 0
        await log.append(request_record(1, subject_id="s"))  # before the gateway reads the notice
        await log.close()
        rows = json.loads(export_subject(config.log_dir, config.key_dir, tmp_path / "a", subject_id="s",
                                         tenant="acme")
                          .json_path.read_text())["records"]
        assert [(r["seq"], r.get("personal_data")) for r in rows if r["type"] == "request"] == [
            (1, "[erased]"), (2, "readable")]
        assert await asyncio.to_thread(cmd_erase, cli_args(config, subject="s", tenant="acme")) == 0
        rows = json.loads(export_subject(config.log_dir, config.key_dir, tmp_path / "b", subject_id="s",
                                         tenant="acme")
                          .json_path.read_text())["records"]
        assert {r.get("personal_data") for r in rows if r["type"] == "request"} == {"[erased]"}
        assert check(config).ok


class TestOneSubPerTenantIsTwoPeople:
    """s8 probe: the pseudonym and the key came from ``sub`` alone, so ``audit erase
    --subject alice`` shredded alice of acme AND alice of globex (another tenant's audit
    evidence destroyed), and the two were linkable in the trail."""

    async def test_erasing_acme_alice_leaves_globex_alice_readable(self, tmp_path: Path) -> None:
        config = make_config(tmp_path)
        log = AuditLog(config)
        await log.append(request_record(0, subject_id="alice", tenant="acme", model="digits"))
        await log.append(request_record(1, subject_id="alice", tenant="globex", model="globex-risk"))
        await log.append(request_record(2, subject_id="alice", tenant="acme", model="digits"))
        await log.close()
        acme_0, globex_1, acme_2 = records(config)
        assert acme_0["subject"] == acme_2["subject"] != globex_1["subject"]  # not linkable across tenants
        assert acme_0["enc"]["kid"] == acme_2["enc"]["kid"] != globex_1["enc"]["kid"]  # nor one key

        acme = export(config, tmp_path / "acme", "alice", "acme")
        rows = acme["records"]
        assert isinstance(rows, list) and [r["seq"] for r in rows] == [1, 3]  # acme's records only
        assert {(r["subject_tenant"], r["personal_data"]) for r in rows} == {("acme", "readable")}
        assert "globex" not in json.dumps(acme)

        assert await asyncio.to_thread(cmd_erase, cli_args(config, subject="alice", tenant="acme")) == 0
        keys = KeyStore(config.key_dir, create=False)
        assert unseal(keys.subjects, globex_1["enc"], seq=2) == {
            "subject_id": "alice", "subject_tenant": "globex", "client_addr": "10.0.0.7"}
        for erased in (acme_0, acme_2):
            with pytest.raises(Unreadable):
                unseal(keys.subjects, erased["enc"], seq=erased["seq"])
        globex = export(config, tmp_path / "globex", "alice", "globex")["records"]
        assert isinstance(globex, list) and [(r["seq"], r["personal_data"]) for r in globex] == [(2, "readable")]
        after = export(config, tmp_path / "acme-after", "alice", "acme")["records"]
        assert isinstance(after, list)
        assert [(r["seq"], r["type"], r.get("personal_data")) for r in after] == [
            (1, "request", "[erased]"), (3, "request", "[erased]"), (4, "erasure", None)]  # nothing of globex
        assert check(config).ok

    async def test_in_process_erase_needs_the_tenant(self, tmp_path: Path) -> None:
        config = make_config(tmp_path)
        log = AuditLog(config)
        await log.append(request_record(0, subject_id="alice", tenant="acme"))
        with pytest.raises(ValueError, match="tenant"):
            await log.erase(subject_id="alice")
        with pytest.raises(ValueError, match="tenant"):
            await log.erase(client_addr="10.0.0.7", tenant="acme")
        await log.close()
        assert [r["type"] for r in records(config)] == ["request"]  # nothing erased, nothing recorded

    @pytest.mark.parametrize("tenant", [None, "", "ac\x1fme"])
    async def test_a_record_naming_a_subject_without_a_usable_tenant_is_refused(self, tmp_path: Path,
                                                                                tenant: str | None) -> None:
        """Fail closed: no fallback to sub alone (or to the clear, possibly redacted tenant)."""
        config = make_config(tmp_path)
        log = AuditLog(config)
        with pytest.raises(DependencyUnavailable):
            await log.append(request_record(0, subject_id="alice", subject_tenant=tenant))
        await log.append(request_record(1, subject_id="alice"))
        await log.close()
        assert [r["n"] for r in records(config)] == [1]
