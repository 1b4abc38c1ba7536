"""PII masking on the way in and on the way out (``policies/pii.yaml``).

On the way in, every BYTES input element is masked before the upstream sees it; on the
way out, every BYTES output whatever its name, so a model that echoes, completes or
invents an address never hands it to the client (catalogue PII-01, PII-05). Request and
response ids and string tensor parameters are masked too: they are text a client chose.

A tensor's elements are also scanned joined together (with each of ``split_joins``):
a model that concatenates ``["john.doe@exa", "mple.com"]`` produces an address no
element holds. Every element contributing to such an entity is masked.

Detection and operators live in :mod:`privacy.pii`; this module only translates between
tensors and text and applies the policy: which entities, which operator per entity,
per-role overrides (reversible tokens only for roles holding ``pii:unmask``).

SECURITY: fail closed. Any failure of the masker is a 503 ``pii_masker_error``; the
request is not forwarded and no unmasked output is returned (catalogue PII-09). The
audit record gets counts per entity type and direction, never a value.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Final, Literal, TypeVar

import numpy as np
from pydantic import BeforeValidator, Field, StrictInt, StrictStr, model_validator

from gateway.context import RequestContext
from gateway.errors import DependencyUnavailable, GatewayError, InputRejected, UpstreamBadResponse
from gateway.kserve import InferRequest, InferResponse, NDArray, Tensor
from gateway.policy.model import StrictModel
from gateway.stages.base import Mode, Stage
from privacy.pii import AesGcmTokenizer, HmacPseudonym, Mask, Operator, PiiEngine, Redact, Replace

__all__ = [
    "FAILURE_REASON",
    "OperatorSpec",
    "PiiMasker",
    "PiiPolicy",
    "RoleOverride",
    "build_pii_stage",
]

FAILURE_REASON: Final = "pii_masker_error"
NOTE_KEY: Final = "pii"

EntityName = Literal["EMAIL", "PHONE", "CARD", "SSN", "IBAN", "IP", "SECRET", "DOB", "ADDRESS"]
OperatorName = Literal["redact", "replace", "mask", "hash", "tokenize"]
Direction = Literal["in", "out"]
T = TypeVar("T")




def _shorthand(value: Any) -> Any:
    """``EMAIL: replace`` in YAML means ``EMAIL: {operator: replace}``."""
    return {"operator": value} if isinstance(value, str) else value


class OperatorSpec(StrictModel):
    """What replaces one entity type. Parameters are checked here, at policy load."""

    operator: OperatorName = Field(description="redact | replace | mask | hash | tokenize")
    keep_last: Annotated[StrictInt, Field(ge=0, le=8)] | None = Field(
        None, description="mask: letters/digits left visible at the end (default 4, never more than half).")
    tag: Annotated[StrictStr, Field(pattern=r"^\[?[A-Z][A-Z_ ]{0,30}\]?$")] | None = Field(
        None, description="replace: the text written instead of the default [TYPE].")

    @model_validator(mode="after")
    def _parameters_fit(self) -> OperatorSpec:
        if self.keep_last is not None and self.operator != "mask":
            raise ValueError(f"keep_last is a parameter of mask, not of {self.operator}")
        if self.tag is not None and self.operator != "replace":
            raise ValueError(f"tag is a parameter of replace, not of {self.operator}")
        return self


Spec = Annotated[OperatorSpec, BeforeValidator(_shorthand)]


def _all_replace() -> dict[EntityName, OperatorSpec]:
    names: tuple[EntityName, ...] = ("EMAIL", "PHONE", "CARD", "SSN", "IBAN", "IP", "SECRET", "DOB", "ADDRESS")
    return {name: OperatorSpec(operator="replace") for name in names}


class RoleOverride(StrictModel):
    """Operators that replace the defaults for principals holding ``role``."""

    role: StrictStr = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,127}$")
    operators: dict[EntityName, Spec] = Field(min_length=1)


class PiiPolicy(StrictModel):
    """``pii.yaml``: which entities are masked, how, for whom, and in which direction."""

    mode: Mode = Field(Mode.ENFORCE, description="shadow: detect and count, forward and return the original.")
    directions: tuple[Direction, ...] = Field(
        ("in", "out"), min_length=1, description="in: inputs before the upstream; out: outputs before the client.")
    on_non_utf8: Literal["refuse", "pass"] = Field(
        "refuse", description="BYTES that are not UTF-8: refuse (422 in, 502 out) or pass (bytes kept, text in "
                              "them still masked).")
    split_joins: tuple[Annotated[StrictStr, Field(max_length=4)], ...] = Field(
        ("", " "), description="Separators a model may join elements with; entities across elements are masked.")
    # SECURITY: bounds what one message can hold the event loop for: the costliest text the
    # engine knows (phones glued back to back, bench/bench_pii.py) is ~2-3 µs a byte, so
    # 16 KiB inline is <= ~50 ms of loop time (64 KiB was 120-190 ms); a thread hand-off
    # costs tens of µs against the milliseconds of masking that much text.
    offload_bytes: Annotated[StrictInt, Field(ge=0)] = Field(
        16_384, description="Messages with more text than this are masked in a worker thread (event loop free).")
    entities: dict[EntityName, Spec] = Field(
        default_factory=_all_replace, description="Entity types to mask and the default operator of each.")
    roles: tuple[RoleOverride, ...] = Field(
        (), description="Per-role operators, first matching role wins per entity; tokenize only here.")

    @model_validator(mode="after")
    def _consistent(self) -> PiiPolicy:
        if len(set(self.directions)) != len(self.directions):
            raise ValueError("a direction is listed twice")
        # SECURITY: reversible tokens only for roles that may reverse them (pii:unmask);
        # a default applies to everyone.
        tokenized = sorted(name for name, spec in self.entities.items() if spec.operator == "tokenize")
        if tokenized:
            raise ValueError(f"tokenize is allowed only in roles overrides, not as a default (entities {tokenized})")
        roles = [override.role for override in self.roles]
        if len(roles) != len(set(roles)):
            raise ValueError("a role is listed twice under roles")
        for override in self.roles:
            disabled = sorted(set(override.operators) - set(self.entities))
            if disabled:
                raise ValueError(f"role {override.role!r} sets operators for entities not enabled: {disabled}")
        return self


# --------------------------------------------------------------------------- stage


@dataclass(frozen=True, slots=True)
class _Masked:
    """One message's worth of work, done off the event loop when large."""

    counts: Counter[str]
    non_utf8: int


