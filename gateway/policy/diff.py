"""``infergate policy diff OLD NEW``: what a policy change grants or removes, for a reviewer.

Two parts. First the **effective permissions**: for both revisions the access policy is
compiled exactly as the authorization stage compiles it (:func:`compile_grants`), kept to
the models ``gateway.yaml`` exposes, and the sets of (tenant, role, model, action) are
compared, so a wildcard, a tenant's new model or a role edit shows up as what it really
grants ("role analyst in tenant acme GAINS infer on model risk"), whichever file changed.
Then every other setting, field by field, with a **security direction** where one is
known: ``weaker`` (more access, less privacy, fewer refusals), ``stronger`` or
``neutral``. Unknown fields are reported as ``neutral`` with their raw path, never hidden.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gateway.policy.loader import FLAGS_FILE, PolicySet, load_policy_dir
from gateway.policy.registry import POLICY_FILES
from gateway.policy.schema import MODEL_ACTIONS
from gateway.stages.authz import ANY_VERSION, compile_grants

Direction = Literal["weaker", "stronger", "neutral"]
Permission = tuple[str, str, str, str]  # tenant, role, model ("" = gateway-level), action

_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class Change:
    file: str
    text: str
    direction: Direction
    kind: Literal["permission", "setting"] = "setting"


# -- effective permissions -------------------------------------------------------------------


def effective_permissions(policy: PolicySet) -> dict[Permission, frozenset[str]]:
    """(tenant, role, model, action) -> versions ({"*"} = any), as the authz stage decides it."""
    grants, role_actions = compile_grants(policy.access)
    exposed = policy.gateway.models
    result: dict[Permission, frozenset[str]] = {}
    for tenant, roles in grants.items():
        for role, models in roles.items():
            for model, model_grants in models.items():
                if model not in exposed:
                    continue  # unreachable whatever the grant says (model_exposure runs first)
                for grant in model_grants:
                    for action in grant.actions & MODEL_ACTIONS:
                        key = (tenant, role, model, action)
                        previous = result.get(key, frozenset())
                        any_version = ANY_VERSION in (previous, grant.versions)
                        result[key] = ANY_VERSION if any_version else previous | grant.versions
                limit = exposed[model].versions
                if limit is not None:  # model_exposure refuses other versions whatever the grant
                    for action in MODEL_ACTIONS:
                        key = (tenant, role, model, action)
                        if key in result:
                            result[key] = frozenset(limit) if result[key] == ANY_VERSION \
                                else result[key] & frozenset(limit)
        for role in roles:
            for action in role_actions.get(role, frozenset()):
                result[(tenant, role, "", action)] = ANY_VERSION
    return result


def _versions(versions: frozenset[str]) -> str:
    return "any version" if versions == ANY_VERSION else f"versions {', '.join(sorted(versions)) or 'none'}"


def permission_changes(old: PolicySet, new: PolicySet) -> list[Change]:
    before, after = effective_permissions(old), effective_permissions(new)
    changes = []
    for key in sorted(before.keys() | after.keys()):
        tenant, role, model, action = key
        target = f"on model {model}" if model else "(gateway-wide)"
        who = f"role {role} in tenant {tenant}"
        if key not in before:
            scope = "" if after[key] == ANY_VERSION else f" ({_versions(after[key])})"
            changes.append(Change("access.yaml", f"{who} GAINS {action} {target}{scope}", "weaker", "permission"))
        elif key not in after:
            changes.append(Change("access.yaml", f"{who} LOSES {action} {target}", "stronger", "permission"))
        elif before[key] != after[key]:
            wider = after[key] == ANY_VERSION or (before[key] != ANY_VERSION and after[key] > before[key])
            changes.append(Change("access.yaml", f"{who}: {action} {target}: {_versions(before[key])} -> "
                                  f"{_versions(after[key])}", "weaker" if wider else "stronger", "permission"))
    return changes


# -- every other setting ---------------------------------------------------------------------

# Lists of entries with a unique name are compared by that name, not by position.
_LIST_KEYS = ("name", "role", "issuer", "id")
# Orders from weakest to strongest, for enumerated settings.
_ORDERS: dict[str, tuple[str, ...]] = {
    "mode": ("shadow", "enforce"),
    "adversarial_mode": ("off", "shadow", "flag", "block"),
    "action": ("off", "flag", "lower_precision", "slow_down", "block"),
    "fail": ("allow", "local", "deny"),
    "pii_operator": ("tokenize", "mask", "hash", "replace", "redact"),
    "on_non_utf8": ("pass", "refuse"),
    "format_chars": ("allow", "remove", "refuse"),
    "control_chars": ("remove", "refuse"),
}


@dataclass(frozen=True, slots=True)
class _Rule:
    """How to judge a change at paths matching ``pattern`` (``file:dotted.path``, fnmatch)."""

    pattern: str
    # "higher" = a larger number is weaker; "lower" = a smaller number is weaker; an
    # _ORDERS key; "added" = adding/enabling is weaker; "removed" = removing/disabling is weaker.
    judge: str
    label: Callable[[tuple[str, ...], Any, Any], str] | None = None


def _arrow(old: Any, new: Any) -> str:
    if old is _MISSING and isinstance(new, dict):
        return "added"
    if new is _MISSING and isinstance(old, dict):
        return "removed"

    def show(value: Any) -> str:
        if value is _MISSING:
            return "(none)"
        return json.dumps(value, ensure_ascii=False) if isinstance(value, list | dict) else str(value)
    return f"{show(old)} -> {show(new)}"


def _limit_label(path: tuple[str, ...], old: Any, new: Any) -> str:
    return f"limit {path[1]}: {'.'.join(path[2:])} {_arrow(old, new)}"


def _pii_label(path: tuple[str, ...], old: Any, new: Any) -> str:
    if path[0] == "entities" and len(path) == 2 and (old is _MISSING or new is _MISSING):
        entry = new if old is _MISSING else old
        operator = entry.get("operator") if isinstance(entry, dict) else entry
        return f"PII: {path[1]} now masked ({operator})" if old is _MISSING else \
            f"PII: {path[1]} no longer masked (was {operator})"
    if path[0] == "entities" and len(path) >= 2:
        return f"PII: {path[1]} {' '.join(path[2:]) or 'entity'} {_arrow(old, new)}"
    return f"PII: {'.'.join(path)} {_arrow(old, new)}"


def _dp_label(path: tuple[str, ...], old: Any, new: Any) -> str:
    if len(path) >= 5 and path[2] == "outputs" and path[4] == "epsilon":
        return f"DP: {path[1]}.{path[3]} epsilon per row {_arrow(old, new)}"
    if len(path) >= 4 and path[2] in {"budget", "tenants"}:
        return f"DP: {path[1]} {' '.join(path[2:])} {_arrow(old, new)}"
    return f"DP: {'.'.join(path)} {_arrow(old, new)}"


def _flag_label(path: tuple[str, ...], old: Any, new: Any) -> str:
    if len(path) >= 4 and path[2] == "weights":
        return f"flag {path[1]} {path[3]} weight {_arrow(old, new)}"
    return f"flag {'.'.join(path[1:])} {_arrow(old, new)}"


_Label = Callable[[tuple[str, ...], Any, Any], str]
_JUDGES = frozenset({"higher", "lower", "added", "removed", "neutral", *_ORDERS})


def _file_rules(file: str, label: _Label | None, table: str) -> tuple[_Rule, ...]:
    """Rules for one policy file from a ``dotted.path judge`` table, one rule a line.

    A table, because the rules are data: the file and the label are said once, not on
    every line, and a misspelt judge fails at import rather than judging nothing.
    """
    rules = []
    for line in table.splitlines():
        if line.strip():
            path, judge = line.split()
            if judge not in _JUDGES:
                raise ValueError(f"unknown judge {judge!r} for {file}:{path}")
            rules.append(_Rule(f"{file}:{path}", judge, label))
    return tuple(rules)


_RULES: tuple[_Rule, ...] = (
    *_file_rules("gateway.yaml", None, """
        models.*                              added
        models.*.versions                     added
        limits.*                              higher
        stages.*.mode                         mode
        upstream.*                            neutral
        audit.retention_days                  lower
    """),
    # access.yaml: grants are judged through effective permissions
    *_file_rules("access.yaml", None, """
        non_enumeration                       removed
        tenants.*                             neutral
    """),
    *_file_rules("identity.yaml", None, """
        issuers.*                             added
        issuers.*.audiences                   added
        issuers.*.algorithms                  added
        issuers.*.leeway_s                    higher
        issuers.*.max_lifetime_s              higher
        issuers.*.required_claims             removed
        issuers.*.keys*                       added
        issuers.*.allowed_roles               added
        api_keys.*                            added
        api_keys.*.roles                      added
        api_keys.*.tenant                     added
    """),
    *_file_rules("inputs.yaml", None, """
        *.mode                                mode
        adversarial.models.*.mode             adversarial_mode
        *.action                              action
        *caps.*                               higher
        *.format_chars                        format_chars
        *.control_chars                       control_chars
        *.binary_inputs                       added
    """),
    *_file_rules("limits.yaml", None, """
        *on_backend_error                     fail
    """),
    *_file_rules("limits.yaml", _limit_label, """
        limits.*.on_backend_error             fail
        limits.*.rate                         higher
        limits.*.burst                        higher
        limits.*.limit                        higher
        limits.*.period_s                     lower
        limits.*                              removed
        limits.*.*                            neutral
    """),
    *_file_rules("limits.yaml", None, """
        pre_auth.rate                         higher
        pre_auth.burst                        higher
        pre_auth                              removed
    """),
    *_file_rules("pii.yaml", _pii_label, """
        mode                                  mode
        directions                            removed
        on_non_utf8                           on_non_utf8
        entities.*                            removed
        entities.*.operator                   pii_operator
        entities.*.keep_last                  higher
        roles.*                               added
        roles.*.operators.*.operator          pii_operator
        split_joins                           removed
    """),
    *_file_rules("privacy.yaml", _dp_label, """
        models.*                              removed
        models.*.outputs.*.epsilon            higher
        models.*.outputs.*.delta              higher
        models.*.outputs.*                    added
        models.*.budget.epsilon               higher
        models.*.budget.delta                 higher
        models.*.budget.period_s              lower
        models.*.tenants.*.epsilon            higher
        models.*.timing_jitter_ms             lower
        models.*.*                            neutral
    """),
    *_file_rules("flags.json", _flag_label, """
        flags.*.weights.*                     neutral
        flags.stage.*.enabled.defaultVariant  neutral
        flags.*                               neutral
    """),
)

_DIRECTION_WORDS = {"weaker": "weaker", "stronger": "stronger", "neutral": ""}


def _rule_for(file: str, path: tuple[str, ...]) -> _Rule | None:
    target = f"{file}:{'.'.join(path)}"
    # The most specific rule wins: the longest pattern that matches.
    matching = [r for r in _RULES if fnmatch.fnmatchcase(target, r.pattern)]
    return max(matching, key=lambda r: len(r.pattern)) if matching else None


def _direction(rule: _Rule | None, old: Any, new: Any) -> Direction:
    if rule is None or rule.judge == "neutral":
        return "neutral"
    judge = rule.judge
    if judge in {"added", "removed"}:
        grew = _size(new) > _size(old) if _size(new) != _size(old) else None
        if old is _MISSING or old is False or old is None:
            grew = True
        elif new is _MISSING or new is False or new is None:
            grew = False
        if grew is None:
            return "neutral"
        return "weaker" if grew == (judge == "added") else "stronger"
    if judge in {"higher", "lower"}:
        if not (isinstance(old, int | float) and isinstance(new, int | float)):
            if old is _MISSING or new is _MISSING or old is None or new is None:
                # a cap or budget removed means "unlimited" (weaker), added means a new bound
                unlimited_after = new is _MISSING or new is None
                return "weaker" if unlimited_after == (judge == "higher") else "stronger"
            return "neutral"
        if old == new:
            return "neutral"
        return "weaker" if (new > old) == (judge == "higher") else "stronger"
    order = _ORDERS.get(judge)
    if order and old in order and new in order:
        return "weaker" if order.index(new) < order.index(old) else "stronger"
    return "neutral"


def _size(value: Any) -> int:
    if value is _MISSING or value is None or value is False:
        return 0
    if isinstance(value, list | dict):
        return len(value)
    return 1


def _normalize(value: Any, file: str) -> Any:
    """Lists of named entries become mappings by name; flag weights become {variant: weight}."""
    if isinstance(value, dict):
        out = {k: _normalize(v, file) for k, v in value.items()}
        targeting = value.get("targeting") if file == FLAGS_FILE else None
        if isinstance(targeting, dict) and isinstance(targeting.get("fractional"), list):
            weights = {str(item[0]): item[1] for item in targeting["fractional"]
                       if isinstance(item, list) and len(item) == 2}  # [variant, weight] pairs
            out["weights"] = weights
            out["targeting"] = {k: _normalize(v, file) for k, v in targeting.items() if k != "fractional"}
        return out
    if isinstance(value, list):
        for key in _LIST_KEYS:
            names = [item.get(key) for item in value if isinstance(item, dict)]
            if names and len(names) == len(value) and all(isinstance(n, str) for n in names) \
                    and len(set(names)) == len(names):
                return {str(item[key]): _normalize(item, file) for item in value}
        return [_normalize(v, file) for v in value]
    return value


def _walk(old: Any, new: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    # An empty list of named entries is an empty mapping of them (the first API key added).
    if isinstance(old, dict) and new == []:
        new = {}
    if isinstance(new, dict) and old == []:
        old = {}
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() | new.keys(), key=str):
            yield from _walk(old.get(key, _MISSING), new.get(key, _MISSING), (*path, str(key)))
    elif old != new:
        yield path, old, new


def _section(policy: PolicySet, file: str) -> Any:
    if file == FLAGS_FILE:
        try:
            return json.loads(policy.flags_raw) if policy.flags_raw else {}
        except ValueError:
            return {"unparsed": policy.flags_raw.decode("utf-8", errors="replace")}
    field_name, _ = POLICY_FILES[file]
    dumped = getattr(policy, field_name).model_dump(mode="json")
    if file == "access.yaml":
        dumped.pop("roles", None)  # judged as effective permissions
    return dumped


def setting_changes(old: PolicySet, new: PolicySet) -> list[Change]:
    changes = []
    for file in [*POLICY_FILES, FLAGS_FILE]:
        before, after = _normalize(_section(old, file), file), _normalize(_section(new, file), file)
        for path, was, now in _walk(before, after, ()):
            if file == FLAGS_FILE and path[:1] == ("metadata",):
                continue  # the file's own comments
            rule = _rule_for(file, path)
            direction = _direction(rule, was, now)
            if rule is not None and rule.label is not None:
                text = rule.label(path, was, now)
            else:
                text = f"{'.'.join(path)}: {_arrow(was, now)}"
            changes.append(Change(file, text, direction))
    return changes


def diff_policies(old: PolicySet, new: PolicySet) -> list[Change]:
    return [*permission_changes(old, new), *setting_changes(old, new)]


def diff_dirs(old: Path, new: Path) -> list[Change]:
    """Raises :class:`gateway.policy.loader.PolicyError` when either directory is invalid."""
    return diff_policies(load_policy_dir(old), load_policy_dir(new))


def render(changes: list[Change]) -> str:
    if not changes:
        return "no difference\n"
    lines = []
    permissions = [c for c in changes if c.kind == "permission"]
    settings = [c for c in changes if c.kind == "setting"]
    if permissions:
        lines.append("Effective permissions:")
        lines.extend(f"  {'+' if c.direction == 'weaker' else '-'} {c.text}" for c in permissions)
    if settings:
        lines.append("Settings:")
        for change in settings:
            word = _DIRECTION_WORDS[change.direction]
            suffix = f" ({word}{' privacy' if change.text.startswith('DP:') else ''})" if word else ""
            lines.append(f"  {change.file}: {change.text}{suffix}")
    counts = _count(changes)
    lines.append(f"{len(changes)} change(s): {counts['weaker']} weaker, {counts['stronger']} stronger, "
                 f"{counts['neutral']} neutral")
    return "\n".join(lines) + "\n"


def _count(changes: list[Change]) -> Mapping[str, int]:
    counts = {"weaker": 0, "stronger": 0, "neutral": 0}
    for change in changes:
        counts[change.direction] += 1
    return counts
