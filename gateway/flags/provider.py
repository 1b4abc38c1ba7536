"""An OpenFeature provider over one flagd flag-definition document, evaluated in process.

Why our own provider and not ``openfeature-provider-flagd``'s in-process file mode:

- that package pins ``protobuf>=7.35`` while ``tritonclient[grpc]`` needs ``protobuf<7``,
  so it cannot be installed next to the upstream client at all;
- its file mode watches a path on its own thread and swaps flags whenever the file
  changes, so flags would reload apart from the policy revision a request is pinned to;
  here a provider is built from the exact bytes of one revision and never changes;
- its evaluator (``openfeature-flagd-core`` 2.0) hashes ``fractional`` keys as CBOR
  arrays, which the flagd daemon does not (yet) do: a subject would land in different
  buckets in process and in a daemon. We follow the daemon (``core/pkg/evaluator/
  fractional.go``): MurmurHash3 x86_32 (seed 0) of ``flagKey + targetingKey`` as UTF-8,
  bucket ``(hash * totalWeight) >> 32`` (flagd PR #1909), tested against flagd's vectors.

The provider implements OpenFeature's ``FeatureProvider`` contract, so the stage can be
handed any other provider (a flagd RPC provider, a vendor's) without code changes.

JsonLogic is a deliberate subset, checked when the file is loaded (an unknown operator
is a policy error, not a silent ``null`` at request time): ``var if == === != !== ! !!
and or in cat < <= > >= starts_with ends_with fractional``. ``==`` does not coerce types
(it is ``===``, with ints and floats equal); ``sem_ver`` is not supported; the data
holds ``targetingKey``, the context attributes and ``$flagd.flagKey`` but not
``$flagd.timestamp`` (routing must not change with the clock). JSON only (flagd also
reads YAML): one strict parser, duplicate keys and ``NaN`` refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, TypeAlias

import mmh3
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import FlagNotFoundError, GeneralError, ParseError, TypeMismatchError
from openfeature.flag_evaluation import FlagResolutionDetails, FlagValueType, Reason
from openfeature.provider import AbstractProvider, Metadata
from pydantic import (
    Field,
    JsonValue,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from gateway.policy.model import StrictModel

__all__ = [
    "MAX_FLAG_FILE_BYTES",
    "CompiledFlag",
    "FlagDefinition",
    "FlagFile",
    "FlagFileError",
    "FlagSet",
    "FlagdFileProvider",
    "evaluate_logic",
    "fractional_bucket",
    "parse_flag_file",
]

MAX_FLAG_FILE_BYTES: Final = 1024 * 1024
MAX_LOGIC_DEPTH: Final = 32
MAX_LOGIC_NODES: Final = 5000
MAX_CACHED_DECISIONS: Final = 8192  # per flag set; cleared when full
MAX_WEIGHT_SUM: Final = 2_147_483_647  # flagd: MaxInt32, so hash * total fits a signed 64-bit long

# Header- and label-safe: a variant name ends up in X-Model-Variant and in metric labels.
VARIANT_PATTERN: Final = r"^[A-Za-z0-9_.\-]{1,64}$"
FLAG_KEY_PATTERN: Final = r"^[A-Za-z0-9_.\-]{1,128}$"

Json: TypeAlias = None | bool | int | float | str | list["Json"] | dict[str, "Json"]
Primitive = StrictStr | StrictBool | StrictInt | StrictFloat
VariantName = Annotated[StrictStr, Field(pattern=VARIANT_PATTERN)]
FlagKey = Annotated[StrictStr, Field(pattern=FLAG_KEY_PATTERN)]


class FlagFileError(ValueError):
    """A flag file that must not be activated; ``issues`` name the place and the rule."""

    def __init__(self, issues: Sequence[str]) -> None:
        self.issues = list(issues)
        super().__init__("; ".join(self.issues))


# -- the flagd document ------------------------------------------------------------------


class FlagDefinition(StrictModel):
    """One flag, in flagd's shape (``flagd.dev/schema/v0/flags.json``)."""

    state: Literal["ENABLED", "DISABLED"]
    variants: dict[VariantName, JsonValue] = Field(min_length=1, max_length=64)
    default_variant: VariantName | None = Field(
        alias="defaultVariant",
        description="Variant served when targeting returns null; null = the caller's code default.",
    )
    targeting: dict[StrictStr, JsonValue] | None = Field(
        None, description="A JsonLogic rule returning a variant name; {} or omitted = no targeting.")
    metadata: dict[StrictStr, Primitive] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _default_is_a_variant(self) -> FlagDefinition:
        if self.default_variant is not None and self.default_variant not in self.variants:
            raise ValueError(f"defaultVariant {self.default_variant!r} is not one of the variants "
                             f"{sorted(self.variants)}")
        return self


