"""DSAR export: one entry per request, with the outcome its client really had.

An ``abandoned`` marker (client gone, audit deadline) and a ``response_not_delivered``
event name no person; the export pairs them with the request record they are about, so
the privacy officer does not read an unanswered ``allow`` as answered.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from gateway.audit import AuditLog, export_subject

from . import make_config, request_record


async def test_markers_and_events_are_paired_with_their_request(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    log = AuditLog(config)
    gone = await log.append(request_record(0, subject_id="alice"))
    log.mark_abandoned(gone, "req-0", "client_gone")
    await log.append(request_record(1, subject_id="alice"))
    late = await log.append(request_record(2, subject_id="alice"))
    log.mark_abandoned(late, "req-2", "audit_timeout")  # answered 503 after its record was written
    await log.append(request_record(3, subject_id="alice"))
    await log.append({"event": "response_not_delivered", "request_id": "req-3", "route": "/v2/models/{model}/infer",
                      "reason": "write_timeout"})
    other = await log.append(request_record(4, subject_id="bob"))
    log.mark_abandoned(other, "req-4", "client_gone")
    await log.close()

    result = export_subject(config.log_dir, config.key_dir, tmp_path / "out", subject_id="alice", tenant="acme",
                            anchor_dir=config.anchor_dir)
    report = json.loads(result.json_path.read_text())
    rows = {r["request_id"]: r for r in report["records"]}
    assert sorted(rows) == ["req-0", "req-1", "req-2", "req-3"]  # one entry per request, no bare marker
    assert result.records == 4 and result.chain_ok
    assert (rows["req-0"]["outcome"], rows["req-0"]["outcome_cause"]) == ("abandoned", "client_gone")
    assert rows["req-1"]["outcome"] == "answered" and "outcome_cause" not in rows["req-1"]
    assert (rows["req-2"]["outcome"], rows["req-2"]["answered_status"]) == ("abandoned", 503)
    assert (rows["req-3"]["outcome"], rows["req-3"]["outcome_cause"]) == ("not_delivered", "write_timeout")
    assert all(r["decision"] == "allow" for r in rows.values())  # the decision itself stays as recorded
    table = list(csv.DictReader(io.StringIO(result.csv_path.read_text())))
    assert [(r["request_id"], r["outcome"]) for r in table] == [
        ("req-0", "abandoned"), ("req-1", "answered"), ("req-2", "abandoned"), ("req-3", "not_delivered")]
