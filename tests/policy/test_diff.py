"""`infergate policy diff OLD NEW`: effective permissions and settings, in reviewer's words."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gateway.cli import build_parser, main

from ..conftest import POLICIES


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(POLICIES, old)
    shutil.copytree(POLICIES, new)
    return old, new


def _edit(path: Path, before: str, after: str) -> None:
    text = path.read_text()
    assert before in text, before
    path.write_text(text.replace(before, after, 1))


def _diff(old: Path, new: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["policy", "diff", str(old), str(new)])
    return code, capsys.readouterr().out


def test_no_difference_exits_0(dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert _diff(*dirs, capsys) == (0, "no difference\n")


def test_comment_only_edit_is_no_difference(dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    old, new = dirs
    (new / "limits.yaml").write_text((new / "limits.yaml").read_text() + "# reviewed 2026-12\n")
    assert _diff(old, new, capsys)[0] == 0


def test_cross_tenant_grant_is_named(dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Adding risk to globex's models grants it to every globex role whose grant names it."""
    old, new = dirs
    _edit(new / "access.yaml", "models: [digits, text_echo]     # `risk` belongs to acme only",
          "models: [digits, text_echo, risk]")
    code, out = _diff(old, new, capsys)
    assert code == 1
    assert "+ role analyst in tenant globex GAINS infer on model risk" in out
    assert "+ role admin in tenant globex GAINS metadata on model risk" in out
    assert "+ role viewer in tenant globex GAINS metadata on model risk" in out
    assert "role viewer in tenant globex GAINS infer" not in out  # viewers still have metadata only
    assert "role analyst in tenant acme" not in out  # acme is unchanged


def test_removed_grant_and_wildcards(dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    old, new = dirs
    _edit(new / "access.yaml", "      models: [digits, text_echo, risk]", "      models: [digits]")
    _edit(new / "access.yaml", "  auditor:\n    - actions: [\"audit:read\"]",
          "  auditor:\n    - actions: [\"audit:read\", \"audit:erase\"]")
    code, out = _diff(old, new, capsys)
    assert code == 1
    assert "- role analyst in tenant acme LOSES infer on model risk" in out
    assert "- role analyst in tenant globex LOSES metadata on model text_echo" in out
    assert "+ role auditor in tenant acme GAINS audit:erase (gateway-wide)" in out


@pytest.mark.parametrize(
    ("file", "before", "after", "expected"),
    [
        ("limits.yaml", "rate: 500              # requests", "rate: 50  # requests",
         "limits.yaml: limit tenant_rate: rate 500 -> 50 (stronger)"),
        ("limits.yaml", "limit: 16              # inference calls in flight",
         "limit: 64  # inference calls in flight",
         "limits.yaml: limit tenant_concurrency: limit 16 -> 64 (weaker)"),
        ("limits.yaml", "on_backend_error: deny\n", "on_backend_error: allow\n",
         "limits.yaml: on_backend_error: deny -> allow (weaker)"),
        ("pii.yaml", "  EMAIL: replace", "  EMAIL: redact",
         "pii.yaml: PII: EMAIL operator replace -> redact (stronger)"),
        ("pii.yaml", "  ADDRESS: replace", "  # ADDRESS: replace",
         "pii.yaml: PII: ADDRESS no longer masked (was replace) (weaker)"),
        ("pii.yaml", "mode: enforce ", "mode: shadow  ", "pii.yaml: PII: mode enforce -> shadow (weaker)"),
        ("privacy.yaml", "epsilon: 0.5 ", "epsilon: 1.0 ",
         "privacy.yaml: DP: risk.score epsilon per row 0.5 -> 1.0 (weaker privacy)"),
        ("privacy.yaml", "epsilon: 5.0 ", "epsilon: 2.5 ",
         "privacy.yaml: DP: risk budget epsilon 5.0 -> 2.5 (stronger privacy)"),
        ("gateway.yaml", "    mode: enforce", "    mode: shadow",
         "gateway.yaml: stages.model_exposure.mode: enforce -> shadow (weaker)"),
        ("access.yaml", "non_enumeration: true", "non_enumeration: false",
         "access.yaml: non_enumeration: True -> False (weaker)"),
    ],
)
def test_setting_changes_have_words_and_direction(dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                                  file: str, before: str, after: str, expected: str) -> None:
    old, new = dirs
    _edit(new / file, before, after)
    code, out = _diff(old, new, capsys)
    assert code == 1
    assert f"  {expected}\n" in out, out


def test_flag_weights(dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    old, new = dirs
    flags = json.loads((new / "flags.json").read_text())
    flags["flags"]["digits-version"]["targeting"]["fractional"] = [["stable", 90], ["canary", 10]]
    (new / "flags.json").write_text(json.dumps(flags, indent=2))
    code, out = _diff(old, new, capsys)
    assert code == 1
    assert "flags.json: flag digits-version canary weight 0 -> 10\n" in out
    assert "flags.json: flag digits-version stable weight 100 -> 90\n" in out


def test_new_api_key_is_weaker(dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    old, new = dirs
    _edit(new / "identity.yaml", "api_keys: []",
          f"api_keys:\n  - {{id: batch, sha256: {'c' * 64}, tenant: acme, roles: [analyst]}}")
    code, out = _diff(old, new, capsys)
    assert code == 1
    assert "identity.yaml: api_keys.batch: added (weaker)" in out
    assert out.rstrip().endswith("1 change(s): 1 weaker, 0 stronger, 0 neutral")


def test_invalid_side_exits_2(dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    old, new = dirs
    (new / "gateway.yaml").write_text("limits:\n  max_inputs: 0\n")
    assert main(["policy", "diff", str(old), str(new)]) == 2
    assert "gateway.yaml:2:15" in capsys.readouterr().err


def test_help_states_exit_status() -> None:
    parser = build_parser()
    policy = next(a for a in parser._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
                  if a.prog.endswith("policy"))
    diff_help = policy._subparsers._group_actions[0].choices["diff"].format_help()  # type: ignore[union-attr]
    assert "0 no difference, 1 differences" in " ".join(diff_help.split())
