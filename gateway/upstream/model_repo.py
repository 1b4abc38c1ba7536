"""Read a Triton model repository, and check requests against what it declares.

The embedded upstream serves ``triton_repo/`` without Triton, so this module reproduces
the parts of Triton's repository handling that decide what a client sees: which models
and versions exist, their metadata (KServe datatypes, full shapes with the batch
dimension), and Triton's tensor checks. Layout::

    <root>/<model>/config.pbtxt
    <root>/<model>/<version>/model.onnx      (or config's default_model_filename)

Loading is strict, as Triton is at start-up with its default ``--exit-on-error``: a config
Triton would refuse, or one using a feature the embedded backend does not implement,
raises :class:`ModelRepoError` naming the file, rather than serving something different
from what Triton would serve. Everything returned is frozen: the repository is read once,
and a reload builds a new value.

:func:`validate_request` is Triton's input check (names, datatypes, ranks, fixed dims,
batch size) written once for both upstreams, so a bad tensor gets the same
``InputRejected`` whether it would have reached onnxruntime or a stand-in server that does
not check tensors itself (``notes/BACKENDS.md``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import structlog
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from gateway.errors import InputRejected
from gateway.kserve import DTYPES, InferRequest, ModelMetadata, TensorSpec

log = structlog.get_logger("gateway.upstream.model_repo")

PLATFORM: Final = "onnxruntime_onnx"
DEFAULT_MODEL_FILENAME: Final = "model.onnx"
CONFIG_FILENAME: Final = "config.pbtxt"
# A config is a few KiB; refuse to parse something that is clearly not one.
MAX_CONFIG_BYTES: Final = 1 << 20
_INT64_MAX: Final = (1 << 63) - 1
# Triton takes a version directory name with stoll(); it skips names with leading zeros.
# Stricter here: only plain decimal digits (stoll would also accept "+3" or "3abc").
_VERSION_DIR = re.compile(r"0|[1-9][0-9]{0,18}")

# Triton's TYPE_* -> KServe V2 datatype, as Triton's model metadata reports it.
# TYPE_BF16 is left out on purpose: numpy has no bfloat16, so it cannot be served here.
KSERVE_DATATYPES: Final[dict[str, str]] = {
    "TYPE_BOOL": "BOOL",
    "TYPE_UINT8": "UINT8",
    "TYPE_UINT16": "UINT16",
    "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64",
    "TYPE_INT8": "INT8",
    "TYPE_INT16": "INT16",
    "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64",
    "TYPE_FP16": "FP16",
    "TYPE_FP32": "FP32",
    "TYPE_FP64": "FP64",
    "TYPE_STRING": "BYTES",
}

# ModelConfig fields that change what a request or response means and that the embedded
# backend does not implement. Refusing them beats silently serving something else.
_UNSUPPORTED_MODEL_FIELDS: Final = (
    "batch_input",
    "batch_output",
    "sequence_batching",
    "ensemble_scheduling",
)
_UNSUPPORTED_TENSOR_FLAGS: Final = ("is_shape_tensor", "allow_ragged_batch", "is_non_linear_format_io")


class ModelRepoError(Exception):
    """The repository cannot be served as it is; the message names the file and the rule.

    Raised at start-up or reload only, never for a request, so it is not a GatewayError:
    the operator reads it, a client never does.
    """


@dataclass(frozen=True, slots=True)
class RepoModel:
    """One model of the repository: its metadata plus what only the backend needs.

    ``version_files`` are the served versions (after the version policy), ascending, each
    with its resolved model file. ``optional_inputs`` may be omitted by a request;
    ``input_reshape`` / ``output_reshape`` are Triton's ``reshape`` (without the batch dim).
    """

    metadata: ModelMetadata
    directory: Path
    config_path: Path
    version_files: tuple[tuple[str, Path], ...]
    optional_inputs: frozenset[str] = frozenset()
    input_reshape: tuple[tuple[str, tuple[int, ...]], ...] = ()
    output_reshape: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def required_inputs(self) -> frozenset[str]:
        return frozenset(s.name for s in self.metadata.inputs) - self.optional_inputs

    @property
    def latest_version(self) -> str:
        """What ``version=""`` means: the highest served version, as in Triton."""
        return self.version_files[-1][0]

    def model_file(self, version: str) -> Path | None:
        for v, path in self.version_files:
            if v == version:
                return path
        return None


@dataclass(frozen=True, slots=True)
class ModelRepository:
    """Every model of one repository, read at one moment."""

    root: Path
    models: tuple[RepoModel, ...] = field(default=())

    def get(self, name: str) -> RepoModel | None:
        for model in self.models:
            if model.name == name:
                return model
        return None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)


# --------------------------------------------------------------------------- loading


def load_repository(root: Path | str) -> ModelRepository:
    """Read every model directory under ``root``; raise :class:`ModelRepoError` on any problem.

    Entries starting with ``.`` (editor and VCS droppings) and plain files are skipped; any
    other directory must be a valid model. An empty repository is an error, as it is for a
    gateway that would then answer nothing but 404.
    """
    try:
        base = Path(root).resolve(strict=True)
    except OSError as exc:
        raise ModelRepoError(f"model repository {root}: cannot open ({exc.strerror or exc})") from exc
    if not base.is_dir():
        raise ModelRepoError(f"model repository {base} is not a directory")
    models: list[RepoModel] = []
    for entry in sorted(base.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        resolved = _inside(base, entry)
        if not resolved.is_dir():
            continue
        models.append(load_model(base, entry.name))
    if not models:
        raise ModelRepoError(f"model repository {base} holds no model directory")
    return ModelRepository(root=base, models=tuple(models))


def load_model(root: Path, name: str) -> RepoModel:
    """Read one model directory ``root/name`` (``root`` already resolved)."""
    directory = _inside(root, root / name)
    config_path = _inside(root, directory / CONFIG_FILENAME)
    if not config_path.is_file():
        raise ModelRepoError(
            f"{directory / CONFIG_FILENAME}: missing (every model needs a config.pbtxt; "
            "auto-complete is not supported)"
        )
    config = parse_config(config_path)
    _check_config(config, name, config_path)

    filename = config.default_model_filename or DEFAULT_MODEL_FILENAME
    # SECURITY: the file name comes from the config; a path in it could point anywhere.
    if "/" in filename or "\\" in filename or filename in {".", ".."} or "\x00" in filename:
        raise ModelRepoError(f"{config_path}: default_model_filename must be a plain file name")

    available = _version_dirs(root, directory, filename)
    chosen = select_versions(config, available.keys(), config_path)
    version_files = tuple((str(v), available[v]) for v in sorted(chosen))

    max_batch = int(config.max_batch_size)
    metadata = ModelMetadata(
        name=name,
        versions=tuple(v for v, _ in version_files),
        platform=PLATFORM,
        inputs=tuple(_spec(t, max_batch, config_path) for t in config.input),
        outputs=tuple(_spec(t, max_batch, config_path) for t in config.output),
        max_batch_size=max_batch,
    )
    return RepoModel(
        metadata=metadata,
        directory=directory,
        config_path=config_path,
        version_files=version_files,
        optional_inputs=frozenset(t.name for t in config.input if t.optional),
        input_reshape=tuple(
            (t.name, tuple(int(d) for d in t.reshape.shape)) for t in config.input if t.HasField("reshape")
        ),
        output_reshape=tuple(
            (t.name, tuple(int(d) for d in t.reshape.shape)) for t in config.output if t.HasField("reshape")
        ),
    )


def parse_config(path: Path) -> Any:
    """Parse a ``config.pbtxt``; unknown fields and syntax errors name the file and line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelRepoError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ModelRepoError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes, not a model config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelRepoError(f"{path}: not UTF-8 text") from exc
    config = model_config_pb2.ModelConfig()
    try:
        # allow_unknown_field=False (the default): a misspelt field is an error, not a default.
        text_format.Parse(text, config, allow_unknown_field=False)
    except text_format.ParseError as exc:
        raise ModelRepoError(f"{path}: invalid model config: {exc}") from exc
    return config


