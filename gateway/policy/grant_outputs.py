"""``policy check`` of per-grant ``outputs:`` lists against the models' own configs.

A misspelt output name in an allowlist would not leak anything (nothing matches it), but
it would silently withhold what the author meant to release, or leave a model callable
with nothing to return. Where a model's ``config.pbtxt`` is in the repository the gateway
knows (``--profiles``, or the embedded backend's repository) the names are checked;
models served only by a remote upstream cannot be checked here, and a request then gets
the clear 403 of the authorization stage instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gateway.policy.schema import AccessPolicy

# model name -> its declared outputs, or None when its config is not known here.
DeclaredOutputs = Callable[[str], frozenset[str] | None]


def repo_outputs(repo_dir: Path) -> DeclaredOutputs:
    """Declared outputs read from ``repo_dir/<model>/config.pbtxt`` (cached per model)."""
    cache: dict[str, frozenset[str] | None] = {}

    def lookup(model: str) -> frozenset[str] | None:
        if model not in cache:
            cache[model] = _read(repo_dir, model)
        return cache[model]

    return lookup


def _read(repo_dir: Path, model: str) -> frozenset[str] | None:
    if not (repo_dir / model / "config.pbtxt").is_file():
        return None
    # Imported here: the repository reader pulls in Triton's protobufs, needed only at build.
    from gateway.upstream.model_repo import ModelRepoError, parse_config

    try:
        config = parse_config(repo_dir / model / "config.pbtxt")
    except ModelRepoError:
        return None  # the backend reports a broken config itself; not this check's concern
    return frozenset(str(out.name) for out in config.output)


def check_grant_outputs(policy: AccessPolicy, declared: DeclaredOutputs) -> list[tuple[str, str]]:
    """(message, hint) for every ``outputs:`` entry the known model configs contradict."""
    every_model = sorted({m for tenant in policy.tenants.values() for m in tenant.models})
    problems: list[tuple[str, str]] = []
    for role, grants in policy.roles.items():
        for index, grant in enumerate(grants):
            if grant.outputs is None:
                continue
            where = f"roles.{role}[{index}].outputs"
            models = every_model if "*" in grant.models else sorted(set(grant.models))
            known = {model: outs for model in models if (outs := declared(model)) is not None}
            if len(known) == len(models) and known:
                declared_anywhere = frozenset().union(*known.values())
                for name in grant.outputs:
                    if name not in declared_anywhere:
                        listing = "; ".join(f"{m}: {', '.join(sorted(o))}" for m, o in sorted(known.items()))
                        problems.append((f"{where}: {name!r} is not an output of any model of this grant",
                                         f"use the names of the models' config.pbtxt ({listing})"))
            if "*" in grant.models:
                continue  # "label wherever a model has one": models without it are the author's choice
            for model, outs in sorted(known.items()):
                if not outs & set(grant.outputs):
                    problems.append((
                        f"{where}: none of the listed outputs belongs to {model!r}, so this grant would let the "
                        "role call it and receive nothing",
                        f"add one of {model}'s outputs ({', '.join(sorted(outs))}), or move {model!r} to a grant "
                        "of its own"))
    return problems