@dataclass(frozen=True, slots=True)
class PiiMasker(Stage):
    """Masks BYTES tensors, ids and string parameters in both directions."""

    name: ClassVar[str] = "pii_mask"
    engine: PiiEngine
    policy: PiiPolicy
    default_operators: Mapping[str, Operator]
    role_operators: tuple[tuple[str, Mapping[str, Operator]], ...] = ()
    tokenizer: AesGcmTokenizer | None = None

    async def on_request(self, ctx: RequestContext, req: InferRequest) -> InferRequest:
        if "in" not in self.policy.directions:
            return req
        operators = self.operators_for(ctx)
        masked, result = await self._guarded(lambda: self._mask_request(req, operators), _text_size(req.inputs))
        self._note(ctx, "in", result)
        return masked

    async def on_response(self, ctx: RequestContext, resp: InferResponse) -> InferResponse:
        if "out" not in self.policy.directions:
            return resp
        operators = self.operators_for(ctx)
        masked, result = await self._guarded(lambda: self._mask_response(resp, operators), _text_size(resp.outputs))
        self._note(ctx, "out", result)
        return masked

    def operators_for(self, ctx: RequestContext) -> Mapping[str, Operator]:
        """Defaults, overridden per entity by the first listed role the principal holds.

        SECURITY: reversible tokens are bound to the principal's tenant (in the AES-GCM
        associated data), so only that tenant can have them unmasked.
        """
        principal = ctx.principal
        if principal is None or not self.role_operators:
            return self.default_operators
        merged = dict(self.default_operators)
        decided: set[str] = set()
        for role, operators in self.role_operators:
            if role in principal.roles:
                for entity, operator in operators.items():
                    if entity not in decided:
                        if isinstance(operator, AesGcmTokenizer):
                            operator = operator.for_tenant(principal.tenant)
                        merged[entity] = operator
                        decided.add(entity)
        return merged

    def token_opener(self, tenant: str) -> AesGcmTokenizer:
        """The tokenizer that opens ``tenant``'s tokens (for the ``pii:unmask`` API).

        The caller checks the permission; without a token key nothing is reversible.
        """
        if self.tokenizer is None:
            raise DependencyUnavailable("no PII token key configured", reason="pii_unmask_unavailable")
        return self.tokenizer.for_tenant(tenant)

    def unmask(self, text: str, *, tenant: str) -> str:
        """Turn ``tenant``'s tokens in ``text`` back into values; other text stays as it is."""
        return self.token_opener(tenant).unmask(text)

    # --- internals --------------------------------------------------------------------

    async def _guarded(self, work: Callable[[], T], size: int) -> T:
        try:
            if size > self.policy.offload_bytes:
                # Large messages are masked in a worker thread; the event loop keeps serving
                # (the GIL is handed over every few ms).
                return await asyncio.to_thread(work)
            return work()
        except GatewayError:
            raise
        except Exception as exc:
            # SECURITY: fail closed; the exception text may quote the input, so it is not
            # passed on (only chained, for the server-side trace).
            raise DependencyUnavailable(reason=FAILURE_REASON) from exc

    def _mask_tensors(self, tensors: list[Tensor], operators: Mapping[str, Operator], *, outbound: bool
                      ) -> tuple[list[Tensor], Counter[str], int]:
        """Every tensor of one message. The elements of all its BYTES tensors are scanned as
        one sequence, in message order, so an entity split across two tensors is found too.

        SECURITY: a model that concatenates its text inputs (a template of "prefix" and
        "user" tensors) or a client that joins two text outputs reads "john.doe@" + "example.com"
        as one address; scanned per tensor, neither half is an entity (s8 probe).
        """
        counts: Counter[str] = Counter()
        non_utf8 = 0
        texts: list[str] = []
        spans: list[tuple[int, int]] = []  # per tensor: its elements' range in ``texts``
        for tensor in tensors:
            start = len(texts)
            if tensor.datatype == "BYTES":
                decoded, bad = self._decode(np.asarray(tensor.data, dtype=object).reshape(-1), outbound=outbound)
                texts += decoded
                non_utf8 += bad
            spans.append((start, len(texts)))
        masked_texts, found = self.engine.mask_many(texts, operators, joins=self.policy.split_joins)
        counts.update(found)
        masked: list[Tensor] = []
        for tensor, (start, end) in zip(tensors, spans, strict=True):
            masked.append(self._rebuild(tensor, texts[start:end], masked_texts[start:end], operators, counts))
        return masked, counts, non_utf8

    def _mask_request(self, req: InferRequest, operators: Mapping[str, Operator]) -> tuple[InferRequest, _Masked]:
        inputs, counts, non_utf8 = self._mask_tensors(req.inputs, operators, outbound=False)
        new_id = self._mask_id(req.id, operators, counts)
        if new_id == req.id and all(a is b for a, b in zip(inputs, req.inputs, strict=True)):
            return req, _Masked(counts, non_utf8)
        return dataclasses.replace(req, inputs=inputs, id=new_id), _Masked(counts, non_utf8)

    def _mask_response(self, resp: InferResponse, operators: Mapping[str, Operator]
                       ) -> tuple[InferResponse, _Masked]:
        outputs, counts, non_utf8 = self._mask_tensors(resp.outputs, operators, outbound=True)
        new_id = self._mask_id(resp.id, operators, counts)
        if new_id == resp.id and all(a is b for a, b in zip(outputs, resp.outputs, strict=True)):
            return resp, _Masked(counts, non_utf8)
        return dataclasses.replace(resp, outputs=outputs, id=new_id), _Masked(counts, non_utf8)

    def _mask_id(self, value: str | None, operators: Mapping[str, Operator], counts: Counter[str]) -> str | None:
        if not value:
            return value
        masked, found = self.engine.mask(value, operators)
        counts.update(found)
        return masked

    def _rebuild(self, tensor: Tensor, texts: list[str], masked: list[str], operators: Mapping[str, Operator],
                 counts: Counter[str]) -> Tensor:
        """``tensor`` with its masked elements and string parameters; itself when nothing changed."""
        parameters = self._mask_parameters(tensor.parameters, operators, counts)
        if tensor.datatype != "BYTES" or all(m is t for m, t in zip(masked, texts, strict=True)):
            return tensor if parameters is tensor.parameters else dataclasses.replace(tensor, parameters=parameters)
        data: NDArray = np.empty(len(masked), dtype=object)
        for index, text in enumerate(masked):
            # surrogateescape: bytes that were not UTF-8 ("pass") come back unchanged.
            data[index] = text.encode("utf-8", "surrogateescape")
        return dataclasses.replace(tensor, data=data.reshape(np.shape(tensor.data)), parameters=parameters)

    def _decode(self, flat: NDArray, *, outbound: bool) -> tuple[list[str], int]:
        texts: list[str] = []
        non_utf8 = 0
        for item in flat.tolist():
            if isinstance(item, bytes | bytearray | memoryview):
                raw = bytes(item)
            elif isinstance(item, str):
                raw = item.encode("utf-8", "surrogateescape")
            else:
                raise TypeError(f"BYTES element of type {type(item).__name__}")
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                if self.policy.on_non_utf8 == "refuse":
                    if outbound:
                        raise UpstreamBadResponse("model output is not UTF-8 text",
                                                  reason="pii_output_not_utf8") from None
                    raise InputRejected("text input is not UTF-8", reason="pii_input_not_utf8") from None
                # SECURITY: "pass" still scans: undecodable bytes become lone surrogates
                # that no recognizer matches, and the text around them is masked.
                texts.append(raw.decode("utf-8", "surrogateescape"))
                non_utf8 += 1
        return texts, non_utf8

    def _mask_parameters(self, parameters: dict[str, Any], operators: Mapping[str, Operator],
                         counts: Counter[str]) -> dict[str, Any]:
        changed: dict[str, Any] | None = None
        for key, value in parameters.items():
            if isinstance(value, str) and value:
                masked, found = self.engine.mask(value, operators)
                if found:
                    counts.update(found)
                    changed = dict(parameters) if changed is None else changed
                    changed[key] = masked
        return parameters if changed is None else changed

    def _note(self, ctx: RequestContext, direction: Direction, result: _Masked) -> None:
        previous = ctx.notes.get(NOTE_KEY)
        record: dict[str, Any] = dict(previous) if isinstance(previous, dict) else {}
        record[direction] = dict(sorted(result.counts.items()))
        if result.non_utf8:
            record[f"{direction}_non_utf8"] = result.non_utf8
        ctx.note(NOTE_KEY, record)


