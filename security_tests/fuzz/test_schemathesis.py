"""Schemathesis against a running gateway, driven by the gateway's own /openapi.json.

The gateway runs as a subprocess (``python -m gateway serve --dev``, embedded backend,
a copy of the shipped policies) and is called with an admin dev token, so every route
is reachable. The served document is used as it is, with two test-world additions made
here and not in the product document: the model path parameters are narrowed to the
models the embedded backend serves (otherwise every infer call stops at 404 before the
codec), and the infer body gets real examples (a handwritten digit, a text).

Checks: no 5xx except the documented 503, every status documented for its operation,
bodies, content types and headers as documented. Examples are bounded (``-n``) and the
stateful phase is off (the API has no resources to create), so the run stays well under
a minute on 2 cores. The gateway's audit log is read afterwards: no request ended in 500.
Summary: security_tests/results/schemathesis.json.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.devissuer import issue_token
from gateway.fronts.http.openapi import openapi_bytes

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "security_tests" / "results"
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
MAX_EXAMPLES = int(os.environ.get("INFERGATE_SCHEMATHESIS_EXAMPLES", "25"))
SEED = os.environ.get("INFERGATE_SCHEMATHESIS_SEED", "20261203")
CHECKS = ("not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance,"
          "response_headers_conformance")
# The handwritten zero of tests/conftest.py: constant or off-grid pixels are refused.
DIGIT_ZERO = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8,
              8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10,
              0, 0, 0]
INFER_EXAMPLES = {
    "digit": {"value": {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": DIGIT_ZERO}]}},
    "text": {"value": {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]}},
}


@dataclass
class Gateway:
    base: str
    state: Path
    audit: Path
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
        return int(resp.status), resp.read()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("schemathesis-gw")
    policies = tmp / "policies"
    subprocess.run(["cp", "-r", str(ROOT / "policies"), str(policies)], check=True)
    port = _free_port()
    gw = Gateway(f"http://127.0.0.1:{port}", tmp / "state", tmp / "audit", tmp / "gateway.log")
    with gw.log.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}", "--dev",
             "--policies", str(policies), "--backend", f"local:{ROOT / 'triton_repo'}",
             "--audit-dir", str(gw.audit), "--state-dir", str(gw.state), "--log-level", "warning"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):  # bounded: up to 30 s for the models to load
            if proc.poll() is not None:
                raise AssertionError(f"gateway exited: {gw.log.read_text()[-2000:]}")
            try:
                if _get(gw.base + "/v2/health/ready", timeout=1.0)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("gateway not ready in 30 s")
        yield gw
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _test_world_document(served: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(served))
    for item in doc["paths"].values():
        for op in item.values():
            for param in op.get("parameters", []):
                if param["name"] == "model_name":
                    param["schema"] = {"type": "string", "enum": ["digits", "text_echo"]}
                elif param["name"] == "model_version":
                    param["schema"] = {"type": "string", "enum": ["1"]}
            if op.get("x-route-kind") == "infer":
                op["requestBody"]["content"]["application/json"]["examples"] = INFER_EXAMPLES
    return doc


def _audit_statuses(audit: Path) -> collections.Counter[str]:
    statuses: collections.Counter[str] = collections.Counter()
    for path in sorted(audit.rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("type") == "request":
                statuses[f"{record.get('route')} {record.get('status')}"] += 1
    return statuses


def test_schemathesis_finds_no_server_errors_or_undocumented_answers(gateway: Gateway, tmp_path: Path) -> None:
    status, served = _get(gateway.base + "/openapi.json")
    assert status == 200 and served == openapi_bytes()
    schema = tmp_path / "openapi.json"
    schema.write_text(json.dumps(_test_world_document(json.loads(served))))
    config = tmp_path / "schemathesis.toml"
    # 503 is documented (a dependency down, Retry-After); every other 5xx is a finding.
    config.write_text('[checks.not_a_server_error]\nexpected-statuses = ["2xx", "3xx", "4xx", "503"]\n')
    token = issue_token(gateway.state, sub="schemathesis", tenant="acme", roles=["admin"], ttl_s=3600)
    junit = tmp_path / "junit.xml"
    started = time.monotonic()
    run = subprocess.run(
        [str(SCHEMATHESIS), "--no-color", "--config-file", str(config), "run", str(schema), "--url", gateway.base,
         "-H", f"Authorization: Bearer {token}", "--checks", CHECKS, "--phases", "examples,coverage,fuzzing",
         "-n", str(MAX_EXAMPLES), "--seed", SEED, "--workers", "1", "--request-timeout", "10",
         "--report", "junit", "--report-junit-path", str(junit)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    elapsed = time.monotonic() - started
    output = run.stdout + run.stderr
    statuses = _audit_statuses(gateway.audit)
    log_text = gateway.log.read_text(errors="replace")
    RESULTS.mkdir(exist_ok=True)
    generated = next((line.strip() for line in output.splitlines() if "generated" in line and "passed" in line), "")
    (RESULTS / "schemathesis.json").write_text(json.dumps({
        "exit_code": run.returncode, "seed": SEED, "max_examples": MAX_EXAMPLES, "seconds": round(elapsed, 1),
        "test_cases": generated, "checks": CHECKS.split(","),
        "audited_requests": sum(statuses.values()),
        "statuses": dict(sorted(statuses.items())),
    }, indent=2) + "\n")
    print(output[-3000:])
    assert run.returncode == 0, f"schemathesis found failures:\n{output[-6000:]}"
    assert "Traceback" not in log_text, log_text[-3000:]
    assert not [key for key in statuses if key.endswith(" 500")], statuses
    # The run reached the codec and the models, not only 404s.
    assert statuses.get("/v2/models/{model}/infer 200", 0) >= 1, statuses
    assert any(key.startswith("/v2/models/{model}/infer 4") for key in statuses), statuses
