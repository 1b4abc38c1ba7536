"""Run the real ``infergate serve`` as a subprocess, as an outsider would use it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    port: int
    state_dir: Path
    audit_dir: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def token(self, sub: str = "alice", tenant: str = "acme", roles: str = "analyst") -> str:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "token",
                "--sub",
                sub,
                "--tenant",
                tenant,
                "--roles",
                roles,
                "--state-dir",
                str(self.state_dir),
            ],
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
        return out.stdout.decode().strip()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_gateway(
    workdir: Path,
    *,
    backend: str,
    policies: Path | None = None,
    extra: list[str] | None = None,
    timeout_s: float = 60.0,
    module: str = "gateway",
    env: dict[str, str] | None = None,
) -> GatewayProcess:
    """``module``: a test launcher wrapping ``gateway`` (e.g. one with a simulated clock)."""
    port = free_port()
    state, audit = workdir / "state", workdir / "audit"
    log_path = workdir / "gateway.log"
    cmd = [
        sys.executable,
        "-m",
        module,
        "serve",
        "--dev",
        "--listen",
        f"127.0.0.1:{port}",
        "--backend",
        backend,
        "--policies",
        str(policies or ROOT / "policies"),
        "--state-dir",
        str(state),
        "--audit-dir",
        str(audit),
        *(extra or []),
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        )
    gw = GatewayProcess(proc, port, state, audit, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited early:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://{gw.url}/v2/health/ready", timeout=2) as resp:
                if resp.status == 200:
                    return gw
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    gw.stop()
    raise RuntimeError(f"gateway not ready in {timeout_s}s:\n{log_path.read_text()[-3000:]}")


def post_json(url: str, path: str, body: object, token: str, *, timeout_s: float = 20.0) -> int:
    """POST a JSON body with a bearer token from a plain thread; the HTTP status, never an exception."""
    import json

    req = urllib.request.Request(  # noqa: S310 - loopback test servers only
        f"{url}{path}", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
