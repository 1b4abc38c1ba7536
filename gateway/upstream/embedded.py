"""The embedded upstream: the ONNX models of a Triton repository, run in-process.

For development, tests and small deployments without a Triton server. It serves what
Triton would serve from the same ``triton_repo/`` (models, versions, metadata, input
checks, error classes), so stages and tests behave the same on either upstream.

Why a small thread pool: ``InferenceSession.run`` releases the GIL but blocks its thread,
so it must never run on the event loop. Each session runs single-threaded (one intra-op
thread, sequential execution) and concurrency comes from the pool, which keeps CPU use
predictable next to the event loop. The pool's queue is bounded: past ``workers +
max_queue`` requests in flight the next one is refused (``UpstreamUnavailable``) instead of
queueing memory without limit, and a timed-out run is told to stop (onnxruntime's
``RunOptions.terminate``) so abandoned work does not keep a worker busy.

Why some runs are inline anyway: for the tiny models of a typical repository a run costs
20-60 µs of CPU, while handing it to a thread and back (queue put, wake-ups, GIL churn)
costs several times that. So a model whose recent runs were measured tiny (see
:class:`_RunCost`) and a small request run on the event loop directly; everything else,
including the first runs of every model, goes to the pool.

BYTES and onnxruntime: Triton's onnxruntime backend hands string elements to onnxruntime as
NUL-terminated C strings, so an element is cut at its first NUL and any other byte reaches
the model unchanged. onnxruntime's Python API instead only takes ``str`` (a ``bytes``
element silently becomes its repr, ``"b'...'"``), encodes it as UTF-8, and decodes every
output string as UTF-8. So: elements are cut at the first NUL as in Triton; when every
BYTES element of the request is valid UTF-8 it is passed as UTF-8 text (the model sees the
same bytes as under Triton); otherwise the whole request goes through Latin-1, a lossless
one-to-one map of bytes to code points, so byte-preserving graphs (Identity, Gather,
Concat...) return arbitrary bytes exactly. Outputs are encoded back with the same codec; a
character a model created outside Latin-1 is encoded as UTF-8.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.metadata
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnxruntime as ort
import structlog
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument

from gateway.errors import (
    GatewayError,
    InputRejected,
    NotFound,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.kserve import DTYPES, InferRequest, InferResponse, ModelMetadata, NDArray, ServerMetadata, Tensor
from gateway.observability.logging import upstream_text
from gateway.upstream.model_repo import (
    ModelRepoError,
    ModelRepository,
    RepoModel,
    load_repository,
    requested_outputs,
    shape_matches,
    validate_request,
)

log = structlog.get_logger("gateway.upstream.embedded")

SERVER_NAME: Final = "infergate-embedded"

# Inline runs on the event loop (see the module docstring). SECURITY: conservative on
# purpose, the loop serves every other request while an inline run holds it.
INLINE_WARMUP_RUNS: Final = 16  # a model's first runs always go to the pool, to measure it
INLINE_MAX_CPU_S: Final = 200e-6  # average CPU of the model's recent runs must be below this
INLINE_MAX_ELEMENTS: Final = 4096  # and the request small: elements over all inputs
INLINE_MAX_BYTES: Final = 16 * 1024  # and bytes over all inputs (BYTES elements included)
# An inline run that took more CPU than this sends the model back to the pool; so does one
# that took more wall time than the larger bound (a run blocked for any other reason). CPU,
# not wall time, is the model's own cost: on a busy machine a preempted loop thread must not
# demote a tiny model into the pool, where every run costs the hand-off as well.
INLINE_DEMOTE_CPU_S: Final = 2e-3
INLINE_DEMOTE_WALL_S: Final = 10e-3
_EWMA_WEIGHT: Final = 0.2
# SECURITY: operators whose work a request's values (not just its size) can make large:
# control flow (trip counts, branches) and outputs shaped by data. A model using any of
# them is never run inline, since a small request could then hold the loop for long.
# Matched as the protobuf encoding of NodeProto.op_type (field 4, length-delimited:
# tag 0x22, length, name), which every node and model-local function carries verbatim,
# so a match can be spurious (the model just stays in the pool) but never missed.
_DATA_DEPENDENT_OPS: Final = (
    "Loop", "Scan", "If", "SequenceMap", "Range", "ConstantOfShape", "Expand", "Tile", "Resize",
    "Upsample", "Pad", "OneHot", "TopK", "NonMaxSuppression", "NonZero", "Unique", "Compress",
    "StringSplit", "RegexFullMatch", "StringConcat", "Tokenizer", "TfIdfVectorizer", "Col2Im",
)
_DATA_DEPENDENT_MARKERS: Final = tuple(b"\x22" + bytes([len(op)]) + op.encode() for op in _DATA_DEPENDENT_OPS)

# onnxruntime's type strings -> KServe datatypes, to refuse a config that lies about a model.
ORT_DATATYPES: Final[dict[str, str]] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _package_version() -> str:
    try:
        return importlib.metadata.version("infergate")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def session_options() -> Any:
    """One session = one thread: the pool, not onnxruntime, decides how much CPU we take."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_profiling = False
    # optimized_model_filepath stays unset: no optimised-graph dumps written next to the model.
    options.log_severity_level = 3  # errors only; onnxruntime's warnings go to stderr
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