def select_versions(
    config: Any, available: Iterable[int], config_path: Path | str = CONFIG_FILENAME
) -> list[int]:
    """Apply ``version_policy`` the way Triton's ``VersionsToLoad`` does.

    ``latest { num_versions: N }`` (the default, N=1) keeps the N highest versions;
    ``all`` keeps every version; ``specific { versions: [...] }`` keeps the listed ones that
    exist (Triton logs the missing ones and loads the rest). No version left is an error,
    as in Triton ("at least one version must be available under the version policy").
    """
    existing = sorted(set(available), reverse=True)
    policy = config.version_policy.WhichOneof("policy_choice")
    if policy == "specific":
        wanted = [int(v) for v in config.version_policy.specific.versions]
        missing = sorted(set(wanted) - set(existing))
        if missing:
            log.error("model_versions_missing", config=str(config_path), versions=missing)
        chosen = sorted(set(wanted) & set(existing))
    elif policy == "all":
        chosen = sorted(existing)
    else:
        count = int(config.version_policy.latest.num_versions) if policy == "latest" else 1
        chosen = sorted(existing[:count])
    if not chosen:
        raise ModelRepoError(
            f"{config_path}: no version available under the version policy "
            f"(version directories with a model file: {sorted(existing) or 'none'})"
        )
    return chosen


