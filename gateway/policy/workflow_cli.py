"""``infergate policy schema|test|diff``: the security team's workflow around ``check``.

Argument parsing and exit codes only; the work is in :mod:`gateway.policy.jsonschema`,
:mod:`gateway.policy.testing` and :mod:`gateway.policy.diff`.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _schema(args: argparse.Namespace) -> int:
    """Generate policies/schema/*.schema.json from the policy models. Exit 1 with --check when
    the files differ from a fresh generation."""
    from gateway.policy import jsonschema

    out = Path(args.out)
    if args.check:
        problems = jsonschema.stale(out)
        for problem in problems:
            print(f"{out}/{problem}", file=sys.stderr)
        if problems:
            print(f"the JSON schemas are out of date; run: {jsonschema.REGENERATE_COMMAND}", file=sys.stderr)
            return 1
        print(f"ok: {out} is up to date")
        return 0
    for path in jsonschema.write(out):
        print(f"wrote {path}")
    return 0


def _test(args: argparse.Namespace) -> int:
    """Run policy unit tests like `opa test`: each case's principal and request go through the
    real compiled stages and the embedded model server. Exit 0 when every case passes, 1
    otherwise (failed case, unreadable test file, invalid policy)."""
    from gateway.policy.testing import report, run_suite
    from gateway.upstream.embedded import EmbeddedUpstream

    policy_dir = Path(args.dir)
    tests_dir = Path(args.tests) if args.tests else policy_dir / "tests"
    only = re.compile(args.run) if args.run else None

    async def run() -> Any:
        upstream = EmbeddedUpstream(Path(args.repo), workers=1)
        await upstream.start()
        try:
            return await run_suite(policy_dir, tests_dir, upstream, repo_dir=Path(args.repo), only=only)
        finally:
            await upstream.close()

    result = asyncio.run(run())
    report(result, sys.stdout, verbose=args.verbose)
    return 0 if result.ok else 1


def _diff(args: argparse.Namespace) -> int:
    """Compare two policy directories: effective permissions per tenant, role, model and action,
    then every other setting with whether it weakens or strengthens security. Exit status like
    diff(1): 0 no difference, 1 differences, 2 a policy is invalid."""
    from gateway.policy.diff import diff_dirs, render
    from gateway.policy.loader import PolicyError

    try:
        changes = diff_dirs(Path(args.old), Path(args.new))
    except PolicyError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return 2
    print(render(changes), end="")
    return 1 if changes else 0


def _command(policy_sub: Any, name: str, handler: Callable[[argparse.Namespace], int], summary: str) -> Any:
    """A subcommand whose ``--help`` description is its handler's docstring, so the text that
    explains the exit codes lives next to the code that returns them."""
    parser = policy_sub.add_parser(name, help=summary, description=handler.__doc__)
    parser.set_defaults(func=handler)
    return parser


def add_workflow_commands(policy_sub: Any) -> None:
    """Add ``schema``, ``test`` and ``diff`` to the ``infergate policy`` subparsers."""
    schema = _command(policy_sub, "schema", _schema, "write the JSON Schemas of the policy files (for editors and CI)")
    schema.add_argument("--out", default="policies/schema", help="directory (default policies/schema)")
    schema.add_argument("--check", action="store_true", help="compare instead of writing")

    test = _command(policy_sub, "test", _test,
                    "run the policy unit tests (DIR/tests/*.yaml) through the compiled pipeline")
    test.add_argument("dir", help="policy directory")
    test.add_argument("--tests", default=None, help="test directory (default DIR/tests)")
    test.add_argument("--repo", default="triton_repo", help="model repository for the embedded upstream")
    test.add_argument("--run", default=None, metavar="REGEX", help="only cases whose name matches")
    test.add_argument("-v", "--verbose", action="store_true", help="every case, with what the stages did")

    diff = _command(policy_sub, "diff", _diff, "what a policy change grants or removes, for a reviewer")
    diff.add_argument("old", help="policy directory before the change")
    diff.add_argument("new", help="policy directory after the change")
