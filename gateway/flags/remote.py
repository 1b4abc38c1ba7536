"""Providers chosen by policy (``gateway.yaml`` ``flags.provider``), and the guard around remote ones.

Kinds: ``file`` (default: :class:`~gateway.flags.provider.FlagdFileProvider` over the
revision's ``flags.json``), ``ofrep`` (:class:`~gateway.flags.ofrep.OfrepProvider`, e.g. a
flagd daemon) and ``python`` (any OpenFeature provider class installed in the environment).

Fail-closed contract, kept by the flag stage with this guard:

- a remote provider that is unreachable, slow (``timeout_s``), erroring or answering
  outside the reviewed file resolves to the flag's *stable* variant, counted in
  ``gateway_flag_evaluation_errors_total{flag}`` and logged; after a failure the guard
  stops asking for ``cooldown_s``, so an outage costs no latency per request;
- a remote provider only *chooses among* the reviewed file's variants; it cannot add a
  route, a target, a kill switch, or a threshold;
- kill switches are asked for only where ``flags.json`` has one (the allow-list compiled
  against the profile), are re-checked against the profile at every call, and any doubt
  keeps the stage running: authentication, authorization, and in production model
  exposure, PII masking and DP can never be switched off, whatever a remote answers.

Providers outlive revisions (one connection pool, one cool-down state): the registry
reuses the provider built for an identical configuration and closes them all at shutdown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib
import inspect
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import structlog
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import OpenFeatureError
from openfeature.flag_evaluation import FlagResolutionDetails
from openfeature.provider import AbstractProvider, FeatureProvider, Metadata

from gateway.flags.async_only import AsyncOnlyProvider
from gateway.flags.ofrep import OfrepProvider, ProviderUnavailable
from gateway.flags.provider import FlagdFileProvider, FlagSet
from gateway.policy.schema import FileFlagProvider, OfrepFlagProvider, PythonFlagProvider

__all__ = ["GuardedProvider", "ProviderConfig", "ProviderRegistry", "load_python_provider"]

log = structlog.get_logger("gateway.flags")

ProviderConfig = FileFlagProvider | OfrepFlagProvider | PythonFlagProvider
_THREADS: Final = 4


def _secret(env: str) -> str:
    value = os.environ.get(env, "")
    if not value:
        raise ValueError(f"environment variable {env} is not set (flags.provider)")
    return value


def load_python_provider(factory: str, config: Mapping[str, Any], secret_env: Mapping[str, str]) -> AbstractProvider:
    """Import ``package.module:Class`` and build it with ``config`` plus secrets from the environment.

    Raises ``ValueError`` (the revision is refused) when the name does not resolve to an
    OpenFeature provider class or the class refuses the arguments.
    """
    module_name, _, attribute = factory.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"flags.provider.factory {factory!r} cannot be imported: {exc}") from exc
    # SECURITY: only a provider *class* may be named. A policy edit must not be a way to call
    # arbitrary code with arguments of its choice (subprocess:run with config as kwargs).
    if not (isinstance(target, type) and issubclass(target, AbstractProvider)):
        raise ValueError(f"flags.provider.factory {factory!r} is not an OpenFeature provider class "  # noqa: TRY004 - a policy error
                         "(a subclass of openfeature.provider.AbstractProvider)")
    kwargs = {**config, **{name: _secret(env) for name, env in secret_env.items()}}
    try:
        provider: AbstractProvider = target(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"flags.provider.factory {factory!r} refused its config: {type(exc).__name__}") from exc
    return provider


class GuardedProvider(AsyncOnlyProvider):
    """A remote provider behind a deadline, a cool-down after failures and lazy ``initialize``.

    ``threaded``: the inner provider's *synchronous* methods run in a small dedicated pool
    (for providers doing blocking I/O, such as ``openfeature-provider-ofrep``); otherwise
    its async methods are awaited on the loop. Everything that is not an answer is raised
    as an OpenFeature error, so the caller's fallback is one ``except``.
    """

    sync_refusal = "a remote flag provider is evaluated asynchronously only"

    def __init__(self, inner: FeatureProvider, *, name: str, timeout_s: float, cooldown_s: float,
                 threaded: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.inner = inner
        self.name = name
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self.threaded = threaded
        self.clock = clock
        self._cool_until = 0.0
        self._down = False
        self._initialized = False
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def get_metadata(self) -> Metadata:
        return Metadata(name=f"guarded:{self.inner.get_metadata().name}")

    @property
    def available(self) -> bool:
        return not self._down

    async def close(self) -> None:
        closer = getattr(self.inner, "close", None)
        try:
            if inspect.iscoroutinefunction(closer):
                await closer()
            elif self._initialized:
                await self._run(self.inner.shutdown)
        except Exception:  # noqa: BLE001 - shutdown of a third-party provider must not stop ours
            log.warning("flag_provider_close_failed", provider=self.name)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the guard ----------------------------------------------------------------------

    async def _run(self, func: Callable[..., Any], *args: Any) -> Any:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(_THREADS, thread_name_prefix="flag-provider")
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(func, *args))

    async def _resolve_async(self, flag_type: str, flag_key: str, default: Any,
                             ctx: EvaluationContext | None) -> FlagResolutionDetails[Any]:
        if self.clock() < self._cool_until:
            raise ProviderUnavailable(f"flag provider {self.name} is cooling down after a failure")
        try:
            async with asyncio.timeout(self.timeout_s):
                if not self._initialized:
                    await self._initialize()
                if self.threaded:
                    method = getattr(self.inner, f"resolve_{flag_type}_details")
                    details = await self._run(method, flag_key, default, ctx)
                else:
                    method = getattr(self.inner, f"resolve_{flag_type}_details_async")
                    details = await method(flag_key, default, ctx)
        except ProviderUnavailable as exc:
            self._failed(str(exc))
            raise
        except OpenFeatureError:
            self._recovered()  # it answered: an error about this flag, not an outage
            raise
        except TimeoutError as exc:
            self._failed("timeout")
            raise ProviderUnavailable(f"flag provider {self.name} did not answer within {self.timeout_s}s") from exc
        except Exception as exc:  # a third-party provider may raise anything
            self._failed(type(exc).__name__)
            raise ProviderUnavailable(f"flag provider {self.name} failed: {type(exc).__name__}") from exc
        if not isinstance(details, FlagResolutionDetails):
            self._failed("bad_answer")
            raise ProviderUnavailable(f"flag provider {self.name} returned {type(details).__name__}")
        self._recovered()
        return details

    async def _initialize(self) -> None:
        if self.threaded:
            await self._run(self.inner.initialize, EvaluationContext())
        else:
            self.inner.initialize(EvaluationContext())
        self._initialized = True

    def _failed(self, why: str) -> None:
        self._cool_until = self.clock() + self.cooldown_s
        if not self._down:
            log.warning("flag_provider_unavailable", provider=self.name, error=why[:200],
                        cooldown_s=self.cooldown_s, fallback="stable_variant")
        self._down = True

    def _recovered(self) -> None:
        if self._down:
            log.info("flag_provider_recovered", provider=self.name)
        self._down = False


class ProviderRegistry:
    """The provider of each revision, from its ``flags.provider`` policy; remote ones are shared.

    Secrets are read from the environment when a provider is first built; a missing one
    is a ``ValueError`` and the revision is refused (never a provider without its key).
    """

    def __init__(self) -> None:
        self._providers: dict[str, GuardedProvider] = {}

    def provider_for(self, config: ProviderConfig, flag_set: FlagSet) -> FeatureProvider:
        if isinstance(config, FileFlagProvider):
            return FlagdFileProvider(flag_set)
        key = config.model_dump_json()
        cached = self._providers.get(key)
        if cached is not None:
            return cached
        if isinstance(config, OfrepFlagProvider):
            headers = {config.auth_header: _secret(config.auth_env)} if config.auth_env else {}
            inner: FeatureProvider = OfrepProvider(config.url, timeout_s=float(config.timeout_s), headers=headers)
            guarded = GuardedProvider(inner, name="ofrep", timeout_s=float(config.timeout_s),
                                      cooldown_s=float(config.cooldown_s))
        else:
            inner = load_python_provider(config.factory, config.config, config.secret_env)
            guarded = GuardedProvider(inner, name=config.factory, timeout_s=float(config.timeout_s),
                                      cooldown_s=float(config.cooldown_s), threaded=config.threaded)
        self._providers[key] = guarded
        return guarded

    async def close(self) -> None:
        providers, self._providers = list(self._providers.values()), {}
        for provider in providers:
            await provider.close()
