"""Run Seldon MLServer as a stand-in for Triton over a Triton model repository.

Why: Triton cannot run on our machines, but the gateway's upstream code speaks KServe V2
gRPC through ``tritonclient``; MLServer 1.7.1 is a real third-party server for that protocol
(see shared/notes/BACKENDS.md). This module runs in the MAIN venv (it has tritonclient, which
parses ``config.pbtxt``); MLServer runs from its own venv (``tools/setup_mlserver.sh``) and
loads ``tests/support/mlserver_runtime.py``, which must not depend on tritonclient. So all
Triton knowledge is translated here into one ``model-settings.json`` per model version.

Usage::

    server = start_mlserver(repo_root / "triton_repo", tmp_dir)
    try:
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)
        ...
    finally:
        server.stop()
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from google.protobuf import text_format
from tritonclient.grpc import InferenceServerClient, model_config_pb2
from tritonclient.utils import InferenceServerException

REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = REPO_ROOT / "tools" / "setup_mlserver.sh"
RUNTIME = "tests.support.mlserver_runtime.TritonOnnxModel"
HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0

# Triton platforms/backends the runtime can serve (it wraps onnxruntime only).
_ONNX_PLATFORMS = {"onnxruntime_onnx"}
_ONNX_BACKENDS = {"onnxruntime"}


class MLServerError(RuntimeError):
    """MLServer could not be set up or started; the message says what to do."""


def default_venv() -> Path:
    """The MLServer venv: ``$MLSERVER_VENV`` or ``<repo>/.venv-mlserver`` (as the setup script)."""
    return Path(os.environ.get("MLSERVER_VENV") or REPO_ROOT / ".venv-mlserver")


def ensure_venv(venv: Path) -> None:
    """Run the (idempotent, ~0.1 s when done) setup script; raise with the fix if it fails.

    Always delegating to the script keeps the pin list in one place: the script's stamp file
    decides whether anything must be installed.
    """
    hint = f"run `MLSERVER_VENV={venv} bash {SETUP_SCRIPT}` (needs python3.11 and PyPI access)"
    if not SETUP_SCRIPT.is_file():
        raise MLServerError(f"{SETUP_SCRIPT} is missing; cannot create the MLServer venv")
    env = {**os.environ, "MLSERVER_VENV": str(venv)}
    try:
        done = subprocess.run(
            ["bash", str(SETUP_SCRIPT)], env=env, capture_output=True, text=True, timeout=900, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise MLServerError(f"MLServer venv setup timed out after 900 s; {hint}") from exc
    if done.returncode != 0 or not (venv / "bin" / "mlserver").is_file():
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise MLServerError(f"MLServer venv setup failed (exit {done.returncode}); {hint}\n{tail}")


def _kserve_datatype(data_type: int) -> str:
    """Triton ``TYPE_FP32`` -> KServe ``FP32``; ``TYPE_STRING`` -> ``BYTES`` (as Triton serves it)."""
    name = str(model_config_pb2.DataType.Name(data_type)).removeprefix("TYPE_")
    if name == "STRING":
        return "BYTES"
    if name in {"INVALID", "BF16"}:  # MLServer 1.7.1 has no BF16 datatype
        raise MLServerError(f"datatype TYPE_{name} cannot be served by MLServer")
    return name


def _tensors(specs: Any, max_batch_size: int) -> list[dict[str, Any]]:
    """Config inputs/outputs as MLServer metadata; Triton shows the batch dim as -1."""
    batch = [-1] if max_batch_size > 0 else []
    return [
        {"name": t.name, "datatype": _kserve_datatype(t.data_type), "shape": batch + [int(d) for d in t.dims]}
        for t in specs
    ]


def _served_versions(model_dir: Path, config: Any, model_file: str) -> list[str]:
    """Apply Triton's version_policy (default: latest 1) to the numeric version directories."""
    available = sorted(
        int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0
    )
    policy = config.version_policy.WhichOneof("policy_choice")
    if policy == "all":
        chosen = available
    elif policy == "specific":
        wanted = {int(v) for v in config.version_policy.specific.versions}
        chosen = [v for v in available if v in wanted]
    else:
        latest = config.version_policy.latest.num_versions if policy == "latest" else 1
        chosen = available[-max(latest, 1) :]
    if not chosen:
        raise MLServerError(f"{model_dir}: no version directory matches the version_policy")
    missing = [v for v in chosen if not (model_dir / str(v) / model_file).is_file()]
    if missing:
        raise MLServerError(f"{model_dir}: versions {missing} have no {model_file}")
    return [str(v) for v in chosen]


