"""CPU cost of refusing hostile JSON bodies (IN-03, IN-08 and regex bait) in the V2 codec.

tests/fronts/test_http_codec.py checks *why* these refusals are cheap (the recursive
parser never sees a deep body, ``int()`` never sees an over-long literal); this prints
*how* cheap, per body, as the median CPU time (``time.process_time``) of ``--runs``
refusals. The bodies are the test's own (``HOSTILE_JSON``). Measured (session 5, busy
2-core VM): ~0.2 ms for 100 kB of digits, ~1.6 ms for 100k levels, 25-35 ms for the 4 MB
bodies: linear passes over the bytes; the test this replaced allowed 100 ms wall.

    .venv/bin/python bench/bench_hostile.py [--runs 15] [--json bench/out/hostile.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.errors import MalformedRequest  # noqa: E402
from gateway.fronts.http.codec import CodecLimits, decode_infer_request  # noqa: E402
from tests.fronts.test_http_codec import HOSTILE_JSON  # noqa: E402


def refusal_cpu_ms(body: bytes, runs: int) -> tuple[float, str]:
    """Median CPU milliseconds to refuse ``body``, and the refusal's reason."""
    limits = CodecLimits()
    samples: list[float] = []
    reason = ""
    for _ in range(runs + 1):  # the first run warms caches (decoder, regexes) and is dropped
        start = time.process_time()
        try:
            decode_infer_request("m", "1", body, header_length=None, limits=limits)
        except MalformedRequest as exc:
            reason = exc.reason
        else:
            reason = "ACCEPTED (not refused!)"
        samples.append((time.process_time() - start) * 1000)
    return statistics.median(samples[1:]), reason


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    result: dict[str, dict[str, float | str]] = {}
    for name, body in HOSTILE_JSON.items():
        ms, reason = refusal_cpu_ms(body, args.runs)
        result[name] = {"bytes": len(body), "cpu_ms": round(ms, 3), "reason": reason}
        print(f"{name:30s} {len(body):>10,d} B  {ms:8.3f} ms CPU (median of {args.runs})  {reason}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
