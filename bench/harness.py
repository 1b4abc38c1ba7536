"""Side by side, in one run on one machine: what the gateway costs against its baselines.

Scenarios (all on loopback, the same request mix, the same upstream models):

1. ``mlserver-http`` / ``mlserver-grpc`` / ``embedded``: the upstream alone (Seldon MLServer
   serving ``triton_repo/`` over HTTP and gRPC; the embedded onnxruntime backend in process);
2. ``nginx``: nginx as a plain reverse proxy in front of MLServer's HTTP port (the C floor);
3. ``aiohttp-proxy``: a bare aiohttp passthrough proxy (``bench/passthrough.py``, the Python floor);
4. ``gateway-auth``: the gateway with authentication and authorization only (no limits,
   detectors, PII or DP; tensor parsing and structural checks always run) over gRPC to MLServer;
5. ``gateway-full``: every stage on (JWT, RBAC, Redis limits, sanitizing, adversarial
   checks, PII on 1 KB texts, DP noise, audit with fsync, metrics) over gRPC to MLServer;
   plus ``gateway-full-embedded`` (the newcomer's default backend) and
   ``gateway-full-2w`` (two worker processes sharing Redis).

The mix cycles through distinct real inputs (every ``digits`` and ``risk`` test row, 1 KB
texts with PII from the PII corpus), so detectors and DP caches see realistic traffic.
The shipped policies are used with rates, quotas and the DP budget raised so that the
limiter and the ledger run on every request but never refuse (refusals would be cheaper).

For each HTTP scenario, wrk (closed loop) at 1/16/64 connections gives req/s, p50/p99 and
CPU microseconds per request of every process involved (from ``/proc``: the robust figure
on a shared machine). An open-loop paced run at half of the full gateway's saturation
gives the latency each layer adds. Finally the 2-worker gateway is checked for exact
limits: a quota of Q requests admits exactly Q across both processes.

    make bench                       # installs wrk and nginx-light (apt) if missing
    .venv/bin/python bench/harness.py [--duration 5] [--quick] [--only gateway-full,nginx]

Prints a table and writes ``bench/results/harness.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from privacy.training.scripts import load_script  # noqa: E402
from tests.support.gateway_proc import GatewayProcess, free_port, start_gateway  # noqa: E402
from tests.support.mlserver import MLServerProcess, start_mlserver  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "harness.json"
TICK = os.sysconf("SC_CLK_TCK")
CONNECTIONS = (1, 16, 64)
BIG = 10**9


# --------------------------------------------------------------------------- workload


def _build_models() -> Any:
    return load_script("infergate_build_models_bench", ROOT / "tools" / "build_models.py")


def _texts(count: int, size: int = 1024) -> list[str]:
    """1 KB texts made of consecutive corpus lines (PII included), cut on a line boundary."""
    with (ROOT / "bench" / "data" / "pii_corpus.jsonl").open(encoding="utf-8") as corpus:
        lines = [json.loads(line)["text"] for line in corpus]
    texts, current = [], ""
    for line in lines:
        if len(current) + len(line) + 1 > size:
            texts.append(current)
            current = ""
            if len(texts) == count:
                break
        current = f"{current} {line}" if current else line
    return texts


def workload() -> list[tuple[str, bytes]]:
    """The request mix: digits, text_echo and risk interleaved, every body distinct."""
    build = _build_models()
    _, digits_x, _, _ = build.load_digits_split()
    _, risk_x, _, _ = build.load_risk_split()
    texts = _texts(len(digits_x))
    mix: list[tuple[str, bytes]] = []
    for i in range(max(len(digits_x), len(risk_x))):
        d = digits_x[i % len(digits_x)]
        r = risk_x[i % len(risk_x)]
        t = texts[i % len(texts)]
        mix.append(("/v2/models/digits/infer", json.dumps({"inputs": [
            {"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [float(v) for v in d]}]}).encode()))
        mix.append(("/v2/models/text_echo/infer", json.dumps({"inputs": [
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": [t]}]}).encode()))
        mix.append(("/v2/models/risk/infer", json.dumps({"inputs": [
            {"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [float(v) for v in r]}]}).encode()))
    return mix


def wrk_script(mix: list[tuple[str, bytes]], token: str, path: Path) -> Path:
    """A wrk Lua script cycling through the mix; ``done`` prints one JSON line."""
    rows = ",\n".join(f"{{[==[{p}]==], [==[{b.decode()}]==]}}" for p, b in mix)
    path.write_text(
        f"local reqs = {{\n{rows}\n}}\n"
        "local i = 0\n"
        f'local hdrs = {{["Content-Type"] = "application/json", ["Authorization"] = "Bearer {token}"}}\n'
        "request = function()\n  i = i % #reqs + 1\n"
        '  return wrk.format("POST", reqs[i][1], hdrs, reqs[i][2])\nend\n'
        # Refusals by status, so a run that sheds load is told apart from one that answers.
        "local threads = {}\nsetup = function(t) table.insert(threads, t) end\n"
        "n429 = 0\nn503 = 0\nn4xx = 0\nn5xx = 0\n"
        "response = function(status, headers, body)\n"
        "  if status == 429 then n429 = n429 + 1 elseif status == 503 then n503 = n503 + 1\n"
        "  elseif status >= 500 then n5xx = n5xx + 1 elseif status >= 400 then n4xx = n4xx + 1 end\nend\n"
        "done = function(s, lat, req)\n"
        "  local c = {0, 0, 0, 0}\n"
        "  for _, t in ipairs(threads) do\n"
        '    c[1] = c[1] + t:get("n429"); c[2] = c[2] + t:get("n503")\n'
        '    c[3] = c[3] + t:get("n4xx"); c[4] = c[4] + t:get("n5xx")\n  end\n'
        '  io.write(string.format("WRKJSON {\\"requests\\":%d,\\"duration_us\\":%d,\\"status_errors\\":%d,'
        '\\"socket_errors\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d,\\"statuses\\":{\\"429\\":%d,\\"503\\":%d,'
        '\\"other_4xx\\":%d,\\"other_5xx\\":%d}}\\n", s.requests, s.duration, s.errors.status,'
        " s.errors.connect + s.errors.read + s.errors.write + s.errors.timeout,"
        " lat:percentile(50), lat:percentile(99), c[1], c[2], c[3], c[4]))\nend\n",
        encoding="utf-8",
    )
    return path


# --------------------------------------------------------------------------- CPU accounting


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds) for every live process."""
    table: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK)
    return table


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its live descendants (a gateway with workers is a tree)."""
    table = _proc_table()
    total, frontier = 0.0, [pid]
    while frontier:
        current = frontier.pop()
        if current in table:
            total += table[current][1]
        frontier.extend(p for p, (ppid, _) in table.items() if ppid == current)
    return total


@dataclass
class Row:
    scenario: str
    connections: int
    req_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu_us_per_req: dict[str, float] = field(default_factory=dict)
    ok_per_s: float = 0.0  # answers that were not errors (refusals are cheaper than answers)
    statuses: dict[str, int] = field(default_factory=dict)  # refusals by status


def _run_wrk(url: str, script: Path, connections: int, duration: float, pids: dict[str, int]) -> Row | None:
    before = {name: tree_cpu(pid) for name, pid in pids.items()}
    proc = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s", "-s", str(script), url],
        capture_output=True, text=True, timeout=duration + 60, check=False,
    )
    after = {name: tree_cpu(pid) for name, pid in pids.items()}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        print(f"  wrk failed: {proc.stdout[-500:]} {proc.stderr[-500:]}", file=sys.stderr)
        return None
    data = json.loads(line[len("WRKJSON "):])
    n = max(1, data["requests"])
    return Row(
        scenario="", connections=connections,
        req_per_s=data["requests"] / (data["duration_us"] / 1e6),
        ok_per_s=max(0, data["requests"] - data["status_errors"] - data["socket_errors"]) / (data["duration_us"] / 1e6),
        p50_ms=data["p50_us"] / 1000, p99_ms=data["p99_us"] / 1000,
        requests=data["requests"], errors=data["status_errors"] + data["socket_errors"],
        cpu_us_per_req={name: (after[name] - before[name]) * 1e6 / n for name in pids},
        statuses={k: v for k, v in data.get("statuses", {}).items() if v},
    )


def wrk_scenario(name: str, url: str, script: Path, pids: dict[str, int], duration: float,
                 connections: tuple[int, ...]) -> list[Row]:
    # Warm-up: connection pools, caches, JIT-free but page-cache and allocator warm.
    _run_wrk(url, script, 4, min(2.0, duration), pids)
    rows = []
    for c in connections:
        row = _run_wrk(url, script, c, duration, pids)
        if row is not None:
            row.scenario = name
            rows.append(row)
            print(f"  {name:24s} c={c:<3d} {row.req_per_s:8.0f} req/s  p50 {row.p50_ms:7.2f} ms  "
                  f"p99 {row.p99_ms:7.2f} ms  errors {row.errors}{row.statuses or ''}  CPU µs/req "
                  + ", ".join(f"{k} {v:.0f}" for k, v in row.cpu_us_per_req.items()), flush=True)
    return rows


# --------------------------------------------------------------------------- open-loop latency


async def _paced(url: str, mix: list[tuple[str, bytes]], token: str, rate: float, duration: float) -> dict[str, float]:
    """Send at a fixed rate whatever the answers do; latency counts from the scheduled time
    (no coordinated omission)."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(i: int, scheduled: float) -> None:
            nonlocal errors
            path, body = mix[i % len(mix)]
            try:
                async with session.post(url + path, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - scheduled)

        total = int(rate * duration)
        start = time.perf_counter() + 0.05
        tasks = []
        for i in range(total):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, scheduled)))
        await asyncio.gather(*tasks)
    latencies.sort()
    return {"rate": rate, "requests": total, "errors": errors,
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}