class _RunCost:
    """Recent CPU cost of one model version's runs: decides whether a run may be inline.

    Measured as the running thread's CPU time (``time.thread_time``), so runs in the pool
    are not charged for time spent waiting for the GIL; a run has one onnxruntime thread,
    the caller's, so that is the CPU it takes. Updated from pool threads and the loop
    without a lock: a lost update only delays a decision.
    """

    __slots__ = ("allowed", "ewma_s", "runs")

    def __init__(self, *, allowed: bool) -> None:
        self.allowed = allowed  # False: the model's graph may cost what a request makes it
        self.runs = 0
        self.ewma_s = 0.0

    def add(self, cpu_s: float) -> None:
        self.ewma_s = cpu_s if self.runs == 0 else self.ewma_s + _EWMA_WEIGHT * (cpu_s - self.ewma_s)
        self.runs += 1

    def demote(self) -> None:
        """Back to the pool for a fresh warm-up: an inline run took too long."""
        self.runs = 0
        self.ewma_s = 0.0

    def inline_ok(self) -> bool:
        return self.allowed and self.runs >= INLINE_WARMUP_RUNS and self.ewma_s < INLINE_MAX_CPU_S


def inline_candidate(model_bytes: bytes) -> bool:
    """Whether a model's cost can only depend on the size of its inputs (see _DATA_DEPENDENT_OPS)."""
    return not any(marker in model_bytes for marker in _DATA_DEPENDENT_MARKERS)


def _small(request: InferRequest) -> bool:
    """Whether a request is small enough to be run inline (its model being tiny too)."""
    elements = 0
    size = 0
    for tensor in request.inputs:
        data = tensor.data
        elements += data.size
        if elements > INLINE_MAX_ELEMENTS:
            return False
        if tensor.datatype == "BYTES":
            size += sum(len(v) for v in data.flat)
        else:
            size += data.nbytes
        if size > INLINE_MAX_BYTES:
            return False
    return True


@dataclass(frozen=True, slots=True)
class _Served:
    """A loaded model: repository entry, one session per served version, codec helpers."""

    model: RepoModel
    sessions: Mapping[str, Any]  # version -> onnxruntime.InferenceSession
    input_reshape: Mapping[str, tuple[int, ...]]
    output_reshape: Mapping[str, tuple[int, ...]]
    costs: Mapping[str, _RunCost]  # version -> recent run cost