class FlagFile(StrictModel):
    """The whole document. Unknown top-level keys are refused (a typo must not be ignored)."""

    schema_uri: StrictStr | None = Field(None, alias="$schema")
    flags: dict[FlagKey, FlagDefinition]
    evaluators: dict[Annotated[StrictStr, Field(pattern=FLAG_KEY_PATTERN)], JsonValue] = Field(
        default_factory=dict, alias="$evaluators",
        description="Shared JsonLogic fragments, used as {\"$ref\": \"name\"} inside targeting.")
    metadata: dict[StrictStr, Primitive] = Field(default_factory=dict)


# -- loading -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompiledFlag:
    """A flag ready for evaluation: ``$ref`` expanded, rule checked, definition hashed."""

    key: str
    enabled: bool
    variants: Mapping[str, Json]
    default_variant: str | None
    targeting: Json  # None = no targeting
    metadata: Mapping[str, str | bool | int | float]
    definition_hash: str  # sha256 of the expanded definition: changes iff a person edits it


@dataclass(frozen=True, slots=True)
class FlagSet:
    """The flags of one policy revision. Immutable: a new revision builds a new one."""

    flags: Mapping[str, CompiledFlag]
    metadata: Mapping[str, str | bool | int | float]
    content_hash: str


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        # SECURITY: with duplicate keys a reviewer reads one value while the parser keeps another.
        if key in result:
            raise FlagFileError([f"duplicate key {key!r}"])
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise FlagFileError([f"{name} is not JSON"])


