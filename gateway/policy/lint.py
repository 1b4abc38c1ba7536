"""Warnings for valid policies a reviewer should look at twice (``infergate policy check``).

Unlike the loader's errors these do not stop a policy loading: a wildcard grant is
sometimes meant. They are printed so a reviewer reading the check output sees it
without running ``policy diff``; ``policy check --strict`` makes them fail the check.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from gateway.policy.loader import PolicyIssue, parse_yaml_document, read_policy_dir
from gateway.policy.registry import POLICY_FILES
from gateway.policy.schema import AccessPolicy

ACCESS_FILE = "access.yaml"
# Roles expected to hold everything; any other role granted "*" is worth a second look.
WILDCARD_ROLES = frozenset({"admin"})


def no_policy_files(directory: Path) -> list[PolicyIssue]:
    """A directory holding none of the policy files: valid (every file has safe defaults),
    but almost always the wrong path, and "ok" would read as "your policy is fine"."""
    if any((directory / name).is_file() for name in POLICY_FILES):
        return []
    return [PolicyIssue(str(directory), 1, 1, "no policy file here: the built-in defaults apply "
                        "(no issuer trusted, nothing granted)",
                        hint=f"point at the directory holding {', '.join(sorted(POLICY_FILES))}")]


def wildcard_grants(directory: Path) -> list[PolicyIssue]:
    """Grants outside ``admin`` that give ``actions: ["*"]``, or ``infer`` on every model
    (``models: ["*"]`` or no ``models`` at all, which defaults to ``*``), each at its file:line.

    # SECURITY: the role name is compared exactly: ``Admin`` or ``admin `` is another role,
    # and a wildcard there is exactly what this warning is for.
    """
    raw = read_policy_dir(directory)
    content = raw.get(ACCESS_FILE)
    if content is None:
        return []
    access, node = parse_yaml_document(content.decode("utf-8"), ACCESS_FILE, AccessPolicy)
    warnings: list[PolicyIssue] = []

    def warn(loc: tuple[int | str, ...], message: str, hint: str) -> None:
        found = _node_at(node, loc)
        line, col = (found.start_mark.line + 1, found.start_mark.column + 1) if found is not None else (1, 1)
        warnings.append(PolicyIssue(ACCESS_FILE, line, col, message, hint))

    for role, grants in access.roles.items():
        if role in WILDCARD_ROLES:
            continue
        # SECURITY: a lookalike name ('\u0430dmin', Cyrillic a) is shown escaped, not as "admin".
        shown = repr(role) if role.isascii() else ascii(role)
        for index, grant in enumerate(grants):
            base = ("roles", role, index)
            if "*" in grant.actions:
                warn((*base, "actions", grant.actions.index("*")),
                     f"role {shown} is granted every action (actions: [\"*\"]), including the operator "
                     "permissions (audit, budgets, PII unmasking, policy)",
                     "list the actions this role needs")
            # Reading every model's metadata (the shipped ``viewer``) is by design; running every
            # model, including ones added later, is what a reviewer must see.
            runs_models = "*" in grant.actions or "infer" in grant.actions
            if "*" in grant.models and runs_models:
                explicit = grant.models != ("*",) or _node_at(node, (*base, "models")) is not None
                where = (*base, "models", grant.models.index("*")) if explicit else base
                said = "models: [\"*\"]" if explicit else "no models: listed, which means \"*\""
                warn(where, f"role {shown} is granted every model of its tenant ({said}), including "
                            "models added later", "list the models this role needs")
    return warnings


def _node_at(node: yaml.Node | None, loc: tuple[int | str, ...]) -> yaml.Node | None:
    """The YAML node at ``loc`` (mapping keys and sequence indexes), or ``None``."""
    current = node
    for part in loc:
        if isinstance(current, yaml.MappingNode):
            current = next((v for k, v in current.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)),
                           None)
        elif isinstance(current, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(current.value):
            current = current.value[part]
        else:
            return None
    return current
