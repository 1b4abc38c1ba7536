"""Check a decoded request against the model's declared metadata, before the upstream,
and the upstream's answer against the request, before any response stage.

Always on (not a policy stage): a tensor the model did not declare is never forwarded.
The adversarial and sanitizing stages build on this; this module only enforces the
contract Triton itself would enforce, so both upstreams behave alike.
"""

from __future__ import annotations

import math
import re

import numpy as np

from gateway.errors import InputRejected, UpstreamBadResponse
from gateway.kserve import FLOAT_TYPES, InferRequest, InferResponse, ModelMetadata


def check_request(req: InferRequest, meta: ModelMetadata) -> None:
    declared = {spec.name: spec for spec in meta.inputs}
    given = {t.name for t in req.inputs}
    for tensor in req.inputs:
        spec = declared.get(tensor.name)
        if spec is None:
            raise InputRejected(f"input '{_safe(tensor.name)}' is not an input of this model",
                                reason="input_unknown_name")
        if tensor.datatype != spec.datatype:
            raise InputRejected(f"input '{spec.name}' must have datatype {spec.datatype}",
                                reason="input_wrong_datatype")
        if len(tensor.shape) != len(spec.shape):
            raise InputRejected(f"input '{spec.name}' must have rank {len(spec.shape)}",
                                reason="input_wrong_shape")
        for axis, (dim, want) in enumerate(zip(tensor.shape, spec.shape, strict=True)):
            if want >= 0 and dim != want:
                raise InputRejected(f"input '{spec.name}' dimension {axis} must be {want}",
                                    reason="input_wrong_shape")
            if dim == 0:
                # SECURITY: an empty tensor is no query. The codecs decode it (a model-free
                # parser has no reason to refuse it), but forwarded it reaches backends that
                # answer it differently (an empty result, an error, a crash), bypasses
                # every per-row detector and is charged nothing by per-row DP accounting.
                # IN-04 refuses shape [0]; this is the same for any zero dimension, on
                # both fronts, variable dimension or not.
                raise InputRejected(f"input '{spec.name}' dimension {axis} must be at least 1 "
                                    "(empty tensors are not accepted)", reason="input_wrong_shape")
        if meta.max_batch_size > 0 and tensor.shape and tensor.shape[0] > meta.max_batch_size:
            raise InputRejected(f"input '{spec.name}' batch size exceeds {meta.max_batch_size}",
                                reason="input_batch_too_large")
    missing = sorted(set(declared) - given)
    if missing:
        raise InputRejected(f"missing input '{missing[0]}'", reason="input_missing")
    if meta.max_batch_size > 0:
        batches = {t.shape[0] for t in req.inputs if t.shape}
        if len(batches) > 1:
            raise InputRejected("all inputs must have the same batch size", reason="input_wrong_shape")
    outputs = {spec.name for spec in meta.outputs}
    for out in req.outputs:
        if out.name not in outputs:
            raise InputRejected(f"output '{_safe(out.name)}' is not an output of this model",
                                reason="output_unknown_name")


def check_response(resp: InferResponse, req: InferRequest, meta: ModelMetadata) -> None:
    """Refuse (502) an upstream answer that is not an answer to ``req``, before the response
    stages see it.

    Why here and not only in the front's encoder: the response stages (DP noise, PII
    masking, output detectors) run before encoding. A NaN clamped and noised by DP would
    leave as a valid-looking, charged answer; rows the client did not ask for (a batching
    bug upstream mixing in another request's rows) would be released as if they were its own.
    """
    batch = _request_batch(req) if meta.max_batch_size > 0 and meta.name == req.model else None
    for tensor in resp.outputs:
        if batch is not None and meta.output(tensor.name) is not None and (
                not tensor.shape or tensor.shape[0] != batch):
            # SECURITY: one row out per row in; more would be someone else's answer (AV-04).
            raise UpstreamBadResponse("the model answered another batch size than was asked",
                                      reason="upstream_wrong_batch")
        data = np.asarray(tensor.data)
        if tensor.datatype in FLOAT_TYPES and data.size and data.dtype.kind == "f":
            low, high = float(data.min()), float(data.max())
            if not (math.isfinite(low) and math.isfinite(high)):
                # SECURITY: NaN/inf never reach DP/PII code as if they were values (AV-04).
                raise UpstreamBadResponse("the model answered non-finite values", reason="upstream_non_finite")


def _request_batch(req: InferRequest) -> int | None:
    """The batch size of a batched request (``check_request`` made the inputs agree)."""
    for tensor in req.inputs:
        if tensor.shape:
            return tensor.shape[0]
    return None


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")
_DIGIT_RUN = re.compile(r"[0-9]{4}")


def _safe(name: str) -> str:
    """A client-chosen name is echoed only when it looks like an identifier.

    # SECURITY: error messages reach logs and audit records; a "name" such as an SSN or
    # a header-injection payload must not.
    """
    if _IDENTIFIER.fullmatch(name) and not _DIGIT_RUN.search(name):
        return name
    return "(unnamed)"
