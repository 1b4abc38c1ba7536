"""Replay the committed corpus as explicit hypothesis examples (run first, every profile)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import example

from security_tests.fuzz.targets import corpus_entries

F = TypeVar("F", bound=Callable[..., Any])


def with_corpus(target: str, argument: str = "data", **fixed: Any) -> Callable[[F], F]:
    """Decorate a ``@given(data=...)`` test with one ``@example`` per seed of ``target``
    (``fixed`` gives the test's other arguments for these examples)."""
    seeds = corpus_entries(target)
    if not seeds:
        raise RuntimeError(f"security_tests/corpus/{target}/ has no seed files")

    def decorate(test: F) -> F:
        for seed in reversed(seeds):
            test = example(**{argument: seed}, **fixed)(test)
        return test

    return decorate