def model_settings(repo: Path) -> list[dict[str, Any]]:
    """One MLServer ``model-settings.json`` document per served model version in a Triton repo.

    The name is the model's; ``parameters.version`` is the version directory, so MLServer
    routes ``model_version`` like Triton (absent version -> NOT_FOUND; none -> highest).
    """
    documents: list[dict[str, Any]] = []
    model_dirs = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    for model_dir in model_dirs:
        config_path = model_dir / "config.pbtxt"
        if not config_path.is_file():
            raise MLServerError(f"{model_dir} has no config.pbtxt (auto-complete is not supported)")
        config = text_format.Parse(config_path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
        if config.name and config.name != model_dir.name:
            raise MLServerError(f"{config_path}: name {config.name!r} differs from its directory")
        if config.platform not in _ONNX_PLATFORMS and config.backend not in _ONNX_BACKENDS:
            raise MLServerError(f"{config_path}: only ONNX models are supported, not {config.platform!r}")
        model_file = config.default_model_filename or "model.onnx"
        mbs = int(config.max_batch_size)
        versions = _served_versions(model_dir, config, model_file)
        for version in versions:
            documents.append(
                {
                    "name": model_dir.name,
                    "implementation": RUNTIME,
                    "platform": "onnxruntime_onnx",
                    "versions": versions,
                    "inputs": _tensors(config.input, mbs),
                    "outputs": _tensors(config.output, mbs),
                    "parameters": {
                        "version": version,
                        "uri": str((model_dir / version).resolve()),
                        "extra": {
                            "onnx_path": str((model_dir / version / model_file).resolve()),
                            "config_path": str(config_path.resolve()),
                            "max_batch_size": mbs,
                            "optional_inputs": [t.name for t in config.input if t.optional],
                            "input_reshape": {
                                t.name: list(t.reshape.shape) for t in config.input if t.HasField("reshape")
                            },
                            "output_reshape": {
                                t.name: list(t.reshape.shape) for t in config.output if t.HasField("reshape")
                            },
                        },
                    },
                }
            )
    if not documents:
        raise MLServerError(f"{repo} holds no model")
    return documents


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all sockets held open until every port is chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for s in socks:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]


_LIVE: set[MLServerProcess] = set()


@atexit.register
def _stop_leftovers() -> None:
    """Last resort if a test session ends without calling ``stop()``."""
    for server in list(_LIVE):
        server.stop()


@dataclass(eq=False)
class MLServerProcess:
    """A running ``mlserver start`` subprocess (its own process group) and its addresses."""

    process: subprocess.Popen[bytes]
    grpc_url: str
    http_url: str
    metrics_url: str
    log_path: Path
    models: list[tuple[str, str]]
    startup_seconds: float = 0.0
    _log: IO[bytes] | None = field(default=None, repr=False)

    def log_tail(self, lines: int = 40) -> str:
        """The end of MLServer's log, for error messages."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after 10 s; idempotent."""
        _LIVE.discard(self)
        if self.process.poll() is None:
            # The group is still there while the leader is unreaped, so killpg is safe.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> MLServerProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _wait_ready(server: MLServerProcess, timeout: float) -> None:
    """Poll until the server and every (model, version) is ready, or fail with the log tail."""
    deadline = time.monotonic() + timeout
    pending = list(server.models)
    last_error = "server not ready"
    client = InferenceServerClient(server.grpc_url)
    try:
        while True:
            if server.process.poll() is not None:
                raise MLServerError(
                    f"mlserver exited with code {server.process.returncode} during start-up; "
                    f"log {server.log_path}:\n{server.log_tail()}"
                )
            try:
                if client.is_server_ready(client_timeout=2.0):
                    pending = [
                        (name, version)
                        for name, version in pending
                        if not client.is_model_ready(name, version, client_timeout=2.0)
                    ]
                    if not pending:
                        return
                    last_error = f"models not ready: {pending}"
            except InferenceServerException as exc:  # not listening yet, or model not loaded
                last_error = str(exc)
            if time.monotonic() > deadline:
                raise MLServerError(
                    f"mlserver not ready after {timeout:.0f} s ({last_error}); "
                    f"log {server.log_path}:\n{server.log_tail()}"
                )
            time.sleep(0.2)
    finally:
        client.close()


def start_mlserver(
    repo: Path, workdir: Path, *, venv: Path | None = None, timeout: float = START_TIMEOUT_S
) -> MLServerProcess:
    """Serve every model version of the Triton repository ``repo`` on loopback ports.

    ``workdir`` receives ``settings.json``, ``models/<name>/<version>/model-settings.json``
    and ``mlserver.log``. The caller must call ``stop()`` (an atexit hook is the safety net).
    """
    venv = venv or default_venv()
    ensure_venv(venv)
    documents = model_settings(repo)

    workdir = workdir.resolve()
    models_dir = workdir / "models"
    if models_dir.exists():
        shutil.rmtree(models_dir)
    for doc in documents:
        target = models_dir / doc["name"] / doc["parameters"]["version"] / "model-settings.json"
        target.parent.mkdir(parents=True)
        target.write_text(json.dumps(doc, indent=2), encoding="utf-8")

    http_port, grpc_port, metrics_port = _free_ports(3)
    settings = {
        "debug": False,
        "host": HOST,  # applies to the HTTP, gRPC and metrics listeners
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        # 0 = models run in the server process: no worker pool (and no uvloop start-up crash).
        "parallel_workers": 0,
        "load_models_at_startup": True,  # `mlserver start DIR` scans DIR/**/model-settings.json
        "metrics_dir": str(workdir / "metrics"),
        "environments_dir": str(workdir / "envs"),
    }
    (workdir / "settings.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")

    # MLServer reads MLSERVER_* variables and a ./.env file as settings: drop the former, and
    # run in workdir for the latter. PYTHONPATH = repo root only, so that
    # "tests.support.mlserver_runtime" imports and nothing from the main venv leaks in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSERVER_")}
    for key in ("PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(key, None)
    env.update({"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"})

    log_path = workdir / "mlserver.log"
    log = log_path.open("wb")
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            [str(venv / "bin" / "mlserver"), "start", str(workdir)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() signals every child too
        )
    except OSError:
        log.close()
        raise
    server = MLServerProcess(
        process=process,
        grpc_url=f"{HOST}:{grpc_port}",
        http_url=f"{HOST}:{http_port}",
        metrics_url=f"{HOST}:{metrics_port}",
        log_path=log_path,
        models=[(d["name"], d["parameters"]["version"]) for d in documents],
        _log=log,
    )
    _LIVE.add(server)
    try:
        _wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    server.startup_seconds = time.monotonic() - started
    return server
