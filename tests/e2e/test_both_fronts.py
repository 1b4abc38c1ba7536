"""One suite, both fronts: unmodified tritonclient.http and tritonclient.grpc (sync and aio)
get the same answers, the same refusals and leave the same audit records.

The gateway runs in process with both fronts on one :class:`InferenceService`, served from
a background thread with its own event loop (the sync clients block). Every test runs
once per front kind and makes the same call through the HTTP front as a reference, so
each comparison is self-contained: answers equal, refusal codes equal through the error
taxonomy (HTTP status -> gRPC code), client messages equal, and the two audit records
equal apart from ``transport`` and the per-call fields (id, time, latency, chain).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient
from aiohttp import web
from tritonclient.utils import InferenceServerException

from gateway import errors
from gateway.app import HEADER_TIMEOUT_S, build_app, build_service, runner_for
from gateway.audit import iter_records
from gateway.devissuer import issue_token
from gateway.fronts.grpc.server import RunningGrpcFront, start_grpc_front
from gateway.fronts.http.connection_cap import GatedSite
from gateway.policy.loader import POLICY_FILES  # the loader's own list, wherever it is defined
from gateway.service import InferenceService
from gateway.settings import Settings
from gateway.tls import TlsSettings, server_ssl_context
from gateway.upstream.base import Upstream
from tests.support.liveness import hang_bound

from ..conftest import DIGIT_ZERO, POLICIES, TRITON_REPO

KINDS = ("http", "grpc", "grpc-aio")


# ---------------------------------------------------------------------------------------
# The in-process gateway (also used by tests/test_tls.py)
# ---------------------------------------------------------------------------------------


def gateway_settings(directory: Path) -> Settings:
    """conftest-style settings: dev issuer, embedded backend, a private policy copy.

    Only the files the loader knows are copied, so a policy file another change is still
    adding cannot break these tests.
    """
    policies = directory / "policies"
    policies.mkdir(parents=True)
    for name in POLICY_FILES:
        if (POLICIES / name).exists():  # a file the loader knows may be optional
            shutil.copy(POLICIES / name, policies / name)
    return Settings(policies=policies, backend=f"local:{TRITON_REPO}", audit_dir=directory / "audit",
                    state_dir=directory / "state", dev=True, policy_poll_s=0.1)


class GatewayThread:
    """Both fronts on one service, in a background thread running its own event loop.

    The loop runs from construction, so :meth:`run` can start helpers on it (a fake
    upstream) before :meth:`start` builds the gateway.
    """

    def __init__(self, settings: Settings, *, tls: TlsSettings | None = None,
                 upstream: Upstream | None = None, record_every_refusal: bool = False) -> None:
        self.settings = settings
        self.tls = tls
        self.upstream = upstream
        self.record_every_refusal = record_every_refusal
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway-loop", daemon=True)
        self.thread.start()
        self.http_port = 0
        self.grpc_port = 0
        self.service: InferenceService | None = None
        self._runner: web.AppRunner | None = None
        self._grpc: RunningGrpcFront | None = None

    def start(self) -> GatewayThread:
        self.run(self._start())
        return self

    def run(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the gateway's loop (e.g. to poke at the service)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    async def _start(self) -> None:
        self.service = build_service(self.settings, upstream=self.upstream)
        if self.record_every_refusal:
            self.service.audit_aggregator = RecordEveryRefusal(self.service.audit_log)  # type: ignore[assignment]
        app = build_app(self.settings, service=self.service)
        self._runner = runner_for(app)
        await self._runner.setup()
        ssl_context = server_ssl_context(self.tls) if self.tls is not None else None
        # The site serve() uses: TLS connections pass the connection cap before the handshake.
        site = GatedSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context, handshake_timeout_s=HEADER_TIMEOUT_S)
        await site.start()
        self.http_port = int(self._runner.addresses[0][1])
        self._grpc = await start_grpc_front(self.service, "127.0.0.1", 0, tls=self.tls)
        self.grpc_port = self._grpc.port

    async def _stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(1.0)
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self, *cleanups: Any) -> None:
        """Stop the fronts and the service, then ``cleanups`` (coroutines), then the loop."""
        try:
            self.run(self._stop())
            for cleanup in cleanups:
                self.run(cleanup)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def token(self, sub: str = "alice", tenant: str = "acme", roles: tuple[str, ...] = ("analyst",)) -> str:
        return issue_token(self.settings.state_dir, sub=sub, tenant=tenant, roles=list(roles), ttl_s=600)

    def audit_record(self, request_id: str) -> dict[str, Any]:
        """The one audit record of a call (durable before its answer left)."""
        found = [r for r in iter_records(self.settings.audit_dir) if r.get("request_id") == request_id]
        assert len(found) == 1, f"{len(found)} audit records for {request_id}"
        return found[0]


class RecordEveryRefusal:
    """Stands in for the audit's flood control (one record per client, reason and minute
    for anonymous refusals, then a count): here the HTTP reference and the front under
    test refuse the same anonymous call from the same address within a second, and both
    records are needed to compare them. Flood control is tested in tests/audit."""

    def __init__(self, log: Any) -> None:
        self._log = log

    def start(self, interval_s: float = 1.0) -> None:
        return None

    async def close(self) -> None:
        return None

    async def refusal(self, record: Any, *, key: str) -> bool:
        await self._log.append(record)
        return True


# ---------------------------------------------------------------------------------------
# One client interface over the three tritonclient flavours
# ---------------------------------------------------------------------------------------

# The error taxonomy, read backwards: an HTTP status means this gRPC code.
HTTP_TO_GRPC: dict[int, str] = {}
for _cls in errors.GatewayError.__subclasses__():
    assert HTTP_TO_GRPC.setdefault(_cls.http_status, _cls.grpc_code.name) == _cls.grpc_code.name


@dataclass(frozen=True)
class Refused(Exception):
    """A refusal, as a gRPC code name whichever front gave it, with the client message."""

    code: str
    message: str


@dataclass(frozen=True)
class Infer:
    """What a client asks for; the same value is sent through every front."""

    model: str
    inputs: tuple[tuple[str, np.ndarray, str], ...]
    outputs: tuple[str, ...] = ()
    request_id: str = ""
    sequence_id: int = 0


_call_numbers = itertools.count()


class FrontClient:
    """Calls the gateway through one front with tritonclient, unmodified.

    Each call carries an ``x-request-id`` (the gateway accepts a well-formed one) so its
    audit record can be found; the id is returned in ``last_request_id``.
    """

    kind: str = ""

    def __init__(self, gw: GatewayThread) -> None:
        self.gw = gw
        self.last_request_id = ""

    def _headers(self, token: str | None) -> dict[str, str]:
        self.last_request_id = f"{self.kind}.{next(_call_numbers)}"
        headers = {"x-request-id": self.last_request_id}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        return headers

    def live(self) -> bool: raise NotImplementedError
    def ready(self) -> bool: raise NotImplementedError
    def model_ready(self, model: str, token: str | None, version: str = "") -> bool: raise NotImplementedError
    def server_metadata(self, token: str | None) -> dict[str, Any]: raise NotImplementedError
    def model_metadata(self, model: str, token: str | None) -> dict[str, Any]: raise NotImplementedError
    def infer(self, call: Infer, token: str | None) -> tuple[dict[str, np.ndarray], str]: raise NotImplementedError
    def close(self) -> None: pass


class HttpFrontClient(FrontClient):
    kind = "http"

    def __init__(self, gw: GatewayThread) -> None:
        super().__init__(gw)
        self.client = httpclient.InferenceServerClient(gw.http_url)

    def _headers(self, token: str | None) -> dict[str, str]:
        # Title case as HTTP clients write them; a fresh dict per call (tritonclient.http
        # writes Inference-Header-Content-Length into it).
        return {k.title(): v for k, v in super()._headers(token).items()}

    @staticmethod
    def _refusal(exc: InferenceServerException) -> Refused:
        return Refused(HTTP_TO_GRPC[int(str(exc.status()))], str(exc.message()))

    def live(self) -> bool:
        return bool(self.client.is_server_live())

    def ready(self) -> bool:
        return bool(self.client.is_server_ready())

    def model_ready(self, model: str, token: str | None, version: str = "") -> bool:
        # tritonclient.http answers False for any non-200 status, refusals included.
        return bool(self.client.is_model_ready(model, version, headers=self._headers(token)))

    def server_metadata(self, token: str | None) -> dict[str, Any]:
        try:
            return dict(self.client.get_server_metadata(headers=self._headers(token)))
        except InferenceServerException as exc:
            raise self._refusal(exc) from None

    def model_metadata(self, model: str, token: str | None) -> dict[str, Any]:
        try:
            meta = self.client.get_model_metadata(model, headers=self._headers(token))
        except InferenceServerException as exc:
            raise self._refusal(exc) from None
        return {key: meta[key] for key in ("name", "versions", "platform", "inputs", "outputs")}

    def infer(self, call: Infer, token: str | None) -> tuple[dict[str, np.ndarray], str]:
        inputs = []
        for name, array, datatype in call.inputs:
            item = httpclient.InferInput(name, list(array.shape), datatype)
            item.set_data_from_numpy(array)
            inputs.append(item)
        outputs = [httpclient.InferRequestedOutput(n) for n in call.outputs] or None
        try:
            result = self.client.infer(call.model, inputs, outputs=outputs, headers=self._headers(token),
                                       request_id=call.request_id, sequence_id=call.sequence_id)
        except InferenceServerException as exc:
            raise self._refusal(exc) from None
        response = result.get_response()
        return {o["name"]: result.as_numpy(o["name"]) for o in response["outputs"]}, str(response.get("id", ""))

    def close(self) -> None:
        self.client.close()


def _grpc_refusal(exc: InferenceServerException) -> Refused:
    return Refused(str(exc.status()).removeprefix("StatusCode."), str(exc.message()))


def _grpc_metadata(meta: Any) -> dict[str, Any]:
    def tensors(items: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": [int(d) for d in t.shape]} for t in items]

    return {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
            "inputs": tensors(meta.inputs), "outputs": tensors(meta.outputs)}


def _grpc_inputs(module: Any, call: Infer) -> tuple[list[Any], list[Any] | None]:
    inputs = []
    for name, array, datatype in call.inputs:
        item = module.InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs, [module.InferRequestedOutput(n) for n in call.outputs] or None


def _grpc_result(result: Any) -> tuple[dict[str, np.ndarray], str]:
    response = result.get_response()
    return {o.name: result.as_numpy(o.name) for o in response.outputs}, str(response.id)


class GrpcFrontClient(FrontClient):
    kind = "grpc"

    def __init__(self, gw: GatewayThread) -> None:
        super().__init__(gw)
        self.client = grpcclient.InferenceServerClient(gw.grpc_url)

    def _do(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except InferenceServerException as exc:
            raise _grpc_refusal(exc) from None

    def live(self) -> bool:
        return bool(self._do(self.client.is_server_live))

    def ready(self) -> bool:
        return bool(self._do(self.client.is_server_ready))

    def model_ready(self, model: str, token: str | None, version: str = "") -> bool:
        headers = self._headers(token)
        return bool(self._do(lambda: self.client.is_model_ready(model, version, headers=headers)))

    def server_metadata(self, token: str | None) -> dict[str, Any]:
        headers = self._headers(token)
        meta = self._do(lambda: self.client.get_server_metadata(headers=headers))
        return {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}

    def model_metadata(self, model: str, token: str | None) -> dict[str, Any]:
        headers = self._headers(token)
        return _grpc_metadata(self._do(lambda: self.client.get_model_metadata(model, headers=headers)))

    def infer(self, call: Infer, token: str | None) -> tuple[dict[str, np.ndarray], str]:
        headers = self._headers(token)
        inputs, outputs = _grpc_inputs(grpcclient, call)
        return _grpc_result(self._do(lambda: self.client.infer(
            call.model, inputs, outputs=outputs, headers=headers, request_id=call.request_id,
            sequence_id=call.sequence_id)))

    def close(self) -> None:
        self.client.close()


class GrpcAioFrontClient(FrontClient):
    """tritonclient.grpc.aio, each call in its own ``asyncio.run`` with its own client."""

    kind = "grpc-aio"

    def _do(self, fn: Callable[[Any], Any]) -> Any:
        async def run() -> Any:
            client = grpcclient_aio.InferenceServerClient(self.gw.grpc_url)
            try:
                return await fn(client)
            finally:
                await client.close()

        try:
            return asyncio.run(run())
        except InferenceServerException as exc:
            raise _grpc_refusal(exc) from None

    def live(self) -> bool:
        return bool(self._do(lambda c: c.is_server_live()))

    def ready(self) -> bool:
        return bool(self._do(lambda c: c.is_server_ready()))

    def model_ready(self, model: str, token: str | None, version: str = "") -> bool:
        headers = self._headers(token)
        return bool(self._do(lambda c: c.is_model_ready(model, version, headers=headers)))

    def server_metadata(self, token: str | None) -> dict[str, Any]:
        headers = self._headers(token)
        meta = self._do(lambda c: c.get_server_metadata(headers=headers))
        return {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}

    def model_metadata(self, model: str, token: str | None) -> dict[str, Any]:
        headers = self._headers(token)
        return _grpc_metadata(self._do(lambda c: c.get_model_metadata(model, headers=headers)))

    def infer(self, call: Infer, token: str | None) -> tuple[dict[str, np.ndarray], str]:
        headers = self._headers(token)
        inputs, outputs = _grpc_inputs(grpcclient_aio, call)
        return _grpc_result(self._do(lambda c: c.infer(
            call.model, inputs, outputs=outputs, headers=headers, request_id=call.request_id,
            sequence_id=call.sequence_id)))


CLIENTS: dict[str, type[FrontClient]] = {"http": HttpFrontClient, "grpc": GrpcFrontClient,
                                         "grpc-aio": GrpcAioFrontClient}


# ---------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    gateway = GatewayThread(gateway_settings(tmp_path_factory.mktemp("both-fronts")),
                            record_every_refusal=True).start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def http(gw: GatewayThread) -> Iterator[FrontClient]:
    """The reference every front is compared with."""
    client = HttpFrontClient(gw)
    yield client
    client.close()


@pytest.fixture(scope="module", params=KINDS)
def front(request: pytest.FixtureRequest, gw: GatewayThread) -> Iterator[FrontClient]:
    client = CLIENTS[request.param](gw)
    yield client
    client.close()


@pytest.fixture(scope="module")
def tokens(gw: GatewayThread) -> dict[str, str]:
    return {
        "analyst": gw.token(),
        "globex": gw.token(sub="gina", tenant="globex"),
        "viewer": gw.token(sub="vic", roles=("viewer",)),
    }


# Per call: ids, timing, chain position and MAC, and the personal fields' ciphertext (random nonce;
# who they belong to is compared through the client/subject pseudonyms).
VOLATILE = frozenset({"request_id", "transport", "latency_ms", "time", "seq", "prev_hash", "mac", "enc"})


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    """An audit record without what legitimately differs between two calls."""
    same = {k: v for k, v in record.items() if k not in VOLATILE}
    same["stages"] = [{k: v for k, v in stage.items() if k != "us"} for stage in record["stages"]]
    return same


def assert_same_audit(gw: GatewayThread, front: FrontClient, front_id: str, http_id: str) -> None:
    mine, reference = gw.audit_record(front_id), gw.audit_record(http_id)
    assert mine["transport"] == ("http" if front.kind == "http" else "grpc")
    assert reference["transport"] == "http"
    assert comparable(mine) == comparable(reference)


def outcome(fn: Callable[[], Any]) -> Any:
    """The answer, or the refusal as a value, so two fronts' outcomes compare with ==."""
    try:
        return fn()
    except Refused as refused:
        return refused


