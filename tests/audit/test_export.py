"""Data-subject access reports (JSON + CSV) and the access summary."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
from pathlib import Path

import pytest

from gateway.audit import AuditLog, access_report, export_subject
from gateway.audit.cli import cmd_export, cmd_report
from gateway.audit.export import to_csv
from gateway.audit.records import parse_time

from . import find_line, make_config, records, request_record


@pytest.fixture
async def mixed(tmp_path: Path) -> Path:
    """Two tenants, two models, two purposes, allow and deny, on two days."""
    clock = [parse_time("2025-03-01T10:00:00Z").timestamp()]
    config = make_config(tmp_path)
    log = AuditLog(config, clock=lambda: clock[0])
    await log.append(request_record(0, subject_id="alice", tenant="acme", model="digits", purpose="scoring"))
    await log.append(request_record(1, subject_id="bob", tenant="globex", model="risk", purpose="fraud",
                                    decision="deny", reason="authz_denied", status=403))
    clock[0] = parse_time("2025-03-02T10:00:00Z").timestamp()
    await log.append(request_record(2, subject_id="alice", tenant="acme", model="risk", purpose="fraud",
                                    request_id="=HYPERLINK(\"http://evil\")"))
    await log.append({"type": "denial_aggregate", "reason": "authn_missing_token", "count": 7, "decision": "deny",
                      "client_addr": "192.0.2.1", "model": "digits"})
    await log.close()
    return tmp_path


class TestSubjectExport:
    def test_json_and_csv_hold_everything_about_the_person_and_nothing_else(self, mixed: Path) -> None:
        config = make_config(mixed)
        result = export_subject(config.log_dir, config.key_dir, mixed / "out", subject_id="alice", tenant="acme",
                                anchor_dir=config.anchor_dir)
        assert (result.records, result.erased, result.chain_ok) == (2, 0, True)
        report = json.loads(result.json_path.read_text())
        assert report["kind"] == "data_subject_access_report"
        assert report["subject"] == {"subject_id": "alice", "tenant": "acme"}
        assert [r["model"] for r in report["records"]] == ["digits", "risk"]
        assert {r["subject_id"] for r in report["records"]} == {"alice"}
        assert "bob" not in result.json_path.read_text()
        for row in report["records"]:
            assert not {"mac", "prev_hash", "enc", "key_id"} & set(row)
        rows = list(csv.DictReader(io.StringIO(result.csv_path.read_text())))
        assert [r["seq"] for r in rows] == ["1", "3"]
        assert rows[0]["subject_id"] == "alice" and rows[0]["client_addr"] == "10.0.0.7"
        assert rows[1]["roles"] == '["analyst"]'
        # SECURITY: a formula in an attacker-chosen field is neutralised (CSV injection).
        assert rows[1]["request_id"].startswith("'=")
        assert result.json_path.stat().st_mode & 0o077 == 0 and result.csv_path.stat().st_mode & 0o077 == 0

    def test_unknown_subject_gives_an_empty_report(self, mixed: Path) -> None:
        config = make_config(mixed)
        result = export_subject(config.log_dir, config.key_dir, mixed / "out", subject_id="nobody", tenant="acme")
        assert result.records == 0
        assert json.loads(result.json_path.read_text())["records"] == []

    def test_csv_columns_lead_with_the_usual_fields(self) -> None:
        text = to_csv([{"zeta": 1, "seq": 2, "model": "m", "time": "t"}, {"seq": 3, "extra": None}])
        assert text.splitlines()[0] == "seq,time,model,extra,zeta"
        assert text.splitlines()[2] == "3,,,,"


class TestAccessReport:
    def test_per_model_tenant_and_purpose(self, mixed: Path) -> None:
        report = access_report(make_config(mixed).log_dir)
        assert report["requests"] == 3 + 7
        by_model = {r["model"]: r for r in report["by_model"]}
        assert by_model["digits"]["requests"] == 8 and by_model["digits"]["deny"] == 7
        assert by_model["risk"] == {"model": "risk", "allow": 1, "deny": 1, "requests": 2, "distinct_subjects": 2}
        by_tenant = {r["tenant"]: r for r in report["by_tenant"]}
        assert by_tenant["acme"]["requests"] == 2 and by_tenant["acme"]["distinct_subjects"] == 1
        by_purpose = {r["purpose"]: r["requests"] for r in report["by_purpose"]}
        assert by_purpose == {"fraud": 2, "scoring": 1, "unspecified": 7}
        assert "alice" not in json.dumps(report)

    def test_period_filter(self, mixed: Path) -> None:
        log_dir = make_config(mixed).log_dir
        first_day = access_report(log_dir, since=parse_time("2025-03-01"), until=parse_time("2025-03-02"))
        assert first_day["requests"] == 2
        second_day = access_report(log_dir, since=parse_time("2025-03-02"))
        assert second_day["requests"] == 8


class TestCli:
    async def test_export_and_report_commands(self, mixed: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = make_config(mixed)
        common = {"dir": str(config.log_dir), "anchors": str(config.anchor_dir), "keys": str(config.key_dir)}
        args = argparse.Namespace(**common, subject="bob", tenant="globex", client_addr=None, out=str(mixed / "dsar"))
        assert await asyncio.to_thread(cmd_export, args) == 0
        assert "1 record(s)" in capsys.readouterr().out
        assert len(list((mixed / "dsar").iterdir())) == 2
        args = argparse.Namespace(**common, since="2025-03-01", until=None, json=False)
        assert cmd_report(args) == 0
        out = capsys.readouterr().out
        assert "10 requests" in out and "by purpose" in out
        args = argparse.Namespace(**common, since=None, until="2025-03-02", json=True)
        assert cmd_report(args) == 0
        assert json.loads(capsys.readouterr().out)["requests"] == 2


class TestOfficerProbes:
    """Variants a privacy officer (or someone near their files) runs into: shared subs
    and addresses, planted output files, mistyped directories, a forged log."""

    async def test_a_tenant_scoped_export_holds_nothing_of_the_other_tenant(self, tmp_path: Path) -> None:
        """One sub in two tenants is two people: each export is one tenant's, and there is
        no export of "u1" in every tenant at once."""
        config = make_config(tmp_path)
        log = AuditLog(config)
        await log.append(request_record(0, subject_id="u1", tenant="alpha", model="digits"))
        await log.append(request_record(1, subject_id="u1", tenant="beta", model="beta-secret-model"))
        await log.close()
        with pytest.raises(ValueError, match="tenant"):
            export_subject(config.log_dir, config.key_dir, tmp_path / "all", subject_id="u1")
        assert not (tmp_path / "all").exists()
        alpha = export_subject(config.log_dir, config.key_dir, tmp_path / "alpha", subject_id="u1", tenant="alpha")
        text = alpha.json_path.read_text() + alpha.csv_path.read_text()
        assert alpha.records == 1 and "beta" not in text
        assert json.loads(alpha.json_path.read_text())["subject"] == {"subject_id": "u1", "tenant": "alpha"}
        beta = export_subject(config.log_dir, config.key_dir, tmp_path / "beta", subject_id="u1", tenant="beta")
        assert beta.records == 1 and "digits" not in beta.json_path.read_text()
        # Two people, two pseudonyms: neither file name is the other's.
        assert alpha.json_path.name != beta.json_path.name

    async def test_the_subject_is_found_by_its_authenticated_tenant_not_the_clear_one(self, tmp_path: Path) -> None:
        """The clear ``tenant`` field is redacted when it looks like personal data; the
        person is keyed on the tenant as authenticated (``subject_tenant``, encrypted)."""
        config = make_config(tmp_path)
        log = AuditLog(config)
        await log.append(request_record(0, subject_id="u1", tenant="[US_SSN]", subject_tenant="078-05-1120"))
        await log.append(request_record(1, subject_id="u1", tenant="[US_SSN]", subject_tenant="078-05-1121"))
        await log.close()
        assert "078-05-112" not in "".join(json.dumps(r) for r in records(config))  # never in clear
        mine = export_subject(config.log_dir, config.key_dir, tmp_path / "a", subject_id="u1", tenant="078-05-1120")
        [row] = json.loads(mine.json_path.read_text())["records"]
        assert (row["seq"], row["subject_tenant"], row["personal_data"]) == (1, "078-05-1120", "readable")

    async def test_an_address_export_never_opens_an_authenticated_persons_records(self, tmp_path: Path) -> None:
        config = make_config(tmp_path)
        log = AuditLog(config)
        await log.append(request_record(0, subject_id="alice-behind-nat", client_addr="192.0.2.50"))
        await log.append({"decision": "deny", "reason": "authn_missing_token", "client_addr": "192.0.2.50"})
        await log.close()
        result = export_subject(config.log_dir, config.key_dir, tmp_path / "out", client_addr="192.0.2.50")
        text = result.json_path.read_text() + result.csv_path.read_text()
        assert result.records == 1 and "alice-behind-nat" not in text and "authn_missing_token" in text
        subject_row = next(r for r in records(config) if r.get("subject"))
        assert subject_row["subject"] not in text  # not even their pseudonym

    @pytest.mark.parametrize("plant", ["world_readable_file", "symlink"])
    async def test_a_file_planted_at_the_output_name_is_replaced_not_reused(self, mixed: Path, plant: str) -> None:
        config = make_config(mixed)
        first = export_subject(config.log_dir, config.key_dir, mixed / "probe", subject_id="alice", tenant="acme")
        shared = mixed / "shared"
        shared.mkdir()
        victim = mixed / "victim"
        for name in (first.json_path.name, first.csv_path.name):
            if plant == "symlink":
                (shared / name).symlink_to(victim)
            else:
                (shared / name).write_text("planted")
                (shared / name).chmod(0o666)
        result = export_subject(config.log_dir, config.key_dir, shared, subject_id="alice", tenant="acme")
        for path in (result.json_path, result.csv_path):
            assert not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600
            assert "alice" in path.read_text()
        assert not victim.exists()
        assert sorted(p.name for p in shared.iterdir()) == sorted([first.json_path.name, first.csv_path.name])

    @pytest.mark.parametrize("value", ["=1+1", " =1+1", "\u00a0@SUM(A1)", "\n=cmd", "|calc", "\uff1dHYPERLINK(1)",
                                       "%0A=1"])
    def test_formula_variants_are_neutralised(self, value: str) -> None:
        rows = list(csv.DictReader(io.StringIO(to_csv([{"seq": 1, "model": value}]))))
        assert rows[0]["model"] == "'" + value

    async def test_a_forged_record_is_marked_and_the_export_fails(self, mixed: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
        config = make_config(mixed)
        path, index = find_line(config, 3)
        lines = path.read_bytes().splitlines(keepends=True)
        lines[index] = lines[index].replace(b'"decision":"allow"', b'"decision":"deny"')
        path.write_bytes(b"".join(lines))
        args = argparse.Namespace(dir=str(config.log_dir), anchors=str(config.anchor_dir), keys=str(config.key_dir),
                                  subject="alice", tenant="acme", client_addr=None, out=str(mixed / "dsar"))
        assert await asyncio.to_thread(cmd_export, args) == 1
        assert "TAMPERED" in capsys.readouterr().err
        rows = list(csv.DictReader(io.StringIO(next((mixed / "dsar").glob("*.csv")).read_text())))
        assert [(r["seq"], r["chain"]) for r in rows] == [("1", ""), ("3", "UNVERIFIED")]

    @pytest.mark.parametrize("command", ["export", "report", "erase", "retention", "rotate-key"])
    async def test_a_mistyped_log_dir_is_a_usage_error_that_changes_nothing(self, mixed: Path, command: str,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
        from gateway.audit import cli

        config = make_config(mixed)
        wrong = mixed / "lgo"
        args = argparse.Namespace(dir=str(wrong), anchors=str(config.anchor_dir), keys=str(config.key_dir),
                                  subject="alice", tenant="acme", client_addr=None, out=str(mixed / "dsar"),
                                  since=None, until=None,
                                  json=False, days=1.0, family="pseudonym")
        keys_before = sorted(p.relative_to(config.key_dir) for p in config.key_dir.rglob("*"))
        func = {"export": cli.cmd_export, "report": cli.cmd_report, "erase": cli.cmd_erase,
                "retention": cli.cmd_retention, "rotate-key": cli.cmd_rotate_key}[command]
        assert await asyncio.to_thread(func, args) == 2
        assert "no audit log at" in capsys.readouterr().err
        assert not wrong.exists() and not (mixed / "dsar").exists()
        assert sorted(p.relative_to(config.key_dir) for p in config.key_dir.rglob("*")) == keys_before

    @pytest.mark.parametrize("argv", [
        ["report", "{log}", "--since", "garbage"],
        ["report", "{log}", "--since", "2025-13-45"],
        ["report", "{log}", "--since", "2025-03-02", "--until", "2025-03-01"],
        ["retention", "{log}", "--days", "-1"],
        ["retention", "{log}", "--days", "nan"],
        ["retention", "{log}", "--days", "0"],
        ["export", "{log}", "--keys", "{log}", "--subject", "alice", "--tenant", "acme", "--out", "{tmp}/o"],
        ["erase", "{log}", "--subject", "", "--tenant", "acme"],
        ["erase", "{log}", "--subject", "alice", "--tenant", ""],
        ["erase", "{log}", "--subject", "alice", "--tenant", "ac\x1fme"],
        ["export", "{log}", "--client-addr", "", "--out", "{tmp}/o"],
        ["erase", "{log}", "--subject", "alice"],
        ["export", "{log}", "--subject", "alice", "--out", "{tmp}/o"],
        ["export", "{log}", "--client-addr", "192.0.2.1", "--tenant", "acme", "--out", "{tmp}/o"],
    ])
    def test_bad_arguments_are_exit_2_with_a_message_never_a_traceback(
            self, mixed: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
        from gateway.cli import main

        config = make_config(mixed)
        args = [a.format(log=config.log_dir, tmp=mixed) for a in argv]
        keys = [] if "--keys" in args else ["--keys", str(config.key_dir)]
        args[2:2] = ["--anchors", str(config.anchor_dir), *keys]
        try:
            code = main(["audit", *args])
        except SystemExit as exc:  # argparse's own usage errors
            code = int(exc.code or 0)
        err = capsys.readouterr().err
        assert code == 2 and "error" in err and "Traceback" not in err
        assert not (mixed / "o").exists()

    async def test_the_report_names_the_categories_it_holds(self, mixed: Path) -> None:
        """CCPA right to know: categories, source and purposes, from what is really held."""
        config = make_config(mixed)
        report = json.loads(export_subject(config.log_dir, config.key_dir, mixed / "a", subject_id="alice",
                                           tenant="acme")
                            .json_path.read_text())
        by_name = {c["category"]: c for c in report["categories"]}
        assert by_name["identifiers"]["items"] == ["account identifier (the token's subject)", "IP address"]
        assert by_name["identifiers"]["purposes"] == ["fraud", "scoring"]
        assert "internet or other electronic network activity" in by_name
        log = AuditLog(config)
        await log.erase(subject_id="alice", tenant="acme")
        await log.close()
        report = json.loads(export_subject(config.log_dir, config.key_dir, mixed / "b", subject_id="alice",
                                           tenant="acme")
                            .json_path.read_text())
        assert "identifiers" not in {c["category"] for c in report["categories"]}
        assert report["erased_records"] == 2
