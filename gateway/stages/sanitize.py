"""Per-model input caps and text hygiene, before anything reads tensor contents.

Runs after the codec (which already refuses malformed JSON, NaN/Inf, wrapped integers,
oversized bodies and elements) and after the metadata check (names, datatypes, shapes),
and *before* PII masking: the masker must see the text the model will see, in one
canonical form, or ``john\\u200b.doe@example.com`` slips past a regex that the model then
reads as an e-mail address (catalogue PII-02).

Per model (``policies/inputs.yaml``, section ``sanitize``):

- caps tighter than the global codec limits: batch size (first dimension), elements per
  tensor and per request, bytes per BYTES element and per request (413 ``input_too_large``
  / ``input_batch_too_large``);
- BYTES inputs are text unless listed in ``binary_inputs``. Text must be strict UTF-8
  (422 ``input_not_utf8``), must not hold NUL (422 ``input_nul_byte``: Triton's onnxruntime
  backend truncates strings at the first NUL, so the gateway and the model would read
  different strings), control characters are refused or removed (``input_control_chars``),
  format characters (Unicode category Cf: zero-width, bidi overrides, soft hyphen, tag
  characters) removed or refused (``input_format_chars``), then the text is normalised
  (NFKC by default).

The stage never edits its input: a rewrite builds a new :class:`InferRequest`, so shadow
mode (which forwards the original) stays truthful.
"""

from __future__ import annotations

import asyncio
import functools
import re
import sys
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Final, Literal

import numpy as np
from pydantic import Field, StrictBool, StrictInt, StrictStr, field_validator

from gateway.context import RequestContext
from gateway.errors import InputRejected, PayloadTooLarge
from gateway.kserve import InferRequest, NDArray, Tensor
from gateway.policy.model import StrictModel
from gateway.stages.base import Mode, Stage

__all__ = [
    "InputSanitizer",
    "ModelSanitizePolicy",
    "SanitizePolicy",
    "TensorCaps",
    "TextRules",
    "TextCleaner",
    "build_sanitize_stage",
    "clean_text",
    "object_array",
]

_NAME_PATTERN: Final = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$"
PositiveInt = Annotated[StrictInt, Field(gt=0)]




# --------------------------------------------------------------------------- policy


class TensorCaps(StrictModel):
    """Resource caps for one model's requests; omitted = only the global codec limits."""

    max_batch: PositiveInt | None = Field(None, description="Largest first dimension of any input.")
    max_elements: PositiveInt | None = Field(None, description="Elements in one input tensor.")
    max_total_elements: PositiveInt | None = Field(None, description="Elements over all inputs of a request.")
    max_bytes_element: PositiveInt | None = Field(
        None, description="Bytes in one BYTES element, checked again after normalisation.")
    max_bytes_total: PositiveInt | None = Field(None, description="Bytes over all BYTES elements of a request.")


class TextRules(StrictModel):
    """How text inputs are cleaned. NUL is always refused in text: there is no switch."""

    normalize: Literal["NFKC", "NFC", "none"] = Field(
        "NFKC", description="Unicode normalisation applied after removals; NFKC folds fullwidth and "
                            "compatibility forms so PII masking sees one canonical spelling.")
    format_chars: Literal["remove", "refuse", "allow"] = Field(
        "remove", description="Category Cf (zero-width, bidi controls, soft hyphen, tags).")
    control_chars: Literal["refuse", "remove"] = Field(
        "refuse", description="C0/C1 controls, DEL, U+2028/U+2029 (tab, LF, CR per allow_whitespace).")
    allow_whitespace: StrictBool = Field(True, description="Tab, LF and CR are not control characters here.")


class ModelSanitizePolicy(StrictModel):
    """One model's rules; an entry replaces ``defaults`` as a whole (no field merging)."""

    caps: TensorCaps = TensorCaps()
    text: TextRules = TextRules()
    binary_inputs: tuple[Annotated[StrictStr, Field(pattern=_NAME_PATTERN)], ...] = Field(
        (), description="BYTES inputs that carry raw bytes (images, audio), exempt from text rules.")