def _inside(root: Path, path: Path) -> Path:
    """``path`` resolved, refusing anything (a symlink, ``..``) that leaves ``root``."""
    resolved = path.resolve()
    # SECURITY: a symlink in the repository must not make the gateway read (and serve, or
    # report in errors) files outside it; links that stay inside are fine.
    if not resolved.is_relative_to(root):
        raise ModelRepoError(f"{path}: resolves outside the model repository {root}")
    return resolved


def _version_dirs(root: Path, directory: Path, filename: str) -> dict[int, Path]:
    """Numeric version directories holding the model file -> that file (resolved)."""
    found: dict[int, Path] = {}
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if not _VERSION_DIR.fullmatch(entry.name):
            continue  # Triton ignores non-numeric directories (and files) here
        version = int(entry.name)
        if version > _INT64_MAX:
            continue
        version_dir = _inside(root, entry)
        if not version_dir.is_dir():
            continue
        model_file = _inside(root, version_dir / filename)
        if not model_file.is_file():
            log.warning("model_version_without_file", directory=str(entry), file=filename)
            continue
        found[version] = model_file
    return found


def _check_config(config: Any, name: str, path: Path) -> None:
    """Triton's rules for a config, plus refusals for what the embedded backend lacks."""
    if config.name and config.name != name:
        # Triton requires it: the name in the config must be the directory name.
        raise ModelRepoError(f"{path}: name {config.name!r} does not match its directory {name!r}")
    if not config.platform and not config.backend:
        raise ModelRepoError(f"{path}: neither platform nor backend is set")
    if config.platform not in ("", PLATFORM) or config.backend not in ("", "onnxruntime"):
        raise ModelRepoError(
            f"{path}: only ONNX models are served (platform {PLATFORM!r} or backend 'onnxruntime')"
        )
    if config.max_batch_size < 0:
        raise ModelRepoError(f"{path}: max_batch_size must be >= 0")
    for unsupported in _UNSUPPORTED_MODEL_FIELDS:
        if _is_set(config, unsupported):
            raise ModelRepoError(f"{path}: {unsupported} is not supported by the embedded backend")
    if config.model_transaction_policy.decoupled:
        raise ModelRepoError(f"{path}: decoupled models are not supported by the embedded backend")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        if not tensors:
            raise ModelRepoError(f"{path}: at least one {kind} must be declared")
        seen: set[str] = set()
        for tensor in tensors:
            where = f"{path}: {kind} {tensor.name!r}"
            if not tensor.name:
                raise ModelRepoError(f"{path}: an {kind} has no name")
            if tensor.name in seen:
                raise ModelRepoError(f"{where} is declared twice")
            seen.add(tensor.name)
            for flag in _UNSUPPORTED_TENSOR_FLAGS:
                if getattr(tensor, flag, False):
                    raise ModelRepoError(f"{where}: {flag} is not supported by the embedded backend")
            if not tensor.dims:
                raise ModelRepoError(f"{where}: dims must be given")
            if any(d < -1 or d == 0 for d in tensor.dims):
                raise ModelRepoError(f"{where}: each dim must be >= 1, or -1 for a variable size")
            if tensor.HasField("reshape"):
                _check_reshape(where, list(tensor.dims), list(tensor.reshape.shape))


def _check_reshape(where: str, dims: list[int], shape: list[int]) -> None:
    if any(d < -1 or d == 0 for d in shape):
        raise ModelRepoError(f"{where}: each reshape dim must be >= 1, or -1 for a variable size")
    if dims.count(-1) != shape.count(-1) or shape.count(-1) > 1:
        raise ModelRepoError(f"{where}: reshape may only have one variable (-1) dim, as dims does")
    if -1 not in dims and int(np.prod(dims)) != int(np.prod(shape or [1])):
        raise ModelRepoError(f"{where}: reshape {shape} does not hold the {dims} elements")


def _is_set(message: Any, name: str) -> bool:
    value = getattr(message, name)
    if hasattr(value, "ListFields"):
        return bool(message.HasField(name))
    return len(value) > 0


def _spec(tensor: Any, max_batch_size: int, path: Path) -> TensorSpec:
    type_name = str(model_config_pb2.DataType.Name(tensor.data_type))
    datatype = KSERVE_DATATYPES.get(type_name)
    if datatype is None:
        raise ModelRepoError(f"{path}: tensor {tensor.name!r} has unsupported data_type {type_name}")
    dims = tuple(int(d) for d in tensor.dims)
    # Triton's metadata shows the batch dimension as a leading -1 when batching is on.
    shape = (-1, *dims) if max_batch_size > 0 else dims
    return TensorSpec(name=tensor.name, datatype=datatype, shape=shape)


