"""JSON Schemas of the policy files, generated from the pydantic models that load them.

Generated, never hand-written: the models in :data:`gateway.policy.registry.POLICY_FILES`
are the single source of truth, and a test compares the committed files in
``policies/schema/`` with a fresh generation, so a model change without regeneration
fails CI. Editors use them through the ``# yaml-language-server: $schema=...`` line at the
top of each shipped YAML file (VS Code's YAML extension, any yaml-language-server client).

``flags.json`` is flagd's format and already names flagd's own schema
(:data:`FLAGD_SCHEMA_URL`); no schema is generated for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.policy.registry import POLICY_FILES

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
FLAGD_SCHEMA_URL = "https://flagd.dev/schema/v0/flags.json"
SCHEMA_SUFFIX = ".schema.json"
REGENERATE_COMMAND = "infergate policy schema --out policies/schema"
TESTS_SCHEMA = "policy-tests.schema.json"


def schema_file_name(policy_file: str) -> str:
    """``gateway.yaml`` -> ``gateway.schema.json``."""
    return Path(policy_file).stem + SCHEMA_SUFFIX


def modeline(policy_file: str) -> str:
    """The first line of a shipped YAML policy, relative to ``policies/``."""
    return f"# yaml-language-server: $schema=schema/{schema_file_name(policy_file)}"


# Models that also accept a bare string, meaning {field: string} (a BeforeValidator the
# schema generator cannot see): `EMAIL: replace` is `EMAIL: {operator: replace}`.
SHORTHANDS: dict[str, str] = {"OperatorSpec": "operator"}
_BOUNDS = {"gt": "exclusiveMinimum", "ge": "minimum", "lt": "exclusiveMaximum", "le": "maximum"}


def _fix_bounds(node: Any) -> Any:
    """pydantic writes a bound on ``int | float`` as a bare ``gt``/``le`` beside ``anyOf``,
    which JSON Schema ignores; move it into each numeric branch under its JSON Schema name."""
    if isinstance(node, list):
        return [_fix_bounds(item) for item in node]
    if not isinstance(node, dict):
        return node
    fixed = {k: _fix_bounds(v) for k, v in node.items()}
    # Only numeric values: a property *named* "gt" would hold a schema (a dict), not a bound.
    bounds = {_BOUNDS[k]: fixed.pop(k) for k in list(fixed)
              if k in _BOUNDS and isinstance(fixed[k], int | float) and not isinstance(fixed[k], bool)}
    if bounds and isinstance(fixed.get("anyOf"), list):
        fixed["anyOf"] = [{**branch, **bounds} if branch.get("type") in {"number", "integer"} else branch
                          for branch in fixed["anyOf"]]
    elif bounds:
        fixed.update(bounds)
    return fixed


def _add_shorthands(schema: dict[str, Any]) -> dict[str, Any]:
    defs = schema.get("$defs", {})
    for name, field_name in SHORTHANDS.items():
        if name in defs:
            full = defs[name]
            short = {k: v for k, v in full["properties"][field_name].items() if k not in {"description", "title"}}
            defs[name] = {"anyOf": [short, full], "description": full.get("description", ""),
                          "title": full.get("title", name)}
    return schema


def policy_schema(policy_file: str) -> dict[str, Any]:
    """The JSON Schema of one policy file (validation mode: what the loader accepts)."""
    _, model = POLICY_FILES[policy_file]
    body = _add_shorthands(_fix_bounds(model.model_json_schema(mode="validation")))
    header: dict[str, Any] = {
        "$schema": JSON_SCHEMA_DIALECT,
        "$comment": f"Generated from {model.__module__}.{model.__qualname__} by `{REGENERATE_COMMAND}`; "
                    "do not edit.",
        "title": f"infergate policies/{policy_file}",
    }
    return {**header, **{k: v for k, v in body.items() if k != "title"}}


def render(schema: dict[str, Any]) -> str:
    """Stable text: sorted keys and a final newline, so regeneration diffs are real changes."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def tests_schema() -> dict[str, Any]:
    """The JSON Schema of ``policies/tests/*.yaml`` (policy unit tests)."""
    from gateway.policy.testing import TestFile  # lazy: the runner pulls in the whole pipeline

    body = _fix_bounds(TestFile.model_json_schema(mode="validation"))
    header: dict[str, Any] = {
        "$schema": JSON_SCHEMA_DIALECT,
        "$comment": f"Generated from gateway.policy.testing.TestFile by `{REGENERATE_COMMAND}`; do not edit.",
        "title": "infergate policies/tests/*.yaml (policy unit tests)",
    }
    return {**header, **{k: v for k, v in body.items() if k != "title"}}


def generate() -> dict[str, str]:
    """Schema file name -> its text, for every YAML policy file and the policy tests."""
    schemas = {schema_file_name(name): render(policy_schema(name)) for name in sorted(POLICY_FILES)}
    schemas[TESTS_SCHEMA] = render(tests_schema())
    return schemas


def write(out: Path) -> list[Path]:
    """Write every schema into ``out`` (created if needed); returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generate().items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale(out: Path) -> list[str]:
    """Schema files in ``out`` that are missing, differ from a fresh generation, or are left over."""
    expected = generate()
    problems = []
    for name, text in expected.items():
        path = out / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{name}: out of date")
    if out.is_dir():
        problems.extend(f"{p.name}: no policy file has this schema any more"
                        for p in sorted(out.glob(f"*{SCHEMA_SUFFIX}")) if p.name not in expected)
    return problems