class EmbeddedUpstream:
    """:class:`~gateway.upstream.base.Upstream` backed by onnxruntime in this process.

    ``repository`` is the Triton repository directory (or one already read). ``workers``
    threads run inferences; at most ``max_queue`` more wait for one, further requests get
    ``UpstreamUnavailable`` (reason ``upstream_overloaded``). ``inline`` allows tiny runs
    on the event loop (see :class:`_RunCost`); off, every run goes to the pool.
    """

    def __init__(
        self,
        repository: Path | str | ModelRepository,
        *,
        workers: int = 2,
        max_queue: int = 64,
        inline: bool = True,
    ) -> None:
        if workers < 1 or max_queue < 0:
            raise ValueError("workers must be >= 1 and max_queue >= 0")
        self._source = repository
        self._workers = workers
        self._max_queue = max_queue
        self._inline = inline
        self._models: dict[str, _Served] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        # Released by the worker's future when the work really ends (or is cancelled while
        # still queued), not when the awaiting coroutine gives up: a timed-out request
        # still holds its slot until its thread is free again.
        self._slots = threading.BoundedSemaphore(workers + max_queue)
        # RunOptions of runs in progress, so close() can stop them; touched by worker threads.
        self._active_runs: set[Any] = set()
        self._active_lock = threading.Lock()
        self._closed = False
        self._version = _package_version()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Read the repository and load every served version (off the event loop)."""
        if self._closed:
            raise RuntimeError("EmbeddedUpstream cannot be restarted after close()")
        if self._executor is not None:
            return
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._workers, thread_name_prefix="infergate-onnx"
        )
        try:
            loop = asyncio.get_running_loop()
            self._models = await loop.run_in_executor(executor, self._load_all)
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        self._executor = executor
        log.info(
            "embedded_upstream_started",
            models={name: list(s.sessions) for name, s in self._models.items()},
            workers=self._workers,
            max_queue=self._max_queue,
        )

    async def close(self) -> None:
        """Stop accepting work, stop runs in progress, drop the sessions; idempotent."""
        self._closed = True
        with self._active_lock:
            for run_options in self._active_runs:
                run_options.terminate = True
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._models = {}

    def _load_all(self) -> dict[str, _Served]:
        repo = self._source if isinstance(self._source, ModelRepository) else load_repository(self._source)
        return {model.name: _load_model(model) for model in repo.models}

    # ------------------------------------------------------------------ health and metadata

    @property
    def _running(self) -> bool:
        return self._executor is not None and not self._closed

    async def server_live(self, *, timeout_s: float) -> bool:
        return self._running

    async def server_ready(self, *, timeout_s: float) -> bool:
        return self._running and bool(self._models)

    async def server_metadata(self, *, timeout_s: float) -> ServerMetadata:
        self._require_running()
        return ServerMetadata(name=SERVER_NAME, version=self._version, extensions=())

    async def model_ready(self, model: str, version: str, *, timeout_s: float) -> bool:
        if not self._running:
            return False
        served = self._models.get(model)
        return served is not None and (version == "" or version in served.sessions)

    async def model_metadata(self, model: str, version: str, *, timeout_s: float) -> ModelMetadata:
        self._require_running()
        served, _ = self._resolve(model, version)
        return served.model.metadata

    # ------------------------------------------------------------------ inference

    async def infer(self, request: InferRequest, *, timeout_s: float) -> InferResponse:
        self._require_running()
        served, version = self._resolve(request.model, request.version)
        metadata = served.model.metadata
        validate_request(metadata, request, required_inputs=served.model.required_inputs)
        output_names = requested_outputs(metadata, request)
        executor = self._executor
        if executor is None:  # unreachable: _require_running() checked it
            raise UpstreamUnavailable(reason="upstream_not_started")

        if not self._slots.acquire(blocking=False):
            # SECURITY: bounded queue. Timed-out runs keep their thread until onnxruntime
            # notices the terminate flag; without a bound, piled-up requests (and their
            # tensors) would grow memory without limit.
            raise UpstreamUnavailable(reason="upstream_overloaded", retry_after_s=1.0)
        run_options = ort.RunOptions()
        # Fatal only: a failed run is logged once, structured, by _ort_error().
        run_options.log_severity_level = 4
        cost = served.costs[version]
        if self._inline and cost.inline_ok() and _small(request):
            # SECURITY: only a model measured tiny over its recent runs and a small request;
            # a run that still takes long sends the model back to the pool.
            began, cpu_began = time.perf_counter(), time.thread_time()
            try:
                outputs = self._run(served, version, request, output_names, run_options)
            finally:
                self._slots.release()
                took = time.perf_counter() - began
                cpu = time.thread_time() - cpu_began
                if cpu > INLINE_DEMOTE_CPU_S or took > INLINE_DEMOTE_WALL_S:  # failed runs count too
                    cost.demote()
                    log.warning("embedded_inline_run_slow", model=request.model, version=version, seconds=took,
                                cpu_seconds=cpu)
            if took > timeout_s:  # as if offloaded: an answer later than the deadline is a timeout
                raise UpstreamTimeout()
            return InferResponse(model_name=request.model, model_version=version, outputs=outputs, id=request.id)
        try:
            # executor.submit + wrap_future rather than loop.run_in_executor: the slot must
            # be released by the concurrent future itself, which also fires when a queued
            # job is cancelled before it ever runs.
            future = executor.submit(self._run, served, version, request, output_names, run_options)
        except RuntimeError as exc:  # executor shut down by close() meanwhile
            self._slots.release()
            raise UpstreamUnavailable(reason="upstream_closed") from exc
        future.add_done_callback(lambda _: self._slots.release())
        try:
            outputs = await asyncio.wait_for(asyncio.wrap_future(future), timeout=timeout_s)
        except TimeoutError as exc:
            run_options.terminate = True
            raise UpstreamTimeout() from exc
        except asyncio.CancelledError:
            run_options.terminate = True
            task = asyncio.current_task()
            if future.cancelled() and task is not None and task.cancelling() == 0:
                # Not our caller being cancelled: close() dropped the queued job.
                raise UpstreamUnavailable(reason="upstream_closed") from None
            raise
        return InferResponse(model_name=request.model, model_version=version, outputs=outputs, id=request.id)

    def _run(
        self,
        served: _Served,
        version: str,
        request: InferRequest,
        output_names: list[str],
        run_options: Any,
    ) -> list[Tensor]:
        """Worker thread: build the feed, run the session, convert the outputs.

        The one boundary for onnxruntime: whatever it raises leaves as a GatewayError.
        """
        with self._active_lock:
            if run_options.terminate or self._closed:  # given up on while it was queued
                raise UpstreamUnavailable(reason="upstream_run_stopped")
            self._active_runs.add(run_options)
        try:
            cpu_began = time.thread_time()
            feed, codec = _feed(served, request)
            results = served.sessions[version].run(output_names, feed, run_options)
            served.costs[version].add(time.thread_time() - cpu_began)
            return [
                _output(served, version, name, value, codec)
                for name, value in zip(output_names, results, strict=True)
            ]
        except GatewayError:
            raise
        except Exception as exc:  # onnxruntime's errors share no base class
            raise _ort_error(served, version, exc, run_options) from exc
        finally:
            with self._active_lock:
                self._active_runs.discard(run_options)

    # ------------------------------------------------------------------ helpers

    def _require_running(self) -> None:
        if not self._running:
            raise UpstreamUnavailable(reason="upstream_not_started")

    def _resolve(self, model: str, version: str) -> tuple[_Served, str]:
        """The model and the version to serve, or NotFound.

        SECURITY: unknown model and unknown version give the same error (no detail), so a
        client cannot probe which model names exist, and the error never lists models.
        """
        served = self._models.get(model)
        if served is None:
            raise NotFound(reason="model_unknown")
        if version == "":
            return served, served.model.latest_version
        if version not in served.sessions:
            raise NotFound(reason="model_unknown")
        return served, version


# ---------------------------------------------------------------------- loading


def _load_model(model: RepoModel) -> _Served:
    sessions: dict[str, Any] = {}
    costs: dict[str, _RunCost] = {}
    for version, path in model.version_files:
        # SECURITY: hand onnxruntime the bytes, not the path: the file checked by the
        # repository reader (inside the repo) is the file loaded, and a model cannot pull
        # external-data files from elsewhere by relative path.
        model_bytes = path.read_bytes()
        try:
            session = ort.InferenceSession(
                model_bytes, sess_options=session_options(), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's errors share no base class
            raise ModelRepoError(f"{path}: onnxruntime cannot load the model: {exc}") from exc
        _check_session(model, version, session)
        sessions[version] = session
        costs[version] = _RunCost(allowed=inline_candidate(model_bytes))
    return _Served(
        model=model,
        sessions=sessions,
        input_reshape=dict(model.input_reshape),
        output_reshape=dict(model.output_reshape),
        costs=costs,
    )


def _check_session(model: RepoModel, version: str, session: Any) -> None:
    """Refuse a config that disagrees with the ONNX graph, as Triton's backend does."""
    where = f"{model.config_path} (version {version})"
    meta = model.metadata
    batching = meta.max_batch_size > 0
    reshapes = {**dict(model.input_reshape), **dict(model.output_reshape)}
    graph_inputs = {i.name: i for i in session.get_inputs()}
    overridable = {i.name for i in session.get_overridable_initializers()}
    undeclared = sorted(set(graph_inputs) - {s.name for s in meta.inputs})
    if undeclared:
        raise ModelRepoError(f"{where}: the model has inputs the config does not declare: {undeclared}")
    graph_outputs = {o.name: o for o in session.get_outputs()}
    for kind, specs, graph in (("input", meta.inputs, graph_inputs), ("output", meta.outputs, graph_outputs)):
        for spec in specs:
            node = graph.get(spec.name)
            if node is None:
                if kind == "input" and spec.name in overridable:
                    continue
                raise ModelRepoError(f"{where}: {kind} {spec.name!r} is not in the ONNX model")
            datatype = ORT_DATATYPES.get(node.type)
            if datatype != spec.datatype:
                raise ModelRepoError(
                    f"{where}: {kind} {spec.name!r} is {spec.datatype} in the config "
                    f"but {node.type} in the ONNX model"
                )
            dims = reshapes.get(spec.name)
            expected = spec.shape if dims is None else ((-1, *dims) if batching else dims)
            _check_dims(where, kind, spec.name, expected, list(node.shape), batching)


