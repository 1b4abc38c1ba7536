"""A scriptable fake Triton gRPC server for fault injection.

Real servers (MLServer, KServe) cannot be told to hang, send a malformed tensor or fail
with a chosen status code; this fake can, between two calls of the same test. It is a
``grpc.aio`` server on ``127.0.0.1:<free port>`` built on tritonclient's generated
``GRPCInferenceServiceServicer`` and implements the RPCs the gateway relies on:
ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata and ModelInfer (the
others answer UNIMPLEMENTED, like the stand-ins).

Usage::

    fake = FakeTriton([DIGITS])
    await fake.start()
    fake.set(error(grpc.StatusCode.INTERNAL))      # every ModelInfer from now on
    fake.set(hang(), rpc="ModelReady")             # one RPC kind
    fake.set(slow(0.5), model="digits")            # one model
    fake.set(with_metadata(ok(), initial=(("set-cookie", "a=b"),)))  # response metadata
    fake.set(redirect("http://127.0.0.1:9/"))      # UNAVAILABLE with a `location` header
    ...
    fake.requests[-1]        # the last ModelInferRequest proto received (a copy)
    fake.calls[-1].metadata  # the gRPC metadata that came with it
    fake.calls[-1].deadline_s  # the gRPC deadline it arrived with (seconds left; None: none)
    fake.counts["ModelInfer"], fake.cancelled["ModelInfer"]
    fake.peak_in_flight["ModelInfer"]  # most calls of that RPC held (slow/hang) at once
    await fake.stop()

Error messages contain :data:`CANARY` so tests can prove the gateway never passes an
upstream's text on to its client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal

import grpc  # type: ignore[import-untyped, unused-ignore]
import grpc.aio  # type: ignore[import-untyped, unused-ignore]
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from gateway import kserve
from gateway.kserve import DTYPES, ModelMetadata, NDArray, TensorSpec

# Looks like what a real server might leak: an internal address and a secret.
CANARY: Final = "/internal/host:1234 secret"

Kind = Literal[
    "ok",
    "echo",
    "error",
    "hang",
    "slow",
    "wrong_shape",
    "wrong_datatype",
    "nan_out",
    "bad_size",
    "extra_output",
]
OutputFn = Callable[[Mapping[str, NDArray]], Mapping[str, NDArray]]

INFER: Final = "ModelInfer"
RPCS: Final = ("ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", INFER)
EXTRA_OUTPUT: Final = "undeclared_extra"


@dataclass(frozen=True, slots=True)
class Behaviour:
    """What the fake does for an RPC. Build with the functions below, not directly."""

    kind: Kind
    code: Any = None  # grpc.StatusCode for "error"
    message: str = ""
    seconds: float = 0.0
    fn: OutputFn | None = None
    # Response headers (initial metadata) and trailers, sent whatever the kind.
    initial_metadata: tuple[tuple[str, str | bytes], ...] = ()
    trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()


def ok(fn: OutputFn | None = None) -> Behaviour:
    """Answer normally; ModelInfer returns zeros of the declared shapes, or ``fn(inputs)``."""
    return Behaviour("ok", fn=fn)


def echo() -> Behaviour:
    """ModelInfer returns each input as the output of the same name (else same position)."""
    return Behaviour("echo")


def error(code: Any, message: str | None = None) -> Behaviour:
    """Abort with ``code``; the message contains the canary unless one is given."""
    return Behaviour("error", code=code, message=message or f"failure at {CANARY} (details for operators)")


def hang() -> Behaviour:
    """Never answer; the handler only ends when the call is cancelled (deadline, close)."""
    return Behaviour("hang")


def slow(seconds: float) -> Behaviour:
    """Sleep ``seconds``, then answer as ``ok``."""
    return Behaviour("slow", seconds=seconds)


def with_metadata(behaviour: Behaviour, *, initial: Iterable[tuple[str, str | bytes]] = (),
                  trailing: Iterable[tuple[str, str | bytes]] = ()) -> Behaviour:
    """``behaviour``, plus response headers (``initial``) and trailers: what a hostile or
    misconfigured upstream may add (``set-cookie``, ``server``, a 1 MB value, CR/LF)."""
    return dataclasses.replace(behaviour, initial_metadata=tuple(initial), trailing_metadata=tuple(trailing))


def redirect(location: str) -> Behaviour:
    """The nearest gRPC has to a redirect: UNAVAILABLE with ``location`` in headers and trailers."""
    return with_metadata(error(grpc.StatusCode.UNAVAILABLE, "moved"), initial=(("location", location),),
                         trailing=(("location", location),))


def wrong_shape() -> Behaviour:
    """ModelInfer outputs with one more element in the last dimension than declared."""
    return Behaviour("wrong_shape")


def wrong_datatype() -> Behaviour:
    """ModelInfer outputs labelled with another datatype of the same size (FP32 <-> INT32)."""
    return Behaviour("wrong_datatype")


def nan_out() -> Behaviour:
    """ModelInfer float outputs full of NaN (and an inf), declared shapes."""
    return Behaviour("nan_out")


def bad_size() -> Behaviour:
    """ModelInfer outputs whose raw bytes are one byte short of what the shape needs."""
    return Behaviour("bad_size")


def extra_output() -> Behaviour:
    """ModelInfer adds an output the model does not declare."""
    return Behaviour("extra_output")


@dataclass(frozen=True, slots=True)
class RecordedCall:
    """One RPC as received: its name, model (if any) and invocation metadata.

    ``deadline_s`` is the time the call had left when it arrived (``None``: no deadline):
    tests check the deadline a client sent instead of timing how long it waited.
    """

    rpc: str
    model: str | None
    metadata: tuple[tuple[str, str | bytes], ...]
    deadline_s: float | None = None


@dataclass
class _State:
    defaults: dict[str, Behaviour] = field(default_factory=dict)
    per_model: dict[tuple[str, str], Behaviour] = field(default_factory=dict)


class FakeTriton:
    """The fake server. ``models`` are served as given (name, versions, tensors, batching)."""

    def __init__(
        self,
        models: Iterable[ModelMetadata],
        *,
        name: str = "fake-triton",
        version: str = "0.0.0-fake",
        extensions: Iterable[str] = (),
    ) -> None:
        self.models: dict[str, ModelMetadata] = {m.name: m for m in models}
        self.server_name = name
        self.server_version = version
        self.extensions = tuple(extensions)
        self.requests: list[Any] = []  # service_pb2.ModelInferRequest copies
        self.calls: list[RecordedCall] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.cancelled: collections.Counter[str] = collections.Counter()
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.peak_in_flight: collections.Counter[str] = collections.Counter()
        self._state = _State()
        self._server: Any = None
        self.port = 0

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("FakeTriton is not started")
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ control

    def set(self, behaviour: Behaviour, *, rpc: str = INFER, model: str | None = None) -> None:
        """Use ``behaviour`` for ``rpc`` (for one ``model`` only, if given) from now on."""
        if rpc not in RPCS:
            raise ValueError(f"unknown rpc {rpc!r}; one of {RPCS}")
        if model is None:
            self._state.defaults[rpc] = behaviour
        else:
            self._state.per_model[(rpc, model)] = behaviour

    def reset(self) -> None:
        """Back to ``ok`` everywhere; recorded requests and counters are cleared too."""
        self._state = _State()
        self.requests.clear()
        self.calls.clear()
        self.counts.clear()
        self.cancelled.clear()
        self.peak_in_flight.clear()  # in_flight is not: calls in progress still end

    def behaviour(self, rpc: str, model: str | None) -> Behaviour:
        if model is not None and (rpc, model) in self._state.per_model:
            return self._state.per_model[(rpc, model)]
        return self._state.defaults.get(rpc, ok())

    # ------------------------------------------------------------------ lifecycle

    async def start(self, port: int = 0) -> None:
        """Serve on ``port`` (0: any free one; a fixed one brings back an upstream that was down)."""
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            ]
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(self), server)
        self.port = int(server.add_insecure_port(f"127.0.0.1:{port}"))
        await server.start()
        self._server = server

    async def stop(self) -> None:
        """Stop at once, cancelling calls in progress (a hung handler included). Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace=None)

    async def __aenter__(self) -> FakeTriton:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ used by the servicer

    def record(self, rpc: str, model: str | None, context: Any) -> None:
        metadata = tuple((str(m.key), m.value) for m in (context.invocation_metadata() or ()))
        self.calls.append(RecordedCall(rpc=rpc, model=model, metadata=metadata,
                                       deadline_s=context.time_remaining()))
        self.counts[rpc] += 1


