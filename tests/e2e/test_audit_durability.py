"""kill -9 under load: every 2xx the client received has its audit record after restart,
and the whole trail (old segments and the restarted chain) verifies."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from gateway.audit import iter_records
from tests.support.gateway_proc import ROOT, start_gateway

from ..conftest import DIGITS_BODY, TRITON_REPO


async def _load(url: str, token: str, seconds: float) -> list[str]:
    """Send requests from 16 tasks; return the request ids of the 2xx answers received."""
    ok: list[str] = []
    stop = asyncio.get_running_loop().time() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        while asyncio.get_running_loop().time() < stop:
            try:
                # text_echo: no privacy budget and no query-pattern detector to run out of
                async with session.post(f"{url}/v2/models/text_echo/infer", json={"inputs": [
                        {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]},
                        headers={"Authorization": f"Bearer {token}"}) as resp:
                    await resp.read()
                    if resp.status == 200:
                        ok.append(resp.headers["X-Request-ID"])
            except (aiohttp.ClientError, ConnectionError):
                return  # the gateway died under us

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(16)))
    return ok


async def test_kill_9_loses_no_answered_record(tmp_path: Path) -> None:
    gw = await asyncio.to_thread(start_gateway, tmp_path, backend=f"local:{TRITON_REPO}")
    token = await asyncio.to_thread(gw.token)
    load = asyncio.create_task(_load(f"http://{gw.url}", token, seconds=6.0))
    await asyncio.sleep(2.0)
    gw.proc.send_signal(signal.SIGKILL)
    answered = await load
    gw.proc.wait()
    assert len(answered) > 20, "the load did not get going before the kill"

    # restart on the same directories: recovery continues the chain
    again = await asyncio.to_thread(start_gateway, tmp_path, backend=f"local:{TRITON_REPO}")
    try:
        token2 = await asyncio.to_thread(again.token)
        async with aiohttp.ClientSession() as session, session.post(
                f"http://{again.url}/v2/models/digits/infer", json=DIGITS_BODY,
                headers={"Authorization": f"Bearer {token2}"}) as resp:
            assert resp.status == 200
    finally:
        assert again.stop() == 0
    recorded = {r.get("request_id") for r in iter_records(gw.audit_dir)}
    missing = [rid for rid in answered if rid not in recorded]
    assert not missing, f"{len(missing)} answered requests have no audit record"
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "audit", "verify",
                                                   str(gw.audit_dir)], capture_output=True, text=True, cwd=ROOT,
                                  check=False)
    assert out.returncode == 0, out.stdout + out.stderr