def _check_dims(
    where: str, kind: str, name: str, expected: tuple[int, ...], graph: list[Any], batching: bool
) -> None:
    if not graph:  # no shape information in the graph: nothing to compare
        return
    if len(graph) != len(expected):
        raise ModelRepoError(
            f"{where}: {kind} {name!r} has rank {len(expected)} in the config but {len(graph)} in the model"
        )
    if batching and isinstance(graph[0], int) and graph[0] > 0:
        raise ModelRepoError(f"{where}: {kind} {name!r} has a fixed batch dimension but max_batch_size > 0")
    for want, have in zip(expected, graph, strict=True):
        if want != -1 and isinstance(have, int) and have > 0 and have != want:
            raise ModelRepoError(
                f"{where}: {kind} {name!r} dims {list(expected)} in the config do not match the model"
            )


# ---------------------------------------------------------------------- per request


def _feed(served: _Served, request: InferRequest) -> tuple[dict[str, NDArray], str]:
    """Input tensors as onnxruntime wants them, and the codec used for BYTES."""
    feed: dict[str, NDArray] = {}
    strings: dict[str, tuple[tuple[int, ...], list[bytes]]] = {}
    for tensor in request.inputs:
        if tensor.datatype == "BYTES":
            # Triton's backend passes C strings: everything after the first NUL is lost.
            strings[tensor.name] = (tensor.shape, [v.split(b"\x00", 1)[0] for v in tensor.data.flat])
        else:
            feed[tensor.name] = np.ascontiguousarray(tensor.data)
    codec = "utf-8" if all(_is_utf8(values) for _, values in strings.values()) else "latin-1"
    for name, (shape, values) in strings.items():
        array = np.empty(len(values), dtype=np.object_)
        array[:] = [v.decode(codec) for v in values]
        feed[name] = array.reshape(shape)
    for name, dims in served.input_reshape.items():
        if name in feed:
            batch = feed[name].shape[:1] if served.model.metadata.max_batch_size > 0 else ()
            feed[name] = feed[name].reshape((*batch, *dims))
    return feed, codec


