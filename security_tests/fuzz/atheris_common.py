"""Run one fuzz target of :mod:`security_tests.fuzz.targets` under atheris (libFuzzer).

Local use, with a time budget, over the committed corpus::

    .venv/bin/python -m security_tests.fuzz.atheris_http_infer --seconds 600
    .venv/bin/python -m security_tests.fuzz.atheris_jwt --seconds 60 -- -jobs=2

New interesting inputs go to ``.cache/fuzz/<target>/corpus`` (not committed), crashes to
``.cache/fuzz/<target>/artifacts``. A crash is any exception other than the refusals the
target accepts (GatewayError, PolicyError) or a failed property: minimize it, copy it into
``security_tests/corpus/<target>/crash_<what>``, and the hypothesis suite replays it in CI.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import atheris  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]


def run(target: str, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=f"atheris fuzzing of the {target} target")
    parser.add_argument("--seconds", type=int, default=60, help="time budget (default 60)")
    parser.add_argument("--replay-only", action="store_true", help="run the corpus once and stop")
    parser.add_argument("libfuzzer", nargs="*", help="extra libFuzzer flags (after --)")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])

    # Instrument the gateway's own code (coverage feedback) before anything imports it.
    with atheris.instrument_imports(include=["gateway", "privacy", "jwt", "yaml"]):
        from security_tests.fuzz import targets

    function: Callable[[bytes], object] = targets.TARGET_FUNCTIONS[target]
    work = ROOT / ".cache" / "fuzz" / target
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    (work / "artifacts").mkdir(parents=True, exist_ok=True)
    budget = ["-runs=0"] if args.replay_only else [f"-max_total_time={args.seconds}"]
    flags = [sys.argv[0], *budget, "-timeout=10", "-rss_limit_mb=2048", "-max_len=65536",
             f"-artifact_prefix={work / 'artifacts'}/", *args.libfuzzer,
             str(work / "corpus"), str(targets.CORPUS / target)]

    def one_input(data: bytes) -> None:
        function(data)

    atheris.Setup(flags, one_input)
    atheris.Fuzz()