@functools.cache
def _test_digits() -> np.ndarray:
    from tools.build_models import load_digits_split

    return np.asarray(load_digits_split()[1], dtype=np.float32)


_next_row = itertools.count()


def pixels(rows: int = 3) -> np.ndarray:
    """Real digits, fresh rows on every call: the input policy refuses constant, off-grid or
    out-of-range images, and a tenant repeating near-identical queries looks like probing."""
    data = _test_digits()
    return np.stack([data[next(_next_row) % len(data)] for _ in range(rows)])


# For refusals that never reach the model (authn, authz, routing, shape, parameters).
DIGIT = np.asarray([DIGIT_ZERO], dtype=np.float32)


# ---------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------


def test_server_live_and_ready(front: FrontClient) -> None:
    assert front.live() is True
    assert front.ready() is True


@pytest.mark.parametrize(("case", "model", "version", "token"), [
    ("known", "digits", "", "analyst"),
    ("known_version", "digits", "1", "analyst"),
    ("unknown", "nope", "", "analyst"),
    ("not_visible", "risk", "", "globex"),
    ("no_token", "digits", "", None),
])
def test_model_ready(front: FrontClient, http: FrontClient, gw: GatewayThread, tokens: dict[str, str],
                     case: str, model: str, version: str, token: str | None) -> None:
    bearer = tokens[token] if token else None
    got = outcome(lambda: front.model_ready(model, bearer, version))
    front_id = front.last_request_id
    reference = http.model_ready(model, bearer, version)
    if case.startswith("known"):
        assert got is True and reference is True
    else:
        # tritonclient.http maps every non-200 to False; gRPC carries the refusal itself.
        expected = {"unknown": "NOT_FOUND", "not_visible": "NOT_FOUND", "no_token": "UNAUTHENTICATED"}[case]
        assert reference is False
        assert got is False if front.kind == "http" else isinstance(got, Refused) and got.code == expected
    # The decision underneath is the same on both fronts.
    assert_same_audit(gw, front, front_id, http.last_request_id)


