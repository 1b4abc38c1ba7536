"""CPU cost of authentication + authorization per request with a cached token.

Runs the real pipeline of the shipped policies (dev issuer, RBAC) through ``admit`` and
prints CPU microseconds per call: first call (signature verification) and cached calls.
Target (issue: identity and access): under 50 µs CPU per request with a cached token.

    .venv/bin/python bench/bench_auth.py [--n 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from gateway.context import Action, RequestContext
from gateway.devissuer import issue_token, trusted_dev_issuer
from gateway.observability.metrics import Metrics
from gateway.policy.compile import CompileEnv, compile_pipeline
from gateway.policy.loader import load_policy_dir

ROOT = Path(__file__).resolve().parent.parent


async def run(n: int) -> dict[str, float]:
    state = Path(tempfile.mkdtemp())
    pipeline = compile_pipeline(load_policy_dir(ROOT / "policies"), Metrics(),
                                CompileEnv(extra_issuers=(trusted_dev_issuer(state),), repo_dir=ROOT / "triton_repo",
                                           pii_hmac_key=bytes(32), pii_token_key=bytes(32)))
    token = issue_token(state, sub="alice", tenant="acme", roles=["analyst"])

    def ctx() -> RequestContext:
        c = RequestContext(request_id="r", revision=pipeline.revision, action=Action.INFER, transport="bench",
                           client_addr="127.0.0.1", model="digits")
        c.bearer = token
        return c

    start = time.process_time()
    await pipeline.admit(ctx())
    first = time.process_time() - start
    for _ in range(1000):  # warm-up
        await pipeline.admit(ctx())
    start = time.process_time()
    for _ in range(n):
        await pipeline.admit(ctx())
    cached = (time.process_time() - start) / n
    return {"first_call_us": first * 1e6, "cached_us_per_request": cached * 1e6, "n": n}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20_000)
    result = asyncio.run(run(parser.parse_args().n))
    print(f"authn+authz, first call (EdDSA verify): {result['first_call_us']:.0f} µs CPU")
    print(f"authn+authz, cached token:              {result['cached_us_per_request']:.1f} µs CPU/request "
          f"(target < 50)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