# --------------------------------------------------------------------------- in-process upstream runs


async def _closed_loop(name: str, items: list[Any], call: Callable[[Any], Awaitable[Any]], concurrency: int,
                       duration: float, pids: dict[str, int]) -> Row:
    """``concurrency`` callers back to back for ``duration`` s; CPU of this process and of ``pids``."""
    latencies: list[float] = []
    deadline = time.perf_counter() + duration

    async def worker(offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await call(items[i % len(items)])
            latencies.append(time.perf_counter() - t0)
            i += concurrency

    before, cpu0, t0 = {k: tree_cpu(p) for k, p in pids.items()}, time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    done = len(latencies)
    per_req = {k: (tree_cpu(p) - before[k]) * 1e6 / done for k, p in pids.items()}
    latencies.sort()
    return Row(name, concurrency, done / wall, 1000 * latencies[done // 2], 1000 * latencies[int(done * 0.99)],
               done, 0, {**per_req, "this process": cpu * 1e6 / done})


async def _embedded_alone(mix: list[tuple[str, bytes]], concurrency: int, duration: float) -> Row:
    from gateway.fronts.http.codec import CodecLimits, decode_infer_request
    from gateway.upstream.embedded import EmbeddedUpstream

    upstream = EmbeddedUpstream(ROOT / "triton_repo")
    await upstream.start()
    requests = [decode_infer_request(p.split("/")[3], "", b, header_length=None, limits=CodecLimits())
                for p, b in mix]
    try:
        return await _closed_loop("embedded", requests, lambda r: upstream.infer(r, timeout_s=10.0), concurrency,
                                  duration, {})
    finally:
        await upstream.close()


async def _mlserver_grpc_alone(grpc_url: str, mix: list[tuple[str, bytes]], concurrency: int, duration: float,
                               server_pid: int) -> Row:
    import tritonclient.grpc.aio as grpcclient

    def inputs(path: str, body: bytes) -> tuple[str, list[Any]]:
        model = path.split("/")[3]
        spec = json.loads(body)["inputs"][0]
        if spec["datatype"] == "BYTES":
            arr = np.array([s.encode() for s in spec["data"]], dtype=np.object_)
        else:
            arr = np.asarray(spec["data"], dtype=np.float32).reshape(spec["shape"])
        tensor = grpcclient.InferInput(spec["name"], list(arr.shape), spec["datatype"])
        tensor.set_data_from_numpy(arr)
        return model, [tensor]

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        return await _closed_loop("mlserver-grpc", [inputs(p, b) for p, b in mix],
                                  lambda item: client.infer(item[0], item[1]), concurrency, duration,
                                  {"mlserver": server_pid})
    finally:
        await client.close()


# --------------------------------------------------------------------------- processes under test


def bench_policies(target: Path, *, auth_only: bool, quota: int | None = None) -> Path:
    """The shipped policies with limits that never refuse (or nothing but authn/authz)."""
    shutil.copytree(ROOT / "policies", target, ignore=shutil.ignore_patterns("tests", "schema"))

    def edit(name: str, change: Any) -> None:
        path = target / name
        doc = yaml.safe_load(path.read_text())
        change(doc)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))

    def limits(doc: dict[str, Any]) -> None:
        if auth_only:
            doc["limits"] = []
            doc.pop("pre_auth", None)
            return
        doc["pre_auth"].update(rate=BIG, burst=BIG)
        for rule in doc["limits"]:
            for key in ("rate", "burst"):
                if key in rule:
                    rule[key] = BIG
            if rule["kind"] == "quota":
                rule["limit"] = quota if quota is not None else BIG
            elif rule["kind"] == "concurrency":
                rule["limit"] = 100_000
            elif rule["kind"] == "cost":
                rule["limit"] = BIG * 1000

    edit("limits.yaml", limits)
    if auth_only:
        edit("inputs.yaml", lambda d: d["adversarial"].update(models={}))
        edit("pii.yaml", lambda d: (d.update(entities={}, roles=[])))
        edit("privacy.yaml", lambda d: d.update(models={}))
    else:
        def privacy(doc: dict[str, Any]) -> None:
            # The budget is capped by the schema (ε ≤ 1000): a tiny ε per row gives 100 000 rows.
            for model in doc["models"].values():
                model["budget"]["epsilon"] = 1000.0
                for output in model["outputs"].values():
                    output["epsilon"] = 0.01

        edit("privacy.yaml", privacy)
    return target


