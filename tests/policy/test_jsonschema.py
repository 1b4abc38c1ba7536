"""The committed JSON Schemas match the models, and the shipped policies validate against them."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from gateway.cli import main
from gateway.policy import jsonschema as policy_jsonschema
from gateway.policy.registry import POLICY_FILES

from ..conftest import POLICIES

SCHEMA_DIR = POLICIES / "schema"


def test_committed_schemas_equal_a_fresh_generation() -> None:
    """A model change without regeneration fails here, naming the command to run."""
    problems = policy_jsonschema.stale(SCHEMA_DIR)
    assert problems == [], (f"policies/schema/ is out of date ({problems}); "
                            f"run: {policy_jsonschema.REGENERATE_COMMAND}")


def test_stale_schema_is_detected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`policy schema --check` exits 1 and says what to run when a file differs or is missing."""
    assert main(["policy", "schema", "--out", str(tmp_path)]) == 0
    assert main(["policy", "schema", "--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "limits.schema.json").write_text("{}\n")
    (tmp_path / "pii.schema.json").unlink()
    capsys.readouterr()
    assert main(["policy", "schema", "--check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "limits.schema.json: out of date" in err
    assert "pii.schema.json: missing" in err
    assert policy_jsonschema.REGENERATE_COMMAND in err


def test_every_policy_file_has_a_schema_and_flags_uses_flagd() -> None:
    names = {p.name for p in SCHEMA_DIR.glob("*.schema.json")}
    assert names == {policy_jsonschema.schema_file_name(f) for f in POLICY_FILES} | {policy_jsonschema.TESTS_SCHEMA}
    flags = json.loads((POLICIES / "flags.json").read_text())
    assert flags["$schema"] == policy_jsonschema.FLAGD_SCHEMA_URL
    assert not (SCHEMA_DIR / "flags.schema.json").exists()


@pytest.mark.parametrize("policy_file", sorted(POLICY_FILES))
def test_shipped_policy_has_modeline_and_validates(policy_file: str) -> None:
    """Editors find the schema through the first line, and the shipped file satisfies it."""
    text = (POLICIES / policy_file).read_text()
    assert text.splitlines()[0] == policy_jsonschema.modeline(policy_file)
    schema = json.loads((SCHEMA_DIR / policy_jsonschema.schema_file_name(policy_file)).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load(text) or {})


def test_policy_tests_validate_against_their_schema() -> None:
    schema = json.loads((SCHEMA_DIR / policy_jsonschema.TESTS_SCHEMA).read_text())
    files = sorted((POLICIES / "tests").glob("*.yaml"))
    assert files
    for path in files:
        assert path.read_text().startswith("# yaml-language-server: $schema=../schema/policy-tests.schema.json")
        jsonschema.Draft202012Validator(schema).validate(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize(
    ("policy_file", "document"),
    [
        # a misspelt key is refused by the editor's schema too, not only by the loader
        ("gateway.yaml", {"limits": {"max_body_bytez": 3}}),
        # a limit of zero
        ("limits.yaml", {"limits": [{"name": "a", "kind": "rate", "rate": 0}]}),
        # an unknown limit kind
        ("limits.yaml", {"limits": [{"name": "a", "kind": "rat", "rate": 1}]}),
        # a role name that YAML read as a boolean is not a string
        ("access.yaml", {"roles": {"r": [{"actions": [False]}]}}),
    ],
)
def test_schema_refuses_what_the_loader_refuses(policy_file: str, document: object) -> None:
    schema = json.loads((SCHEMA_DIR / policy_jsonschema.schema_file_name(policy_file)).read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(document)
