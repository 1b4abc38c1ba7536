"""The gateway as a process: SIGHUP reload, dev issuer only under --dev, clean shutdown."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.gateway_proc import ROOT, free_port, start_gateway
from tests.support.liveness import hang_bound

from ..conftest import POLICIES, TRITON_REPO


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - loopback test server
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_sighup_reload_keeps_serving_through_a_bad_edit(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    gw = start_gateway(tmp_path, backend=f"local:{TRITON_REPO}", policies=policies)
    try:
        token = gw.token()
        base = f"http://{gw.url}"
        assert _get(f"{base}/v2/models/risk", token)[0] == 200
        (policies / "gateway.yaml").write_text("models:\n  digits: {}\n  digits: {}\n")  # duplicate key
        gw.proc.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        assert _get(f"{base}/v2/models/risk", token)[0] == 200  # old revision still serving
        metrics = _get(f"{base}/metrics")[1]
        assert 'gateway_policy_reloads_total{result="rejected"}' in metrics
        log = gw.log_path.read_text()
        assert "policy_reload_rejected" in log
        assert "duplicate key" in log
    finally:
        assert gw.stop() == 0


def test_dev_tokens_are_worthless_without_dev(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    dev = start_gateway(tmp_path / "dev", backend=f"local:{TRITON_REPO}")
    token = dev.token()
    dev.stop()
    port = free_port()
    log = (tmp_path / "prod.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}", "--backend",
         f"local:{TRITON_REPO}", "--state-dir", str(dev.state_dir), "--audit-dir", str(tmp_path / "audit")],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        for _ in range(100):
            try:
                if _get(f"http://127.0.0.1:{port}/v2/health/live")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        status, body = _get(f"http://127.0.0.1:{port}/v2/models/digits", token)
        assert status == 401
        assert json.loads(body)["error"].startswith("authentication required")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        log.close()


def test_invalid_policy_at_startup_refuses_to_start(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    (policies / "gateway.yaml").write_text("limits:\n  max_body_bytez: 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{free_port()}", "--policies",
         str(policies), "--state-dir", str(tmp_path / "s"), "--audit-dir", str(tmp_path / "a")],
        capture_output=True, timeout=60, cwd=ROOT, check=False)
    assert out.returncode == 2
    assert b"gateway.yaml:2" in out.stderr
    assert b"max_body_bytez" in out.stderr


@pytest.mark.parametrize("argv", [["policy", "check", str(POLICIES)]])
def test_policy_check_cli(argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "gateway", *argv], capture_output=True, check=False, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(b"ok: revision ")


def test_apikey_cli_prints_a_key_and_its_hash() -> None:
    from gateway.stages.authn import api_key_hash

    out = subprocess.run([sys.executable, "-m", "gateway", "apikey", "new", "--id", "bot", "--tenant", "acme",
                          "--roles", "analyst"], capture_output=True, check=True, cwd=ROOT, text=True)
    lines = out.stdout.splitlines()
    key = lines[1].strip()
    assert key.startswith("igk_")
    assert f"sha256: {api_key_hash(key)}" in out.stdout


def test_two_workers_share_the_port(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, backend=f"local:{TRITON_REPO}", extra=["--workers", "2"])
    try:
        token = gw.token()
        statuses = [_get(f"http://{gw.url}/v2/models/digits", token)[0] for _ in range(20)]
        assert statuses == [200] * 20
        chains = sorted(p.name for p in gw.audit_dir.iterdir())
        assert chains and all(name.startswith("worker-") for name in chains)
    finally:
        assert gw.stop() == 0


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_workers_do_not_outlive_a_killed_supervisor(tmp_path: Path) -> None:
    """kill -9 of the supervisor (or an OOM kill) leaves no worker serving the port with
    nobody to stop it: each gets the parent-death SIGTERM, drains and exits."""
    gw = start_gateway(tmp_path, backend=f"local:{TRITON_REPO}", extra=["--workers", "2"])
    try:
        workers = [c for c in _children(gw.proc.pid) if "infergate" in Path(f"/proc/{c}/cmdline").read_text()
                   or "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(workers) == 2, workers
        gw.proc.kill()
        gw.proc.wait()
        deadline = time.monotonic() + hang_bound(5.0)  # a drain: seconds, not a bound on speed
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), workers
    finally:
        gw.stop()
    with pytest.raises(OSError):  # nothing listens on the port any more
        socket.create_connection(("127.0.0.1", gw.port), timeout=2).close()


def test_grpc_front_from_the_command_line(tmp_path: Path) -> None:
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from ..conftest import DIGIT_ZERO

    grpc_port = free_port()
    gw = start_gateway(tmp_path, backend=f"local:{TRITON_REPO}", extra=["--grpc-listen", f"127.0.0.1:{grpc_port}"])
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        headers = {"authorization": f"Bearer {gw.token()}"}
        inp = grpcclient.InferInput("pixels", [1, 64], "FP32")
        inp.set_data_from_numpy(np.array([DIGIT_ZERO], dtype=np.float32))
        result = client.infer("digits", [inp], headers=headers)
        assert int(result.as_numpy("probabilities").argmax()) == 0
        with pytest.raises(InferenceServerException) as info:
            client.infer("digits", [inp])
        assert "UNAUTHENTICATED" in str(info.value.status())
        client.close()
    finally:
        assert gw.stop() == 0
