"""The Triton upstream: KServe V2 over gRPC with ``tritonclient.grpc.aio``.

One channel, opened in :meth:`TritonGrpcUpstream.start` and closed in ``close``, is shared
by every request (HTTP/2 multiplexes them). Each call carries a gRPC deadline equal to the
caller's remaining budget (tritonclient's ``client_timeout``).

Errors: tritonclient turns every ``grpc.RpcError`` into ``InferenceServerException``,
whose ``status()`` is the *string* ``str(grpc.StatusCode.X)``, e.g.
``"StatusCode.NOT_FOUND"`` (tritonclient 2.73.0, ``grpc/_utils.py``), or ``None`` for
errors raised by the client library itself. :func:`upstream_error` is the one place that
maps them, branching on the status code and never on message text (Triton, MLServer and
KServe word the same error differently). The upstream's text is logged, never returned.

What goes out: only the tensors and the request id. Client headers are never forwarded
(``headers`` is built here: none yet), no request parameters are set, and by default the
channel ignores ``http_proxy``-style environment variables.

What comes back is checked before anyone uses it: each output must be declared (or
requested), appear once, have the declared datatype, a shape that fits the declaration,
and exactly as many bytes as its shape needs. Anything else is ``UpstreamBadResponse``.

Cost: inference is the one call on every request's path, so it skips tritonclient's
per-call Python layer (``InferInput``/``set_data_from_numpy``, ``_get_inference_request``,
headers-to-metadata plugin, ``InferResult.as_numpy``) and sends a ``ModelInferRequest``
built in one constructor call through tritonclient's own generated stub on its channel,
decoding the reply's raw contents directly. The request bytes on the wire are identical
to what ``client.infer`` sends and the arrays returned are identical to the ones
``as_numpy`` gave (``tests/upstream/test_triton_grpc_fast.py`` pins both); errors are
converted by tritonclient's ``raise_error_grpc`` exactly as ``client.infer`` does.
Health and metadata calls keep using tritonclient's client methods unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import struct
from typing import Any, Final, NoReturn

import grpc  # type: ignore[import-untyped, unused-ignore]
import grpc.aio  # type: ignore[import-untyped, unused-ignore]
import numpy as np
import structlog
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from gateway.errors import (
    GatewayError,
    InputRejected,
    NotFound,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.kserve import (
    CONTENTS_FIELD,
    DTYPES,
    ELEMENT_SIZE,
    InferRequest,
    InferResponse,
    ModelMetadata,
    NDArray,
    ServerMetadata,
    Tensor,
    TensorSpec,
    element_count,
)
from gateway.observability.logging import upstream_text
from gateway.upstream.model_repo import requested_outputs, shape_matches, validate_request

log = structlog.get_logger("gateway.upstream.triton_grpc")

DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
# The gRPC deadline should fire first; this is the net under it (e.g. a stuck resolver).
_DEADLINE_GRACE_S: Final = 0.25
# gRPC's default reconnect backoff grows 1 s x 1.6 per failed attempt up to 120 s: an
# upstream that was down for 30 s at start came back and /ready stayed 503 for another
# ~16 s (AV-05: ready within 5 s of the upstream coming up, without a restart). A channel
# in TRANSIENT_FAILURE fails calls at once until its next attempt, so the backoff is the
# recovery time. Capped at 1 s (+/-20 % jitter): one connect attempt a second to one
# address is nothing. grpc.min_reconnect_backoff_ms is left alone: gRPC uses it as the
# minimum connect timeout (default 20 s), which a TLS upstream on a busy host may need.
RECONNECT_BACKOFF_INITIAL_MS: Final = 250
RECONNECT_BACKOFF_MAX_MS: Final = 1_000

_INPUT_REJECTED: Final = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE", "FAILED_PRECONDITION"})
_UNAVAILABLE: Final = frozenset({"UNAVAILABLE", "CANCELLED", "RESOURCE_EXHAUSTED"})

_ModelInferRequest: Final[Any] = service_pb2.ModelInferRequest
_InputTensor: Final[Any] = service_pb2.ModelInferRequest.InferInputTensor
_RequestedOutput: Final[Any] = service_pb2.ModelInferRequest.InferRequestedOutputTensor
# tritonclient's infer passes NoCompression explicitly; so do we (same call options).
_NO_COMPRESSION: Final = grpc.Compression.NoCompression
_LENGTH: Final = struct.Struct("<I")  # BYTES elements: 4-byte little-endian length prefix


class _InferenceClient(tgrpc_aio.InferenceServerClient):  # type: ignore[misc]
    """tritonclient's aio client plus one call that sends a ready ``ModelInferRequest``.

    ``client.infer`` rebuilds the request from ``InferInput`` objects and wraps the reply
    in ``InferResult`` on every call; this sends the message the caller built, on the same
    channel and generated stub (``_client_stub``, set by tritonclient 2.73.0's ``__init__``)
    with the same call options, and converts errors the same way.
    """

    async def model_infer(self, request: Any, *, metadata: tuple[tuple[str, str], ...], deadline_s: float) -> Any:
        try:
            return await self._client_stub.ModelInfer(
                request=request, metadata=metadata, timeout=deadline_s, compression=_NO_COMPRESSION
            )
        except grpc.RpcError as rpc_error:
            tgrpc.raise_error_grpc(rpc_error)


def status_code_name(exc: BaseException) -> str | None:
    """The gRPC status code name (``"NOT_FOUND"``) an exception carries, or None.

    tritonclient 2.73.0 gives ``InferenceServerException.status() == "StatusCode.NOT_FOUND"``
    (``str()`` of the enum); a ``grpc.aio.AioRpcError`` that escaped it has ``code()``.
    """
    if isinstance(exc, InferenceServerException):
        status = exc.status()
        if not isinstance(status, str):
            return None  # raised by tritonclient itself, not by the server
        name = status.removeprefix("StatusCode.")
        return name if name in grpc.StatusCode.__members__ else None
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        code = exc.code()
        return code.name if isinstance(code, grpc.StatusCode) else None
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError is TimeoutError since 3.11
        return "DEADLINE_EXCEEDED"
    if isinstance(exc, (ConnectionError, grpc.aio.UsageError)):  # e.g. channel already closed
        return "UNAVAILABLE"
    return None


def upstream_error(exc: BaseException, *, operation: str, model: str | None = None) -> GatewayError:
    """THE mapping from anything tritonclient/grpc raised to a :class:`GatewayError`.

    Branches on the status code only. The upstream's message can carry host names, paths
    or model internals, so it goes to the log and the error gets a fixed text.
    """
    code = status_code_name(exc)
    raw = exc.message() if isinstance(exc, InferenceServerException) else str(exc)
    # SECURITY: the raw upstream text is for operators: logged here, never in the error.
    log.warning(
        "upstream_grpc_error",
        operation=operation,
        model=model,
        code=code,
        error_type=type(exc).__name__,
        error=upstream_text(raw),
    )
    if code == "NOT_FOUND":
        return NotFound(reason="model_unknown")
    if code in _INPUT_REJECTED:
        return InputRejected("the model server rejected the input", reason="upstream_rejected")
    if code == "DEADLINE_EXCEEDED":
        return UpstreamTimeout()
    if code in _UNAVAILABLE:
        reason = "upstream_overloaded" if code == "RESOURCE_EXHAUSTED" else "upstream_unavailable"
        return UpstreamUnavailable(reason=reason, retry_after_s=1.0)
    # UNIMPLEMENTED, INTERNAL, UNKNOWN, DATA_LOSS, auth codes, None: the upstream (or the
    # library) misbehaved in a way the client cannot fix.
    return UpstreamBadResponse(reason="upstream_error")


class TritonGrpcUpstream:
    """:class:`~gateway.upstream.base.Upstream` for Triton (or a KServe V2 gRPC stand-in).

    ``url`` is ``host:port``. ``ssl`` and the certificate paths are tritonclient's.
    ``validate``: check requests against the model metadata before sending them (Triton
    does it too, the stand-ins do not) and check responses against it; metadata is cached
    per (model, version) for ``metadata_ttl_s``. ``max_message_bytes`` bounds both
    directions (tritonclient's default is 2 GiB). ``use_env_proxy`` lets gRPC honour
    ``http_proxy``/``grpc_proxy`` variables.
    """

    def __init__(
        self,
        url: str,
        *,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
        validate: bool = True,
        metadata_ttl_s: float = 30.0,
        metadata_cache_size: int = 256,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        use_env_proxy: bool = False,
    ) -> None:
        self.url = url
        self._ssl = ssl
        self._root_certificates = root_certificates
        self._private_key = private_key
        self._certificate_chain = certificate_chain
        self._validate = validate
        self._metadata_ttl_s = metadata_ttl_s
        self._metadata_cache_size = metadata_cache_size
        self._max_message_bytes = max_message_bytes
        self._use_env_proxy = use_env_proxy
        self._client: Any = None
        self._metadata: collections.OrderedDict[tuple[str, str], tuple[float, ModelMetadata]] = (
            collections.OrderedDict()
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create the one shared channel (connection happens lazily, on the first call)."""
        if self._client is not None:
            return
        keepalive = tgrpc.KeepAliveOptions()
        channel_args = [
            # SECURITY: bound what a broken or hostile upstream can make us buffer.
            ("grpc.max_send_message_length", self._max_message_bytes),
            ("grpc.max_receive_message_length", self._max_message_bytes),
            # SECURITY: inference payloads must not be diverted through a proxy that was
            # configured in the environment for something else (pip, curl).
            ("grpc.enable_http_proxy", 1 if self._use_env_proxy else 0),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            # Recovery after an upstream outage is bounded by the reconnect backoff (AV-05).
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_INITIAL_MS),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
        ]
        self._client = _InferenceClient(
            self.url,
            ssl=self._ssl,
            root_certificates=self._root_certificates,
            private_key=self._private_key,
            certificate_chain=self._certificate_chain,
            channel_args=channel_args,
        )

    async def close(self) -> None:
        """Close the channel; calls in flight fail as UpstreamUnavailable. Idempotent."""
        client, self._client = self._client, None
        self._metadata.clear()
        if client is not None:
            await client.close()

    # ------------------------------------------------------------------ health and metadata

    async def server_live(self, *, timeout_s: float) -> bool:
        return bool(await self._call("server_live", None, timeout_s, self._live))

    async def server_ready(self, *, timeout_s: float) -> bool:
        return bool(await self._call("server_ready", None, timeout_s, self._ready))

    async def server_metadata(self, *, timeout_s: float) -> ServerMetadata:
        response = await self._call("server_metadata", None, timeout_s, self._server_metadata)
        return ServerMetadata(
            name=str(response.name), version=str(response.version), extensions=tuple(response.extensions)
        )

    async def model_ready(self, model: str, version: str, *, timeout_s: float) -> bool:
        """False for a model the server does not know, rather than an error.

        MLServer answers an unknown model with UNKNOWN, Triton and KServe with NOT_FOUND
        (``notes/BACKENDS.md``); both mean "not ready". Other failures still raise.
        """
        client = self._require_client()
        try:
            ready = await self._bounded(
                client.is_model_ready(
                    model, version, headers=self._headers(), client_timeout=max(timeout_s, 0.0)
                ),
                timeout_s,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the one boundary: everything is mapped
            if status_code_name(exc) in ("NOT_FOUND", "UNKNOWN"):
                return False
            raise upstream_error(exc, operation="model_ready", model=model) from exc
        return bool(ready)

    async def model_metadata(self, model: str, version: str, *, timeout_s: float) -> ModelMetadata:
        response = await self._call(
            "model_metadata",
            model,
            timeout_s,
            lambda client, t: client.get_model_metadata(
                model, version, headers=self._headers(), client_timeout=t
            ),
        )
        try:
            metadata = _metadata_from_proto(response)
        except (TypeError, ValueError) as exc:
            log.warning("upstream_bad_metadata", model=model, error=upstream_text(str(exc)))
            raise UpstreamBadResponse(reason="upstream_bad_metadata") from exc
        if metadata.name and metadata.name != model:
            log.warning("upstream_bad_metadata", model=model, error="metadata for another model")
            raise UpstreamBadResponse(reason="upstream_bad_metadata")
        return metadata

    # ------------------------------------------------------------------ inference

    async def infer(self, request: InferRequest, *, timeout_s: float) -> InferResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        metadata: ModelMetadata | None = None
        if self._validate:
            metadata = await self._cached_metadata(request.model, request.version, deadline)
            # Missing inputs are left to the server: KServe metadata cannot say which
            # inputs are optional.
            validate_request(metadata, request, required_inputs=())
            expected = requested_outputs(metadata, request)
        else:
            expected = [out.name for out in request.outputs]
        message = _infer_message(request)
        # SECURITY: as _headers(): only the validated trace context goes out, never client headers.
        grpc_metadata = (("traceparent", request.traceparent),) if request.traceparent else ()

        remaining = deadline - loop.time()
        response = await self._call(
            "infer",
            request.model,
            remaining,
            lambda client, t: client.model_infer(message, metadata=grpc_metadata, deadline_s=t),
        )
        try:
            tensors = _outputs(response, request, expected, metadata)
        except UpstreamBadResponse:
            raise
        except Exception as exc:  # anything odd in a response is the upstream's fault
            log.warning(
                "upstream_bad_response", model=request.model, error_type=type(exc).__name__,
                error=upstream_text(str(exc)),
            )
            raise UpstreamBadResponse(reason="upstream_bad_response") from exc
        if response.model_name and response.model_name != request.model:
            _bad("infer", request.model, "response names another model")
        return InferResponse(
            model_name=request.model,
            model_version=str(response.model_version) or request.version,
            outputs=tensors,
            id=request.id,
        )

    # ------------------------------------------------------------------ helpers

    def _headers(self, traceparent: str | None = None) -> dict[str, str] | None:
        """gRPC metadata sent upstream, built here only.

        SECURITY: nothing from the client's request (authorization, cookies, identity
        headers) is ever forwarded; only the W3C trace context, which the front validated.
        """
        return {"traceparent": traceparent} if traceparent else None

    def _require_client(self) -> Any:
        if self._client is None:
            raise UpstreamUnavailable(reason="upstream_not_started")
        return self._client

    async def _call(self, operation: str, model: str | None, timeout_s: float, fn: Any) -> Any:
        """Run one RPC with the deadline; map whatever it raises (cancellation excepted)."""
        client = self._require_client()
        try:
            return await self._bounded(fn(client, max(timeout_s, 0.0)), timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the one boundary: everything is mapped
            raise upstream_error(exc, operation=operation, model=model) from exc

    @staticmethod
    async def _bounded(awaitable: Any, timeout_s: float) -> Any:
        async with asyncio.timeout(max(timeout_s, 0.0) + _DEADLINE_GRACE_S):
            return await awaitable

    def _live(self, client: Any, timeout_s: float) -> Any:
        return client.is_server_live(headers=self._headers(), client_timeout=timeout_s)

    def _ready(self, client: Any, timeout_s: float) -> Any:
        return client.is_server_ready(headers=self._headers(), client_timeout=timeout_s)

    def _server_metadata(self, client: Any, timeout_s: float) -> Any:
        return client.get_server_metadata(headers=self._headers(), client_timeout=timeout_s)

    async def _cached_metadata(self, model: str, version: str, deadline: float) -> ModelMetadata:
        loop = asyncio.get_running_loop()
        key = (model, version)
        cached = self._metadata.get(key)
        if cached is not None and cached[0] > loop.time():
            return cached[1]
        metadata = await self.model_metadata(model, version, timeout_s=deadline - loop.time())
        self._metadata[key] = (loop.time() + self._metadata_ttl_s, metadata)
        self._metadata.move_to_end(key)
        # SECURITY: bounded; a server that ignores versions (KServe) would otherwise let
        # clients grow this with one entry per made-up version string.
        while len(self._metadata) > self._metadata_cache_size:
            self._metadata.popitem(last=False)
        return metadata


# ---------------------------------------------------------------------- conversions


def _metadata_from_proto(response: Any) -> ModelMetadata:
    def specs(tensors: Any) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(name=str(t.name), datatype=str(t.datatype), shape=tuple(int(d) for d in t.shape))
            for t in tensors
        )

    return ModelMetadata(
        name=str(response.name),
        versions=tuple(str(v) for v in response.versions),
        platform=str(response.platform),
        inputs=specs(response.inputs),
        outputs=specs(response.outputs),
    )


def _infer_message(request: InferRequest) -> Any:
    """The ``ModelInferRequest`` tritonclient's ``infer`` would build for ``request``.

    Same checks as ``InferInput.set_data_from_numpy`` (array dtype is the datatype's,
    shape is the declared one) and the same encoding (``tobytes()`` in C order; BYTES as
    4-byte little-endian length + bytes per element, row-major), field for field.
    """
    tensors: list[Any] = []
    contents: list[bytes] = []
    for tensor in request.inputs:
        data: Any = tensor.data  # typed NDArray, but checked as tritonclient did
        if tensor.datatype == "BYTES":
            # tritonclient would str() anything else: refuse instead of sending a repr.
            # (np.bytes_ elements of an "S" array are bytes, as tritonclient accepts.)
            if not isinstance(data, np.ndarray) or not all(isinstance(v, bytes) for v in data.flat):
                raise InputRejected(
                    f"input {tensor.name!r}: BYTES elements must be bytes", reason="input_datatype"
                )
            dtype_ok = data.dtype == np.object_ or data.dtype.type == np.bytes_
        else:
            expected = DTYPES.get(tensor.datatype)
            dtype_ok = isinstance(data, np.ndarray) and expected is not None and data.dtype == expected
        if not dtype_ok or data.shape != tuple(tensor.shape):
            log.info("upstream_input_encoding_failed", input=tensor.name, error="datatype or shape mismatch")
            raise InputRejected(
                f"input {tensor.name!r}: data does not match its datatype or shape", reason="input_datatype"
            )
        tensors.append(_InputTensor(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape))
        contents.append(_bytes_tensor(data) if tensor.datatype == "BYTES" else data.tobytes())
    return _ModelInferRequest(
        model_name=request.model,
        model_version=request.version,
        id=request.id or "",
        inputs=tensors,
        outputs=[_RequestedOutput(name=out.name) for out in request.outputs],
        raw_input_contents=contents,
    )


def _bytes_tensor(data: NDArray) -> bytes:
    """KServe V2 raw BYTES: each element's 4-byte little-endian length, then the element."""
    parts: list[bytes] = []
    for value in data.flat:
        parts.append(_LENGTH.pack(len(value)))
        parts.append(value)
    return b"".join(parts)


def _bytes_elements(buffer: bytes) -> list[bytes]:
    """Split raw BYTES contents into elements; a length that overruns the buffer is an error."""
    elements: list[bytes] = []
    offset, end = 0, len(buffer)
    while offset < end:
        if offset + 4 > end:
            raise ValueError(f"truncated length prefix at byte {offset}")
        (length,) = _LENGTH.unpack_from(buffer, offset)
        offset += 4
        if offset + length > end:
            raise ValueError(f"element of {length} bytes at byte {offset} overruns {end}")
        elements.append(buffer[offset : offset + length])
        offset += length
    return elements


def _outputs(
    response: Any, request: InferRequest, expected: list[str], metadata: ModelMetadata | None
) -> list[Tensor]:
    """Decode and check every output of a ``ModelInferResponse``; any inconsistency is the upstream's."""
    raw = response.raw_output_contents
    if len(raw) not in (0, len(response.outputs)):
        _bad("infer", request.model, "raw_output_contents does not match the outputs")
    tensors: list[Tensor] = []
    seen: set[str] = set()
    for index, out in enumerate(response.outputs):
        name = str(out.name)
        if name in seen:
            _bad("infer", request.model, f"output {name!r} appears twice")
        seen.add(name)
        if expected and name not in expected:
            _bad("infer", request.model, f"output {name!r} was neither requested nor declared")
        datatype = str(out.datatype)
        if datatype not in DTYPES:
            _bad("infer", request.model, f"output {name!r} has unsupported datatype {datatype!r}")
        shape = tuple(int(d) for d in out.shape)
        if any(d < 0 for d in shape):
            _bad("infer", request.model, f"output {name!r} has a negative dimension")
        spec = metadata.output(name) if metadata is not None else None
        if spec is not None:
            if datatype != spec.datatype:
                _bad("infer", request.model, f"output {name!r} is {datatype}, declared {spec.datatype}")
            if not shape_matches(shape, spec.shape):
                _bad("infer", request.model, f"output {name!r} shape {list(shape)} is not {list(spec.shape)}")
        count = element_count(shape)
        if raw:
            data = _raw_array(name, datatype, count, raw[index], request.model)
        else:
            data = _typed_array(out, datatype, count, request.model)
        tensors.append(Tensor(name=name, datatype=datatype, shape=shape, data=data.reshape(shape)))
    missing = [name for name in expected if name not in seen]
    if missing:
        _bad("infer", request.model, f"outputs {missing} are missing from the response")
    return tensors


def _raw_array(name: str, datatype: str, count: int, buffer: bytes, model: str) -> NDArray:
    """A writable array of ``count`` elements from raw contents (the caller reshapes it)."""
    if datatype == "BYTES":
        try:
            elements = _bytes_elements(buffer)
        except ValueError as exc:  # truncated elements
            _bad("infer", model, f"output {name!r} cannot be decoded: {exc}")
        if len(elements) != count:
            _bad("infer", model, f"output {name!r} does not hold {count} elements")
        array = np.empty(count, dtype=np.object_)
        array[:] = elements
        return array
    if len(buffer) != count * ELEMENT_SIZE[datatype]:
        _bad("infer", model, f"output {name!r} has {len(buffer)} bytes for {count} elements")
    # np.frombuffer views are read-only; stages (noise, masking) may write in place.
    copied: NDArray = np.frombuffer(buffer, dtype=DTYPES[datatype]).copy()
    return copied


def _typed_array(out: Any, datatype: str, count: int, model: str) -> NDArray:
    field = CONTENTS_FIELD.get(datatype)
    values = list(getattr(out.contents, field)) if field is not None else []
    if len(values) != count:
        _bad("infer", model, f"output {out.name!r} has {len(values)} typed values for {count} elements")
    if datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = [bytes(v) for v in values]
        return array
    try:
        return np.array(values, dtype=DTYPES[datatype])
    except (OverflowError, ValueError) as exc:
        _bad("infer", model, f"output {out.name!r} has values outside {datatype}: {exc}")


def _bad(operation: str, model: str, problem: str) -> NoReturn:
    """Log what is wrong with a response, then raise UpstreamBadResponse."""
    log.warning("upstream_bad_response", operation=operation, model=model, problem=problem)
    raise UpstreamBadResponse(reason="upstream_bad_response")
