"""A real ``infergate serve`` process over the attack world, with a simulated clock.

Shared by ``security_tests/ml`` and ``security_tests/dp``: the policies of
``security_tests/ml/world/policies``, the models of :mod:`.models` in a temporary Triton
repository served by the embedded onnxruntime backend, tokens from the ``--dev`` issuer
minted at the *gateway's* simulated time, and a keep-alive HTTP client. Every attack talks
to the gateway over HTTP with a real token: authn, limits, DP, output policy and audit are
all in the loop.

Sizes: ``INFERGATE_DEEP=1`` (or ``--deep``) runs the catalogue's full sample counts;
CI runs reduced ones chosen so the assertions keep their statistical power (each test
documents its standard error).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import numpy as np
import numpy.typing as npt

from gateway.audit import iter_records
from gateway.devissuer import DEV_AUDIENCE, DEV_ISSUER, load_or_create_key
from security_tests.ml.world.clocked_gateway import write_offset
from tests.support.gateway_proc import GatewayProcess, start_gateway

POLICIES = Path(__file__).resolve().parent / "policies"
DAY = 86_400.0
CLOCK_MODULE = "security_tests.ml.world.clocked_gateway"


def deep() -> bool:
    """Full catalogue sample sizes (nightly) instead of the CI ones."""
    return os.environ.get("INFERGATE_DEEP", "") == "1"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]

    def output(self, name: str | None = None) -> npt.NDArray[np.float64]:
        """The named (or first) output as rows x width."""
        outs = self.body["outputs"]
        out = next(o for o in outs if name is None or o["name"] == name)
        return np.asarray(out["data"], dtype=np.float64).reshape(out["shape"])


def infer_body(x: npt.ArrayLike, *, input_name: str = "x", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A V2 JSON body with one FP32 input (a single row becomes ``[1, n]``), for cases that
    send it some other way than :meth:`AttackGateway.infer` or change it first."""
    rows = np.asarray(x, dtype=np.float32)
    rows = rows.reshape(1, -1) if rows.ndim == 1 else rows
    return {"inputs": [{"name": input_name, "shape": list(rows.shape), "datatype": "FP32",
                        "data": [float(v) for v in rows.reshape(-1)]}], **(extra or {})}


@dataclass
class AttackGateway:
    """One gateway process, its clock file and an HTTP connection."""

    proc: GatewayProcess
    clock_file: Path
    offset: float = 0.0
    _conn: http.client.HTTPConnection | None = None
    calls: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(cls, workdir: Path, repo: Path, *, policies: Path = POLICIES, redis_url: str | None = None,
              offset: float = 0.0) -> AttackGateway:
        workdir.mkdir(parents=True, exist_ok=True)
        policy_dir = workdir / "policies"
        if not policy_dir.exists():
            shutil.copytree(policies, policy_dir)
        clock_file = workdir / "clock"
        write_offset(str(clock_file), offset)
        extra = ["--log-level", "warning"] + (["--redis", redis_url] if redis_url else [])
        proc = start_gateway(workdir, backend=f"local:{repo}", policies=policy_dir, extra=extra,
                             module=CLOCK_MODULE, env={"INFERGATE_TEST_CLOCK_FILE": str(clock_file)})
        return cls(proc, clock_file, offset)

    def stop(self) -> int:
        if self._conn is not None:
            self._conn.close()
        return self.proc.stop()

    # ------------------------------------------------------------------ clock

    def now(self) -> float:
        import time

        return time.time() + self.offset

    def set_offset(self, offset: float) -> None:
        self.offset = offset
        write_offset(str(self.clock_file), offset)

    def next_period(self, length: float = DAY) -> None:
        """Jump to one hour after the start of the next period (UTC midnight for days)."""
        now = self.now()
        target = (math.floor(now / length) + 1) * length + min(3600.0, length / 4)
        self.set_offset(self.offset + (target - now))

    # ------------------------------------------------------------------ identity

    def token(self, sub: str, tenant: str, roles: Sequence[str] = ("predictor",), ttl_s: int = 3600,
              **claims: Any) -> str:
        """A token of the trusted --dev issuer, issued at the gateway's (simulated) now."""
        now = int(self.now())
        body = {"iss": DEV_ISSUER, "aud": DEV_AUDIENCE, "sub": sub, "tenant": tenant, "roles": list(roles),
                "iat": now, "nbf": now, "exp": now + ttl_s, "jti": uuid.uuid4().hex, **claims}
        return jwt.encode(body, load_or_create_key(self.proc.state_dir), algorithm="EdDSA", headers={"typ": "JWT"})

    # ------------------------------------------------------------------ HTTP

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self.proc.port, timeout=30)
        return self._conn

    def request(self, method: str, path: str, token: str | None, body: Any = None,
                headers: dict[str, str] | None = None) -> Reply:
        payload = None if body is None else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        try:
            resp, raw = self._send(method, path, payload, hdrs)
        except (http.client.HTTPException, ConnectionError):
            # A kept-alive connection the server closed: one retry on a fresh one.
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            resp, raw = self._send(method, path, payload, hdrs)
        text = raw.decode() if raw else "{}"
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = {"raw": text}
        self.calls[path] = self.calls.get(path, 0) + 1
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, parsed)

    def _send(self, method: str, path: str, payload: bytes | None,
              hdrs: dict[str, str]) -> tuple[http.client.HTTPResponse, bytes]:
        conn = self._connection()
        conn.request(method, path, body=payload, headers=hdrs)
        resp = conn.getresponse()
        return resp, resp.read()

    def infer(self, model: str, token: str, x: npt.ArrayLike, *, input_name: str = "x",
              extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> Reply:
        body = infer_body(x, input_name=input_name, extra=extra)
        return self.request("POST", f"/v2/models/{model}/infer", token, body, headers)

    # ------------------------------------------------------------------ audit

    def audit(self) -> list[dict[str, Any]]:
        return [dict(r) for r in iter_records(self.proc.audit_dir) if "request_id" in r]