@contextlib.contextmanager
def nginx(upstream_http: str, workdir: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    host, upstream_port = upstream_http.replace("http://", "").split(":")
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/body;
  proxy_temp_path {workdir}/proxy;
  upstream backend {{ server {host}:{upstream_port}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 8m;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with _serving(proc, port) as served:
        yield served


@contextlib.contextmanager
def passthrough(upstream_http: str) -> Iterator[tuple[str, int]]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "passthrough.py"), "--listen", f"127.0.0.1:{port}",
                             "--upstream", upstream_http], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with _serving(proc, port) as served:
        yield served


@contextlib.contextmanager
def _serving(proc: subprocess.Popen[bytes], port: int) -> Iterator[tuple[str, int]]:
    """A started server process: its URL and pid once the port answers, stopped on exit."""
    try:
        _wait_port(port)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_port(port: int, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


@contextlib.contextmanager
def gateway(workdir: Path, backend: str, policies: Path, extra: list[str]) -> Iterator[GatewayProcess]:
    workdir.mkdir(parents=True, exist_ok=True)
    gw = start_gateway(workdir, backend=backend, policies=policies, extra=["--log-level", "warning", *extra])
    try:
        yield gw
    finally:
        gw.stop()


# --------------------------------------------------------------------------- exact limits, 2 workers


async def _exact_quota(url: str, token: str, body: bytes, total: int, concurrency: int) -> dict[str, int]:
    import aiohttp

    counts: dict[str, int] = {}
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    queue = list(range(total))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:

        async def worker() -> None:
            while queue:
                queue.pop()
                async with session.post(url + "/v2/models/text_echo/infer", data=body, headers=headers) as resp:
                    await resp.read()
                    counts[str(resp.status)] = counts.get(str(resp.status), 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--quick", action="store_true", help="1 s runs at 16 connections only (a smoke run)")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--connections", default="", help="comma-separated wrk connection counts (default 1,16,64)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    duration = 1.0 if args.quick else args.duration
    connections: tuple[int, ...] = (16,) if args.quick else CONNECTIONS
    if args.connections:
        connections = tuple(int(c) for c in args.connections.split(","))
    only = {s for s in args.only.split(",") if s}

    def wanted(name: str) -> bool:
        return not only or name in only

    for tool in ("wrk", "nginx", "redis-server"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: run `make bench` (installs wrk, nginx-light, redis-server)", file=sys.stderr)
            return 2
    mix = workload()
    rows: list[Row] = []
    paced: dict[str, dict[str, float]] = {}
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="infergate-bench-") as tmp_name:
        tmp = Path(tmp_name)
        full_policies = bench_policies(tmp / "policies-full", auth_only=False)
        auth_policies = bench_policies(tmp / "policies-auth", auth_only=True)
        print(f"machine: {os.cpu_count()} CPUs; mix of {len(mix)} distinct requests; {duration:.0f} s per run")
        ml: MLServerProcess = start_mlserver(ROOT / "triton_repo", tmp / "mlserver")
        redis = RedisServer.start(tmp / "redis")
        try:
            ml_pid = ml.process.pid
            ml_http = f"http://{ml.http_url}"
            if wanted("embedded"):
                for c in connections:
                    row = asyncio.run(_embedded_alone(mix, c, duration))
                    rows.append(row)
                    print(f"  embedded                 c={c:<3d} {row.req_per_s:8.0f} calls/s p50 {row.p50_ms:.2f} ms "
                          f"CPU µs/call {row.cpu_us_per_req['this process']:.0f}", flush=True)
            if wanted("mlserver-grpc"):
                for c in connections:
                    row = asyncio.run(_mlserver_grpc_alone(ml.grpc_url, mix, c, duration, ml_pid))
                    rows.append(row)
                    print(f"  mlserver-grpc            c={c:<3d} {row.req_per_s:8.0f} req/s  p50 {row.p50_ms:.2f} ms "
                          f"CPU µs/req mlserver {row.cpu_us_per_req['mlserver']:.0f}, "
                          f"client {row.cpu_us_per_req['this process']:.0f}", flush=True)

            # The token of the full gateway is reused by every HTTP scenario (ignored upstream).
            with gateway(tmp / "gw-full", f"grpc://{ml.grpc_url}", full_policies,
                         ["--redis", redis.url]) as gw_full:
                token = gw_full.token(sub="bench", tenant="acme", roles="analyst")
                script = wrk_script(mix, token, tmp / "mix.lua")
                base = {"mlserver": ml_pid}
                if wanted("mlserver-http"):
                    rows += wrk_scenario("mlserver-http", ml_http, script, base, duration, connections)
                if wanted("nginx"):
                    with nginx(ml_http, tmp) as (url, pid):
                        rows += wrk_scenario("nginx", url, script, {**base, "nginx": pid}, duration, connections)
                if wanted("aiohttp-proxy"):
                    with passthrough(ml_http) as (url, pid):
                        rows += wrk_scenario("aiohttp-proxy", url, script, {**base, "proxy": pid}, duration,
                                             connections)
                if wanted("gateway-full"):
                    rows += wrk_scenario("gateway-full", f"http://{gw_full.url}", script,
                                         {**base, "gateway": gw_full.proc.pid, "redis": redis.pid}, duration,
                                         connections)
            if wanted("gateway-auth"):
                with gateway(tmp / "gw-auth", f"grpc://{ml.grpc_url}", auth_policies, []) as gw:
                    rows += wrk_scenario("gateway-auth", f"http://{gw.url}", wrk_script(
                        mix, gw.token(sub="bench", tenant="acme", roles="analyst"), tmp / "auth.lua"),
                        {**base, "gateway": gw.proc.pid}, duration, connections)
            if wanted("gateway-full-embedded"):
                with gateway(tmp / "gw-emb", "local:" + str(ROOT / "triton_repo"), full_policies,
                             ["--redis", redis.url]) as gw:
                    rows += wrk_scenario("gateway-full-embedded", f"http://{gw.url}", wrk_script(
                        mix, gw.token(sub="bench", tenant="acme", roles="analyst"), tmp / "emb.lua"),
                        {"gateway": gw.proc.pid, "redis": redis.pid}, duration, connections)
            if wanted("gateway-full-2w"):
                with gateway(tmp / "gw-2w", f"grpc://{ml.grpc_url}", full_policies,
                             ["--redis", redis.url, "--workers", "2"]) as gw:
                    rows += wrk_scenario("gateway-full-2w", f"http://{gw.url}", wrk_script(
                        mix, gw.token(sub="bench", tenant="acme", roles="analyst"), tmp / "2w.lua"),
                        {"mlserver": ml_pid, "gateway": gw.proc.pid, "redis": redis.pid}, duration, connections)

            # Open loop at half of the full gateway's saturation: what each layer adds.
            sat = max((r.ok_per_s for r in rows if r.scenario == "gateway-full"), default=0.0)
            if sat and not args.quick:
                rate = sat / 2
                print(f"open loop at {rate:.0f} req/s (half of gateway-full's saturation):")
                paced["mlserver-http"] = asyncio.run(_paced(ml_http, mix, token, rate, duration))
                with passthrough(ml_http) as (url, _pid):
                    paced["aiohttp-proxy"] = asyncio.run(_paced(url, mix, token, rate, duration))
                with gateway(tmp / "gw-auth-2", f"grpc://{ml.grpc_url}", auth_policies, []) as gw:
                    paced["gateway-auth"] = asyncio.run(_paced(
                        f"http://{gw.url}", mix, gw.token(sub="bench", tenant="acme", roles="analyst"), rate,
                        duration))
                with gateway(tmp / "gw-full-2", f"grpc://{ml.grpc_url}", full_policies,
                             ["--redis", redis.url]) as gw:
                    paced["gateway-full"] = asyncio.run(_paced(
                        f"http://{gw.url}", mix, gw.token(sub="bench2", tenant="acme", roles="analyst"), rate,
                        duration))
                for name, p in paced.items():
                    print(f"  {name:24s} p50 {p['p50_ms']:.2f} ms  p99 {p['p99_ms']:.2f} ms  errors {p['errors']}")

            # Limits stay exact with two workers: a quota of Q admits exactly Q.
            if wanted("gateway-full-2w"):
                quota, total = 300, 450
                q_policies = bench_policies(tmp / "policies-quota", auth_only=False, quota=quota)
                redis_q = RedisServer.start(tmp / "redis-q")
                try:
                    with gateway(tmp / "gw-q", f"grpc://{ml.grpc_url}", q_policies,
                                 ["--redis", redis_q.url, "--workers", "2"]) as gw:
                        body = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                                       "data": ["exactness"]}]}).encode()
                        counts = asyncio.run(_exact_quota(f"http://{gw.url}", gw.token(
                            sub="quota", tenant="acme", roles="analyst"), body, total, 32))
                finally:
                    redis_q.stop()
                extra["two_worker_quota"] = {"quota": quota, "sent": total, "statuses": counts,
                                             "exact": counts.get("200", 0) == quota}
                print(f"2 workers, daily quota {quota}, {total} sent: {counts} "
                      f"({'exact' if counts.get('200', 0) == quota else 'NOT EXACT'})")
        finally:
            redis.stop()
            ml.stop()

    summary = _summary(rows, paced)
    for line in summary["lines"]:
        print(line)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
        "duration_s": duration, "mix_size": len(mix), "rows": [asdict(r) for r in rows], "paced": paced,
        "targets": summary["targets"], **extra,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _summary(rows: list[Row], paced: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The issue's targets, computed from the rows (reported, never asserted)."""

    def cpu(scenario: str, process: str) -> float | None:
        values = [r.cpu_us_per_req.get(process) for r in rows if r.scenario == scenario and r.connections > 1]
        clean = [v for v in values if v is not None]
        return statistics.median(clean) if clean else None

    def rps(scenario: str, c: int) -> float | None:
        """Successful answers per second: a run that sheds load must not look faster."""
        return next((r.ok_per_s for r in rows if r.scenario == scenario and r.connections == c), None)

    targets: dict[str, Any] = {}
    lines = ["", "targets:"]
    proxy_cpu, full_cpu = cpu("aiohttp-proxy", "proxy"), cpu("gateway-full", "gateway")
    if proxy_cpu and full_cpu:
        targets["full_cpu_vs_proxy"] = full_cpu / proxy_cpu
        lines.append(f"  full pipeline CPU/req {full_cpu:.0f} µs = {full_cpu / proxy_cpu:.2f}× the bare aiohttp "
                     f"proxy's {proxy_cpu:.0f} µs (target ≤ 2×)")
    if "gateway-full" in paced and "mlserver-http" in paced:
        added50 = paced["gateway-full"]["p50_ms"] - paced["mlserver-http"]["p50_ms"]
        added99 = paced["gateway-full"]["p99_ms"] - paced["mlserver-http"]["p99_ms"]
        targets.update(added_p50_ms=added50, added_p99_ms=added99)
        lines.append(f"  added latency at half saturation: p50 +{added50:.2f} ms (target ≤ 1), "
                     f"p99 +{added99:.2f} ms (target ≤ 5)")
    one, two = rps("gateway-full", 64), rps("gateway-full-2w", 64)
    if one and two:
        targets["two_worker_scaling"] = two / one
        lines.append(f"  2 workers: {two:.0f} vs {one:.0f} successful req/s at c=64 = {two / one:.2f}× "
                     "(target ≥ 1.8×)")
    return {"targets": targets, "lines": lines}


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        sys.exit(main())