class SanitizePolicy(StrictModel):
    """Section ``sanitize`` of ``inputs.yaml``."""

    mode: Mode = Field(Mode.ENFORCE, description="enforce, or shadow (record only, forward the original).")
    defaults: ModelSanitizePolicy = Field(
        ModelSanitizePolicy(), description="Rules for every model without an entry of its own.")
    models: dict[StrictStr, ModelSanitizePolicy] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, ModelSanitizePolicy]) -> dict[str, ModelSanitizePolicy]:
        for name in value:
            if not re.match(_NAME_PATTERN, name):
                raise ValueError(f"model name {name!r} must match {_NAME_PATTERN}")
        return value


# --------------------------------------------------------------------------- text


@functools.cache
def _format_class() -> str:
    """A regex class of every category-Cf code point of this Python's Unicode database.

    Computed once (~0.1 s) rather than hard-coded, so it always agrees with the
    ``unicodedata`` that NFKC uses.
    """
    ranges: list[str] = []
    start = prev = -2
    for code in range(sys.maxunicode + 1):
        if unicodedata.category(chr(code)) != "Cf":
            continue
        if code != prev + 1:
            if start >= 0:
                ranges.append(_range(start, prev))
            start = code
        prev = code
    ranges.append(_range(start, prev))
    return "[" + "".join(ranges) + "]"


def _range(first: int, last: int) -> str:
    return re.escape(chr(first)) if first == last else f"{re.escape(chr(first))}-{re.escape(chr(last))}"


@dataclass(frozen=True, slots=True)
class TextCleaner:
    """Compiled form of :class:`TextRules` (built once per policy revision)."""

    rules: TextRules
    controls: re.Pattern[str]
    ascii_controls: re.Pattern[bytes]
    formats: re.Pattern[str]

    @classmethod
    def build(cls, rules: TextRules) -> TextCleaner:
        c0 = "\x01-\x08\x0b\x0c\x0e-\x1f" if rules.allow_whitespace else "\x01-\x1f"
        return cls(
            rules=rules,
            # NUL is handled before decoding; U+2028/9 break lines in logs and JSON-in-JS.
            controls=re.compile(f"[{c0}\x7f-\x9f\u2028\u2029]"),
            ascii_controls=re.compile(f"[{c0}\x7f]".encode()),
            formats=re.compile(_format_class()),
        )


def clean_text(value: bytes, cleaner: TextCleaner, label: str) -> bytes:
    """Return the cleaned UTF-8 of one text element (the same object when unchanged)."""
    # SECURITY: refuse NUL before anything else: onnxruntime's string tensors end at the
    # first NUL, so "ok\x00<payload>" would be checked whole here and read as "ok" there.
    if b"\x00" in value:
        raise InputRejected(f"{label}: NUL is not allowed in text", reason="input_nul_byte")
    rules = cleaner.rules
    if value.isascii():
        # Fast path: ASCII has no format characters and is NFKC/NFC-normal already.
        if cleaner.ascii_controls.search(value) is None:
            return value
        if rules.control_chars == "refuse":
            raise InputRejected(f"{label}: control characters are not allowed in text",
                                reason="input_control_chars")
        return cleaner.ascii_controls.sub(b"", value)
    try:
        text = value.decode("utf-8")  # strict: no overlongs, no encoded surrogates
    except UnicodeDecodeError:
        raise InputRejected(f"{label}: text must be valid UTF-8", reason="input_not_utf8") from None
    original = text
    text = _strip(text, cleaner, label)
    form = rules.normalize
    if form != "none" and not unicodedata.is_normalized(form, text):
        text = unicodedata.normalize(form, text)
        # Normalising can (rarely) produce what the first pass removed, and removing can
        # leave a base letter next to a combining mark: one more round, then it must be stable.
        stripped = _strip(text, cleaner, label)
        if stripped != text:
            text = unicodedata.normalize(form, stripped)
            if _strip(text, cleaner, label) != text or not unicodedata.is_normalized(form, text):
                raise InputRejected(f"{label}: text does not reach a stable normal form",
                                    reason="input_unicode_unstable")
    return value if text == original else text.encode("utf-8")


