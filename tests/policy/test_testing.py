"""`infergate policy test`: the shipped suite passes, failures and broken files are reported."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from gateway.cli import main

from ..conftest import POLICIES, TRITON_REPO


def _run(policy_dir: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = main(["policy", "test", str(policy_dir), "--repo", str(TRITON_REPO), *extra])
    return code, capsys.readouterr().out


def _tests(policy_dir: Path, name: str, text: str) -> Path:
    tests = policy_dir / "tests"
    shutil.rmtree(tests / "inputs", ignore_errors=True)
    for old in tests.glob("*.yaml"):
        old.unlink()
    shutil.copytree(POLICIES / "tests" / "inputs", tests / "inputs")
    (tests / name).write_text(text)
    return tests / name


def test_shipped_suite_passes_and_covers_every_role_and_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(POLICIES, capsys, "-v")
    assert code == 0, out
    passed = re.search(r"^PASS: (\d+)/(\d+)$", out, re.MULTILINE)
    assert passed is not None and passed[1] == passed[2] and int(passed[1]) >= 30, out
    assert "FAIL" not in out and "ERROR" not in out
    text = "".join(p.read_text() for p in (POLICIES / "tests").glob("*.yaml"))
    for role in ("analyst", "viewer", "auditor", "admin"):
        assert f"roles: [{role}]" in text
    for model in ("digits", "text_echo", "risk"):
        assert f"model: {model}" in text


def test_a_policy_edit_breaks_the_shipped_tests(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Giving viewers inference is caught by the viewer cases, with file:line and the difference."""
    access = policy_dir / "access.yaml"
    access.write_text(access.read_text().replace("    - actions: [metadata]\n", "    - actions: [metadata, infer]\n"))
    code, out = _run(policy_dir, capsys, "--run", "viewer cannot infer")
    assert code == 1
    assert re.search(r"^tests/access\.yaml:\d+: viewer cannot infer digits: FAIL", out, re.MULTILINE), out
    assert "expected deny, got allow" in out
    assert "FAIL: 3/3" in out


def test_failing_case_reports_expected_and_observed(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tests(policy_dir, "wrong.yaml", (
        "cases:\n"
        "  - name: right\n"
        "    principal: {sub: alice, tenant: acme, roles: [analyst]}\n"
        "    request: {model: text_echo, text: hi}\n"
        "    expect: {decision: allow, outputs: {text: [hi]}}\n"
        "  - name: wrong reason\n"
        "    principal: {sub: bob, tenant: globex, roles: [analyst]}\n"
        "    request: {model: risk, action: metadata}\n"
        "    expect: {decision: deny, reason: authz_denied, status: 403}\n"
    ))
    code, out = _run(policy_dir, capsys)
    assert code == 1
    assert "tests/wrong.yaml:6: wrong reason: FAIL" in out
    assert "expected reason authz_denied, got authz_model_not_visible" in out
    assert "expected status 403, got 404" in out
    assert "right" not in out.split("----")[0]  # passing cases only with -v
    assert "PASS: 1/2" in out and "FAIL: 1/2" in out


@pytest.mark.parametrize(
    ("text", "where", "needle"),
    [
        # an unknown key in a case, with the key that was meant
        ("cases:\n  - name: x\n    request: {model: digits, action: metadata}\n    expct: {decision: allow}\n",
         "tests/bad.yaml:4:5", "did you mean 'expect'"),
        # a decision that is neither allow nor deny
        ("cases:\n  - name: x\n    request: {model: digits, action: metadata}\n    expect: {decision: maybe}\n",
         "tests/bad.yaml:4:24", "decision"),
        # anchors are refused in tests as in policies
        ("cases:\n  - &c {name: x, request: {model: digits, action: metadata}, expect: {decision: deny}}\n"
         "  - *c\n", "tests/bad.yaml:2:5", "anchors"),
        # an inference without inputs cannot run
        ("cases:\n  - name: x\n    request: {model: digits}\n    expect: {decision: deny}\n",
         "tests/bad.yaml:3:14", "needs text, inputs or inputs_file"),
    ],
)
def test_malformed_test_file_is_reported_with_location(policy_dir: Path, capsys: pytest.CaptureFixture[str],
                                                       text: str, where: str, needle: str) -> None:
    _tests(policy_dir, "bad.yaml", text)
    code, out = _run(policy_dir, capsys)
    assert code == 1
    errors = [line for line in out.splitlines() if line.startswith(f"ERROR: {where}:")]
    assert errors, out
    assert needle in errors[0]


def test_api_key_limits_and_repeat(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A service account's tenant and roles come from identity.yaml; repeat exhausts a limit."""
    identity = policy_dir / "identity.yaml"
    identity.write_text(identity.read_text().replace(
        "api_keys: []", f"api_keys:\n  - {{id: batch, sha256: {'b' * 64}, tenant: globex, roles: [analyst]}}"))
    limits = policy_dir / "limits.yaml"
    limits.write_text(limits.read_text().replace("    rate: 200\n    burst: 200\n", "    rate: 1\n    burst: 2\n"))
    _tests(policy_dir, "keys.yaml", (
        "cases:\n"
        "  - name: service account infers text_echo\n"
        "    principal: {api_key: batch}\n"
        "    request: {model: text_echo, text: hi}\n"
        "    expect: {decision: allow, ratelimit: {limit: 2, remaining: 1}}\n"
        "  - name: service account of globex cannot see risk\n"
        "    principal: {api_key: batch}\n"
        "    request: {model: risk, action: metadata}\n"
        "    expect: {decision: deny, reason: authz_model_not_visible}\n"
        "  - name: the third call in a burst of two is refused\n"
        "    principal: {sub: alice, tenant: acme, roles: [analyst]}\n"
        "    request: {model: text_echo, text: hi, repeat: 3}\n"
        "    expect: {decision: deny, reason: ratelimit_exceeded, status: 429, stage: rate_limit,\n"
        "             ratelimit: {limit: 2, remaining: 0}}\n"
        "  - name: unknown key id\n"
        "    principal: {api_key: nobody}\n"
        "    request: {model: digits, action: metadata}\n"
        "    expect: {decision: deny}\n"
    ))
    code, out = _run(policy_dir, capsys, "-v")
    assert code == 1  # the unknown key id
    assert re.search(r"service account infers text_echo: PASS", out), out
    assert re.search(r"service account of globex cannot see risk: PASS", out), out
    assert re.search(r"the third call in a burst of two is refused: PASS", out), out
    assert re.search(r"tests/keys\.yaml:15: unknown key id: ERROR", out), out
    assert "no api_keys entry with id 'nobody'" in out


def test_invalid_policy_is_reported(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (policy_dir / "gateway.yaml").write_text("limits:\n  max_inputs: 0\n")
    code, out = _run(policy_dir, capsys)
    assert code == 1
    assert "ERROR: gateway.yaml:2:15: limits.max_inputs" in out