def _load_json(raw: bytes, name: str) -> Any:
    if len(raw) > MAX_FLAG_FILE_BYTES:
        raise FlagFileError([f"{name}: larger than {MAX_FLAG_FILE_BYTES} bytes"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FlagFileError([f"{name}: not UTF-8"]) from exc
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except FlagFileError as exc:
        raise FlagFileError([f"{name}: {issue}" for issue in exc.issues]) from exc
    except json.JSONDecodeError as exc:
        raise FlagFileError([f"{name}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"]) from exc
    except RecursionError as exc:
        raise FlagFileError([f"{name}: nested too deeply"]) from exc


def parse_flag_file(raw: bytes, *, name: str = "flags.json") -> FlagSet:
    """Validate then compile a flagd JSON document; raise :class:`FlagFileError` with every issue."""
    data = _load_json(raw, name)
    try:
        document = FlagFile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False, include_input=False):
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            unknown = err["type"] == "extra_forbidden"
            hint = " (unknown key: check the spelling against flagd's schema)" if unknown else ""
            problems.append(f"{name}: {where}: {err['msg']}{hint}")
        raise FlagFileError(problems) from exc
    issues: list[str] = []
    evaluators = _expand_evaluators(document.evaluators, issues, name)
    flags: dict[str, CompiledFlag] = {}
    for key, flag in document.flags.items():
        targeting: Json = None
        if flag.targeting:
            expanded = _expand_refs(_as_json(flag.targeting), evaluators.__getitem__, issues,
                                    f"{name}: flags.{key}.targeting")
            before = len(issues)
            check_logic(expanded, issues, f"{name}: flags.{key}.targeting")
            if len(issues) == before:
                check_fractional(expanded, frozenset(flag.variants), issues, f"{name}: flags.{key}.targeting")
            if len(issues) == before:
                targeting = expanded
        definition: dict[str, Json] = {
            "state": flag.state, "variants": _as_json(flag.variants), "defaultVariant": flag.default_variant,
            "targeting": targeting, "metadata": _as_json(flag.metadata),
        }
        flags[key] = CompiledFlag(
            key=key, enabled=flag.state == "ENABLED", variants=dict(flag.variants),
            default_variant=flag.default_variant, targeting=targeting, metadata=dict(flag.metadata),
            definition_hash=_canonical_hash(definition),
        )
    if issues:
        raise FlagFileError(issues)
    return FlagSet(flags=flags, metadata=dict(document.metadata), content_hash=hashlib.sha256(raw).hexdigest()[:12])


def _as_json(value: Any) -> Json:
    """Pydantic's ``JsonValue`` is already plain JSON data; this only narrows the type."""
    result: Json = value
    return result


def _canonical_hash(value: Json) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _UnknownRef(KeyError):
    pass


def _expand_evaluators(raw: Mapping[str, Any], issues: list[str], name: str) -> dict[str, Json]:
    """Resolve references between evaluators once; a cycle or an unknown name is an issue."""
    done: dict[str, Json] = {}

    def resolve(key: str, stack: tuple[str, ...]) -> Json:
        if key not in raw:
            raise _UnknownRef(key)
        if key in done:
            return done[key]
        if key in stack:
            issues.append(f"{name}: $evaluators.{key}: reference cycle {' -> '.join((*stack, key))}")
            return None
        value = _expand_refs(_as_json(raw[key]), lambda ref: resolve(ref, (*stack, key)), issues,
                             f"{name}: $evaluators.{key}")
        done[key] = value
        return value

    for key in raw:
        resolve(key, ())
    return done


def _expand_refs(node: Json, lookup: Callable[[str], Json], issues: list[str], where: str) -> Json:
    """Replace every ``{"$ref": name}`` by the named evaluator (flagd's ``$evaluators``)."""
    if isinstance(node, dict):
        if len(node) == 1 and "$ref" in node:
            ref = node["$ref"]
            if not isinstance(ref, str):
                issues.append(f"{where}: $ref must name an evaluator")
                return None
            try:
                return lookup(ref)
            except KeyError:  # _UnknownRef or a plain missing name
                issues.append(f"{where}: unknown $ref {ref!r}")
                return None
        return {k: _expand_refs(v, lookup, issues, where) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_refs(v, lookup, issues, where) for v in node]
    return node


# -- JsonLogic -------------------------------------------------------------------------------

# operator -> (min args, max args); None = unbounded.
_ARITY: Final[dict[str, tuple[int, int | None]]] = {
    "var": (0, 2), "if": (1, None), "==": (2, 2), "===": (2, 2), "!=": (2, 2), "!==": (2, 2),
    "!": (1, 1), "!!": (1, 1), "and": (1, None), "or": (1, None), "in": (2, 2), "cat": (0, None),
    "<": (2, 3), "<=": (2, 3), ">": (2, 2), ">=": (2, 2), "starts_with": (2, 2), "ends_with": (2, 2),
    "fractional": (2, None),
}


def check_logic(node: Json, issues: list[str], where: str) -> None:
    """Refuse at load time what evaluation would silently turn into ``null``."""
    count = 0

    def walk(value: Json, depth: int) -> None:
        nonlocal count
        count += 1
        if depth > MAX_LOGIC_DEPTH or count > MAX_LOGIC_NODES:
            raise FlagFileError([f"{where}: rule deeper than {MAX_LOGIC_DEPTH} or larger than {MAX_LOGIC_NODES} nodes"])
        if isinstance(value, list):
            for item in value:
                walk(item, depth + 1)
            return
        if not isinstance(value, dict):
            return
        if len(value) != 1:
            issues.append(f"{where}: an operation must have exactly one operator, got {sorted(value)}")
            return
        ((op, args),) = value.items()
        arity = _ARITY.get(op)
        if arity is None:
            issues.append(f"{where}: unsupported operator {op!r} (supported: {' '.join(sorted(_ARITY))})")
            return
        arguments = args if isinstance(args, list) else [args]
        low, high = arity
        if len(arguments) < low or (high is not None and len(arguments) > high):
            issues.append(f"{where}: {op!r} takes {low}..{high if high is not None else 'n'} arguments, "
                          f"got {len(arguments)}")
        for item in arguments:
            walk(item, depth + 1)

    try:
        walk(node, 0)
    except FlagFileError as exc:
        issues.extend(exc.issues)


def check_fractional(node: Json, variants: frozenset[str], issues: list[str], where: str) -> None:
    """Refuse at load time a ``fractional`` split that could only fail at request time.

    # SECURITY: a negative weight, an all-zero split or a misspelt variant (``canray``)
    # makes every evaluation an error that silently serves the default; the operator
    # believes a canary (or a rollback) is live when it is not. Literal entries only:
    # computed variants or weights are judged at request time (and fail to stable).
    """
    if isinstance(node, list):
        for item in node:
            check_fractional(item, variants, issues, where)
        return
    if not isinstance(node, dict):
        return
    ((op, raw_args),) = node.items()
    args: list[Json] = raw_args if isinstance(raw_args, list) else [raw_args]
    if op != "fractional":
        check_fractional(args, variants, issues, where)
        return
    first = args[0] if args else None
    distribution = args[1:] if first is None or isinstance(first, str | dict) else args
    total: int | None = 0
    for entry in distribution:
        if not isinstance(entry, list) or not entry:
            issues.append(f"{where}: fractional: each bucket is [variant, weight], got {json.dumps(entry)}")
            return
        variant = entry[0]
        if isinstance(variant, str) and variant not in variants:
            issues.append(f"{where}: fractional: {variant!r} is not one of the variants {sorted(variants)}")
        weight = entry[1] if len(entry) > 1 else 1
        if isinstance(weight, dict):
            total = None  # computed: judged when evaluated
            continue
        number = _number(weight) if weight is not None else 1.0
        if number is None or not number.is_integer() or number < 0:
            issues.append(f"{where}: fractional: the weight of {_text(variant)!r} must be a whole number >= 0, "
                          f"got {json.dumps(weight)}")
            total = None
        elif total is not None:
            total += int(number)
    if total is not None and not 0 < total <= MAX_WEIGHT_SUM:
        issues.append(f"{where}: fractional: the weights must add up to between 1 and {MAX_WEIGHT_SUM}, got {total} "
                      "(for a full rollback write [[\"stable\", 100], [\"canary\", 0]])")


def _truthy(value: Json) -> bool:
    """JsonLogic truthiness: ``[]``, ``""``, ``0``, ``null`` and ``false`` are false; ``{}`` is true."""
    if isinstance(value, dict):
        return True
    return bool(value)


def _number(value: Json) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _equal(a: Json, b: Json) -> bool:
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None:
        return na == nb
    return type(a) is type(b) and a == b


def _text(value: Json) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str | int | float):
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _compare(op: str, args: list[Json]) -> bool:
    numbers = [_number(a) for a in args]
    values: list[Any]
    if all(n is not None for n in numbers):
        values = numbers
    elif all(isinstance(a, str) for a in args):
        values = list(args)
    else:
        return False
    strict = op in {"<", ">"}
    ordered = values if op in {"<", "<="} else list(reversed(values))
    return all((x < y) if strict else (x <= y) for x, y in zip(ordered, ordered[1:], strict=False))


