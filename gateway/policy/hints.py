"""A hint for every policy error: what to write instead, in the words of the person editing.

Policy files are edited by security teams, not by the developers of the models, so an
error names the rule and the fix (Presidio's "errors that teach"). Allowed keys come from
the same JSON Schema the editors use (:mod:`gateway.policy.jsonschema`), so a hint never
disagrees with autocompletion.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from typing import Any

from gateway.policy.jsonschema import TESTS_SCHEMA, policy_schema, schema_file_name, tests_schema
from gateway.policy.registry import POLICY_FILES

# YAML 1.1 (PyYAML) reads these unquoted words as booleans.
YAML_BOOLEAN_WORDS = frozenset({"yes", "no", "on", "off", "true", "false", "y", "n"})

ANCHOR_HINT = ("write the value out in full where it applies; anchors (&name) and aliases (*name) are refused "
               "because they hide what a key really holds and allow alias bombs")
INVALID_YAML_HINT = "check the indentation (spaces only) and the quoting near this position"

# Messages of model validators (ValueError text) -> the fix. Matched by substring; the
# validators live next to the stages they configure, this table only explains them.
_VALUE_HINTS: tuple[tuple[str, str], ...] = (
    ("smaller than one query's cost",
     "raise this budget's epsilon to at least the cost of one row, or lower the per-row epsilon of the outputs; "
     "a budget that cannot pay for one query makes the model unusable"),
    ("exactly one key source", "keep one of pem, jwks, jwks_url, oidc_discovery, hs_secret_env under keys"),
    ("one key family", "split the issuer in two, one key family each (e.g. RS256/PS256 or ES256), "
                       "so the token can never pick the key type"),
    ("hs_secret_env", "HS256/384/512 go with keys.hs_secret_env only, asymmetric algorithms with pem/jwks"),
    ("listed twice", "remove the repeated entry; each name may appear once"),
    ("must be unique", "rename or remove one of the entries with the same name"),
    ("same mechanism", "use laplace for every output of this model, or gaussian for every output"),
    ("bounds must be", "write bounds as [lower, upper] with two finite numbers, lower < upper"),
    ("needs delta", "add delta (e.g. 1.0e-6) to gaussian outputs and their budget"),
    ("takes no delta", "remove delta: laplace is pure epsilon-DP"),
    ("per: [subject]", "write per: [tenant, subject]: a subject is unique only within its tenant"),
    ("per: [role]", "list the roles this limit applies to under roles: [...]"),
    ("does not grant infer", "add infer to this grant's actions, or remove outputs: (it only restricts inference)"),
    ("tokenize is allowed only", "use tokenize only under roles: for roles that hold pii:unmask in access.yaml"),
)


def schema_ref(policy_file: str) -> str:
    name = schema_file_name(policy_file) if policy_file in POLICY_FILES else TESTS_SCHEMA
    return f"policies/schema/{name}"


@cache
def _schema(policy_file: str) -> Mapping[str, Any]:
    # Anything that is not a policy file and is parsed with the policy rules is a test file.
    return policy_schema(policy_file) if policy_file in POLICY_FILES else tests_schema()


def _resolve(node: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = node.get("$ref")
    while isinstance(ref, str) and ref.startswith("#/$defs/"):
        node = root["$defs"][ref.removeprefix("#/$defs/")]
        ref = node.get("$ref")
    return node


def _branches(node: Mapping[str, Any], root: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    node = _resolve(node, root)
    alternatives = node.get("anyOf") or node.get("oneOf")
    if alternatives:
        for branch in alternatives:
            yield from _branches(branch, root)
    else:
        yield node


def _child(node: Mapping[str, Any], part: int | str, root: Mapping[str, Any]) -> Mapping[str, Any] | None:
    mapping = _resolve(node, root).get("discriminator", {}).get("mapping", {})
    if isinstance(part, str) and part in mapping:
        return {"$ref": mapping[part]}  # pydantic names the tag of a discriminated union in loc
    for branch in _branches(node, root):
        if isinstance(part, int) and isinstance(branch.get("items"), Mapping):
            return branch["items"]  # type: ignore[no-any-return]
        if isinstance(part, str):
            props = branch.get("properties")
            if isinstance(props, Mapping) and part in props:
                return props[part]  # type: ignore[no-any-return]
            extra = branch.get("additionalProperties")
            if isinstance(extra, Mapping):
                return extra
    return None


def allowed_keys(policy_file: str, loc: Sequence[int | str]) -> list[str]:
    """The keys the schema allows in the mapping at ``loc`` (pydantic's location tuple)."""
    root = _schema(policy_file)
    node: Mapping[str, Any] = root
    for part in loc:
        child = _child(node, part, root)
        if child is not None:
            node = child
        # else: a union member name or tag in pydantic's loc; stay where we are
    keys: set[str] = set()
    for branch in _branches(node, root):
        props = branch.get("properties")
        if isinstance(props, Mapping):
            keys.update(props)
    return sorted(keys)


def _unknown_key(policy_file: str, loc: Sequence[int | str]) -> str:
    key = str(loc[-1]) if loc else ""
    allowed = allowed_keys(policy_file, loc[:-1])
    if not allowed:
        return f"remove this key; see {schema_ref(policy_file)}"
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    listing = ", ".join(allowed[:15]) + (", ..." if len(allowed) > 15 else "")
    if close:
        return f"did you mean {close[0]!r}? allowed here: {listing}"
    return f"allowed keys here: {listing}"


def _number_bound(kind: str, ctx: Mapping[str, Any]) -> str:
    bound = next(iter(ctx.values()), None)
    if kind == "greater_than" and bound == 0:
        return ("use a positive number; a limit of zero would refuse every call (to remove a limit, "
                "delete its entry instead)")
    words = {"greater_than": "above", "greater_than_equal": "at least", "less_than": "below",
             "less_than_equal": "at most"}
    return f"use a number {words.get(kind, 'within')} {bound}"


def hint_for(policy_file: str, error: Mapping[str, Any], yaml_value: str | None = None) -> str:
    """The fix for one pydantic error (``ValidationError.errors()`` item) in ``policy_file``.

    ``yaml_value`` is the scalar text the author wrote at the error's location, if any: it
    tells "no" (a YAML boolean) from a real type mistake. Only the input's type is read
    from ``error``, never its value.
    """
    kind = str(error.get("type", ""))
    loc = tuple(error.get("loc", ()))
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    if kind in {"string_type", "literal_error", "enum", "int_type", "float_type", "dict_type", "model_type"}:
        if yaml_value is not None and yaml_value.lower() in YAML_BOOLEAN_WORDS:
            return f"YAML reads an unquoted {yaml_value} as a boolean; quote it: \"{yaml_value}\""
        if isinstance(error.get("input"), bool):
            return "YAML reads unquoted yes/no/on/off/true/false as booleans; quote the word"
    if kind == "extra_forbidden":
        return _unknown_key(policy_file, loc)
    if kind == "missing":
        return f"add the required key {str(loc[-1])!r} here; see {schema_ref(policy_file)}" if loc else \
            f"see {schema_ref(policy_file)}"
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        return _number_bound(kind, ctx)
    if kind in {"int_type", "int_parsing", "int_from_float", "float_type", "float_parsing"}:
        return "write a plain number without quotes or units"
    if kind in {"string_type", "str_type"}:
        return "write a string; quote it if YAML could read it as a number, boolean or null"
    if kind in {"bool_type", "bool_parsing"}:
        return "write true or false"
    if kind in {"literal_error", "enum"}:
        return f"use one of: {ctx.get('expected', 'the values listed in ' + schema_ref(policy_file))}"
    if kind in {"union_tag_invalid", "union_tag_not_found"}:
        tag = str(ctx.get("discriminator", "kind")).strip("'")
        return f"set {tag}: to one of {ctx.get('expected_tags', 'the documented kinds')}"
    if kind in {"too_short", "too_long"}:
        return f"give between {ctx.get('min_length', 0)} and {ctx.get('max_length', 'any number of')} item(s)" \
            if kind == "too_long" else f"give at least {ctx.get('min_length', 1)} item(s)"
    if kind == "string_pattern_mismatch":
        return f"the value must match the pattern {ctx.get('pattern')}"
    if kind in {"dict_type", "model_type", "model_attributes_type"}:
        return "write a mapping here (key: value lines, or {key: value})"
    if kind in {"tuple_type", "list_type", "set_type", "frozen_set_type"}:
        return "write a list here ([a, b] or one '- item' line each)"
    if kind == "value_error":
        message = str(error.get("msg", ""))
        for needle, hint in _VALUE_HINTS:
            if needle in message:
                return hint
    return f"see the field's description in {schema_ref(policy_file)}"
