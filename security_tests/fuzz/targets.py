"""Fuzz targets shared by the hypothesis properties (CI) and the atheris harnesses (local).

Each target takes the raw bytes of one corpus entry (security_tests/corpus/<target>/),
drives one parser of the gateway and returns normally when the parser either accepted
the input or refused it with a :class:`~gateway.errors.GatewayError` (the taxonomy every
front maps to a 4xx/5xx in one place). Anything else escaping is the bug class these
targets hunt: an unexpected exception is a 500 (or a dead watcher) reachable by an
attacker. Each target also checks what it can about an accepted input (limits held, no
authentication, no planted PII left).

Corpus framing, chosen so a seed file is readable and atheris mutates it as it is:

- ``http_infer``: an optional first line ``HL:<value>\\n`` is the raw
  ``Inference-Header-Content-Length`` header (any bytes, passed verbatim), the rest the body.
- ``http_body``: an optional first line ``CE:<value>\\n`` is the ``Content-Encoding``.
- ``grpc_infer``: a serialized ``ModelInferRequest``.
- ``jwt``: the bearer token (bytes, decoded leniently).
- ``policy``: an optional first line ``FILE:<name>\\n`` picks the policy file (default
  ``gateway.yaml``), the rest is its content.
- ``pii``: UTF-8 text (decoded leniently).
"""

from __future__ import annotations

import asyncio
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Final

from aiohttp.test_utils import make_mocked_request
from google.protobuf.message import DecodeError
from multidict import CIMultiDict
from tritonclient.grpc import service_pb2

from gateway.devissuer import DEV_ISSUER, trusted_dev_issuer
from gateway.errors import GatewayError
from gateway.fronts.grpc.codec import decode_model_infer_request
from gateway.fronts.http.body import read_body
from gateway.fronts.http.codec import CodecLimits, decode_infer_request
from gateway.kserve import InferRequest
from gateway.policy.loader import PolicyError, build_policy_set
from gateway.policy.registry import POLICY_FILES
from gateway.stages.authn import JwtAuthenticator
from privacy.pii import PiiEngine, Replace

CORPUS: Final = Path(__file__).resolve().parent.parent / "corpus"
TARGETS: Final = ("http_infer", "http_body", "grpc_infer", "jwt", "policy", "pii")

# Small limits: a fuzzer reaches every limit branch with short inputs, and an accepted
# input is checked against them.
LIMITS: Final = CodecLimits(max_elements_per_tensor=4096, max_dims=8, max_bytes_element=512, max_inputs=8)
BODY_CAP: Final = 64 * 1024


class FuzzFinding(AssertionError):
    """A property violated by an input that did not raise (e.g. it authenticated)."""


# ---------------------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------------------


def split_prefix(data: bytes, tag: bytes) -> tuple[bytes | None, bytes]:
    """``TAG:<value>\\n<rest>`` -> (value, rest); (None, data) without the prefix line."""
    if data.startswith(tag + b":"):
        line, sep, rest = data.partition(b"\n")
        if sep:
            return line[len(tag) + 1:], rest
    return None, data


def frame(tag: bytes, value: bytes | None, rest: bytes) -> bytes:
    return rest if value is None else tag + b":" + value + b"\n" + rest


def corpus_entries(target: str) -> list[bytes]:
    """The committed seeds of ``target``, sorted by name (stable hypothesis examples)."""
    folder = CORPUS / target
    return [path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()] if folder.is_dir() else []


# ---------------------------------------------------------------------------------------
# Codecs
# ---------------------------------------------------------------------------------------


def check_limits(req: InferRequest, limits: CodecLimits = LIMITS) -> None:
    """What any accepted request must respect, whatever bytes it came from."""
    if not 1 <= len(req.inputs) <= limits.max_inputs or len(req.outputs) > limits.max_inputs:
        raise FuzzFinding("tensor count outside the limits")
    for tensor in req.inputs:
        data = tensor.data
        if len(tensor.shape) > limits.max_dims or tuple(data.shape) != tensor.shape:
            raise FuzzFinding("shape outside the limits or not the data's shape")
        if data.size > limits.max_elements_per_tensor or data.size != math.prod(tensor.shape):
            raise FuzzFinding("element count outside the limits")
        if tensor.datatype == "BYTES" and any(len(v) > limits.max_bytes_element for v in data.reshape(-1)):
            raise FuzzFinding("BYTES element over the limit")


def http_infer(data: bytes) -> InferRequest | None:
    header, body = split_prefix(data, b"HL")
    try:
        req = decode_infer_request("m", "", body, limits=LIMITS,
                                   header_length=None if header is None else header.decode("latin-1"))
    except GatewayError:
        return None
    check_limits(req)
    return req