def _is_utf8(values: list[bytes]) -> bool:
    try:
        for value in values:
            value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _output(served: _Served, version: str, name: str, value: Any, codec: str) -> Tensor:
    spec = served.model.metadata.output(name)
    if spec is None:  # unreachable: requested_outputs() only returns declared names
        raise UpstreamBadResponse(reason="upstream_bad_output")
    array = np.asarray(value)
    if name in served.output_reshape:
        # The model produced the reshape shape; the client sees the declared dims.
        batching = served.model.metadata.max_batch_size > 0
        dims = spec.shape[1:] if batching else spec.shape
        array = array.reshape((*array.shape[:1], *dims) if batching else dims)
    if spec.datatype == "BYTES":
        array = _encode_strings(array, codec)
    elif array.dtype != DTYPES[spec.datatype]:
        _bad_output(served, version, name, f"dtype {array.dtype} instead of {spec.datatype}")
    if not shape_matches(array.shape, spec.shape):
        _bad_output(served, version, name, f"shape {list(array.shape)} instead of {list(spec.shape)}")
    return Tensor(name=name, datatype=spec.datatype, shape=tuple(int(d) for d in array.shape), data=array)


def _encode_strings(array: NDArray, codec: str) -> NDArray:
    out = np.empty(array.size, dtype=np.object_)
    for i, value in enumerate(array.flat):
        if isinstance(value, bytes):
            out[i] = value
            continue
        text = str(value)
        try:
            out[i] = text.encode(codec)
        except UnicodeEncodeError:  # a character the model made, outside Latin-1
            out[i] = text.encode("utf-8")
    return out.reshape(array.shape)