def _strip(text: str, cleaner: TextCleaner, label: str) -> str:
    rules = cleaner.rules
    if cleaner.controls.search(text) is not None:
        if rules.control_chars == "refuse":
            raise InputRejected(f"{label}: control characters are not allowed in text",
                                reason="input_control_chars")
        text = cleaner.controls.sub("", text)
    if rules.format_chars != "allow" and cleaner.formats.search(text) is not None:
        # SECURITY: zero-width and bidi characters hide text from reviewers and from PII
        # regexes (Trojan Source, CVE-2021-42574; catalogue PII-02).
        if rules.format_chars == "refuse":
            raise InputRejected(f"{label}: invisible format characters (zero-width, bidi) are not allowed",
                                reason="input_format_chars")
        text = cleaner.formats.sub("", text)
    return text


# --------------------------------------------------------------------------- stage


@dataclass(frozen=True, slots=True)
class _ModelRules:
    caps: TensorCaps
    cleaner: TextCleaner
    binary_inputs: frozenset[str]


_QUOTABLE: Final = re.compile(r"(?!.*[0-9]{4})[A-Za-z_][A-Za-z0-9_.\-]{0,63}")


def _label(index: int, name: str) -> str:
    # SECURITY: names are echoed in errors, logs and audit records; identifier-like only.
    return f"input '{name}'" if _QUOTABLE.fullmatch(name) else f"inputs[{index}]"


@dataclass(frozen=True, slots=True)
class InputSanitizer(Stage):
    """Caps and text hygiene per model; see the module docstring for the rules."""

    name: ClassVar[str] = "sanitize"
    models: Mapping[str, _ModelRules]
    defaults: _ModelRules

    async def on_request(self, ctx: RequestContext, req: InferRequest) -> InferRequest:
        rules = self.models.get(req.model, self.defaults)
        caps = rules.caps
        total_elements = 0
        has_bytes = False
        for index, tensor in enumerate(req.inputs):
            size = int(tensor.data.size)
            total_elements += size
            if caps.max_batch is not None and tensor.shape and tensor.shape[0] > caps.max_batch:
                raise PayloadTooLarge(f"{_label(index, tensor.name)}: batch larger than {caps.max_batch}",
                                      reason="input_batch_too_large")
            if caps.max_elements is not None and size > caps.max_elements:
                raise PayloadTooLarge(f"{_label(index, tensor.name)}: more than {caps.max_elements} elements")
            has_bytes |= tensor.datatype == "BYTES"
        if caps.max_total_elements is not None and total_elements > caps.max_total_elements:
            raise PayloadTooLarge(f"more than {caps.max_total_elements} elements in one request")
        if not has_bytes:
            return req
        work = functools.partial(self._bytes_inputs, req, rules)
        # SECURITY: normalising megabytes of text holds the GIL in long C calls; in a worker
        # thread the event loop still gets a slice every switch interval (catalogue I5).
        rewritten = await asyncio.to_thread(work) if _heavy(req) else work()
        if rewritten is None:
            return req
        ctx.note(self.name, {"rewritten_inputs": sum(a is not b for a, b in zip(rewritten, req.inputs, strict=True))})
        return InferRequest(req.model, req.version, rewritten, list(req.outputs), req.id, req.binary_data_output)

    def _bytes_inputs(self, req: InferRequest, rules: _ModelRules) -> list[Tensor] | None:
        """Check and clean every BYTES input; the new input list, or None when nothing changed."""
        cap_total = rules.caps.max_bytes_total
        total_bytes = 0
        rewritten: list[Tensor] | None = None
        for index, tensor in enumerate(req.inputs):
            if tensor.datatype != "BYTES":
                continue
            text = tensor.name not in rules.binary_inputs
            data, used = self._bytes_tensor(tensor.data, rules, _label(index, tensor.name), text=text)
            total_bytes += used
            if cap_total is not None and total_bytes > cap_total:
                raise PayloadTooLarge(f"more than {cap_total} bytes of BYTES data in one request")
            if data is not tensor.data:
                if rewritten is None:
                    rewritten = list(req.inputs)
                rewritten[index] = Tensor(tensor.name, tensor.datatype, tensor.shape, data, dict(tensor.parameters))
        return rewritten

    @staticmethod
    def _bytes_tensor(data: NDArray, rules: _ModelRules, label: str, *, text: bool) -> tuple[NDArray, int]:
        """Check (and for text, clean) every element; returns the array to pass on and its bytes."""
        cap = rules.caps.max_bytes_element
        flat = data.reshape(-1)
        out: NDArray | None = None
        used = 0
        for position, item in enumerate(flat):
            if not isinstance(item, bytes):
                raise InputRejected(f"{label}: BYTES elements must be byte strings", reason="input_invalid_data")
            if cap is not None and len(item) > cap:
                raise PayloadTooLarge(f"{label}: BYTES element longer than {cap} bytes")
            cleaned = clean_text(item, rules.cleaner, label) if text else item
            if cleaned is not item:
                # SECURITY: NFKC can expand a character up to 18-fold (U+FDFA); re-check
                # the cap on what is forwarded, not only on what was received.
                if cap is not None and len(cleaned) > cap:
                    raise PayloadTooLarge(f"{label}: BYTES element longer than {cap} bytes after normalisation")
                if out is None:
                    out = flat.copy()
                out[position] = cleaned
            used += len(cleaned)
        if out is None:
            return data, used
        return out.reshape(data.shape), used


