"""`infergate policy check DIR`: every refusal of issue 8 with file, line, column and a hint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.cli import main

from ..conftest import POLICIES, TRITON_REPO

ISSUE = re.compile(r"^(?P<file>[\w.\-/]+):(?P<line>\d+):(?P<col>\d+): (?P<message>.*) \(hint: (?P<hint>.+)\)$")


def _check(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[re.Match[str]]]:
    code = main(["policy", "check", str(policy_dir), "--profiles", str(TRITON_REPO)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.endswith("error(s)")]
    matches = [ISSUE.match(line) for line in lines]
    assert all(matches), f"every issue needs file:line:col and a hint:\n{err}"
    return code, [m for m in matches if m is not None]


def test_shipped_policies_pass(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(POLICIES), "--profiles", str(TRITON_REPO)]) == 0
    assert capsys.readouterr().out.startswith("ok: revision ")


@pytest.mark.parametrize(
    ("file", "text", "line", "col", "message", "hint"),
    [
        # billion laughs: any anchor is refused before a single alias is expanded
        ("gateway.yaml", "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n", 1, 4, "anchors and aliases", "write the value"),
        # a nesting bomb (no alias needed) would blow the composer's recursion
        ("gateway.yaml", "models: " + "[" * 5000 + "]" * 5000 + "\n", 1, 72, "nesting deeper", "flatten"),
        # duplicate keys: the reviewer reads one, the loader would take the other
        ("gateway.yaml", "models:\n  digits: {}\n  risk: {}\n  digits: {}\n", 4, 3, "duplicate key 'digits'",
         "first is on line 2"),
        # unknown key: the hint names the key that was meant
        ("limits.yaml", "limits:\n  - name: a\n    kind: rate\n    rate: 1\n    brust: 2\n", 5, 5,
         "limits.0.brust: Extra inputs", "did you mean 'burst'"),
        # a limit of zero
        ("limits.yaml", "limits:\n  - name: a\n    kind: quota\n    limit: 0\n", 4, 12, "greater than 0",
         "a limit of zero would refuse every call"),
        ("gateway.yaml", "limits:\n  max_inputs: 0\n", 2, 15, "greater than 0", "limit of zero"),
        # YAML 1.1: an unquoted `no` is a boolean, not a role
        ("access.yaml", "roles:\n  analyst:\n    - actions: [infer]\n      models: [no]\n", 4, 16,
         "valid string", "quote it"),
    ],
)
def test_refusals_have_location_and_hint(policy_dir: Path, capsys: pytest.CaptureFixture[str], file: str,
                                         text: str, line: int, col: int, message: str, hint: str) -> None:
    (policy_dir / file).write_text(text)
    code, issues = _check(policy_dir, capsys)
    assert code == 1
    found = [m for m in issues if m["file"] == file and message in m["message"]]
    assert found, [m.group(0) for m in issues]
    assert (int(found[0]["line"]), int(found[0]["col"])) == (line, col), found[0].group(0)
    assert hint in found[0]["hint"]


def test_dp_budget_smaller_than_one_query(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    privacy = policy_dir / "privacy.yaml"
    text = privacy.read_text()
    assert "      epsilon: 5.0 " in text
    privacy.write_text(text.replace("      epsilon: 5.0 ", "      epsilon: 0.25"))
    code, issues = _check(policy_dir, capsys)
    assert code == 1
    (issue,) = [m for m in issues if "smaller than one query" in m["message"]]
    budget_line = next(i for i, row in enumerate(privacy.read_text().splitlines(), 1) if row == "    budget:")
    assert (issue["file"], int(issue["line"])) == ("privacy.yaml", budget_line + 1)
    assert "raise this budget's epsilon" in issue["hint"]


def test_role_granting_a_model_of_another_tenant(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A globex service account given a role that only reaches acme's risk model."""
    access = policy_dir / "access.yaml"
    access.write_text(access.read_text() + "  risk_scorer:\n    - actions: [infer]\n      models: [risk]\n")
    identity = policy_dir / "identity.yaml"
    identity.write_text(identity.read_text().replace(
        "api_keys: []", f"api_keys:\n  - id: scorer\n    sha256: {'a' * 64}\n    tenant: globex\n"
                        "    roles: [risk_scorer]\n"))
    code, issues = _check(policy_dir, capsys)
    assert code == 1
    (issue,) = issues
    assert issue["file"] == "identity.yaml"
    assert "grants only models of other tenants: risk (acme)" in issue["message"]
    row = next(i for i, line in enumerate(identity.read_text().splitlines(), 1) if "risk_scorer" in line)
    assert issue["line"] == str(row)
    assert "tenants.globex.models" in issue["hint"]