def _bad_output(served: _Served, version: str, name: str, problem: str) -> None:
    log.error("embedded_bad_output", model=served.model.name, version=version, output=name, problem=problem)
    raise UpstreamBadResponse(reason="upstream_bad_output")


def _ort_error(served: _Served, version: str, exc: BaseException, run_options: Any) -> GatewayError:
    """The one mapping of an onnxruntime (or conversion) failure to a GatewayError."""
    if run_options.terminate:
        # We stopped it (timeout, cancellation, close). After a timeout nobody reads this;
        # after close() the caller learns that the upstream went away.
        log.debug("onnxruntime_run_terminated", model=served.model.name, version=version)
        return UpstreamUnavailable(reason="upstream_run_stopped")
    # SECURITY: onnxruntime's text names source files, nodes and shapes: it is logged here
    # and never put in the error (it stays only as the cause, for tracebacks in our logs).
    log.warning(
        "onnxruntime_error",
        model=served.model.name,
        version=version,
        error_type=type(exc).__name__,
        error=upstream_text(str(exc)),
    )
    if isinstance(exc, OrtInvalidArgument):  # onnxruntime's own input checks
        return InputRejected("the model rejected the input", reason="input_rejected_by_model")
    return UpstreamBadResponse(reason="upstream_model_failed")

