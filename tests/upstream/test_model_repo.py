"""Reading a Triton model repository: configs, datatypes, shapes, version policy, symlinks."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.errors import InputRejected
from gateway.kserve import InferRequest, ModelMetadata, RequestedOutput, Tensor, TensorSpec
from gateway.upstream.model_repo import (
    KSERVE_DATATYPES,
    ModelRepoError,
    load_repository,
    requested_outputs,
    validate_request,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TRITON_REPO = REPO_ROOT / "triton_repo"

X_IN = 'input { name: "x" data_type: TYPE_FP32 dims: 1 }'
Y_OUT = 'output { name: "y" data_type: TYPE_FP32 dims: 1 }'


def _x(fields: str) -> str:
    """An FP32 input "x" with the given extra fields, plus the standard output."""
    return f'input {{ name: "x" data_type: TYPE_FP32 {fields} }} {Y_OUT}'


SIMPLE = """
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {mbs}
input {{ name: "x" data_type: TYPE_FP32 dims: [ 4 ] }}
output {{ name: "y" data_type: TYPE_FP32 dims: [ 2 ] }}
{extra}
"""


def write_model(
    root: Path,
    name: str = "m",
    *,
    versions: tuple[str, ...] = ("1",),
    config: str | None = None,
    mbs: int = 8,
    extra: str = "",
    filename: str = "model.onnx",
) -> Path:
    """A model directory whose model files are placeholders (the reader never parses them)."""
    directory = root / name
    directory.mkdir(parents=True)
    text = config if config is not None else SIMPLE.format(name=name, mbs=mbs, extra=extra)
    (directory / "config.pbtxt").write_text(text, encoding="utf-8")
    for version in versions:
        (directory / version).mkdir()
        (directory / version / filename).write_bytes(b"onnx")
    return directory


# --------------------------------------------------------------------------- the real repo


def test_real_repository_metadata() -> None:
    repo = load_repository(TRITON_REPO)
    assert set(repo.names) >= {"digits", "text_echo", "risk"}
    digits = repo.get("digits")
    assert digits is not None
    assert digits.metadata.platform == "onnxruntime_onnx"
    assert digits.metadata.max_batch_size == 64
    assert digits.metadata.inputs == (TensorSpec("pixels", "FP32", (-1, 64)),)
    assert digits.metadata.outputs == (TensorSpec("probabilities", "FP32", (-1, 10)),)
    assert digits.metadata.versions == ("1", "2")  # 2 = the DP-SGD model, version_policy all
    assert digits.latest_version == "2"
    text = repo.get("text_echo")
    assert text is not None
    assert text.metadata.max_batch_size == 0
    assert [s.datatype for s in text.metadata.inputs + text.metadata.outputs] == ["BYTES", "BYTES"]
    assert text.metadata.inputs[0].shape == (-1,)  # no batch dimension added
    risk = repo.get("risk")
    assert risk is not None
    assert risk.metadata.inputs[0].shape == (-1, 30)
    assert risk.metadata.outputs[0].shape == (-1, 1)


def test_result_is_frozen(tmp_path: Path) -> None:
    write_model(tmp_path)
    repo = load_repository(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        repo.models[0].metadata.name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        repo.models = ()  # type: ignore[misc]


# --------------------------------------------------------------------------- datatypes, shapes


@pytest.mark.parametrize(("triton", "kserve"), sorted(KSERVE_DATATYPES.items()))
def test_datatype_mapping(tmp_path: Path, triton: str, kserve: str) -> None:
    config = f"""
        platform: "onnxruntime_onnx"
        input {{ name: "x" data_type: {triton} dims: [ -1 ] }}
        output {{ name: "y" data_type: {triton} dims: [ 3, -1 ] }}
    """
    write_model(tmp_path, config=config)
    model = load_repository(tmp_path).models[0]
    assert model.metadata.inputs[0] == TensorSpec("x", kserve, (-1,))
    assert model.metadata.outputs[0] == TensorSpec("y", kserve, (3, -1))


def test_string_is_bytes() -> None:
    assert KSERVE_DATATYPES["TYPE_STRING"] == "BYTES"
    assert KSERVE_DATATYPES["TYPE_FP32"] == "FP32"


@pytest.mark.parametrize("triton", ["TYPE_BF16", "TYPE_INVALID"])
def test_unservable_datatype(tmp_path: Path, triton: str) -> None:
    config = f"""
        platform: "onnxruntime_onnx"
        input {{ name: "x" data_type: {triton} dims: [ 1 ] }}
        output {{ name: "y" data_type: TYPE_FP32 dims: [ 1 ] }}
    """
    write_model(tmp_path, config=config)
    with pytest.raises(ModelRepoError, match=triton):
        load_repository(tmp_path)


def test_batch_dimension_prepended_only_when_batching(tmp_path: Path) -> None:
    write_model(tmp_path, "batched", mbs=8)
    write_model(tmp_path, "plain", mbs=0)
    repo = load_repository(tmp_path)
    batched, plain = repo.get("batched"), repo.get("plain")
    assert batched is not None and plain is not None
    assert batched.metadata.inputs[0].shape == (-1, 4)
    assert batched.metadata.max_batch_size == 8
    assert plain.metadata.inputs[0].shape == (4,)
    assert plain.metadata.max_batch_size == 0


def test_name_defaults_to_directory(tmp_path: Path) -> None:
    write_model(tmp_path, "dirname", config=SIMPLE.format(name="", mbs=0, extra="").replace('name: ""', ""))
    assert load_repository(tmp_path).names == ("dirname",)


# --------------------------------------------------------------------------- refused configs


def test_unknown_field_names_the_file(tmp_path: Path) -> None:
    directory = write_model(tmp_path, extra="max_batch_sise: 4")
    with pytest.raises(ModelRepoError) as info:
        load_repository(tmp_path)
    assert str(directory / "config.pbtxt") in str(info.value)
    assert "max_batch_sise" in str(info.value)


def test_syntax_error_names_the_file(tmp_path: Path) -> None:
    directory = write_model(tmp_path, config='name: "m" input {')
    with pytest.raises(ModelRepoError, match=str(directory / "config.pbtxt")):
        load_repository(tmp_path)


def test_name_must_match_directory(tmp_path: Path) -> None:
    write_model(tmp_path, "dir", config=SIMPLE.format(name="other", mbs=0, extra=""))
    with pytest.raises(ModelRepoError, match="does not match its directory"):
        load_repository(tmp_path)


def test_missing_config(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    with pytest.raises(ModelRepoError, match="config.pbtxt"):
        load_repository(tmp_path)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('platform: "tensorflow_savedmodel"', "only ONNX"),
        ('backend: "python"', "only ONNX"),
        ("", "neither platform nor backend"),
        ('platform: "onnxruntime_onnx" max_batch_size: -1', "max_batch_size"),
        ('platform: "onnxruntime_onnx" sequence_batching { }', "sequence_batching"),
        ('platform: "onnxruntime_onnx" model_transaction_policy { decoupled: true }', "decoupled"),
    ],
)
def test_refused_model_settings(tmp_path: Path, config: str, message: str) -> None:
    write_model(tmp_path, config=f"{config}\n{X_IN}\n{Y_OUT}")
    with pytest.raises(ModelRepoError, match=message):
        load_repository(tmp_path)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (X_IN, "at least one output"),
        (Y_OUT, "at least one input"),
        (f"{X_IN} {X_IN} {Y_OUT}", "declared twice"),
        (f'input {{ name: "x" data_type: TYPE_FP32 }} {Y_OUT}', "dims"),
        (f'input {{ name: "x" data_type: TYPE_FP32 dims: 0 }} {Y_OUT}', "dim"),
        (f'input {{ name: "x" data_type: TYPE_FP32 dims: -2 }} {Y_OUT}', "dim"),
        (_x("dims: 1 is_shape_tensor: true"), "is_shape_tensor"),
        (_x("dims: [2, 3] reshape { shape: [ 5 ] }"), "reshape"),
        (_x("dims: [-1, -1] reshape { shape: [ -1, -1 ] }"), "reshape"),
    ],
)
def test_refused_tensors(tmp_path: Path, tensors: str, message: str) -> None:
    write_model(tmp_path, config='platform: "onnxruntime_onnx"\n' + tensors)
    with pytest.raises(ModelRepoError, match=message):
        load_repository(tmp_path)


def test_optional_inputs_and_reshape_are_kept(tmp_path: Path) -> None:
    config = """
        platform: "onnxruntime_onnx"
        max_batch_size: 4
        input { name: "a" data_type: TYPE_FP32 dims: [ 2, 3 ] reshape { shape: [ 6 ] } }
        input { name: "b" data_type: TYPE_INT64 dims: [ 1 ] optional: true }
        output { name: "y" data_type: TYPE_FP32 dims: [ 1 ] reshape { shape: [ ] } }
    """
    write_model(tmp_path, config=config)
    model = load_repository(tmp_path).models[0]
    assert model.optional_inputs == frozenset({"b"})
    assert model.required_inputs == frozenset({"a"})
    assert dict(model.input_reshape) == {"a": (6,)}
    assert dict(model.output_reshape) == {"y": ()}
    assert model.metadata.inputs[0].shape == (-1, 2, 3)  # metadata shows dims, not reshape


def test_default_model_filename(tmp_path: Path) -> None:
    write_model(tmp_path, extra='default_model_filename: "net.onnx"', filename="net.onnx")
    model = load_repository(tmp_path).models[0]
    assert model.model_file("1") == (tmp_path / "m" / "1" / "net.onnx").resolve()


@pytest.mark.parametrize("filename", ["../../etc/passwd", "sub/model.onnx", "..", "."])
def test_default_model_filename_must_be_plain(tmp_path: Path, filename: str) -> None:
    write_model(tmp_path, extra=f'default_model_filename: "{filename}"')
    with pytest.raises(ModelRepoError, match="plain file name"):
        load_repository(tmp_path)


# --------------------------------------------------------------------------- versions


@pytest.mark.parametrize(
    ("policy", "served"),
    [
        ("", ("3",)),  # Triton's default: latest { num_versions: 1 }
        ("version_policy { latest { num_versions: 1 } }", ("3",)),
        ("version_policy { latest { num_versions: 2 } }", ("2", "3")),
        ("version_policy { latest { num_versions: 9 } }", ("1", "2", "3")),
        ("version_policy { all { } }", ("1", "2", "3")),
        ("version_policy { specific { versions: [ 1, 3 ] } }", ("1", "3")),
        ("version_policy { specific { versions: [ 2, 7 ] } }", ("2",)),  # 7 missing: logged, skipped
    ],
)
def test_version_policy(tmp_path: Path, policy: str, served: tuple[str, ...]) -> None:
    write_model(tmp_path, versions=("1", "2", "3"), extra=policy)
    model = load_repository(tmp_path).models[0]
    assert model.metadata.versions == served
    assert model.latest_version == served[-1]
    assert [v for v, _ in model.version_files] == list(served)


@pytest.mark.parametrize(
    "policy",
    ["version_policy { specific { versions: [ 7 ] } }", "version_policy { latest { num_versions: 0 } }"],
)
def test_no_version_left_is_an_error(tmp_path: Path, policy: str) -> None:
    write_model(tmp_path, versions=("1",), extra=policy)
    with pytest.raises(ModelRepoError, match="no version available"):
        load_repository(tmp_path)


def test_versions_are_numeric_dirs_with_a_model_file(tmp_path: Path) -> None:
    directory = write_model(tmp_path, versions=("2", "10"), extra="version_policy { all { } }")
    for odd in ("abc", "01", "1a", "-1", "+3", " 4"):
        (directory / odd).mkdir()
        (directory / odd / "model.onnx").write_bytes(b"x")
    (directory / "5").write_bytes(b"a file, not a directory")
    (directory / "7").mkdir()  # numeric, but no model.onnx: not a version
    model = load_repository(tmp_path).models[0]
    assert model.metadata.versions == ("2", "10")  # numeric order, not string order
    assert model.latest_version == "10"


# --------------------------------------------------------------------------- layout, symlinks


def test_hidden_entries_and_files_are_skipped(tmp_path: Path) -> None:
    write_model(tmp_path, "m")
    (tmp_path / ".git").mkdir()
    (tmp_path / "README.md").write_text("hi", encoding="utf-8")
    assert load_repository(tmp_path).names == ("m",)


def test_empty_or_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(ModelRepoError, match="no model"):
        load_repository(tmp_path)
    with pytest.raises(ModelRepoError, match="cannot open"):
        load_repository(tmp_path / "nope")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the repository, holding a complete model."""
    other = tmp_path / "outside"
    write_model(other, "escaped")
    return other


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    write_model(root, "m")
    return root


