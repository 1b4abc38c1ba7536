"""Key sources that outlive policy revisions.

A JWKS cache must survive a policy reload (otherwise every reload empties it and restarts
the refresh cooldown), so sources are kept here, keyed by everything that defines them,
and handed to each compiled revision. The registry owns the one HTTP session they share;
the app closes it on shutdown.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.identity.jwks import JwksKeySource, JwksSourceSettings
from gateway.policy.schema import IssuerPolicy


def _new_session() -> aiohttp.ClientSession:
    # SECURITY: no proxies from the environment, no cookies, no transparent decompression.
    return aiohttp.ClientSession(trust_env=False, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False)


def _make_source(cfg: IssuerPolicy, *, session: aiohttp.ClientSession | None) -> JwksKeySource:
    """The key source of one issuer policy; no I/O (a discovery URL is resolved on first use)."""
    s = cfg.jwks_settings
    settings = JwksSourceSettings(
        fetch_timeout_s=float(s.fetch_timeout_s), refresh_cooldown_s=float(s.refresh_cooldown_s),
        max_stale_s=float(s.max_stale_s), allow_http=s.allow_http,
    )
    if cfg.keys.oidc_discovery is not None:
        # SECURITY: discovery is resolved by the source's first refresh, on the request
        # path: a wrong document is then a failed fetch (503, logged, under backoff),
        # never an exception per request (500) that re-fetches the document every time.
        return JwksKeySource(discovery_url=cfg.keys.oidc_discovery, issuer=cfg.issuer,
                             algorithms=tuple(cfg.algorithms), settings=settings, session=session)
    return JwksKeySource(cfg.keys.jwks_url, algorithms=tuple(cfg.algorithms), settings=settings, session=session)


@dataclass(slots=True)
class _Lazy:
    """A source whose discovery document is fetched on first use, inside the event loop."""

    registry: KeySourceRegistry
    cfg: IssuerPolicy
    source: JwksKeySource | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def get_key(self, kid: str | None, alg: str) -> Any:
        if self.source is None:
            async with self.lock:
                if self.source is None:
                    self.source = await self.registry.build(self.cfg)
        return await self.source.get_key(kid, alg)

    def vouches(self, kid: str | None, alg: str, key: object) -> bool:
        """See :meth:`JwksKeySource.vouches` (no source yet: nothing is vouched for)."""
        return self.source is not None and self.source.vouches(kid, alg, key)


class KeySourceRegistry:
    def __init__(self) -> None:
        self._sources: dict[tuple[Any, ...], _Lazy] = {}
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = _new_session()
        return self._session

    def __call__(self, cfg: IssuerPolicy) -> _Lazy:
        """The :data:`KeySourceFactory` of ``compile_pipeline``: same config, same source."""
        s = cfg.jwks_settings
        key = (cfg.issuer, cfg.keys.jwks_url, cfg.keys.oidc_discovery, cfg.algorithms,
               s.refresh_cooldown_s, s.fetch_timeout_s, s.allow_http, s.max_stale_s)
        lazy = self._sources.get(key)
        if lazy is None:
            # SECURITY: a source that cannot be built (an http URL without allow_http, ...)
            # is refused now, at policy load (JwksConfigError is a ValueError, which
            # compile reports as a PolicyError), not as a 500 on every request. No I/O here.
            _make_source(cfg, session=None)
            lazy = self._sources[key] = _Lazy(self, cfg)
        return lazy

    async def build(self, cfg: IssuerPolicy) -> JwksKeySource:
        return _make_source(cfg, session=self.session())

    def counters(self) -> dict[str, int]:
        totals: dict[str, int] = {"hits": 0, "fetches": 0, "failures": 0, "stale_served": 0, "waits_cut": 0}
        for lazy in self._sources.values():
            if lazy.source is not None:
                for name in totals:
                    totals[name] += int(getattr(lazy.source, name))
        return totals

    async def close(self) -> None:
        for lazy in self._sources.values():
            if lazy.source is not None:
                await lazy.source.close()
        if self._session is not None:
            await self._session.close()