class _Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Triton's generated servicer; unimplemented RPCs keep its UNIMPLEMENTED answers."""

    def __init__(self, fake: FakeTriton) -> None:
        self.fake = fake

    async def _apply(self, rpc: str, model: str | None, context: Any) -> Behaviour:
        """Record the call and run the timing/error part of the behaviour."""
        self.fake.record(rpc, model, context)
        behaviour = self.fake.behaviour(rpc, model)
        if behaviour.initial_metadata:
            await context.send_initial_metadata(behaviour.initial_metadata)
        if behaviour.trailing_metadata:
            context.set_trailing_metadata(behaviour.trailing_metadata)
        self.fake.in_flight[rpc] += 1
        self.fake.peak_in_flight[rpc] = max(self.fake.peak_in_flight[rpc], self.fake.in_flight[rpc])
        try:
            if behaviour.kind == "hang":
                await asyncio.Event().wait()
            elif behaviour.kind == "slow":
                await asyncio.sleep(behaviour.seconds)
        except asyncio.CancelledError:
            self.fake.cancelled[rpc] += 1
            raise
        finally:
            self.fake.in_flight[rpc] -= 1
        if behaviour.kind == "error":
            await context.abort(behaviour.code, behaviour.message)
        return behaviour

    async def ServerLive(self, request: Any, context: Any) -> Any:  # gRPC's method names
        await self._apply("ServerLive", None, context)
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        await self._apply("ServerReady", None, context)
        return service_pb2.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        await self._apply("ServerMetadata", None, context)
        return service_pb2.ServerMetadataResponse(
            name=self.fake.server_name,
            version=self.fake.server_version,
            extensions=list(self.fake.extensions),
        )

    async def ModelReady(self, request: Any, context: Any) -> Any:
        await self._apply("ModelReady", request.name, context)
        model = self.fake.models.get(request.name)
        ready = model is not None and (request.version in ("", *model.versions))
        return service_pb2.ModelReadyResponse(ready=ready)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        await self._apply("ModelMetadata", request.name, context)
        model = await self._model(request.name, request.version, context)
        return service_pb2.ModelMetadataResponse(
            name=model.name,
            versions=list(model.versions),
            platform=model.platform,
            inputs=[_tensor_metadata(s) for s in model.inputs],
            outputs=[_tensor_metadata(s) for s in model.outputs],
        )

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        copy = service_pb2.ModelInferRequest()
        copy.CopyFrom(request)
        self.fake.requests.append(copy)
        behaviour = await self._apply(INFER, request.model_name, context)
        model = await self._model(request.model_name, request.model_version, context)
        inputs = _decode_inputs(request)
        names = [o.name for o in request.outputs] or [s.name for s in model.outputs]
        outputs = _make_outputs(model, behaviour, inputs, names)
        response = service_pb2.ModelInferResponse(
            model_name=model.name,
            model_version=request.model_version or (model.versions[-1] if model.versions else ""),
            id=request.id,
        )
        for name, datatype, array in outputs:
            tensor = response.outputs.add()
            tensor.name = name
            tensor.datatype = datatype
            tensor.shape.extend(int(d) for d in array.shape)
            raw = _encode(datatype, array)
            if behaviour.kind == "bad_size":
                raw = raw[:-1] if raw else b"\x00"
            response.raw_output_contents.append(raw)
        return response

    # kserve.ModelMetadata: inside this class, ``ModelMetadata`` is the RPC method.
    async def _model(self, name: str, version: str, context: Any) -> kserve.ModelMetadata:
        model = self.fake.models.get(name)
        if model is None or (version and version not in model.versions):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model {CANARY}")
        if model is None:  # unreachable: abort() raises
            raise RuntimeError("abort() returned")
        return model