def test_server_metadata(front: FrontClient, http: FrontClient, gw: GatewayThread, tokens: dict[str, str]) -> None:
    got = front.server_metadata(tokens["analyst"])
    front_id = front.last_request_id
    assert got == http.server_metadata(tokens["analyst"])
    assert got["name"] == "infergate"
    assert_same_audit(gw, front, front_id, http.last_request_id)
    refused = outcome(lambda: front.server_metadata(None))
    assert isinstance(refused, Refused) and refused.code == "UNAUTHENTICATED"


@pytest.mark.parametrize("model", ["digits", "text_echo"])
def test_model_metadata(front: FrontClient, http: FrontClient, gw: GatewayThread, tokens: dict[str, str],
                        model: str) -> None:
    got = front.model_metadata(model, tokens["analyst"])
    front_id = front.last_request_id
    assert got == http.model_metadata(model, tokens["analyst"])
    assert got["name"] == model and got["inputs"] and got["outputs"]
    assert_same_audit(gw, front, front_id, http.last_request_id)


def test_infer_digits_matches_onnxruntime(front: FrontClient, http: FrontClient, gw: GatewayThread,
                                          tokens: dict[str, str]) -> None:
    import onnxruntime as ort

    x = pixels()
    call = Infer("digits", (("pixels", x, "FP32"),), outputs=("probabilities",), request_id="e2e-digits")
    outputs, response_id = front.infer(call, tokens["analyst"])
    front_id = front.last_request_id
    # No flags.json in this policy set: an unversioned call gets the upstream's highest version,
    # 2 (DP-SGD), as from Triton; the shipped flags would route it to 1.
    session = ort.InferenceSession(str(TRITON_REPO / "digits" / "2" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (want,) = session.run(["probabilities"], {"pixels": x})
    assert set(outputs) == {"probabilities"}
    assert outputs["probabilities"].shape == (3, 10)
    np.testing.assert_allclose(outputs["probabilities"], want, rtol=1e-5, atol=1e-6)
    assert response_id == "e2e-digits"
    reference, _ = http.infer(call, tokens["analyst"])
    np.testing.assert_array_equal(outputs["probabilities"], reference["probabilities"])
    assert_same_audit(gw, front, front_id, http.last_request_id)


def test_infer_without_requested_outputs(front: FrontClient, http: FrontClient, tokens: dict[str, str]) -> None:
    call = Infer("digits", (("pixels", pixels(1), "FP32"),))
    outputs, _ = front.infer(call, tokens["analyst"])
    reference, _ = http.infer(call, tokens["analyst"])
    assert set(outputs) == set(reference)
    for name in outputs:
        np.testing.assert_array_equal(outputs[name], reference[name])


def test_infer_text_echo_bytes(front: FrontClient, http: FrontClient, gw: GatewayThread,
                               tokens: dict[str, str]) -> None:
    text = np.array([b"hello", "wörld".encode(), b""], dtype=np.object_)
    call = Infer("text_echo", (("text", text, "BYTES"),), outputs=("text",))
    outputs, _ = front.infer(call, tokens["analyst"])
    front_id = front.last_request_id
    assert [bytes(v) for v in outputs["text"]] == [b"hello", "wörld".encode(), b""]
    reference, _ = http.infer(call, tokens["analyst"])
    assert [bytes(v) for v in outputs["text"]] == [bytes(v) for v in reference["text"]]
    assert_same_audit(gw, front, front_id, http.last_request_id)


# case -> (token key or None, call, expected gRPC code, the HTTP status it stands for)
REFUSALS: dict[str, tuple[str | None, Infer, str, int]] = {
    "no_token": (None, Infer("digits", (("pixels", DIGIT, "FP32"),)), "UNAUTHENTICATED", 401),
    "bad_token": ("garbage", Infer("digits", (("pixels", DIGIT, "FP32"),)), "UNAUTHENTICATED", 401),
    "other_tenant_model": ("globex", Infer("risk", (("features", np.zeros((1, 30), np.float32), "FP32"),)),
                           "NOT_FOUND", 404),
    "viewer_infers": ("viewer", Infer("digits", (("pixels", DIGIT, "FP32"),)), "PERMISSION_DENIED", 403),
    "wrong_shape": ("analyst", Infer("digits", (("pixels", np.zeros((1, 63), np.float32), "FP32"),)),
                    "INVALID_ARGUMENT", 422),
    "wrong_datatype": ("analyst", Infer("digits", (("pixels", np.zeros((1, 64), np.float64), "FP64"),)),
                       "INVALID_ARGUMENT", 422),
    # IN-04 variants: a zero dimension anywhere is an empty tensor, refused on both fronts.
    "empty_batch": ("analyst", Infer("digits", (("pixels", np.zeros((0, 64), np.float32), "FP32"),)),
                    "INVALID_ARGUMENT", 422),
    "empty_text": ("analyst", Infer("text_echo", (("text", np.array([], dtype=np.object_), "BYTES"),)),
                   "INVALID_ARGUMENT", 422),
    "unknown_model": ("analyst", Infer("nope", (("pixels", DIGIT, "FP32"),)), "NOT_FOUND", 404),
    "reserved_parameter": ("analyst", Infer("digits", (("pixels", DIGIT, "FP32"),), sequence_id=5),
                           "INVALID_ARGUMENT", 400),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(front: FrontClient, http: FrontClient, gw: GatewayThread, tokens: dict[str, str],
                  case: str) -> None:
    token_key, call, code, status = REFUSALS[case]
    bearer = None if token_key is None else tokens.get(token_key, token_key)
    got = outcome(lambda: front.infer(call, bearer))
    front_id = front.last_request_id
    reference = outcome(lambda: http.infer(call, bearer))
    assert isinstance(got, Refused) and isinstance(reference, Refused)
    assert got.code == reference.code == code
    if case == "reserved_parameter":
        # The codecs word it for their own wire (JSON may carry binary_data_output).
        assert got.message.startswith("malformed request: request parameter 'sequence_id' is not allowed")
        assert reference.message.startswith("malformed request: request parameter 'sequence_id' is not allowed")
    else:
        assert got.message == reference.message
    record = gw.audit_record(front_id)
    assert record["status"] == status and record["decision"] == "deny"
    assert record["upstream_called"] is False
    assert_same_audit(gw, front, front_id, http.last_request_id)


# ---------------------------------------------------------------------------------------
# Streaming: refused cleanly, whatever the client flavour
# ---------------------------------------------------------------------------------------

STREAM_REFUSAL = "method not allowed: ModelStreamInfer is not available through this gateway"


def _grpc_input(data: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("pixels", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return tensor


@pytest.mark.parametrize("requests", [1, 2, 3, 5])
def test_aio_stream_infer_is_refused_unimplemented(gw: GatewayThread, tokens: dict[str, str], requests: int) -> None:
    """tritonclient.grpc.aio ``stream_infer`` with several requests: UNIMPLEMENTED each time.
    The front used to end the stream at once, and grpcio's aio client then failed a request
    still being written with INTERNAL "Internal error from Core" (about one call in three).
    Each case streams several times, as the old failure was random."""

    async def stream_once() -> grpc.aio.AioRpcError:
        client = grpcclient_aio.InferenceServerClient(gw.grpc_url)
        try:
            async def inputs() -> Any:
                for _ in range(requests):
                    yield {"model_name": "digits", "inputs": [_grpc_input(DIGIT)]}

            # tritonclient.grpc.aio lets the stream's AioRpcError through (no
            # InferenceServerException): a client library choice, not the gateway's.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _result, _error in client.stream_infer(inputs(), headers={
                        "authorization": f"Bearer {tokens['analyst']}"}):
                    pass
            return info.value
        finally:
            await client.close()

    for _ in range(5):
        exc = asyncio.run(stream_once())
        assert (exc.code(), exc.details()) == (grpc.StatusCode.UNIMPLEMENTED, STREAM_REFUSAL)


def test_sync_stream_is_refused_through_the_callback(gw: GatewayThread, tokens: dict[str, str]) -> None:
    import queue

    client = grpcclient.InferenceServerClient(gw.grpc_url)
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    try:
        client.start_stream(callback=lambda result, error: got.put((result, error)),
                            headers={"authorization": f"Bearer {tokens['analyst']}"})
        for _ in range(3):
            client.async_stream_infer("digits", [_grpc_input(DIGIT)])
        result, error = got.get(timeout=hang_bound())  # a hang bound, not a speed check
        client.stop_stream()
    finally:
        client.close()
    assert result is None
    assert isinstance(error, InferenceServerException)
    assert (error.status(), error.message()) == ("StatusCode.UNIMPLEMENTED", STREAM_REFUSAL)