# Same threshold as the fronts' off-loop decoding: below it the thread hop costs more than it saves.
OFFLOAD_BYTES: Final = 256 * 1024
_OFFLOAD_ELEMENTS: Final = 64


def _heavy(req: InferRequest) -> bool:
    """Worth a worker thread? Counting bytes is itself bounded: many elements means heavy."""
    elements = 0
    size = 0
    for tensor in req.inputs:
        if tensor.datatype != "BYTES":
            continue
        elements += int(tensor.data.size)
        if elements > _OFFLOAD_ELEMENTS:
            return True
        size += sum(len(item) for item in tensor.data.reshape(-1) if isinstance(item, bytes))
    return size > OFFLOAD_BYTES


def _compile(policy: ModelSanitizePolicy) -> _ModelRules:
    return _ModelRules(caps=policy.caps, cleaner=TextCleaner.build(policy.text),
                       binary_inputs=frozenset(policy.binary_inputs))


def build_sanitize_stage(policy: SanitizePolicy, repo_dir: Path | None) -> InputSanitizer:
    """Compile the ``sanitize`` section. Raises ``ValueError`` for a policy the repository
    contradicts (a ``binary_inputs`` name that is not a BYTES input of a model present in
    ``repo_dir``); models absent from ``repo_dir`` (served only upstream) are not checked."""
    if repo_dir is not None:
        for model, entry in policy.models.items():
            _check_binary_inputs(repo_dir, model, entry)
    compiled = {name: _compile(entry) for name, entry in policy.models.items()}
    return InputSanitizer(models=compiled, defaults=_compile(policy.defaults))


def _check_binary_inputs(repo_dir: Path, model: str, entry: ModelSanitizePolicy) -> None:
    if not entry.binary_inputs or not (repo_dir / model / "config.pbtxt").is_file():
        return
    # Imported here: the repository reader pulls in Triton's protobufs, needed only at build.
    from gateway.upstream.model_repo import ModelRepoError, load_model

    try:
        meta = load_model(repo_dir.resolve(), model).metadata
    except ModelRepoError as exc:
        raise ValueError(f"sanitize.models.{model}: {exc}") from exc
    for name in entry.binary_inputs:
        spec = meta.input(name)
        if spec is None or spec.datatype != "BYTES":
            raise ValueError(f"sanitize.models.{model}.binary_inputs: {name!r} is not a BYTES input of the model")


def object_array(values: list[bytes]) -> NDArray:
    """A 1-D object array of byte strings (numpy would otherwise make a fixed-width array)."""
    array = np.empty(len(values), dtype=np.object_)
    array[:] = values
    return array