def _text_size(tensors: Sequence[Tensor]) -> int:
    """Bytes of BYTES data in a message (element count when sizes are unknown)."""
    total = 0
    for tensor in tensors:
        if tensor.datatype == "BYTES":
            for item in np.asarray(tensor.data, dtype=object).reshape(-1).tolist():
                total += len(item) if isinstance(item, bytes | bytearray | str) else 1
    return total


# --------------------------------------------------------------------------- builder


def _operator(spec: OperatorSpec, *, hmac_key: bytes, token_key: bytes) -> Operator:
    match spec.operator:
        case "redact":
            return Redact()
        case "replace":
            return Replace(spec.tag)
        case "mask":
            return Mask(keep_last=4 if spec.keep_last is None else spec.keep_last)
        case "hash":
            return HmacPseudonym(hmac_key)
        case "tokenize":
            return AesGcmTokenizer(token_key)


def build_pii_stage(policy: PiiPolicy, *, hmac_key: bytes, token_key: bytes,
                    unmask_roles: Collection[str] | None = None) -> PiiMasker:
    """Compile the policy into a stage: engine, operators and keys checked once.

    ``hmac_key`` (>= 32 bytes) is needed only if a ``hash`` operator is used, ``token_key``
    (16/24/32 bytes) only if ``tokenize`` is. ``unmask_roles``: the roles that hold
    ``pii:unmask`` in the access policy; when given, a ``tokenize`` override for any
    other role is refused. Raises ``ValueError`` naming the problem.
    """
    operators_used = {spec.operator for spec in policy.entities.values()}
    operators_used.update(spec.operator for override in policy.roles for spec in override.operators.values())
    if "hash" in operators_used and len(hmac_key) < 32:
        raise ValueError("the hash operator needs a PII pseudonym key of at least 32 bytes")
    if "tokenize" in operators_used and len(token_key) not in (16, 24, 32):
        raise ValueError("the tokenize operator needs a PII token key of 16, 24 or 32 bytes")
    if unmask_roles is not None:
        allowed = set(unmask_roles)
        for override in policy.roles:
            if override.role not in allowed and any(s.operator == "tokenize" for s in override.operators.values()):
                raise ValueError(f"role {override.role!r} gets reversible tokens but does not hold pii:unmask")

    def build(spec: OperatorSpec) -> Operator:
        return _operator(spec, hmac_key=hmac_key, token_key=token_key)

    defaults: dict[str, Operator] = {entity: build(spec) for entity, spec in policy.entities.items()}
    roles: tuple[tuple[str, Mapping[str, Operator]], ...] = tuple(
        (override.role, {str(entity): build(spec) for entity, spec in override.operators.items()})
        for override in policy.roles
    )
    tokenizer = AesGcmTokenizer(token_key) if "tokenize" in operators_used else None
    return PiiMasker(engine=PiiEngine(policy.entities), policy=policy, default_operators=defaults,
                     role_operators=roles, tokenizer=tokenizer)