def grpc_infer(data: bytes) -> InferRequest | None:
    message = service_pb2.ModelInferRequest()
    try:
        message.ParseFromString(data)
    except DecodeError:
        return None  # grpc's deserializer refuses it before the gateway's code runs
    try:
        req = decode_model_infer_request(message, limits=LIMITS)
    except GatewayError:
        return None
    check_limits(req)
    return req


# ---------------------------------------------------------------------------------------
# HTTP body reader
# ---------------------------------------------------------------------------------------


class _Stream:
    """The part of aiohttp's StreamReader read_body uses: read(n) until b""."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self._data, self._pos, self._chunk = data, 0, chunk

    async def read(self, n: int = -1) -> bytes:
        size = min(n if n > 0 else len(self._data), self._chunk)
        piece = self._data[self._pos:self._pos + size]
        self._pos += len(piece)
        return piece


def http_body(data: bytes, *, chunk: int = 4096, declare_length: bool = False) -> bytes | None:
    coding, raw = split_prefix(data, b"CE")
    headers = CIMultiDict[str]()
    if coding is not None:
        headers["Content-Encoding"] = coding.decode("latin-1")
    if declare_length:
        headers["Content-Length"] = str(len(raw))
    request = make_mocked_request("POST", "/v2/models/m/infer", headers=headers,
                                  payload=_Stream(raw, chunk))  # type: ignore[arg-type]  # duck-typed reader
    try:
        body = asyncio.run(read_body(request, max_bytes=BODY_CAP))
    except GatewayError:
        return None
    if len(body) > BODY_CAP:
        raise FuzzFinding("read_body returned more than its cap")
    return body


# ---------------------------------------------------------------------------------------
# JWT
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JwtWorld:
    """A real authenticator trusting the dev issuer (Ed25519); the key stays on disk."""

    state_dir: Path
    authenticator: JwtAuthenticator


@cache
def jwt_world() -> JwtWorld:
    state = Path(tempfile.mkdtemp(prefix="fuzz-jwt-"))
    return JwtWorld(state, JwtAuthenticator(issuers={DEV_ISSUER: trusted_dev_issuer(state)}))


def authenticate(token: str) -> Any:
    """The principal, or raises: only AuthenticationFailed is an acceptable refusal."""
    return asyncio.run(jwt_world().authenticator.authenticate(token))


def jwt(data: bytes) -> None:
    token = data.decode("utf-8", "replace")
    try:
        authenticate(token)
    except GatewayError as exc:
        if exc.http_status != 401:
            raise FuzzFinding(f"token refused with {type(exc).__name__}, not AuthenticationFailed") from exc
        return
    raise FuzzFinding("a fuzzed token authenticated")


# ---------------------------------------------------------------------------------------
# Policy loader
# ---------------------------------------------------------------------------------------


def policy(data: bytes) -> None:
    name, content = split_prefix(data, b"FILE")
    file_name = name.decode("latin-1") if name is not None else "gateway.yaml"
    if file_name not in POLICY_FILES:
        file_name = "gateway.yaml"
    try:
        build_policy_set({file_name: content})
    except PolicyError:
        return


# ---------------------------------------------------------------------------------------
# PII engine
# ---------------------------------------------------------------------------------------


@cache
def pii_engine() -> PiiEngine:
    return PiiEngine()


@cache
def pii_tags() -> dict[str, Replace]:
    return {entity: Replace() for entity in pii_engine().entities}


@cache
def pii_blocks() -> dict[str, Replace]:
    """A tag without letters or digits: "[PHONE]" is itself a phone keyword ("tel", "phone")
    and would make a second pass see context the first pass did not have."""
    return {entity: Replace(tag="\u2588") for entity in pii_engine().entities}


# How far a replacement changes what the recognizers see around it (a boundary, a keyword).
PII_CONTEXT_CHARS: Final = 24


def pii(data: bytes) -> None:
    """mask never raises, and masking the masked text finds nothing new except next to a
    replacement (where the first pass changed the context: "0001\t0010000000" is one long
    number, "\u2588\t0010000000" is not); far from every replacement it is a fixed point."""
    text = data.decode("utf-8", "replace")
    engine = pii_engine()
    engine.mask(text, pii_tags())
    masked, _counts = engine.mask(text, pii_blocks())
    if "\u2588" in text:
        return  # the block is the replacement marker: the text must not hold one already
    blocks = [i for i, ch in enumerate(masked) if ch == "\u2588"]
    for found in engine.scan(masked):
        near = any(found.start - PII_CONTEXT_CHARS <= i < found.end + PII_CONTEXT_CHARS for i in blocks)
        if not near:
            raise FuzzFinding(f"masked text still holds {found.entity} far from any replacement")
    engine.mask_many(text.split("\x00"), pii_tags())


TARGET_FUNCTIONS: Final[dict[str, Callable[[bytes], object]]] = {
    "http_infer": http_infer, "http_body": http_body, "grpc_infer": grpc_infer,
    "jwt": jwt, "policy": policy, "pii": pii,
}