def test_symlinked_model_dir_outside_is_refused(repo: Path, outside: Path) -> None:
    os.symlink(outside / "escaped", repo / "escaped")
    with pytest.raises(ModelRepoError, match="outside the model repository"):
        load_repository(repo)


def test_symlinked_model_file_outside_is_refused(repo: Path, outside: Path) -> None:
    target = repo / "m" / "1" / "model.onnx"
    target.unlink()
    os.symlink(outside / "escaped" / "1" / "model.onnx", target)
    with pytest.raises(ModelRepoError, match="outside the model repository"):
        load_repository(repo)


def test_symlinked_version_dir_outside_is_refused(repo: Path, outside: Path) -> None:
    os.symlink(outside / "escaped" / "1", repo / "m" / "2")
    with pytest.raises(ModelRepoError, match="outside the model repository"):
        load_repository(repo)


def test_symlinked_config_outside_is_refused(repo: Path, outside: Path) -> None:
    (repo / "m" / "config.pbtxt").unlink()
    os.symlink(outside / "escaped" / "config.pbtxt", repo / "m" / "config.pbtxt")
    with pytest.raises(ModelRepoError, match="outside the model repository"):
        load_repository(repo)


def test_symlinks_inside_the_repository_are_fine(repo: Path) -> None:
    (repo / "shared").mkdir()
    (repo / "m" / "1" / "model.onnx").rename(repo / "shared" / "model.onnx")
    os.symlink(repo / "shared" / "model.onnx", repo / "m" / "1" / "model.onnx")
    (repo / "shared" / "config.pbtxt").write_text(SIMPLE.format(name="shared", mbs=0, extra=""), "utf-8")
    (repo / "shared" / "1").mkdir()
    os.symlink(repo / "shared" / "model.onnx", repo / "shared" / "1" / "model.onnx")
    loaded = load_repository(repo)
    model = loaded.get("m")
    assert model is not None
    assert model.model_file("1") == (repo / "shared" / "model.onnx").resolve()