# ------------------------------------------------------------------ request checking


def validate_request(
    metadata: ModelMetadata, request: InferRequest, *, required_inputs: Collection[str] | None = None
) -> None:
    """Triton's checks of a request against declared metadata; raise ``InputRejected``.

    Every input must be declared, appear once, have the declared datatype and rank, match
    every fixed dimension, and (with batching) share one batch size in
    ``1..max_batch_size``. The data must be an array of the datatype's dtype and of the
    stated shape; BYTES elements must be ``bytes``. ``required_inputs`` are the inputs
    that must be present (all declared ones by default); ``()`` leaves that check to the
    server. Messages name declared inputs only, never an undeclared name or a value.
    """
    declared = {spec.name: spec for spec in metadata.inputs}
    seen: set[str] = set()
    batch_sizes: set[int] = set()
    for tensor in request.inputs:
        spec = declared.get(tensor.name)
        if spec is None:
            raise InputRejected("the request has an input the model does not declare", reason="input_unknown")
        if tensor.name in seen:
            raise InputRejected(f"input {spec.name!r} is given more than once", reason="input_duplicate")
        seen.add(tensor.name)
        if tensor.datatype != spec.datatype:
            raise InputRejected(
                f"input {spec.name!r} must have datatype {spec.datatype}", reason="input_datatype"
            )
        _check_data(spec, tensor.shape, tensor.data)
        if not _shape_matches(tensor.shape, spec.shape):
            raise InputRejected(
                f"input {spec.name!r} must have shape {_fmt(spec.shape)}", reason="input_shape"
            )
        if metadata.max_batch_size > 0:
            batch = tensor.shape[0]
            if not 1 <= batch <= metadata.max_batch_size:
                raise InputRejected(
                    f"input {spec.name!r}: batch size must be between 1 and {metadata.max_batch_size}",
                    reason="input_batch_size",
                )
            batch_sizes.add(batch)
    if len(batch_sizes) > 1:
        raise InputRejected("all inputs must have the same batch size", reason="input_batch_size")
    required = set(declared) if required_inputs is None else set(required_inputs)
    missing = sorted(required - seen)
    if missing:
        raise InputRejected(f"missing input(s) {', '.join(map(repr, missing))}", reason="input_missing")


def requested_outputs(metadata: ModelMetadata, request: InferRequest) -> list[str]:
    """The output names to compute: those requested, else all declared (declared order).

    An undeclared or repeated requested output is an ``InputRejected``, as in Triton.
    """
    if not request.outputs:
        return [spec.name for spec in metadata.outputs]
    names: list[str] = []
    for out in request.outputs:
        if metadata.output(out.name) is None:
            raise InputRejected(
                "the request asks for an output the model does not declare", reason="output_unknown"
            )
        if out.name in names:
            raise InputRejected(f"output {out.name!r} is requested more than once", reason="output_duplicate")
        names.append(out.name)
    return names


def shape_matches(shape: Sequence[int], declared: Sequence[int]) -> bool:
    """A concrete shape fits a declared one: same rank, each fixed (non ``-1``) dim equal."""
    return _shape_matches(shape, declared)


def _shape_matches(shape: Sequence[int], declared: Sequence[int]) -> bool:
    return len(shape) == len(declared) and all(
        d >= 0 and (want == -1 or want == d) for d, want in zip(shape, declared, strict=True)
    )


def _check_data(spec: TensorSpec, shape: tuple[int, ...], data: Any) -> None:
    """The array itself must be what the tensor claims (a stage could have broken it)."""
    if not isinstance(data, np.ndarray) or tuple(data.shape) != tuple(shape):
        raise InputRejected(f"input {spec.name!r}: data does not match its shape", reason="input_shape")
    dtype = DTYPES.get(spec.datatype)
    if dtype is None:  # a remote model may declare a type the gateway has no array for (BF16)
        raise InputRejected(
            f"input {spec.name!r}: datatype {spec.datatype} is not supported", reason="input_datatype"
        )
    if data.dtype != dtype:
        raise InputRejected(
            f"input {spec.name!r} must have datatype {spec.datatype}", reason="input_datatype"
        )
    if spec.datatype == "BYTES" and not all(isinstance(v, bytes) for v in data.flat):
        raise InputRejected(f"input {spec.name!r}: BYTES elements must be bytes", reason="input_datatype")


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"