def _var(args: list[Json], data: Json) -> Json:
    path = args[0] if args else None
    default = args[1] if len(args) > 1 else None
    if path is None or path == "":
        return data
    current: Json = data
    for part in _text(path).split("."):
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return default
    return current


def fractional_bucket(bucket_by: str, weights: Sequence[int]) -> int | None:
    """Index of the bucket ``bucket_by`` falls in, exactly as the flagd daemon computes it."""
    total = sum(weights)
    if total <= 0 or total > MAX_WEIGHT_SUM:
        return None
    hash_value = mmh3.hash(bucket_by.encode("utf-8"), 0, signed=False)
    bucket = (hash_value * total) >> 32
    end = 0
    for index, weight in enumerate(weights):
        end += weight
        if bucket < end:
            return index
    return None  # unreachable: bucket < total


def _fractional(args: list[Json], data: Json) -> Json:
    if len(args) < 2:
        return None
    first = args[0]
    if isinstance(first, str):
        bucket_by = first
        distribution = args[1:]
    else:
        distribution = args[1:] if first is None else args
        flagd = data.get("$flagd") if isinstance(data, dict) else None
        flag_key = flagd.get("flagKey") if isinstance(flagd, dict) else None
        targeting_key = data.get("targetingKey") if isinstance(data, dict) else None
        if not isinstance(targeting_key, str) or not isinstance(flag_key, str):
            return None  # flagd: no bucketing value and no targetingKey -> error -> default
        bucket_by = flag_key + targeting_key
    variants: list[Json] = []
    weights: list[int] = []
    for entry in distribution:
        if not isinstance(entry, list) or not entry:
            return None
        variant = entry[0]
        if isinstance(variant, list | dict):
            return None
        weight: Json = entry[1] if len(entry) > 1 else 1
        if weight is None:
            weight = 1
        number = _number(weight)
        if number is None or not number.is_integer() or number < 0 or number > MAX_WEIGHT_SUM:
            return None
        variants.append(variant)
        weights.append(int(number))
    index = fractional_bucket(bucket_by, weights)
    return None if index is None else variants[index]