# --------------------------------------------------------------------------- request checks

META = ModelMetadata(
    name="m",
    versions=("1",),
    platform="onnxruntime_onnx",
    inputs=(TensorSpec("a", "FP32", (-1, 3)), TensorSpec("b", "BYTES", (-1,))),
    outputs=(TensorSpec("y", "FP32", (-1, 1)), TensorSpec("z", "INT64", (-1,))),
    max_batch_size=4,
)


def _req(*tensors: Tensor, outputs: tuple[str, ...] = ()) -> InferRequest:
    return InferRequest("m", "", list(tensors), [RequestedOutput(n) for n in outputs])


def _a(batch: int = 2, dims: int = 3, dtype: type = np.float32) -> Tensor:
    data: np.ndarray[Any, Any] = np.zeros((batch, dims), dtype=dtype)
    return Tensor("a", "FP32", data.shape, data)


def _b(batch: int = 2) -> Tensor:
    data = np.array([b"x"] * batch, dtype=np.object_)
    return Tensor("b", "BYTES", data.shape, data)


def test_validate_accepts_a_good_request() -> None:
    validate_request(META, _req(_a(), _b()))


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (_req(_a()), "input_missing"),
        (_req(_a(), _b(), Tensor("c", "FP32", (1,), np.zeros(1, np.float32))), "input_unknown"),
        (_req(_a(), _a(), _b()), "input_duplicate"),
        (_req(Tensor("a", "FP64", (2, 3), np.zeros((2, 3))), _b()), "input_datatype"),
        (_req(_a(dtype=np.float64), _b()), "input_datatype"),
        (_req(_a(dims=4), _b()), "input_shape"),
        (_req(Tensor("a", "FP32", (2, 3, 1), np.zeros((2, 3, 1), np.float32)), _b()), "input_shape"),
        (_req(Tensor("a", "FP32", (2, 3), np.zeros((3, 2), np.float32)), _b()), "input_shape"),
        (_req(_a(batch=5), _b(batch=5)), "input_batch_size"),
        (_req(_a(batch=0), _b(batch=0)), "input_batch_size"),
        (_req(_a(batch=2), _b(batch=3)), "input_batch_size"),
        (_req(_a(), Tensor("b", "BYTES", (2,), np.array(["x", "y"], dtype=np.object_))), "input_datatype"),
    ],
)
def test_validate_rejects(request_: InferRequest, reason: str) -> None:
    with pytest.raises(InputRejected) as info:
        validate_request(META, request_)
    assert info.value.reason == reason


def test_validate_never_echoes_undeclared_names() -> None:
    with pytest.raises(InputRejected) as info:
        validate_request(META, _req(_a(), _b(), Tensor("<script>", "FP32", (1,), np.zeros(1, np.float32))))
    assert "<script>" not in str(info.value)


def test_validate_can_leave_missing_inputs_to_the_server() -> None:
    validate_request(META, _req(_a()), required_inputs=())


def test_requested_outputs() -> None:
    assert requested_outputs(META, _req()) == ["y", "z"]
    assert requested_outputs(META, _req(outputs=("z",))) == ["z"]
    with pytest.raises(InputRejected) as info:
        requested_outputs(META, _req(outputs=("nope",)))
    assert info.value.reason == "output_unknown"
    with pytest.raises(InputRejected) as info:
        requested_outputs(META, _req(outputs=("y", "y")))
    assert info.value.reason == "output_duplicate"
