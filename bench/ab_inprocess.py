"""In-process A/B of gateway CPU per request: gateway and client in one process.

Why in process: on a shared 2-core machine wall-clock throughput moves with other
people's load, while the process CPU time per request of a fixed closed loop is stable
enough to compare two code trees. The figure includes the aiohttp client (roughly
constant between A and B), so compare differences, not absolute values.

Usage (alternates A and B ``--runs`` times each, prints medians):

    .venv/bin/python bench/ab_inprocess.py --a /tmp/ab/base --b . --mode auth --runs 3

``--a``/``--b`` are source trees (each with ``gateway/``, ``privacy/``, ``bench/``,
``policies/``, ``triton_repo/``); a snapshot of the tree before a change is made with e.g.
``rsync -a --exclude .venv --exclude .git ./ /tmp/ab/base/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

CHILD = r"""
import asyncio, json, sys, tempfile, time
from pathlib import Path
root, mode, loop_kind, n, conc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
sys.path.insert(0, root); sys.path.insert(0, root + "/bench")
import harness
import gateway
assert gateway.__file__.startswith(root), gateway.__file__
from aiohttp import ClientSession, TCPConnector
from aiohttp.test_utils import TestServer
from gateway.app import build_app, runner_for
from gateway.settings import Settings
from gateway.devissuer import issue_token

class S(TestServer):
    async def _make_runner(self, **kw):
        return runner_for(self.app, **kw)

async def main():
    tmp = Path(tempfile.mkdtemp())
    pol = harness.bench_policies(tmp / "p", auth_only=(mode == "auth"))
    st = Settings(policies=pol, backend="local:" + root + "/triton_repo", audit_dir=tmp / "audit",
                  state_dir=tmp / "state", dev=True)
    srv = S(build_app(st))
    await srv.start_server()
    tok = issue_token(st.state_dir, sub="bench", tenant="acme", roles=["analyst"])
    mix = harness.workload()
    h = {"Authorization": "Bearer " + tok, "Content-Type": "application/json"}
    async with ClientSession(connector=TCPConnector(limit=0)) as s:
        async def worker(k, count):
            for i in range(count):
                p, b = mix[(k * 1000 + i) % len(mix)]
                async with s.post(srv.make_url(p), data=b, headers=h) as r:
                    await r.read()
                    assert r.status == 200, (r.status, await r.text())
        await asyncio.gather(*(worker(k, 50) for k in range(conc)))
        c0 = time.process_time(); t0 = time.perf_counter()
        await asyncio.gather(*(worker(k + 100, n // conc) for k in range(conc)))
        c1 = time.process_time(); t1 = time.perf_counter()
    await srv.close()
    return (c1 - c0) / n * 1e6, n / (t1 - t0)

if loop_kind == "uvloop":
    import uvloop
    cpu, rps = uvloop.run(main())
else:
    cpu, rps = asyncio.run(main())
print(json.dumps({"cpu_us": cpu, "rps": rps}))
"""


def run_one(root: Path, mode: str, loop: str, n: int, conc: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(root.resolve()), mode, loop, str(n), str(conc)],
        check=True, capture_output=True, text=True, cwd=str(root),
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="baseline tree")
    parser.add_argument("--b", type=Path, default=Path(), help="candidate tree")
    parser.add_argument("--mode", choices=("auth", "full"), default="auth")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--conc", type=int, default=8)
    args = parser.parse_args()
    samples: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    for i in range(args.runs):
        for side in ("A", "B") if i % 2 == 0 else ("B", "A"):
            r = run_one(args.a if side == "A" else args.b, args.mode, args.loop, args.n, args.conc)
            samples[side].append(r)
            print(f"run {i} {side}: {r['cpu_us']:.0f} us CPU/req, {r['rps']:.0f} req/s", flush=True)
    summary: dict[str, Any] = {}
    for side, rows in samples.items():
        summary[side] = {
            "median_cpu_us": statistics.median(r["cpu_us"] for r in rows),
            "min_cpu_us": min(r["cpu_us"] for r in rows),  # noise only adds CPU: the minimum is informative too
            "cpu_us": [round(r["cpu_us"]) for r in rows],
            "median_rps": statistics.median(r["rps"] for r in rows),
        }
    a, b = summary["A"]["median_cpu_us"], summary["B"]["median_cpu_us"]
    summary["delta_pct"] = (b - a) / a * 100
    print(json.dumps({"mode": args.mode, "loop": args.loop, **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