def evaluate_logic(node: Json, data: Json) -> Json:
    """Evaluate a rule checked by :func:`check_logic` against ``data``."""
    if isinstance(node, list):
        return [evaluate_logic(item, data) for item in node]
    if not isinstance(node, dict):
        return node
    ((op, raw_args),) = node.items()
    args = raw_args if isinstance(raw_args, list) else [raw_args]
    # Lazy operators first: JsonLogic evaluates only the branches it needs.
    if op == "if":
        for index in range(0, len(args) - 1, 2):
            if _truthy(evaluate_logic(args[index], data)):
                return evaluate_logic(args[index + 1], data)
        return evaluate_logic(args[-1], data) if len(args) % 2 else None
    if op in {"and", "or"}:
        value: Json = None
        for arg in args:
            value = evaluate_logic(arg, data)
            if _truthy(value) is (op == "or"):
                return value
        return value
    values = [evaluate_logic(arg, data) for arg in args]
    return _apply(op, values, data)


def _apply(op: str, values: list[Json], data: Json) -> Json:
    if op == "var":
        return _var(values, data)
    if op in {"==", "==="}:
        return _equal(values[0], values[1])
    if op in {"!=", "!=="}:
        return not _equal(values[0], values[1])
    if op == "!":
        return not _truthy(values[0])
    if op == "!!":
        return _truthy(values[0])
    if op == "in":
        needle, haystack = values
        if isinstance(haystack, str):
            return isinstance(needle, str) and needle in haystack
        if isinstance(haystack, list):
            return any(_equal(needle, item) for item in haystack)
        return False
    if op == "cat":
        return "".join(_text(v) for v in values)
    if op in {"<", "<=", ">", ">="}:
        return _compare(op, values)
    if op in {"starts_with", "ends_with"}:
        text, affix = values
        if not isinstance(text, str) or not isinstance(affix, str):
            return None
        return text.startswith(affix) if op == "starts_with" else text.endswith(affix)
    if op == "fractional":
        return _fractional(values, data)
    raise ParseError(f"unsupported operator {op!r}")  # unreachable after check_logic


# -- the provider ----------------------------------------------------------------------------

_TYPE_CHECKS: Final[dict[str, Callable[[object], bool]]] = {
    "boolean": lambda v: isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "object": lambda v: isinstance(v, dict | list),
}


