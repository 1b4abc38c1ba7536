"""The OpenFeature provider surface of a provider that may only be evaluated asynchronously.

Why: a provider that does network I/O (OFREP, the guard around any remote provider)
would block the event loop in OpenFeature's synchronous ``resolve_*_details`` methods,
for the whole timeout when the service is down. Such providers refuse the synchronous
calls and route the five typed async calls to one :meth:`AsyncOnlyProvider._resolve_async`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import GeneralError
from openfeature.flag_evaluation import FlagResolutionDetails, FlagValueType
from openfeature.provider import AbstractProvider

__all__ = ["AsyncOnlyProvider"]

ObjectValue = Sequence[FlagValueType] | Mapping[str, FlagValueType]


class AsyncOnlyProvider(AbstractProvider):
    """Synchronous resolves raise ``GeneralError(sync_refusal)``; async ones call ``_resolve_async``."""

    sync_refusal: ClassVar[str] = "this flag provider is evaluated asynchronously only"

    async def _resolve_async(self, flag_type: str, flag_key: str, default_value: Any,
                             evaluation_context: EvaluationContext | None) -> FlagResolutionDetails[Any]:
        """One evaluation; ``flag_type`` is boolean, string, integer, float or object."""
        raise NotImplementedError

    # -- synchronous calls would block the loop on the network: refused ------------------

    def resolve_boolean_details(self, flag_key: str, default_value: bool,
                                evaluation_context: EvaluationContext | None = None) -> FlagResolutionDetails[bool]:
        raise GeneralError(self.sync_refusal)

    def resolve_string_details(self, flag_key: str, default_value: str,
                               evaluation_context: EvaluationContext | None = None) -> FlagResolutionDetails[str]:
        raise GeneralError(self.sync_refusal)

    def resolve_integer_details(self, flag_key: str, default_value: int,
                                evaluation_context: EvaluationContext | None = None) -> FlagResolutionDetails[int]:
        raise GeneralError(self.sync_refusal)

    def resolve_float_details(self, flag_key: str, default_value: float,
                              evaluation_context: EvaluationContext | None = None) -> FlagResolutionDetails[float]:
        raise GeneralError(self.sync_refusal)

    def resolve_object_details(
        self, flag_key: str, default_value: ObjectValue, evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[ObjectValue]:
        raise GeneralError(self.sync_refusal)

    # -- the async surface: one code path -------------------------------------------------

    async def resolve_boolean_details_async(
        self, flag_key: str, default_value: bool, evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[bool]:
        return await self._resolve_async("boolean", flag_key, default_value, evaluation_context)

    async def resolve_string_details_async(
        self, flag_key: str, default_value: str, evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[str]:
        return await self._resolve_async("string", flag_key, default_value, evaluation_context)

    async def resolve_integer_details_async(
        self, flag_key: str, default_value: int, evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[int]:
        return await self._resolve_async("integer", flag_key, default_value, evaluation_context)

    async def resolve_float_details_async(
        self, flag_key: str, default_value: float, evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[float]:
        details: FlagResolutionDetails[float] = await self._resolve_async(
            "float", flag_key, default_value, evaluation_context)
        if isinstance(details.value, int):  # JSON has one number type; OpenFeature wants a float
            details.value = float(details.value)
        return details

    async def resolve_object_details_async(
        self, flag_key: str, default_value: ObjectValue, evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[ObjectValue]:
        return await self._resolve_async("object", flag_key, default_value, evaluation_context)
