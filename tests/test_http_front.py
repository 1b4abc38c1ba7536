"""The HTTP front end to end on the embedded backend: shape, refusals, audit, reload."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.app import SERVICE_KEY
from gateway.audit import AuditConfig, iter_records, verify_audit
from gateway.settings import Settings

from .conftest import DIGIT_ZERO, Client


def digits_body(rows: list[list[float]] | None = None, **extra: Any) -> dict[str, Any]:
    rows = rows or [DIGIT_ZERO]
    return {"inputs": [{"name": "pixels", "shape": [len(rows), 64], "datatype": "FP32",
                        "data": [v for r in rows for v in r]}], **extra}


def write_policy_without_risk(policy_dir: Path) -> None:
    """A consistent edit across files: `risk` leaves the gateway, the tenant and the roles."""
    for name in ("gateway.yaml", "access.yaml"):
        path = policy_dir / name
        text = path.read_text().replace("  risk: {}\n", "").replace(", risk]", "]")
        path.write_text(text)


def audit_records(settings: Settings) -> list[dict[str, Any]]:
    """The request records of the trail (not checkpoints or other bookkeeping records)."""
    return [dict(r) for r in iter_records(settings.audit_dir) if "request_id" in r]


def audit_text(settings: Settings) -> str:
    return "".join(p.read_text() for p in sorted(settings.audit_dir.glob("*.jsonl")))


class TestShape:
    async def test_health_is_open(self, client: Client) -> None:
        assert (await client.get("/v2/health/live")).status == 200
        ready = await client.get("/v2/health/ready")
        assert ready.status == 200
        assert (await ready.json()) == {"ready": True}

    async def test_server_metadata_needs_a_token(self, client: Client, auth: dict[str, str]) -> None:
        refused = await client.get("/v2")
        assert refused.status == 401
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await refused.json())["error"].startswith("authentication required")
        ok = await client.get("/v2", headers=auth)
        assert ok.status == 200
        body = await ok.json()
        assert body["name"] == "infergate"
        assert "binary_tensor_data" in body["extensions"]

    async def test_model_metadata_like_triton(self, client: Client, auth: dict[str, str]) -> None:
        resp = await client.get("/v2/models/digits", headers=auth)
        assert resp.status == 200
        meta = await resp.json()
        assert meta["name"] == "digits"
        assert meta["platform"] == "onnxruntime_onnx"
        # 2 = the DP-SGD model: the digits-version flag's canary (0 %), which answers 404 to
        # a caller outside the canary, so it is not listed to one either (AUTHZ-17).
        assert meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
        assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
        version = await client.get("/v2/models/digits/versions/1", headers=auth)
        assert (await version.json()) == meta
        assert (await client.get("/v2/models/digits/ready", headers=auth)).status == 200
        assert (await client.get("/v2/models/digits/versions/1/ready", headers=auth)).status == 200

    async def test_infer_json(self, client: Client, auth: dict[str, str]) -> None:
        resp = await client.post("/v2/models/digits/infer", json=digits_body(id="req-1"), headers=auth)
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert body["model_name"] == "digits"
        assert body["model_version"] == "1"
        assert body["id"] == "req-1"
        (out,) = body["outputs"]
        assert out["name"] == "probabilities"
        assert out["shape"] == [1, 10]
        probs = np.array(out["data"])
        assert probs.sum() == pytest.approx(1.0, abs=1e-4)
        assert int(probs.argmax()) == 0  # the sample is a handwritten zero

    async def test_infer_text_echo(self, client: Client, auth: dict[str, str]) -> None:
        body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["hello", "wörld"]}]}
        resp = await client.post("/v2/models/text_echo/infer", json=body, headers=auth)
        assert resp.status == 200, await resp.text()
        (out,) = (await resp.json())["outputs"]
        assert out["data"] == ["hello", "wörld"]

    async def test_request_id_echoed_only_when_well_formed(self, client: Client, auth: dict[str, str]) -> None:
        good = await client.get("/v2", headers={**auth, "X-Request-ID": "abc-123"})
        assert good.headers["X-Request-ID"] == "abc-123"
        bad = await client.get("/v2", headers={**auth, "X-Request-ID": "x" * 200})
        assert bad.headers["X-Request-ID"] != "x" * 200
        assert len(bad.headers["X-Request-ID"]) == 32


class TestRefusals:
    """Garbage in gets a clear 4xx, never a 500; every refusal is audited; nothing reaches the model."""

    @pytest.mark.parametrize(
        ("path", "body", "status", "needle"),
        [
            # malformed JSON
            ("/v2/models/digits/infer", b'{"inputs":[{"name":"x"', 400, "malformed"),
            # wrong dtype for the model
            ("/v2/models/digits/infer",
             json.dumps({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP64",
                                     "data": [0.0] * 64}]}).encode(), 422, "datatype"),
            # wrong shape for the model
            ("/v2/models/digits/infer",
             json.dumps({"inputs": [{"name": "pixels", "shape": [1, 63], "datatype": "FP32",
                                     "data": [0.0] * 63}]}).encode(), 422, "dimension"),
            # data does not match the declared shape
            ("/v2/models/digits/infer",
             json.dumps({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
                                     "data": [0.0] * 10}]}).encode(), None, "pixels"),
            # unknown input name
            ("/v2/models/digits/infer",
             json.dumps({"inputs": [{"name": "nope", "shape": [1, 64], "datatype": "FP32",
                                     "data": [0.0] * 64}]}).encode(), 422, "input"),
            # batch above max_batch_size
            ("/v2/models/digits/infer",
             json.dumps({"inputs": [{"name": "pixels", "shape": [65, 64], "datatype": "FP32",
                                     "data": [0.0] * 64 * 65}]}).encode(), 422, "batch"),
            # unknown model and a model the policy does not expose: the same answer
            ("/v2/models/nope/infer", json.dumps(digits_body()).encode(), 404, "unknown model"),
            # NaN
            ("/v2/models/digits/infer",
             b'{"inputs":[{"name":"pixels","shape":[1,1],"datatype":"FP32","data":[NaN]}]}', 400, ""),
        ],
    )
    async def test_bad_infer_requests(self, client: Client, auth: dict[str, str], settings: Settings,
                                      path: str, body: bytes, status: int | None, needle: str) -> None:
        resp = await client.post(path, data=body, headers={**auth, "Content-Type": "application/json"})
        text = await resp.text()
        if status is None:
            assert resp.status in (400, 422), text
        else:
            assert resp.status == status, text
        error = json.loads(text)["error"]
        assert needle in error
        last = audit_records(settings)[-1]
        assert last["decision"] == "deny"
        assert last["status"] == resp.status
        assert last["upstream_called"] is False

    async def test_oversized_body_is_413(self, client: Client, auth: dict[str, str], settings: Settings) -> None:
        big = io.BytesIO(b'{"inputs":[' + b" " * (9 * 1024 * 1024) + b"]}")
        resp = await client.post("/v2/models/digits/infer", data=big, headers=auth)
        assert resp.status == 413
        assert audit_records(settings)[-1]["reason"] == "input_too_large"

    async def test_gzip_bomb_is_413(self, client: Client, auth: dict[str, str]) -> None:
        bomb = gzip.compress(b"0" * (64 * 1024 * 1024))
        resp = await client.post("/v2/models/digits/infer", data=io.BytesIO(bomb),
                                 headers={**auth, "Content-Encoding": "gzip"})
        assert resp.status == 413

    async def test_gzip_request_is_accepted(self, client: Client, auth: dict[str, str]) -> None:
        body = gzip.compress(json.dumps(digits_body()).encode())
        resp = await client.post("/v2/models/digits/infer", data=body,
                                 headers={**auth, "Content-Encoding": "gzip"})
        assert resp.status == 200, await resp.text()

    async def test_unsupported_media_type(self, client: Client, auth: dict[str, str]) -> None:
        resp = await client.post("/v2/models/digits/infer", data=json.dumps(digits_body()),
                                 headers={**auth, "Content-Type": "text/plain"})
        assert resp.status == 415

    @pytest.mark.parametrize(
        "header",
        [
            None,  # no token
            "Bearer not.a.token",  # garbage
            "Basic YWxpY2U6c2VjcmV0",  # wrong scheme
            "Bearer ",  # empty
        ],
    )
    async def test_no_valid_token_is_401_before_the_body_is_read(
        self, client: Client, settings: Settings, header: str | None
    ) -> None:
        headers = {"Authorization": header} if header else {}
        resp = await client.post("/v2/models/digits/infer", json=digits_body(), headers=headers)
        assert resp.status == 401
        assert "WWW-Authenticate" in resp.headers
        record = audit_records(settings)[-1]
        assert record["decision"] == "deny"
        assert record["reason"].startswith("authn_")
        assert record.get("subject") is None

    async def test_token_never_in_audit_or_metrics(self, client: Client, auth: dict[str, str],
                                                    settings: Settings) -> None:
        await client.post("/v2/models/digits/infer", json=digits_body(), headers=auth)
        await client.get("/v2/models/nope", headers=auth)
        token = auth["Authorization"].split()[1]
        log_text = audit_text(settings)
        assert token not in log_text
        assert "alice" not in log_text  # the subject is pseudonymous
        metrics = await (await client.get("/metrics")).text()
        assert token not in metrics
        assert "alice" not in metrics

    async def test_unknown_and_unexposed_models_look_the_same(
        self, client: Client, auth: dict[str, str], policy_dir: Path
    ) -> None:
        unknown = await client.get("/v2/models/nope", headers=auth)
        # `risk` exists upstream; hide it from the policy and compare
        write_policy_without_risk(policy_dir)
        assert await client.app[SERVICE_KEY].store.reload("test")
        hidden = await client.get("/v2/models/risk", headers=auth)
        assert (unknown.status, await unknown.json()) == (hidden.status, await hidden.json()) == (
            404, {"error": "not found: unknown model or version"})

    async def test_admin_surfaces_are_not_served(self, client: Client, auth: dict[str, str]) -> None:
        for method, path in [("GET", "/v2/repository/index"), ("POST", "/v2/repository/index"),
                             ("POST", "/v2/repository/models/digits/load"),
                             ("POST", "/v2/repository/models/digits/unload"),
                             ("GET", "/v2/systemsharedmemory/status"), ("GET", "/v2/trace/setting"),
                             ("GET", "/v2/models/digits/stats")]:
            resp = await client.request(method, path, headers=auth)
            assert resp.status == 404, path


class TestAudit:
    async def test_every_call_is_audited_and_the_chain_verifies(
        self, client: Client, auth: dict[str, str], settings: Settings
    ) -> None:
        await client.post("/v2/models/digits/infer", json=digits_body(), headers=auth)
        await client.post("/v2/models/digits/infer", json=digits_body())
        await client.get("/v2/models/digits", headers=auth)
        records = audit_records(settings)
        assert [r["decision"] for r in records] == ["allow", "deny", "allow"]
        assert records[0]["upstream_called"] is True
        assert records[0]["tenant"] == "acme"
        assert [r["seq"] for r in records] == [1, 2, 3]
        config = AuditConfig.for_dir(settings.audit_dir)
        assert verify_audit(settings.audit_dir, config.anchor_dir, config.key_dir) == (True, None)

    async def test_audit_failure_fails_closed(self, client: Client, auth: dict[str, str]) -> None:
        service = client.app[SERVICE_KEY]
        await service.audit_log.close()  # the sink is gone (disk, permission): nothing can be recorded
        resp = await client.post("/v2/models/digits/infer", json=digits_body(), headers=auth)
        assert resp.status == 503
        assert "Retry-After" in resp.headers


class TestReload:
    async def test_bad_edit_keeps_old_policy_and_good_edit_applies(
        self, client: Client, auth: dict[str, str], policy_dir: Path
    ) -> None:
        service = client.app[SERVICE_KEY]
        before = service.store.current.policy.revision
        original = (policy_dir / "gateway.yaml").read_text()
        (policy_dir / "gateway.yaml").write_text("models:\n  digits: {}\n  digits: {}\n")
        for _ in range(50):
            await asyncio.sleep(0.05)
            if service.store.last_error:
                break
        assert service.store.last_error and "duplicate key" in service.store.last_error
        assert service.store.current.policy.revision == before
        assert (await client.post("/v2/models/risk/infer", json={"inputs": [
            {"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [1.0] * 30}]},
            headers=auth)).status == 200
        metrics = await (await client.get("/metrics")).text()
        assert 'gateway_policy_reloads_total{result="rejected"}' in metrics

        (policy_dir / "gateway.yaml").write_text(original)
        write_policy_without_risk(policy_dir)
        for _ in range(50):
            await asyncio.sleep(0.05)
            if service.store.current.policy.revision != before:
                break
        assert service.store.current.policy.revision != before
        assert service.store.last_error is None
        assert (await client.get("/v2/models/risk", headers=auth)).status == 404
        metrics = await (await client.get("/metrics")).text()
        assert f'gateway_policy_info{{revision="{service.store.current.policy.revision}"}} 1.0' in metrics


class TestEarlyRefusals:
    async def test_bad_path_is_audited(self, client: Client, auth: dict[str, str], settings: Settings) -> None:
        resp = await client.get("/v2/models/a%2Fb", headers=auth)
        assert resp.status == 400
        record = audit_records(settings)[-1]
        assert (record["decision"], record["reason"], record["status"]) == ("deny", "path_invalid", 400)

    async def test_load_is_shed_with_503_and_retry_after(self, client: Client, auth: dict[str, str],
                                                         policy_dir: Path, settings: Settings) -> None:
        path = policy_dir / "gateway.yaml"
        path.write_text(path.read_text().replace("max_inputs: 64", "max_inputs: 64\n  max_in_flight: 1"))
        assert await client.app[SERVICE_KEY].store.reload("test")
        # hold one request in flight inside the upstream, then send another
        service = client.app[SERVICE_KEY]
        gate = asyncio.Event()
        original = service.upstream.infer

        async def slow_infer(*args: Any, **kwargs: Any) -> Any:
            await gate.wait()
            return await original(*args, **kwargs)

        service.upstream.infer = slow_infer  # type: ignore[method-assign]
        first = asyncio.create_task(client.post("/v2/models/digits/infer", json=digits_body(), headers=auth))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if service.metrics.in_flight._value.get() >= 1:
                break
        second = await client.post("/v2/models/digits/infer", json=digits_body(), headers=auth)
        gate.set()
        assert second.status == 503
        assert second.headers["Retry-After"] == "1"
        assert (await first).status == 200
        assert audit_records(settings)[-2]["reason"] == "load_shed"


class TestFlags:
    async def test_variant_served_is_in_header_and_audit(self, client: Client, auth: dict[str, str],
                                                         settings: Settings) -> None:
        resp = await client.post("/v2/models/digits/infer", json=digits_body(), headers=auth)
        assert resp.status == 200
        assert resp.headers["X-Model-Variant"] == "stable"
        record = audit_records(settings)[-1]
        assert (record["flag"], record["variant"]) == ("digits-version", "stable")

    async def test_canary_version_cannot_be_chosen_by_the_client(self, client: Client, auth: dict[str, str]) -> None:
        resp = await client.post("/v2/models/digits/versions/2/infer", json=digits_body(), headers=auth)
        assert resp.status == 404


class TestAuditSettings:
    async def test_records_also_go_to_stdout_when_the_policy_says(
        self, settings: Settings, policy_dir: Path, capfd: pytest.CaptureFixture[str],
        aiohttp_client: Any, auth: dict[str, str],
    ) -> None:
        from gateway.app import build_app

        from .conftest import GatewayTestServer

        path = policy_dir / "gateway.yaml"
        path.write_text(path.read_text().replace("stdout: false", "stdout: true"))
        client = await aiohttp_client(GatewayTestServer(build_app(settings)))
        resp = await client.post("/v2/models/digits/infer", json=digits_body(), headers=auth)
        assert resp.status == 200
        await client.close()
        out = capfd.readouterr().out
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{") and '"seq"' in line]
        assert any(r.get("request_id") == resp.headers["X-Request-ID"] for r in lines)


class TestLimits:
    async def test_subject_rate_limit_is_429_with_ietf_headers(
        self, client: Client, auth: dict[str, str], policy_dir: Path, settings: Settings
    ) -> None:
        path = policy_dir / "limits.yaml"
        text = path.read_text()
        start = text.index("  - name: subject_rate")
        end = text.index("  - name:", start + 5)
        path.write_text(text[:start] + "  - name: subject_rate\n    kind: rate\n    per: [tenant, subject]\n"
                        "    rate: 1\n    burst: 2\n" + text[end:])
        assert await client.app[SERVICE_KEY].store.reload("test")
        ok = await client.post("/v2/models/digits/infer", json=digits_body(), headers=auth)
        assert ok.status == 200
        assert "RateLimit-Limit" in ok.headers
        await client.post("/v2/models/digits/infer", json=digits_body(), headers=auth)
        limited = await client.post("/v2/models/digits/infer", json=digits_body(), headers=auth)
        assert limited.status == 429
        assert int(limited.headers["Retry-After"]) >= 1
        assert limited.headers["RateLimit-Remaining"] == "0"
        assert "rate limit" in (await limited.json())["error"]
        record = audit_records(settings)[-1]
        assert (record["decision"], record["reason"]) == ("deny", "ratelimit_exceeded")
        assert record["upstream_called"] is False
        metrics = await (await client.get("/metrics")).text()
        assert 'gateway_ratelimit_decisions_total{decision="limited",limit="subject_rate"}' in metrics


class TestKillSwitch:
    async def test_a_kill_switched_stage_is_skipped_and_recorded(
        self, client: Client, auth: dict[str, str], policy_dir: Path, settings: Settings
    ) -> None:
        constant = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [7.0] * 64}]}
        assert (await client.post("/v2/models/digits/infer", json=constant, headers=auth)).status == 422
        flags = json.loads((policy_dir / "flags.json").read_text())
        flags["flags"]["stage.adversarial.enabled"] = {
            "state": "ENABLED", "variants": {"on": True, "off": False}, "defaultVariant": "off"}
        (policy_dir / "flags.json").write_text(json.dumps(flags))
        assert await client.app[SERVICE_KEY].store.reload("test")
        resp = await client.post("/v2/models/digits/infer", json=constant, headers=auth)
        assert resp.status == 200
        assert audit_records(settings)[-1]["notes"]["skipped_stages"] == ["adversarial"]

    async def test_protected_stages_cannot_be_switched_off(self, client: Client, policy_dir: Path) -> None:
        flags = json.loads((policy_dir / "flags.json").read_text())
        flags["flags"]["stage.pii_mask.enabled"] = {
            "state": "ENABLED", "variants": {"on": True, "off": False}, "defaultVariant": "off"}
        (policy_dir / "flags.json").write_text(json.dumps(flags))
        store = client.app[SERVICE_KEY].store
        assert not await store.reload("test")
        assert store.last_error is not None
        assert "pii_mask" in store.last_error
