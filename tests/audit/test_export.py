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

from . import make_config, request_record


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
        result = export_subject(config.log_dir, config.key_dir, mixed / "out", subject_id="alice",
                                anchor_dir=config.anchor_dir)
        assert (result.records, result.erased, result.chain_ok) == (2, 0, True)
        report = json.loads(result.json_path.read_text())
        assert report["kind"] == "data_subject_access_report"
        assert report["subject"] == {"subject_id": "alice"}
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
        result = export_subject(config.log_dir, config.key_dir, mixed / "out", subject_id="nobody")
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
        args = argparse.Namespace(**common, subject="bob", client_addr=None, out=str(mixed / "dsar"))
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
