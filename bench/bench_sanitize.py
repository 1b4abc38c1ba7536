"""CPU cost of input sanitizing + adversarial range/Mahalanobis checks for one 64-float request.

Builds the ``sanitize`` and ``adversarial`` stages from the shipped ``policies/inputs.yaml``
against ``triton_repo/`` and drives their ``on_request`` hooks directly (no HTTP, no
upstream) with a real held-out digit, measuring CPU time (``time.process_time``) per
request. Target (issue 4): sanitizing under 30 µs CPU for a 64-float request.

Rows printed:

- ``sanitize``: caps (+ text rules, none for a numeric input);
- ``sanitize + range + mahalanobis``: with the IN-20 range check and the Mahalanobis
  distance (the shipped digits settings), the number the target is about;
- ``adversarial per-request checks as shipped``: range, training range, grid, Mahalanobis;
- ``adversarial as shipped``: adds the stateful query-pattern detector (k-NN over 512 + 1,024
  sketches);
- ``sanitize text_echo``: one 200-character non-ASCII string through NFKC and the Cf filter.

    .venv/bin/python bench/bench_sanitize.py [--n 20000] [--json bench/out/sanitize.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import yaml

from gateway.context import Action, Principal, RequestContext
from gateway.kserve import InferRequest, Tensor
from gateway.stages.adversarial import AdversarialPolicy, InputsPolicy, build_adversarial_stage
from gateway.stages.sanitize import build_sanitize_stage, object_array

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "digits-request.json"
TARGET_US = 30.0


def _ctx(model: str) -> RequestContext:
    ctx = RequestContext(request_id="bench", revision="bench", action=Action.INFER, transport="bench",
                         client_addr="127.0.0.1", model=model)
    ctx.principal = Principal(subject="alice", tenant="acme", roles=frozenset({"analyst"}), issuer="bench",
                              credential_id="x")
    return ctx


async def _measure(n: int, step: Callable[[], Awaitable[object]]) -> float:
    for _ in range(min(n, 2000)):  # warm-up
        await step()
    start = time.process_time()
    for _ in range(n):
        await step()
    return (time.process_time() - start) / n * 1e6


async def run(n: int) -> dict[str, float]:
    policy = InputsPolicy.model_validate(yaml.safe_load((ROOT / "policies" / "inputs.yaml").read_text()))
    repo = ROOT / "triton_repo"
    sanitize = build_sanitize_stage(policy.sanitize, repo)
    shipped = build_adversarial_stage(policy.adversarial, repo, None)
    digits = policy.adversarial.models["digits"]
    range_maha = build_adversarial_stage(AdversarialPolicy(models={"digits": digits.model_copy(update={
        "query_pattern": None, "grid": None, "training_range": None})}), repo, None)
    per_request = build_adversarial_stage(
        AdversarialPolicy(models={"digits": digits.model_copy(update={"query_pattern": None})}), repo, None)

    pixels = np.asarray(json.loads(EXAMPLE.read_text())["inputs"][0]["data"], dtype=np.float32).reshape(1, 64)
    req = InferRequest("digits", "", [Tensor("pixels", "FP32", (1, 64), pixels)])
    text = ("Grüße aus Köln, ｆｕｌｌｗｉｄｔｈ and ﬁ ligatures " * 5)[:200]
    text_req = InferRequest("text_echo", "", [Tensor("text", "BYTES", (1,), object_array([text.encode()]))])

    async def sanitize_only() -> object:
        return await sanitize.on_request(_ctx("digits"), req)

    async def both() -> object:
        ctx = _ctx("digits")
        return await range_maha.on_request(ctx, await sanitize.on_request(ctx, req))

    async def checks_as_shipped() -> object:
        return await per_request.on_request(_ctx("digits"), req)

    async def as_shipped() -> object:
        return await shipped.on_request(_ctx("digits"), req)

    async def text_only() -> object:
        return await sanitize.on_request(_ctx("text_echo"), text_req)

    async def context_only() -> object:
        return _ctx("digits")

    baseline = await _measure(n, context_only)
    return {
        "n": n,
        "context_construction_us": baseline,
        "sanitize_us": await _measure(n, sanitize_only) - baseline,
        "sanitize_range_mahalanobis_us": await _measure(n, both) - baseline,
        "per_request_checks_as_shipped_us": await _measure(n, checks_as_shipped) - baseline,
        "adversarial_as_shipped_us": await _measure(n, as_shipped) - baseline,
        "sanitize_text_200_chars_us": await _measure(n, text_only) - baseline,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    result = asyncio.run(run(args.n))
    print(f"sanitize (caps, digits):                 {result['sanitize_us']:6.1f} µs CPU/request")
    print(f"sanitize + range + mahalanobis:          {result['sanitize_range_mahalanobis_us']:6.1f} µs CPU/request "
          f"(target < {TARGET_US:.0f})")
    print(f"per-request checks as shipped (4):       {result['per_request_checks_as_shipped_us']:6.1f} µs CPU/request")
    print(f"adversarial as shipped (+query pattern): {result['adversarial_as_shipped_us']:6.1f} µs CPU/request")
    print(f"sanitize text_echo, 200 chars NFKC:      {result['sanitize_text_200_chars_us']:6.1f} µs CPU/request")
    print(f"(context construction subtracted:        {result['context_construction_us']:6.1f} µs)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
