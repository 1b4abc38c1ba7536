"""CPU per inference call of the gRPC upstream, against the bare tritonclient floor.

Two clients send the same requests, one at a time, to one real MLServer (``triton_repo``):

- ``bare``: ``tritonclient.grpc.aio.InferenceServerClient.infer`` with ``InferInput``s
  built once beforehand and nothing done with the result (the floor: what the client
  library itself costs);
- ``upstream``: :class:`gateway.upstream.triton_grpc.TritonGrpcUpstream.infer` with a
  gateway :class:`~gateway.kserve.InferRequest` (input conversion, metadata-checked
  response decoding, output arrays), i.e. what the gateway pays per call on top of it.

Requests: ``digits`` (FP32 1x64 → 1x10) and ``text_echo`` (BYTES, one 1 KB text). CPU is
this process's time (all threads: gRPC's poller included) per call; each row is the median
of ``--repeat`` alternating rounds (the machine is shared: compare CPU, not wall time).

    .venv/bin/python bench/bench_upstream.py [--n 2000] [--repeat 5] [--grpc-url host:port]
        [--root /tmp/ab/base]     # measure another tree's gateway package (A/B)
        [--only upstream --model digits --rounds 1]   # fixed loop, e.g. under callgrind

Without ``--grpc-url`` an MLServer is started (``tests/support/mlserver.py``) and stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

DIGIT_ZERO = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8,
              8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13,
              10, 0, 0, 0]
TEXT = ("Dear team, please contact Jane at jane.doe@example.com about invoice 4471; " * 14)[:1024].encode()


def _arrays(model: str) -> tuple[str, str, np.ndarray]:
    if model == "digits":
        return "pixels", "FP32", np.asarray([DIGIT_ZERO], dtype=np.float32)
    array = np.empty(1, dtype=np.object_)
    array[0] = TEXT
    return "text", "BYTES", array


def _bare(client: Any, model: str) -> Any:
    import tritonclient.grpc.aio as tgrpc_aio

    name, datatype, array = _arrays(model)
    tensor = tgrpc_aio.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    inputs = [tensor]
    return lambda: client.infer(model, inputs)


def _upstream(upstream: Any, model: str) -> Any:
    from gateway.kserve import InferRequest, Tensor

    name, datatype, array = _arrays(model)
    request = InferRequest(model=model, version="", inputs=[Tensor(name, datatype, array.shape, array)],
                           id="bench-1", traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    return lambda: upstream.infer(request, timeout_s=10.0)


async def _round(call: Any, n: int) -> float:
    cpu0 = time.process_time()
    for _ in range(n):
        await call()
    return (time.process_time() - cpu0) * 1e6 / n


async def run(url: str, n: int, repeat: int, only: set[str], models: list[str]) -> dict[str, list[float]]:
    import tritonclient.grpc.aio as tgrpc_aio

    from gateway.upstream.triton_grpc import TritonGrpcUpstream

    client = tgrpc_aio.InferenceServerClient(url)
    upstream = TritonGrpcUpstream(url)
    await upstream.start()
    calls = {}
    for model in models:
        if "bare" in only:
            calls[f"bare {model}"] = _bare(client, model)
        if "upstream" in only:
            calls[f"upstream {model}"] = _upstream(upstream, model)
    try:
        for call in calls.values():  # warm-up: connections, metadata cache, code paths
            for _ in range(50):
                await call()
        results: dict[str, list[float]] = {key: [] for key in calls}
        for _ in range(repeat):
            for key, call in calls.items():
                results[key].append(await _round(call, n))
        return results
    finally:
        await upstream.close()
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="calls per round")
    parser.add_argument("--repeat", type=int, default=5, help="alternating rounds (median reported)")
    parser.add_argument("--grpc-url", default=None)
    parser.add_argument("--root", type=Path, default=ROOT, help="tree whose gateway package is measured")
    parser.add_argument("--only", default="bare,upstream")
    parser.add_argument("--model", default="digits,text_echo")
    args = parser.parse_args()
    sys.path.insert(0, str(args.root.resolve()))
    sys.path.insert(1, str(ROOT))
    only, models = set(args.only.split(",")), args.model.split(",")

    server = None
    url = args.grpc_url
    if url is None:
        from tests.support.mlserver import start_mlserver

        server = start_mlserver(ROOT / "triton_repo", Path(tempfile.mkdtemp(prefix="bench-upstream-")))
        url = server.grpc_url
    try:
        results = asyncio.run(run(url, args.n, args.repeat, only, models))
    finally:
        if server is not None:
            server.stop()
    print(f"gateway package from {args.root}; {args.n} calls x {args.repeat} rounds, CPU µs per call")
    print(f"{'client':<22} {'median':>8} {'min':>8} {'max':>8}")
    for key, values in results.items():
        print(f"{key:<22} {statistics.median(values):>8.0f} {min(values):>8.0f} {max(values):>8.0f}")


if __name__ == "__main__":
    main()