class FlagdFileProvider(AbstractProvider):
    """OpenFeature provider over one :class:`FlagSet`; evaluation never does I/O.

    Resolution follows flagd: a ``DISABLED`` flag resolves to the caller's default with
    reason ``DISABLED`` (flagd ADR "disabled-flag-evaluation"); targeting returning
    ``null`` gives ``defaultVariant``; a variant that is not defined, a wrong type or a
    missing flag raises the OpenFeature error, which callers turn into their default.
    """

    def __init__(self, flag_set: FlagSet) -> None:
        super().__init__()
        self.flag_set = flag_set
        # Targeting results of this flag set: evaluation is a pure function of the flag and
        # the context (no clock), so a sticky subject's decision can be remembered. Tied to
        # the FlagSet object: a new revision (canary split, kill switch) is a new set, and
        # the old decisions are never consulted again. Rollback holds act in the stage,
        # before the provider is asked.
        self._decisions: dict[tuple[object, ...], tuple[str | None, str]] = {}
        self._decisions_for: FlagSet = flag_set

    @classmethod
    def from_bytes(cls, raw: bytes, *, name: str = "flags.json") -> FlagdFileProvider:
        return cls(parse_flag_file(raw, name=name))

    def get_metadata(self) -> Metadata:
        return Metadata(name="infergate-flagd-file")

    def resolve_boolean_details(self, flag_key: str, default_value: bool,
                                evaluation_context: EvaluationContext | None = None) -> FlagResolutionDetails[bool]:
        return self._resolve(flag_key, default_value, evaluation_context, "boolean")

    def resolve_string_details(self, flag_key: str, default_value: str,
                               evaluation_context: EvaluationContext | None = None) -> FlagResolutionDetails[str]:
        return self._resolve(flag_key, default_value, evaluation_context, "string")

    def resolve_integer_details(self, flag_key: str, default_value: int,
                                evaluation_context: EvaluationContext | None = None) -> FlagResolutionDetails[int]:
        return self._resolve(flag_key, default_value, evaluation_context, "integer")

    def resolve_float_details(self, flag_key: str, default_value: float,
                              evaluation_context: EvaluationContext | None = None) -> FlagResolutionDetails[float]:
        details: FlagResolutionDetails[float] = self._resolve(flag_key, default_value, evaluation_context, "float")
        if isinstance(details.value, int):
            details.value = float(details.value)
        return details

    def resolve_object_details(
        self, flag_key: str, default_value: Sequence[FlagValueType] | Mapping[str, FlagValueType],
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Sequence[FlagValueType] | Mapping[str, FlagValueType]]:
        return self._resolve(flag_key, default_value, evaluation_context, "object")

    def resolve_variant(self, flag_key: str, evaluation_context: EvaluationContext | None = None,
                        ) -> tuple[str | None, str]:
        """The variant name only (``None`` = the caller's default) and the OpenFeature reason."""
        flag = self.flag_set.flags.get(flag_key)
        if flag is None:
            raise FlagNotFoundError(f"flag {flag_key!r} is not defined")
        if not flag.enabled:
            return None, Reason.DISABLED
        if flag.targeting is None:
            return flag.default_variant, Reason.STATIC
        key = _decision_key(flag_key, evaluation_context)
        if key is not None:
            if self._decisions_for is not self.flag_set:
                self._decisions, self._decisions_for = {}, self.flag_set
            hit = self._decisions.get(key)
            if hit is not None:
                return hit
        data = _context_data(flag_key, evaluation_context)
        result = evaluate_logic(flag.targeting, data)
        if result is None:
            decided: tuple[str | None, str] = (flag.default_variant, Reason.DEFAULT)
        else:
            variant = _text(result)
            if variant not in flag.variants:
                # SECURITY: a rule may only choose among declared variants; anything else is an
                # error (never cached: it is raised again on every call).
                raise GeneralError(f"targeting of {flag_key!r} chose an undefined variant")
            decided = (variant, Reason.TARGETING_MATCH)
        if key is not None:
            if len(self._decisions) >= MAX_CACHED_DECISIONS:
                # SECURITY: bounded: many distinct subjects cost a re-evaluation, not memory.
                self._decisions.clear()
            self._decisions[key] = decided
        return decided

    def _resolve(self, flag_key: str, default_value: Any, evaluation_context: EvaluationContext | None,
                 flag_type: str) -> FlagResolutionDetails[Any]:
        variant, reason = self.resolve_variant(flag_key, evaluation_context)
        flag = self.flag_set.flags[flag_key]
        metadata = {**self.flag_set.metadata, **flag.metadata}
        if variant is None:
            return FlagResolutionDetails(value=default_value, variant=None, reason=reason, flag_metadata=metadata)
        value = flag.variants[variant]
        if not _TYPE_CHECKS[flag_type](value):
            raise TypeMismatchError(f"flag {flag_key!r} variant {variant!r} is not of type {flag_type}")
        return FlagResolutionDetails(value=value, variant=variant, reason=reason, flag_metadata=metadata)


_UNCACHEABLE: Final = object()


def _decision_key(flag_key: str, ctx: EvaluationContext | None) -> tuple[object, ...] | None:
    """What a targeting result depends on, or None when the context holds values whose
    equality does not imply equal evaluation (floats: ``-0.0 == 0.0`` but ``cat`` differs;
    str subclasses, mappings, objects turned into text)."""
    if ctx is None:
        return (flag_key,)
    items: list[tuple[str, object]] = []
    for name, value in ctx.attributes.items():
        frozen = _frozen(value)
        if frozen is _UNCACHEABLE:
            return None
        items.append((name, frozen))
    targeting = ctx.targeting_key
    if targeting is not None and type(targeting) is not str:
        return None
    return (flag_key, targeting, tuple(items))


def _frozen(value: object) -> object:
    kind = type(value)
    if value is None or kind is str or kind is bool or kind is int:
        return (kind, value)  # the type too: True == 1, but JsonLogic tells them apart
    if isinstance(value, list | tuple) and (kind is list or kind is tuple):
        parts = tuple(_frozen(v) for v in value)
        return _UNCACHEABLE if any(p is _UNCACHEABLE for p in parts) else (list, parts)
    return _UNCACHEABLE


def _context_data(flag_key: str, ctx: EvaluationContext | None) -> Json:
    """The JsonLogic data flagd builds: context attributes, ``targetingKey`` and ``$flagd``."""
    data: dict[str, Json] = {}
    if ctx is not None:
        for key, value in ctx.attributes.items():
            data[key] = _plain(value)
        data["targetingKey"] = ctx.targeting_key
    # No $flagd.timestamp: routing must not change with the clock (and tests stay deterministic).
    data["$flagd"] = {"flagKey": flag_key}
    return data


def _plain(value: object) -> Json:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [_plain(v) for v in value]
    return str(value)
