"""The policy loader under fuzz: any text, any YAML structure, any edit of the shipped
policies ends in a loaded policy or a PolicyError (the watcher keeps the last good one),
never another exception; alias bombs and deep nesting are refused with bounded memory."""

from __future__ import annotations

import copy
import tracemalloc
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gateway.policy.loader import PolicyError, build_policy_set
from gateway.policy.registry import POLICY_FILES
from security_tests.fuzz import targets
from security_tests.fuzz.corpus_examples import with_corpus
from security_tests.fuzz.profiles import fuzz_settings

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted(POLICY_FILES)


@cache
def shipped() -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((ROOT / "policies").iterdir())
            if path.is_file() and (path.name in POLICY_FILES or path.name == "flags.json")}


@cache
def vocabulary() -> list[str]:
    """Every key the shipped policies use: generated documents reach real validators."""
    keys: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                keys.add(str(key))
                walk(inner)
        elif isinstance(value, list):
            for inner in value:
                walk(inner)

    for name, raw in shipped().items():
        if name.endswith(".yaml"):
            walk(yaml.safe_load(raw))
    return sorted(keys)


def _load(raw: dict[str, bytes]) -> None:
    try:
        build_policy_set(raw)
    except PolicyError as exc:
        assert exc.issues, "a PolicyError must say why"


def test_positive_control_shipped_policies_load() -> None:
    build_policy_set(shipped())


@fuzz_settings(scale=0.5)
@given(data=st.one_of(st.binary(max_size=1024),
                      st.tuples(st.sampled_from(FILES), st.text(max_size=1024)).map(
                          lambda t: targets.frame(b"FILE", t[0].encode(), t[1].encode("utf-8", "replace")))))
@with_corpus("policy")
def test_arbitrary_policy_text(data: bytes) -> None:
    targets.policy(data)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=10), st.sampled_from(["enforce", "shadow", "deny", "allow", "*", "", "0", "-1",
                                                           "1e9", "1s", "P1D", "digits", "acme", "admin"]))


@cache
def _documents() -> st.SearchStrategy[Any]:
    keys = st.one_of(st.sampled_from(vocabulary()), st.text(max_size=6))
    return st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(keys, inner, max_size=5)), max_leaves=30)


@fuzz_settings(scale=0.5)
@given(name=st.sampled_from(FILES), doc=st.deferred(lambda: _documents()))
def test_generated_yaml_documents(name: str, doc: Any) -> None:
    """Documents built from the policies' own keys, dumped as YAML, alone in their file."""
    _load({**shipped(), name: yaml.safe_dump(doc, allow_unicode=True).encode()})


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, inner in value.items():
            found += _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += _paths(inner, (*prefix, index))
    return found


@fuzz_settings(scale=0.5)
@given(name=st.sampled_from(FILES), pick=st.integers(0, 10_000), action=st.sampled_from(["set", "delete", "add"]),
       value=SCALARS | st.deferred(lambda: _documents()))
def test_one_edit_of_the_shipped_policy(name: str, pick: int, action: str, value: Any) -> None:
    """A single edit anywhere in a real policy (what an operator's typo does): loads or PolicyError."""
    raw = shipped()
    doc = copy.deepcopy(yaml.safe_load(raw[name]) or {})
    paths = [p for p in _paths(doc) if p]
    if not paths:
        doc = {"x": value}
    else:
        path = paths[pick % len(paths)]
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        if action == "set":
            parent[path[-1]] = value
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[f"extra_{pick}"] = value
        else:
            parent.append(value)
    _load({**raw, name: yaml.safe_dump(doc, allow_unicode=True).encode()})


@pytest.mark.parametrize("seed", ["billion_laughs.yaml", "deep_nesting.yaml", "deep_block_nesting.yaml",
                                  "merge_key.yaml"])
def test_bombs_refused_with_bounded_memory(seed: str) -> None:
    data = (targets.CORPUS / "policy" / seed).read_bytes()
    name, content = targets.split_prefix(data, b"FILE")
    assert name is not None
    tracemalloc.start()
    try:
        with pytest.raises(PolicyError):
            build_policy_set({name.decode(): content})
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes"