def _tensor_metadata(spec: TensorSpec) -> Any:
    return service_pb2.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=list(spec.shape)
    )


def _decode_inputs(request: Any) -> dict[str, NDArray]:
    arrays: dict[str, NDArray] = {}
    for index, tensor in enumerate(request.inputs):
        shape = [int(d) for d in tensor.shape]
        raw = request.raw_input_contents[index] if index < len(request.raw_input_contents) else b""
        if tensor.datatype == "BYTES":
            array = deserialize_bytes_tensor(raw) if raw else np.empty(0, dtype=np.object_)
        else:
            array = np.frombuffer(raw, dtype=DTYPES.get(tensor.datatype, np.uint8)).copy()
        with contextlib.suppress(ValueError):
            array = array.reshape(shape)
        arrays[tensor.name] = array
    return arrays


def _make_outputs(
    model: ModelMetadata, behaviour: Behaviour, inputs: Mapping[str, NDArray], names: list[str]
) -> list[tuple[str, str, NDArray]]:
    first = next(iter(inputs.values()), None)
    batch = int(first.shape[0]) if first is not None and first.ndim > 0 else 1
    computed: Mapping[str, NDArray] = behaviour.fn(inputs) if behaviour.fn is not None else {}
    input_list = list(inputs.values())
    outputs: list[tuple[str, str, NDArray]] = []
    for position, name in enumerate(names):
        spec = model.output(name)
        datatype = spec.datatype if spec is not None else "FP32"
        shape = spec.shape if spec is not None else (-1,)
        if name in computed:
            array = np.asarray(computed[name])
        elif behaviour.kind == "echo":
            source = inputs.get(name)
            if source is None:
                source = input_list[min(position, len(input_list) - 1)]
            array = source
        else:
            dims = [batch if (d == -1 and i == 0) else (1 if d == -1 else d) for i, d in enumerate(shape)]
            array = _zeros(datatype, dims)
        if behaviour.kind == "wrong_shape":
            dims = [*array.shape[:-1], array.shape[-1] + 1] if array.ndim else [2]
            array = _zeros(datatype, dims)
        elif behaviour.kind == "wrong_datatype":
            datatype = "INT32" if datatype != "INT32" else "FP32"
            array = np.zeros(array.shape, dtype=DTYPES[datatype])
        elif behaviour.kind == "nan_out" and datatype in ("FP16", "FP32", "FP64"):
            array = np.full(array.shape, math.nan, dtype=DTYPES[datatype])
            if array.size:
                array.flat[0] = math.inf
        outputs.append((name, datatype, array))
    if behaviour.kind == "extra_output":
        outputs.append((EXTRA_OUTPUT, "FP32", np.zeros((1,), dtype=np.float32)))
    return outputs


def _zeros(datatype: str, dims: list[int]) -> NDArray:
    if datatype == "BYTES":
        array = np.empty(dims, dtype=np.object_)
        array.fill(b"")
        return array
    return np.zeros(dims, dtype=DTYPES[datatype])


def _encode(datatype: str, array: NDArray) -> bytes:
    if datatype == "BYTES":
        serialized = serialize_byte_tensor(np.asarray(array, dtype=np.object_))
        return bytes(serialized.item()) if serialized.size > 0 else b""
    return np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()