def test_grant_of_a_model_no_tenant_has(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    access = policy_dir / "access.yaml"
    text = access.read_text()
    access.write_text(text.replace("models: [digits, text_echo, risk]\n  viewer",
                                   "models: [digits, text_echo, rsik]\n  viewer"))
    code, issues = _check(policy_dir, capsys)
    assert code == 1
    (issue,) = issues
    row = next(i for i, line in enumerate(access.read_text().splitlines(), 1) if "rsik" in line)
    assert (issue["file"], int(issue["line"])) == ("access.yaml", row)
    assert "belongs to no tenant" in issue["message"]


def test_dp_policy_for_a_misspelt_model(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A typo in privacy.yaml would release the real model without noise."""
    privacy = policy_dir / "privacy.yaml"
    privacy.write_text(privacy.read_text().replace("\n  risk:\n", "\n  rsik:\n"))
    code, issues = _check(policy_dir, capsys)
    assert code == 1
    assert any(m["file"] == "privacy.yaml" and "rsik" in m["message"] and "unnoised" in m["hint"] for m in issues)


def test_all_errors_reported_at_once(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (policy_dir / "gateway.yaml").write_text("limits:\n  max_inputs: 0\n  max_dimz: 3\n")
    (policy_dir / "limits.yaml").write_text("on_backend_error: maybe\n")
    code, issues = _check(policy_dir, capsys)
    assert code == 1
    assert {(m["file"], m["line"]) for m in issues} >= {("gateway.yaml", "2"), ("gateway.yaml", "3"),
                                                         ("limits.yaml", "1")}


def test_unknown_policy_file_hint(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (policy_dir / "limit.yaml").write_text("limits: []\n")
    code, issues = _check(policy_dir, capsys)
    assert code == 1
    assert issues[0]["file"] == "limit.yaml"
    assert "did you mean limits.yaml" in issues[0]["hint"]


WARNING = re.compile(r"^WARNING: access\.yaml:(?P<line>\d+):(?P<col>\d+): (?P<message>.*) \(hint: (?P<hint>.+)\)$")
WILDCARD_ROLES = """\
roles:
  admin:
    - actions: ["*"]
      models: ["*"]
  helpdesk:
    - actions: [metadata, "*"]
      models: [digits]
  Admin:
    - actions: [infer]
      models: [digits, "*"]
  scorer:
    - actions: [infer]
  auditor:
    - actions: ["audit:read"]
  narrow:
    - actions: [infer]
      models: [digits]
  browser:
    - actions: [metadata]
      models: ["*"]
  \u0430dmin:
    - actions: [infer]
      models: [digits]
    - actions:
        - metadata
        - '*'
"""


def _warnings(policy_dir: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, list[re.Match[str]]]:
    code = main(["policy", "check", str(policy_dir), "--profiles", str(TRITON_REPO), *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("WARNING: ")]
    matches = [WARNING.match(line) for line in lines]
    assert all(matches), err
    return code, [m for m in matches if m is not None]


def _with_roles(policy_dir: Path, roles: str) -> None:
    access = policy_dir / "access.yaml"
    text = access.read_text()
    access.write_text(text[:text.index("roles:")] + roles)


def test_wildcard_grants_outside_admin_are_warned_with_their_line(
    policy_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reviewer sees every role given "*" (actions or models, explicit or by omission) on
    the check's own output; admin, a grant with only operator actions and metadata on every
    model stay quiet."""
    _with_roles(policy_dir, WILDCARD_ROLES)
    code, warnings = _warnings(policy_dir, capsys)
    assert code == 0  # a warning, not an error
    rows = (policy_dir / "access.yaml").read_text().splitlines()
    found = {(rows[int(m["line"]) - 1].strip(), m["message"].split("'")[1]) for m in warnings}
    assert found == {
        ('- actions: [metadata, "*"]', "helpdesk"),
        ('models: [digits, "*"]', "Admin"),
        ("- actions: [infer]", "scorer"),
        ("- '*'", "\\u0430dmin"),  # a lookalike of admin is warned, and shown escaped
        ("- actions:", "\\u0430dmin"),  # ... and its grant without models: is every model
    }, [m.group(0) for m in warnings]
    scorer = next(m for m in warnings if "'scorer'" in m["message"])
    assert "no models: listed" in scorer["message"]
    assert all("list the" in m["hint"] for m in warnings)


def test_strict_fails_on_a_wildcard_grant(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _with_roles(policy_dir, WILDCARD_ROLES)
    code, warnings = _warnings(policy_dir, capsys, "--strict")
    assert code == 1 and len(warnings) == 5
    _with_roles(policy_dir, WILDCARD_ROLES.split("  helpdesk:")[0] + "  narrow:\n    - actions: [infer]\n"
                "      models: [digits]\n")
    code, warnings = _warnings(policy_dir, capsys, "--strict")
    assert (code, warnings) == (0, [])


def test_the_shipped_policy_has_no_wildcard_warning(capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped ``viewer`` reads every model's metadata (by design, quiet); nothing outside
    ``admin`` may run every model, so the example passes ``--strict``."""
    code, warnings = _warnings(POLICIES, capsys, "--strict")
    assert (code, warnings) == (0, [])


def test_a_directory_without_policy_files_is_warned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped or empty --policies path compiles to the safe defaults: "ok" alone would
    read as "your policy is fine". It is warned, and --strict fails on it."""
    empty = tmp_path / "policies"
    empty.mkdir()
    (empty / "README.md").write_text("not a policy file\n")

    def check(*extra: str) -> tuple[int, list[str]]:
        code = main(["policy", "check", str(empty), "--profiles", str(TRITON_REPO), *extra])
        return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING: ")]

    code, warnings = check()
    assert code == 0 and len(warnings) == 1
    assert warnings[0].startswith(f"WARNING: {empty}:1:1: no policy file here") and "access.yaml" in warnings[0]
    assert check("--strict") == (1, warnings)
    (empty / "access.yaml").write_text("roles: {}\n")  # one file is enough: nothing to warn
    assert check("--strict") == (0, [])
