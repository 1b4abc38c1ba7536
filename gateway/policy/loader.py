"""Read a policy directory into a validated :class:`PolicySet`, or say exactly why not.

Validate then build (OPA): nothing here has side effects, so ``infergate policy check``
and the hot-reload path run the same code. Errors carry file, line and column.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from gateway.policy.registry import POLICY_FILES
from gateway.policy.schema import AccessPolicy, GatewayPolicy, IdentityPolicy
from gateway.stages.adversarial import InputsPolicy
from gateway.stages.dp_noise import DpPolicy
from gateway.stages.pii_mask import PiiPolicy
from gateway.stages.ratelimit import RateLimitPolicy

MAX_POLICY_FILE_BYTES = 1024 * 1024
FLAGS_FILE = "flags.json"


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class PolicyError(Exception):
    """A policy that must not be activated. Never reaches a client."""

    def __init__(self, issues: list[PolicyIssue]) -> None:
        self.issues = issues
        super().__init__("; ".join(str(i) for i in issues))


@dataclass(frozen=True, slots=True)
class PolicySet:
    revision: str
    gateway: GatewayPolicy
    identity: IdentityPolicy
    access: AccessPolicy
    inputs: InputsPolicy
    # flags.json (flagd format) stays raw bytes: the flag stage parses it per revision.
    limits: RateLimitPolicy
    pii: PiiPolicy
    privacy: DpPolicy
    flags_raw: bytes = b""


def _strict_yaml(text: str, name: str) -> tuple[Any, yaml.Node | None]:
    """Parse YAML refusing anchors, aliases and duplicate keys.

    # SECURITY: aliases make "billion laughs" bombs and let one edit change many places
    # unseen; duplicate keys let a reviewer read one value while the loader takes another.
    """
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                mark = event.start_mark
                line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
                raise PolicyError([PolicyIssue(name, line, col,
                                               "YAML anchors and aliases are not allowed")])
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        raise PolicyError([PolicyIssue(name, line, col, f"invalid YAML: {getattr(exc, 'problem', exc)}")]) from exc
    if node is None:
        return {}, None
    _check_duplicates(node, name)
    loader = yaml.SafeLoader("")
    try:
        data = loader.construct_document(node)
    finally:
        loader.dispose()
    return data, node


def _check_duplicates(node: yaml.Node, name: str) -> None:
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in current.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        raise PolicyError([PolicyIssue(name, key.start_mark.line + 1, key.start_mark.column + 1,
                                                       f"duplicate key {key.value!r}")])
                    seen.add(key.value)
                stack.append(value)
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)


def _locate(node: yaml.Node | None, loc: tuple[int | str, ...]) -> tuple[int, int]:
    """Find the line/column of a pydantic error location in the YAML node tree."""
    if node is None:
        return 1, 1
    current = node
    for part in loc:
        nxt: yaml.Node | None = None
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    nxt = value
                    break
        elif isinstance(current, yaml.SequenceNode) and isinstance(part, int) and part < len(current.value):
            nxt = current.value[part]
        if nxt is None:
            break
        current = nxt
    return current.start_mark.line + 1, current.start_mark.column + 1


def _validate(model: type[BaseModel], data: Any, node: yaml.Node | None, name: str) -> BaseModel:
    if data is None:
        data = {}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        issues = []
        for err in exc.errors(include_url=False, include_input=False):
            line, col = _locate(node, tuple(err["loc"]))
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            hint = " (unknown key: check the spelling against the schema)" if err["type"] == "extra_forbidden" else ""
            issues.append(PolicyIssue(name, line, col, f"{where}: {err['msg']}{hint}"))
        raise PolicyError(issues) from exc


def load_policy_dir(directory: Path) -> PolicySet:
    """Load every policy file of ``directory``; ``tests/`` and dotfiles are ignored."""
    if not directory.is_dir():
        raise PolicyError([PolicyIssue(str(directory), 1, 1, "policy directory not found")])
    raw: dict[str, bytes] = {}
    issues: list[PolicyIssue] = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.name == FLAGS_FILE:
            if path.stat().st_size > MAX_POLICY_FILE_BYTES:
                issues.append(PolicyIssue(path.name, 1, 1, "policy file larger than 1 MiB"))
                continue
            raw[path.name] = path.read_bytes()
        elif path.suffix in {".yaml", ".yml", ".json"}:
            if path.name not in POLICY_FILES:
                issues.append(PolicyIssue(path.name, 1, 1,
                                          f"unknown policy file; expected one of {sorted(POLICY_FILES)}"))
                continue
            if path.stat().st_size > MAX_POLICY_FILE_BYTES:
                issues.append(PolicyIssue(path.name, 1, 1, "policy file larger than 1 MiB"))
                continue
            raw[path.name] = path.read_bytes()
    if issues:
        raise PolicyError(issues)
    return build_policy_set(raw)


def revision_of(raw: dict[str, bytes]) -> str:
    """The revision is a hash of the exact bytes, so two replicas agree on it."""
    digest = hashlib.sha256()
    for name in sorted(raw):
        digest.update(name.encode() + b"\0" + hashlib.sha256(raw[name]).digest())
    return digest.hexdigest()[:12]


def build_policy_set(raw: dict[str, bytes]) -> PolicySet:
    sections: dict[str, BaseModel] = {}
    issues: list[PolicyIssue] = []
    for name, (field_name, model) in POLICY_FILES.items():
        content = raw.get(name)
        try:
            if content is None:
                sections[field_name] = _validate(model, {}, None, name)
                continue
            try:
                text = content.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PolicyError([PolicyIssue(name, 1, 1, "policy files must be UTF-8")]) from exc
            data, node = _strict_yaml(text, name)
            sections[field_name] = _validate(model, data, node, name)
        except PolicyError as exc:
            issues.extend(exc.issues)
    if issues:
        raise PolicyError(issues)
    policy = PolicySet(revision=revision_of(raw), flags_raw=raw.get(FLAGS_FILE, b""),
                       **sections)  # type: ignore[arg-type]  # typed by the registry
    contradictions = check_contradictions(policy)
    if contradictions:
        raise PolicyError(contradictions)
    return policy


def check_contradictions(policy: PolicySet) -> list[PolicyIssue]:
    """Rules that span files: each would make the policy mean something its author did not."""
    issues: list[PolicyIssue] = []
    exposed = set(policy.gateway.models)
    tenants = set(policy.access.tenants)
    for name, tenant in policy.access.tenants.items():
        for model in tenant.models:
            if model not in exposed:
                issues.append(PolicyIssue("access.yaml", 1, 1,
                                          f"tenants.{name}: model {model!r} is not exposed in gateway.yaml"))
    all_tenant_models = {m for t in policy.access.tenants.values() for m in t.models}
    for role, grants in policy.access.roles.items():
        for index, grant in enumerate(grants):
            for model in grant.models:
                if model != "*" and model not in all_tenant_models:
                    issues.append(PolicyIssue("access.yaml", 1, 1,
                                              f"roles.{role}[{index}]: model {model!r} belongs to no tenant"))
    for key in policy.identity.api_keys:
        if key.tenant not in tenants:
            issues.append(PolicyIssue("identity.yaml", 1, 1, f"api_keys {key.id}: unknown tenant {key.tenant!r}"))
        for role in key.roles:
            if role not in policy.access.roles:
                issues.append(PolicyIssue("identity.yaml", 1, 1, f"api_keys {key.id}: unknown role {role!r}"))
    return issues
