"""Read a policy directory into a validated :class:`PolicySet`, or say exactly why not.

Validate then build (OPA): nothing here has side effects, so ``infergate policy check``
and the hot-reload path run the same code. Errors carry file, line and column.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from gateway.policy.pathsafety import unsafe_directory, unsafe_policy_file
from gateway.policy.registry import POLICY_FILES
from gateway.policy.schema import AccessPolicy, GatewayPolicy, IdentityPolicy
from gateway.stages.adversarial import InputsPolicy
from gateway.stages.dp_noise import DpPolicy
from gateway.stages.pii_mask import PiiPolicy
from gateway.stages.ratelimit import RateLimitPolicy

MAX_POLICY_FILE_BYTES = 1024 * 1024
MAX_YAML_DEPTH = 64

M = TypeVar("M", bound=BaseModel)
FLAGS_FILE = "flags.json"


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    file: str
    line: int
    column: int
    message: str
    # What to write instead (gateway/policy/hints.py); empty only where no fix can be named.
    hint: str = ""

    def __str__(self) -> str:
        text = f"{self.file}:{self.line}:{self.column}: {self.message}"
        return f"{text} (hint: {self.hint})" if self.hint else text


class PolicyError(Exception):
    """A policy that must not be activated. Never reaches a client."""

    # Metric label of a refused reload; signed-bundle refusals override it (unsigned, tampered, ...).
    reason: str = "invalid"

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
    # Files holding a YAML document (not missing, empty or comments only): see check_vanished.
    documents: frozenset[str] = frozenset()


def _strict_yaml(text: str, name: str) -> tuple[Any, yaml.Node | None]:
    """Parse YAML refusing anchors, aliases and duplicate keys.

    # SECURITY: aliases make "billion laughs" bombs and let one edit change many places
    # unseen; duplicate keys let a reviewer read one value while the loader takes another.
    """
    from gateway.policy.hints import ANCHOR_HINT, INVALID_YAML_HINT

    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            mark = event.start_mark
            line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise PolicyError([PolicyIssue(name, line, col, "YAML anchors and aliases are not allowed",
                                               ANCHOR_HINT)])
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                # SECURITY: a deeply nested document (no alias needed) exhausts the composer's
                # recursion; no policy needs more than a few levels.
                if depth > MAX_YAML_DEPTH:
                    raise PolicyError([PolicyIssue(name, line, col, f"nesting deeper than {MAX_YAML_DEPTH} levels",
                                                   "flatten the structure; policy files need only a few levels")])
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        raise PolicyError([PolicyIssue(name, line, col, f"invalid YAML: {getattr(exc, 'problem', exc)}",
                                       INVALID_YAML_HINT)]) from exc
    if node is None:
        return {}, None
    _check_duplicates(node, name)
    loader = yaml.SafeLoader("")
    try:
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        # SECURITY: an unknown tag (!!python/object/apply:...) is refused by the safe loader;
        # it must surface as a policy error (last-known-good kept), never kill the watcher.
        mark = getattr(exc, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        raise PolicyError([PolicyIssue(name, line, col, f"invalid YAML: {getattr(exc, 'problem', exc)}")]) from exc
    except ValueError as exc:
        # SECURITY: the safe constructors call int() and datetime() on scalars: a 5,000-digit
        # integer or 2001-02-30 raises ValueError, which must not kill the watcher either
        # (found by security_tests/fuzz).
        raise PolicyError([PolicyIssue(name, 1, 1, "invalid YAML: a scalar cannot be converted "
                                       "(integer too long or impossible date)")]) from exc
    finally:
        loader.dispose()
    return data, node


def _check_duplicates(node: yaml.Node, name: str) -> None:
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in current.value:
                if key.tag == "tag:yaml.org,2002:merge":
                    # SECURITY: `<<: {key: value}` merges keys the mapping may also spell out
                    # (the explicit one silently wins): a duplicate key in disguise.
                    raise PolicyError([PolicyIssue(
                        name, key.start_mark.line + 1, key.start_mark.column + 1,
                        "YAML merge keys (<<) are not allowed",
                        "write the keys out in the mapping itself",
                    )])
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        raise PolicyError([PolicyIssue(
                            name, key.start_mark.line + 1, key.start_mark.column + 1, f"duplicate key {key.value!r}",
                            f"keep one {key.value!r} (the first is on line {seen[key.value]}) and merge the two",
                        )])
                    seen[key.value] = key.start_mark.line + 1
                stack.append(value)
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)


def _find(node: yaml.Node | None, loc: tuple[int | str, ...],
          *, key_of_last: bool = False) -> tuple[yaml.Node | None, tuple[int | str, ...]]:
    """The YAML node at a pydantic error location, and the parts of ``loc`` found in the file.

    Parts not in the file (a union member's name, a discriminator tag) are skipped; a tag
    that happens to equal a key (``kind: rate`` next to ``rate: 5``) is tried both ways,
    preferring the reading that reaches ``loc``'s last part. ``key_of_last`` points at the
    last part's key rather than its value (unknown keys).
    """
    if node is None:
        return None, ()

    def child(current: yaml.Node, part: int | str, last: bool) -> yaml.Node | None:
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    return key if key_of_last and last else value
        elif isinstance(current, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(current.value):
            return current.value[part]  # type: ignore[no-any-return]
        return None

    def search(current: yaml.Node, index: int) -> tuple[tuple[bool, int], yaml.Node, tuple[int | str, ...]]:
        if index == len(loc):
            return (False, 0), current, ()
        best = search(current, index + 1)  # skip this part
        nxt = child(current, loc[index], index == len(loc) - 1)
        if nxt is not None:
            (last, count), target, found = search(nxt, index + 1)
            candidate = ((last or index == len(loc) - 1, count + 1), target, (loc[index], *found))
            best = max(best, candidate, key=lambda item: item[0])
        return best

    _, target, found = search(node, 0)
    return target, found


def _locate(node: yaml.Node | None, loc: tuple[int | str, ...], *, key_of_last: bool = False) -> tuple[int, int]:
    """Find the line/column of a pydantic error location in the YAML node tree."""
    found, _ = _find(node, loc, key_of_last=key_of_last)
    if found is None:
        return 1, 1
    return found.start_mark.line + 1, found.start_mark.column + 1


def _validate(model: type[BaseModel], data: Any, node: yaml.Node | None, name: str) -> BaseModel:
    if data is None:
        data = {}
    from gateway.policy.hints import hint_for

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        issues: dict[tuple[int, int, str], PolicyIssue] = {}
        errors = exc.errors(include_url=False)
        for err in errors:
            loc = tuple(err["loc"])
            if err["type"] == "too_short" and any(tuple(o["loc"])[:len(loc)] == loc and len(o["loc"]) > len(loc)
                                                  for o in errors):
                continue  # "at least 1 item" because an item failed: the item's error says why
            named_key = err["type"] in {"extra_forbidden", "missing"}
            target, found = _find(node, loc, key_of_last=err["type"] == "extra_forbidden")
            if target is not None and err["type"] == "value_error":
                # "budget: epsilon ... too small" from a model validator: point at `budget`.
                head = str(err["msg"]).removeprefix("Value error, ").split(":", 1)[0]
                deeper, _ = _find(target, tuple(head.split(".")))
                if deeper is not None and deeper is not target and " " not in head:
                    target, found = deeper, (*found, *head.split("."))
            line, col = (target.start_mark.line + 1, target.start_mark.column + 1) if target is not None else (1, 1)
            shown = (*found, loc[-1]) if named_key and loc and (not found or found[-1] != loc[-1]) else found
            where = ".".join(str(p) for p in shown) or "(top level)"
            scalar = target.value if isinstance(target, yaml.ScalarNode) and not named_key else None
            hint = hint_for(name, err, scalar)
            previous = issues.get((line, col, where))
            if previous is not None:
                # One value failing every member of a union (int | float): one issue, both reasons.
                issues[(line, col, where)] = PolicyIssue(name, line, col, f"{previous.message} or {err['msg']}",
                                                         previous.hint)
                continue
            issues[(line, col, where)] = PolicyIssue(name, line, col, f"{where}: {err['msg']}", hint)
        raise PolicyError(list(issues.values())) from exc


def read_policy_dir(directory: Path) -> dict[str, bytes]:
    """Read, once, every file the loader considers; ``tests/``, dotfiles and other suffixes are ignored.

    Unknown names are read too (bounded), so a signed-bundle check sees exactly the set
    the loader would judge; :func:`load_policy_bytes` then refuses them by name.
    """
    if not directory.is_dir():
        raise PolicyError([PolicyIssue(str(directory), 1, 1, "policy directory not found")])
    # SECURITY (SEC-10): policy others could have written is refused (policy/pathsafety.py).
    try:
        unsafe = unsafe_directory(directory)
    except OSError as exc:
        raise PolicyError([_unreadable(str(directory), exc)]) from exc
    if unsafe is not None:
        raise PolicyError([PolicyIssue(str(directory), 1, 1, f"unsafe policy directory: {unsafe}",
                                       "chmod o-w (and g-w) the directories leading to the policies")])
    raw: dict[str, bytes] = {}
    issues: list[PolicyIssue] = []
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise PolicyError([_unreadable(str(directory), exc)]) from exc
    for path in entries:
        if path.name.startswith("."):
            continue
        if path.is_dir():
            if path.name in POLICY_FILES or path.name == FLAGS_FILE:
                # SECURITY: a policy file replaced by a directory is not "no file" (defaults:
                # no DP, no input caps); it is a broken deployment, refused like any other.
                issues.append(PolicyIssue(path.name, 1, 1, "a directory where a policy file belongs",
                                          "replace the directory by the policy file"))
            continue
        if path.name != FLAGS_FILE and path.suffix not in {".yaml", ".yml", ".json"}:
            continue
        if not path.is_file():
            issues.append(PolicyIssue(path.name, 1, 1, "not a regular file"))
            continue
        # SECURITY: read once, bounded; callers verify and parse these same bytes (no TOCTOU).
        try:
            with path.open("rb") as handle:
                unsafe = unsafe_policy_file(path, os.fstat(handle.fileno()))
                if unsafe is not None:
                    issues.append(PolicyIssue(path.name, 1, 1, f"unsafe policy file: {unsafe}",
                                              "chmod go-w the file (or the target of the link)"))
                    continue
                content = handle.read(MAX_POLICY_FILE_BYTES + 1)
        except OSError as exc:
            # SECURITY: permissions 000, a file renamed away between listing and opening, an
            # I/O error: a refused reload (last-known-good kept), never a dead policy watcher.
            issues.append(_unreadable(path.name, exc))
            continue
        if len(content) > MAX_POLICY_FILE_BYTES:
            issues.append(PolicyIssue(path.name, 1, 1, "policy file larger than 1 MiB"))
            continue
        raw[path.name] = content
    if issues:
        raise PolicyError(issues)
    return raw


def _unreadable(name: str, exc: OSError) -> PolicyIssue:
    reason = exc.strerror or type(exc).__name__
    return PolicyIssue(name, 1, 1, f"cannot be read: {reason}",
                       "make the file readable by the gateway's user (and keep it in place while it loads)")


# Files whose empty document already means "deny everything" (no tenant, no issuer).
EMPTY_MEANS_DENY = frozenset({"access.yaml", "identity.yaml"})


def check_vanished(active: PolicySet, candidate: PolicySet) -> list[PolicyIssue]:
    """Files the active revision had content in and the candidate lacks (missing, empty,
    comments only).

    # SECURITY: an empty ``privacy.yaml``, ``pii.yaml``, ``inputs.yaml`` or ``limits.yaml``
    # means "no DP / no masking / no caps / no limits". An editor that truncates then
    # writes, a deploy that copies files one by one, or a deleted file would make that
    # live for a moment, or for good; so a hot reload refuses it and the last-known-good
    # revision keeps serving. To drop a file's protection, write it out explicitly
    # (``models: {}``). Empty ``access.yaml``/``identity.yaml`` deny everything (AUTHZ-16)
    # and stay allowed; ``flags.json`` has its own rule (``build_flags_stage``).
    """
    lost = sorted(active.documents - candidate.documents - EMPTY_MEANS_DENY - {FLAGS_FILE})
    return [PolicyIssue(name, 1, 1, "missing or empty, but the active policy has content in it "
                        "(a truncated write or a deleted file?)",
                        "restore the file; to drop its settings on purpose, write them out explicitly "
                        "(for example `models: {}`)") for name in lost]


def load_policy_bytes(raw: dict[str, bytes]) -> PolicySet:
    """Validate files already read by :func:`read_policy_dir` (and possibly verified)."""
    unknown = [PolicyIssue(name, 1, 1, f"unknown policy file; expected one of {sorted(POLICY_FILES)}",
                           _file_name_hint(name))
               for name in sorted(raw) if name != FLAGS_FILE and name not in POLICY_FILES]
    if unknown:
        raise PolicyError(unknown)
    return build_policy_set(raw)


def _file_name_hint(name: str) -> str:
    close = difflib.get_close_matches(name, [*POLICY_FILES, FLAGS_FILE], n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}? rename the file"
    return "move other files out of the policy directory (tests/ and dotfiles are ignored)"


def load_policy_dir(directory: Path) -> PolicySet:
    """Load every policy file of ``directory``; ``tests/`` and dotfiles are ignored."""
    return load_policy_bytes(read_policy_dir(directory))


def revision_of(raw: dict[str, bytes]) -> str:
    """The revision is a hash of the exact bytes, so two replicas agree on it."""
    digest = hashlib.sha256()
    for name in sorted(raw):
        digest.update(name.encode() + b"\0" + hashlib.sha256(raw[name]).digest())
    return digest.hexdigest()[:12]


def parse_yaml_document(text: str, name: str, model: type[M]) -> tuple[M, yaml.Node | None]:
    """Parse one YAML document with the policy rules (no anchors, no duplicate keys) into
    ``model``; errors are a :class:`PolicyError` located in ``name``. For files next to
    the policy, such as ``tests/*.yaml``."""
    data, node = _strict_yaml(text, name)
    parsed = _validate(model, data, node, name)
    if not isinstance(parsed, model):  # pragma: no cover - model_validate returns its own class
        raise TypeError(type(parsed).__name__)
    return parsed, node


def build_policy_set(raw: dict[str, bytes]) -> PolicySet:
    sections: dict[str, BaseModel] = {}
    nodes: dict[str, yaml.Node | None] = {}
    issues: list[PolicyIssue] = []
    documents: set[str] = set()
    for name, (field_name, model) in POLICY_FILES.items():
        content = raw.get(name)
        try:
            if content is None:
                sections[field_name] = _validate(model, {}, None, name)
                continue
            try:
                text = content.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PolicyError([PolicyIssue(name, 1, 1, "policy files must be UTF-8",
                                               "save the file as UTF-8")]) from exc
            data, nodes[name] = _strict_yaml(text, name)
            if nodes[name] is not None:
                documents.add(name)
            sections[field_name] = _validate(model, data, nodes[name], name)
        except PolicyError as exc:
            issues.extend(exc.issues)
    if issues:
        raise PolicyError(issues)
    policy = PolicySet(revision=revision_of(raw), flags_raw=raw.get(FLAGS_FILE, b""),
                       documents=frozenset(documents), **sections)  # type: ignore[arg-type]  # typed by the registry
    contradictions = check_contradictions(policy, nodes)
    if contradictions:
        raise PolicyError(contradictions)
    return policy


def check_contradictions(policy: PolicySet,
                         nodes: Mapping[str, yaml.Node | None] | None = None) -> list[PolicyIssue]:
    """Rules that span files: each would make the policy mean something its author did not.

    ``nodes`` (file name -> composed YAML) lets each issue point at the offending entry.
    """
    nodes = nodes or {}
    issues: list[PolicyIssue] = []

    def issue(file: str, loc: tuple[int | str, ...], message: str, hint: str) -> None:
        line, col = _locate(nodes.get(file), loc)
        issues.append(PolicyIssue(file, line, col, message, hint))

    exposed = set(policy.gateway.models)
    tenants = policy.access.tenants
    for name, tenant_policy in tenants.items():
        for index, model in enumerate(tenant_policy.models):
            if model not in exposed:
                issue("access.yaml", ("tenants", name, "models", index),
                      f"tenants.{name}: model {model!r} is not exposed in gateway.yaml",
                      f"add {model!r} under models: in gateway.yaml, or remove it here")
    owners: dict[str, list[str]] = {}
    for name, tenant_policy in tenants.items():
        for model in tenant_policy.models:
            owners.setdefault(model, []).append(name)
    for role, grants in policy.access.roles.items():
        for index, grant in enumerate(grants):
            for position, model in enumerate(grant.models):
                if model != "*" and model not in owners:
                    issue("access.yaml", ("roles", role, index, "models", position),
                          f"roles.{role}[{index}]: model {model!r} belongs to no tenant",
                          f"add {model!r} to a tenant's models, or remove it from this grant")
    for index, key in enumerate(policy.identity.api_keys):
        tenant = tenants.get(key.tenant)
        if tenant is None:
            issue("identity.yaml", ("api_keys", index, "tenant"), f"api_keys {key.id}: unknown tenant {key.tenant!r}",
                  f"use one of the tenants of access.yaml: {sorted(tenants)}")
        for position, role in enumerate(key.roles):
            role_grants = policy.access.roles.get(role)
            if role_grants is None:
                issue("identity.yaml", ("api_keys", index, "roles", position),
                      f"api_keys {key.id}: unknown role {role!r}",
                      f"use one of the roles of access.yaml: {sorted(policy.access.roles)}")
                continue
            if tenant is None:
                continue
            named = {m for g in role_grants if set(g.actions) & {"infer", "metadata", "*"} for m in g.models}
            if named and "*" not in named and not named & set(tenant.models):
                # SECURITY: the author meant this key to reach these models, but they belong to
                # other tenants; authorization would (rightly) refuse every call.
                foreign = ", ".join(f"{m} ({'/'.join(owners.get(m, ['no tenant']))})" for m in sorted(named))
                issue("identity.yaml", ("api_keys", index, "roles", position),
                      f"api_keys {key.id}: role {role!r} grants only models of other tenants: {foreign}",
                      f"give the key a tenant that owns these models, or add them to tenants.{key.tenant}.models "
                      "in access.yaml")
    for model, model_policy in policy.privacy.models.items():
        if model not in exposed:
            # SECURITY: a misspelt name here would leave the real model answered without noise.
            issue("privacy.yaml", ("models", model), f"models.{model}: not a model exposed in gateway.yaml",
                  f"use the exposed name ({', '.join(sorted(exposed))}); a typo releases the real model unnoised")
        adversarial = policy.inputs.adversarial.models.get(model)
        if adversarial is not None and adversarial.squeezing is not None and adversarial.mode != "off":
            # SECURITY (DP-09): squeezing compares the answer with a second upstream call's
            # raw answer; its score (audit, metrics) and its block/flag decision would
            # release un-noised, uncharged information about a DP-protected model.
            issue("inputs.yaml", ("adversarial", "models", model, "squeezing"),
                  f"adversarial.models.{model}.squeezing: {model} is DP-protected in privacy.yaml",
                  "remove squeezing for this model: its score and decision come from an un-noised second answer")
        for tenant_name in model_policy.tenants:
            if tenant_name not in tenants:
                issue("privacy.yaml", ("models", model, "tenants", tenant_name),
                      f"models.{model}.tenants.{tenant_name}: unknown tenant",
                      f"use one of the tenants of access.yaml: {sorted(tenants)}")
    for index, override in enumerate(policy.pii.roles):
        if override.role not in policy.access.roles:
            issue("pii.yaml", ("roles", index, "role"), f"roles[{index}]: unknown role {override.role!r}",
                  f"use one of the roles of access.yaml: {sorted(policy.access.roles)}")
    return issues
