"""Hypothesis strategies for KServe V2 tensors and requests, valid and nearly valid."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway.kserve import DTYPES, FLOAT_TYPES

NUMERIC_TYPES = tuple(name for name in DTYPES if name != "BYTES")
NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,15}", fullmatch=True)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
# Text that survives UTF-8 (no lone surrogates): what a JSON BYTES element can carry.
UTF8_TEXT = st.text(st.characters(codec="utf-8"), max_size=24)


@st.composite
def tensors(draw: st.DrawFn, datatypes: tuple[str, ...] = tuple(DTYPES)) -> tuple[str, str, np.ndarray[Any, Any]]:
    """(name, datatype, array) with finite values of exactly that datatype."""
    datatype = draw(st.sampled_from(datatypes))
    shape = draw(SHAPES)
    if datatype == "BYTES":
        count = int(np.prod(shape))
        texts = draw(st.lists(UTF8_TEXT, min_size=count, max_size=count))
        array = np.empty(count, dtype=np.object_)
        array[:] = [t.encode() for t in texts]
        return draw(NAMES), datatype, array.reshape(shape)
    dtype = DTYPES[datatype]
    elements = None
    if datatype in FLOAT_TYPES:
        elements = hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False, allow_subnormal=True)
    array = draw(hnp.arrays(dtype, shape, elements=elements))
    return draw(NAMES), datatype, array


def json_values(array: np.ndarray[Any, Any], datatype: str, *, nested: bool) -> list[Any]:
    if datatype == "BYTES":
        flat = [v.decode() for v in array.reshape(-1)]
        return np.array(flat, dtype=object).reshape(array.shape).tolist() if nested and array.ndim else flat
    values = array.tolist() if nested and array.ndim else array.reshape(-1).tolist()
    return values if isinstance(values, list) else [values]


def binary_values(array: np.ndarray[Any, Any], datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in array.reshape(-1))
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def encode_request(items: list[tuple[str, str, np.ndarray[Any, Any]]], binary: list[bool],
                   nested: bool) -> tuple[bytes, str | None]:
    """A V2 request body (and its Inference-Header-Content-Length) holding ``items``."""
    inputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for (name, datatype, array), as_binary in zip(items, binary, strict=True):
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype}
        if as_binary:
            raw = binary_values(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = json_values(array, datatype, nested=nested)
        inputs.append(entry)
    header = json.dumps({"inputs": inputs}, allow_nan=False).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), str(len(header))


# JSON values of any shape, drawn towards the request's own vocabulary so the decoder's
# deeper branches are reached, with big integers, odd floats and control characters.
KEYS = st.sampled_from(["id", "inputs", "outputs", "parameters", "name", "shape", "datatype", "data",
                        "binary_data_size", "binary_data", "binary_data_output", "sequence_id",
                        "shared_memory_region", "classification", "priority", "timeout", "x"])
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(list(DTYPES) + ["BF16", "fp32", ""]),
    st.text(max_size=12),
)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.one_of(KEYS, st.text(max_size=6)), inner, max_size=6)),
    max_leaves=40)


@st.composite
def near_valid_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A request that is valid except where hypothesis chose to put something else."""
    inputs = []
    for _ in range(draw(st.integers(1, 3))):
        entry: dict[str, Any] = {
            "name": draw(st.one_of(NAMES, JSON)),
            "shape": draw(st.one_of(st.lists(st.integers(-2, 6), max_size=4),
                                    st.lists(st.integers(0, 2**64), max_size=4), JSON)),
            "datatype": draw(st.one_of(st.sampled_from(list(DTYPES)), JSON)),
        }
        if draw(st.booleans()):
            entry["data"] = draw(st.one_of(st.lists(SCALARS, max_size=12), JSON))
        if draw(st.booleans()):
            entry["parameters"] = draw(st.one_of(
                st.fixed_dictionaries({"binary_data_size": st.integers(-1, 64)}), JSON))
        if draw(st.booleans()):
            entry[draw(KEYS)] = draw(JSON)
        inputs.append(entry)
    doc: dict[str, Any] = {"inputs": inputs}
    for key in draw(st.lists(st.sampled_from(["id", "outputs", "parameters", "extra"]), max_size=3, unique=True)):
        doc[key] = draw(JSON)
    return doc
