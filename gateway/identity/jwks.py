"""Verification keys fetched from an issuer's JWKS URL (directly or via OIDC discovery).

Why this is its own component: a fetching key source is the one place where the
gateway's authentication depends on a remote service, so it is where an attacker can
try to turn token traffic into outbound traffic (unknown-``kid`` floods, SSRF through
redirects or token-supplied URLs) and where an outage can tempt code into failing open.
Every decision below is therefore explicit and marked ``# SECURITY:``.

The rules, in short:

* The URL comes from policy only. Nothing a token says (``jku``, ``x5u``, ``kid``)
  is ever fetched; the authenticator refuses those headers before it gets here.
* https only (plain http only with ``allow_http=True``, for loopback tests); redirects
  are never followed; bodies are read with a byte cap and no content decoding; the
  whole refresh (discovery included) has one deadline, ``fetch_timeout_s``.
* A JWK is usable only for the algorithms policy allows and whose family it fits
  (RS*/PS* → RSA ≥ 2048 bits, ES256 → P-256, ES384 → P-384, EdDSA → Ed25519).
  Symmetric (``kty: oct``) keys and keys carrying private members are refused outright.
* Keys are cached for the response's ``Cache-Control: max-age`` clamped to
  ``[min_ttl_s, max_ttl_s]``. An unknown ``kid`` may trigger at most one fetch per
  ``refresh_cooldown_s`` (measured from the last fetch of any kind), concurrent callers
  share one in-flight fetch, and failures back off exponentially.
* No request waits on the IdP for longer than ``request_wait_s`` (1.5 s), measured from
  the start of the fetch: a slow fetch carries on (up to ``fetch_timeout_s``) for the
  requests after it, while the ones that stop waiting are answered from what is cached.
* Outage: stale keys keep being served for up to ``max_stale_s`` past their TTL (each
  such answer is counted in ``stale_served``); with nothing usable cached the answer is
  :class:`~gateway.errors.DependencyUnavailable` (503), never "accept unverified".

Configuration: the tunables are one frozen :class:`JwksSourceSettings`, checked when it
is built, shared by the constructor and :meth:`JwksKeySource.from_discovery`.

Lifecycle: pass a shared ``aiohttp.ClientSession`` (``session=``) that the application
owns and closes itself, or pass none and the source creates its own hardened session on
first use (or in :meth:`JwksKeySource.start`); then :meth:`JwksKeySource.close` (or
``async with``) must be awaited on shutdown. ``close`` never closes an injected session.
An injected session should be created with ``trust_env=False`` and no cookie jar; this
module disables redirects and decompression per request either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import aiohttp
import jwt
import structlog
from aiohttp import hdrs
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from yarl import URL

from gateway import strict_json
from gateway.errors import AuthenticationFailed, DependencyUnavailable
from gateway.stages.authn import PRIVATE_JWK_MEMBERS, valid_kid

log = structlog.get_logger("gateway.identity.jwks")

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

# The family a JWK must have to verify each algorithm: (kty, crv); crv is None for RSA.
_ALG_FAMILY: Final[dict[str, tuple[str, str | None]]] = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"),
    "EdDSA": ("OKP", "Ed25519"),
}
SUPPORTED_ALGORITHMS: Final = frozenset(_ALG_FAMILY)
_CURVE_NAME: Final = {"P-256": "secp256r1", "P-384": "secp384r1"}
_PRIVATE_MEMBERS: Final = PRIVATE_JWK_MEMBERS
# The only members passed on to the key parser: the public ones of each kty.
_PUBLIC_MEMBERS: Final[dict[str, tuple[str, ...]]] = {"RSA": ("n", "e"), "EC": ("crv", "x", "y"), "OKP": ("crv", "x")}

MIN_RSA_BITS: Final = 2048
MAX_RSA_BITS: Final = 8192
MAX_KEYS: Final = 100
_MAX_AGE_RE: Final = re.compile(r"[0-9]{1,10}")
_BACKOFF_DOUBLINGS_CAP: Final = 16


class JwksConfigError(ValueError):
    """The source cannot be set up as configured (bad URL or option, discovery mismatch).

    A configuration error, not an outage: raised at construction or by
    :meth:`JwksKeySource.from_discovery`, never from :meth:`JwksKeySource.get_key`.
    """


class _FetchError(Exception):
    """One refresh failed; ``reason`` is a short code for logs and metrics."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _DiscoveryRejected(_FetchError):
    """The discovery document answered but names another issuer or an unusable jwks_uri."""


class _SkippedKey(Exception):
    """One JWK of a set is not usable; ``refused`` marks keys that signal an IdP misconfiguration."""

    def __init__(self, reason: str, *, refused: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.refused = refused


@dataclass(frozen=True, slots=True)
class _Jwk:
    kid: str | None
    algorithms: frozenset[str]  # the policy-allowed algorithms this key may verify
    key: PublicKey


@dataclass(frozen=True, slots=True)
class _KeySet:
    keys: tuple[_Jwk, ...]
    fetched_at: float
    expires_at: float


def _fail(reason: str) -> AuthenticationFailed:
    return AuthenticationFailed("invalid token", reason=reason)


def _check_url(url: str, *, allow_http: bool, what: str) -> URL:
    """Parse a policy (or discovery) URL, refusing anything but absolute https."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        raise JwksConfigError(f"{what} is not a valid URL") from exc
    if not parsed.absolute or not parsed.host:
        raise JwksConfigError(f"{what} must be an absolute URL")
    # SECURITY: keys fetched over plain http can be swapped by anyone on the path, which
    # makes every token forgeable; http is for loopback tests and must be asked for.
    if parsed.scheme != "https" and not (allow_http and parsed.scheme == "http"):
        raise JwksConfigError(f"{what} must use https")
    # SECURITY: credentials in a URL end up in logs and error messages.
    if parsed.user is not None or parsed.password is not None:
        raise JwksConfigError(f"{what} must not carry credentials")
    return parsed.with_fragment(None)


def _load_json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = strict_json.loads(body.decode("utf-8"))  # SECURITY: "keys" twice = two key sets
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _FetchError("not_json") from exc
    if not isinstance(doc, dict):
        raise _FetchError("wrong_shape")
    return doc


@dataclass(frozen=True, slots=True, kw_only=True)
class JwksSourceSettings:
    """How a :class:`JwksKeySource` fetches and caches; validated here, once.

    Why one object: the same tunables reach the source from policy (``jwks_settings``),
    from :meth:`JwksKeySource.from_discovery` and from tests; one frozen value keeps the
    defaults and the checks in a single place. Durations are seconds.
    """

    fetch_timeout_s: float = 2.0
    """Deadline of one whole refresh (discovery included)."""
    request_wait_s: float = 1.5
    """Longest a request waits for a fetch, counted from the fetch's start; the fetch may go on."""
    refresh_cooldown_s: float = 30.0
    """At most one fetch per this for unknown kids (from the last fetch of any kind)."""
    min_ttl_s: float = 60.0
    max_ttl_s: float = 86_400.0
    default_ttl_s: float = 300.0
    """TTL of a set served without ``Cache-Control: max-age``; all TTLs are clamped to [min, max]."""
    max_stale_s: float = 86_400.0
    """How long past its TTL a set may still be served while refreshes fail; then 503."""
    failure_backoff_s: float = 5.0
    """First wait after a failed fetch; doubles per failure up to max(cooldown, this)."""
    max_bytes: int = 65_536
    allow_http: bool = False
    """Allow plain-http URLs (loopback tests only)."""

    def __post_init__(self) -> None:
        durations = (self.fetch_timeout_s, self.request_wait_s, self.refresh_cooldown_s, self.min_ttl_s,
                     self.max_ttl_s, self.default_ttl_s, self.max_stale_s, self.failure_backoff_s)
        if not all(math.isfinite(d) and d >= 0 for d in durations):
            raise JwksConfigError("durations must be finite and non-negative")
        if (self.fetch_timeout_s <= 0 or self.request_wait_s <= 0 or self.failure_backoff_s <= 0
                or self.min_ttl_s <= 0 or self.min_ttl_s > self.max_ttl_s):
            raise JwksConfigError(
                "fetch_timeout_s, request_wait_s, failure_backoff_s, min_ttl_s must be > 0; min_ttl_s <= max_ttl_s"
            )
        if self.max_bytes <= 0:
            raise JwksConfigError("max_bytes must be positive")


DEFAULT_SETTINGS: Final = JwksSourceSettings()


class JwksKeySource:
    """Keys of one issuer, fetched from its JWKS URL and cached; a ``KeyResolver`` for authn.

    Construct with the JWKS ``url`` from policy, or use :meth:`from_discovery`. Public
    counters (plain ints, for metrics): ``hits`` (keys served), ``stale_served`` (of
    which past their TTL, during an outage), ``fetches`` (refresh attempts), ``failures``
    (failed refreshes), ``unknown_kids`` (lookups answered ``authn_unknown_kid``),
    ``refused_keys`` (JWKs refused as symmetric or private), ``waits_cut`` (requests that
    stopped waiting for a slow fetch after ``request_wait_s``).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        algorithms: tuple[str, ...],
        discovery_url: str | None = None,
        issuer: str | None = None,
        settings: JwksSourceSettings = DEFAULT_SETTINGS,
        clock: Callable[[], float] = time.monotonic,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        """Validate the configuration; no I/O happens here.

        ``url`` is the JWKS URL; alternatively ``discovery_url`` and ``issuer`` make the
        source resolve ``jwks_uri`` from the OIDC discovery document on its first
        refresh (prefer :meth:`from_discovery`, which also checks it eagerly).
        ``clock`` (monotonic seconds) times TTLs, cooldowns, backoff and max-stale; it is
        the public attribute :attr:`clock`, so a test may swap it for one on the same base.
        """
        if (url is None) == (discovery_url is None):
            raise JwksConfigError("give exactly one of url or discovery_url")
        if (discovery_url is None) != (issuer is None) or (issuer is not None and not issuer):
            raise JwksConfigError("discovery_url needs the expected issuer (and only it)")
        if not algorithms:
            raise JwksConfigError("algorithms must not be empty")
        for alg in algorithms:
            # SECURITY: a JWKS never supplies HMAC secrets, and unknown names never pass.
            if alg not in SUPPORTED_ALGORITHMS:
                raise JwksConfigError(f"algorithm {alg!r} cannot be served from a JWKS")

        self.algorithms: tuple[str, ...] = tuple(algorithms)
        self.settings = settings
        allow_http = settings.allow_http
        self._jwks_url = _check_url(url, allow_http=allow_http, what="JWKS URL") if url is not None else None
        self._discovery_url = None
        if discovery_url is not None:
            self._discovery_url = _check_url(discovery_url, allow_http=allow_http, what="discovery URL")
        self._issuer = issuer
        self.clock = clock
        self._session = session
        self._owns_session = session is None
        self._closed = False

        self._keyset: _KeySet | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self._last_fetch_at: float | None = None
        self._next_attempt_at = -math.inf
        self._consecutive_failures = 0
        self._last_error: _FetchError | None = None
        # Real (event-loop) time until which requests may wait for the fetch in flight.
        self._wait_until = -math.inf

        self.hits = 0
        self.stale_served = 0
        self.fetches = 0
        self.failures = 0
        self.unknown_kids = 0
        self.refused_keys = 0
        self.waits_cut = 0

    # ------------------------------------------------------------------ construction

    @classmethod
    async def from_discovery(
        cls,
        discovery_url: str,
        *,
        issuer: str,
        algorithms: tuple[str, ...],
        settings: JwksSourceSettings = DEFAULT_SETTINGS,
        clock: Callable[[], float] = time.monotonic,
        session: aiohttp.ClientSession | None = None,
    ) -> JwksKeySource:
        """A source whose JWKS URL is the ``jwks_uri`` of an OIDC discovery document.

        Fetches the document (and the key set) once now. A document naming another
        issuer, or an unusable ``jwks_uri``, raises :class:`JwksConfigError`: that is a
        misconfiguration (or a mix-up attack), not an outage. If the IdP is merely
        unreachable the source is returned anyway and retries on demand (under the
        failure backoff); until then :meth:`get_key` answers 503, so a gateway started
        during an IdP outage comes up and heals by itself.
        """
        source = cls(discovery_url=discovery_url, issuer=issuer, algorithms=algorithms, settings=settings,
                     clock=clock, session=session)
        try:
            await source.refresh()
        except BaseException:
            await source.close()
            raise
        if isinstance(source._last_error, _DiscoveryRejected):
            reason = source._last_error.reason
            await source.close()
            raise JwksConfigError(f"OIDC discovery refused: {reason}")
        return source

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create the source's own session if none was injected (optional: first use does it)."""
        self._ensure_session()

    async def close(self) -> None:
        """Cancel any fetch in flight and close the session if this source created it."""
        self._closed = True
        task = self._inflight
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def url(self) -> str | None:
        """The JWKS URL in use (``None`` while discovery has not answered yet)."""
        return str(self._jwks_url) if self._jwks_url is not None else None

    # ------------------------------------------------------------------ lookups

    async def get_key(self, kid: str | None, alg: str) -> PublicKey:
        """The key that verifies a token with header ``kid``/``alg``.

        ``alg`` must already be one policy allows for this issuer (checked again here).
        Raises :class:`AuthenticationFailed` (``authn_unknown_kid``, ``authn_kid_required``,
        ``authn_alg_not_allowed``) for keys we do not have, and
        :class:`DependencyUnavailable` (``jwks_unavailable``) when no usable key set can
        be had at all.
        """
        # SECURITY: the algorithm list is policy's; the token's alg only selects within it.
        if alg not in self.algorithms:
            raise _fail("authn_alg_not_allowed")
        # SECURITY: a kid no JWKS could hold is refused without a fetch.
        if kid is not None and not valid_kid(kid):
            self.unknown_kids += 1
            raise _fail("authn_unknown_kid")

        now = self.clock()
        keyset = self._keyset
        stale = False
        if keyset is None or now >= keyset.expires_at:
            # Nothing cached, or past its TTL: refresh unless a recent failure says wait.
            if self._fetch_allowed(now, unknown_kid=False):
                await self._wait_for_fetch()
                keyset = self._keyset
                now = self.clock()
            if keyset is None:
                # SECURITY: fail closed; no key set means no verification, never "accept".
                raise self._unavailable(now)
            stale = now >= keyset.expires_at
            # SECURITY: stale keys are a bridge over an outage, not forever: after
            # max_stale_s a revoked key could otherwise outlive its revocation indefinitely.
            if stale and now >= keyset.expires_at + self.settings.max_stale_s:
                raise self._unavailable(now)

        key = self._lookup(keyset, kid, alg)
        # SECURITY: an unknown kid may refresh at most once per cooldown (and never while
        # backing off), so a flood of random kids costs the IdP at most one fetch per
        # cooldown; concurrent callers join the fetch in flight instead of starting one.
        if key is None and not stale and self._fetch_allowed(now, unknown_kid=True):
            await self._wait_for_fetch()
            current = self._keyset
            if current is not None:
                key = self._lookup(current, kid, alg)
        if key is None:
            self.unknown_kids += 1
            raise _fail("authn_unknown_kid")
        if stale:
            self.stale_served += 1
        self.hits += 1
        return key

    def vouches(self, kid: str | None, alg: str, key: object) -> bool:
        """True while :meth:`get_key` would answer ``key`` for ``kid``/``alg`` without waiting.

        For the verified-token cache (stages/authn.py), asked on every cache hit: a cached
        verification stops being accepted at the moment an uncached one would be refused.
        False once the kid left the key set or its key changed (rotation), once the set
        is past ``max_stale_s`` (outage), and whenever ``get_key`` would refresh first
        (past the TTL, no backoff): the caller then verifies afresh, which refreshes.
        """
        keyset = self._keyset
        if keyset is None:
            return False
        now = self.clock()
        # SECURITY: the same limits as get_key: past the TTL only while no refresh may be
        # tried (backoff), and never past max_stale_s.
        if now >= keyset.expires_at and (self._fetch_allowed(now, unknown_kid=False)
                                         or now >= keyset.expires_at + self.settings.max_stale_s):
            return False
        try:
            return self._lookup(keyset, kid, alg) is key
        except AuthenticationFailed:
            return False

    async def refresh(self) -> bool:
        """Fetch the key set now (joining a fetch in flight); True if it was replaced.

        Ignores the cooldown and the failure backoff: meant for startup warm-up and
        operator action, never for a code path a request can trigger.
        """
        return await self._join_or_start()

    @staticmethod
    def _lookup(keyset: _KeySet, kid: str | None, alg: str) -> PublicKey | None:
        matches = [k for k in keyset.keys if alg in k.algorithms and (kid is None or k.kid == kid)]
        if len(matches) == 1:
            return matches[0].key
        if len(matches) > 1 and kid is None:
            # SECURITY: without a kid we would have to pick (or try every) key; ask for one.
            raise _fail("authn_kid_required")
        return None

    def _fetch_allowed(self, now: float, *, unknown_kid: bool) -> bool:
        if self._inflight is not None:
            return True  # joining a fetch in flight costs the IdP nothing
        # SECURITY: negative caching: after a failure, wait out the backoff.
        if now < self._next_attempt_at:
            return False
        return not (
            unknown_kid and self._last_fetch_at is not None
            and now - self._last_fetch_at < self.settings.refresh_cooldown_s
        )

    def _unavailable(self, now: float) -> DependencyUnavailable:
        wait = self._next_attempt_at - now
        retry = float(math.ceil(wait)) if math.isfinite(wait) and wait > 1.0 else 1.0
        return DependencyUnavailable(reason="jwks_unavailable", retry_after_s=retry)

    # ------------------------------------------------------------------ fetching

    def _start_or_join(self) -> asyncio.Task[bool]:
        # SECURITY: single flight: at most one fetch runs, whoever asks meanwhile joins it.
        task = self._inflight
        if task is None:
            loop = asyncio.get_running_loop()
            self._last_fetch_at = self.clock()
            self._wait_until = loop.time() + self.settings.request_wait_s
            task = loop.create_task(self._refresh_once())
            self._inflight = task
        return task

    async def _join_or_start(self) -> bool:
        # shield: a caller giving up (client gone) must not cancel the fetch others share.
        return await asyncio.shield(self._start_or_join())

    async def _wait_for_fetch(self) -> None:
        """Start or join a fetch for a request, waiting at most until ``request_wait_s`` after its start.

        # SECURITY: a hanging or slow IdP must not hold requests (and their connections)
        # for the whole fetch deadline: past the window the caller goes on with what is
        # cached (stale keys within max-stale, else 503; an unknown kid, 401), while the
        # fetch may still finish for the requests after it.
        """
        task = self._start_or_join()
        remaining = self._wait_until - asyncio.get_running_loop().time()
        if remaining <= 0:
            self.waits_cut += 1
            return
        try:
            async with asyncio.timeout(remaining):
                await asyncio.shield(task)
        except TimeoutError:
            self.waits_cut += 1

    async def _refresh_once(self) -> bool:
        self.fetches += 1
        try:
            # One deadline for the whole refresh, discovery included: no request waits longer.
            async with asyncio.timeout(self.settings.fetch_timeout_s):
                keys, ttl = await self._fetch_keyset()
        except _FetchError as exc:
            self._record_failure(exc)
            return False
        except TimeoutError:
            self._record_failure(_FetchError("timeout"))
            return False
        except (aiohttp.ClientError, OSError) as exc:
            self._record_failure(_FetchError(f"connection:{type(exc).__name__}"))
            return False
        else:
            now = self.clock()
            self._keyset = _KeySet(keys=keys, fetched_at=now, expires_at=now + ttl)
            self._consecutive_failures = 0
            self._next_attempt_at = -math.inf
            self._last_error = None
            log.info("jwks_refreshed", url=self._log_url(), keys=len(keys), ttl_s=ttl)
            return True
        finally:
            self._inflight = None

    def _record_failure(self, exc: _FetchError) -> None:
        self.failures += 1
        self._last_error = exc
        self._consecutive_failures += 1
        doublings = min(self._consecutive_failures - 1, _BACKOFF_DOUBLINGS_CAP)
        first, cooldown = self.settings.failure_backoff_s, self.settings.refresh_cooldown_s
        backoff = min(first * 2**doublings, max(cooldown, first))
        self._next_attempt_at = self.clock() + backoff
        log.warning(
            "jwks_refresh_failed", url=self._log_url(), reason=exc.reason, retry_in_s=backoff,
            serving_stale=self._keyset is not None,
        )

    def _log_url(self) -> str:
        url = self._jwks_url or self._discovery_url
        return str(url.with_query(None)) if url is not None else "?"

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise _FetchError("closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.fetch_timeout_s),
                # SECURITY: no proxy settings from the environment, no cookies, no decoding.
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                connector=aiohttp.TCPConnector(limit=4),
            )
        return self._session

    async def _fetch_keyset(self) -> tuple[tuple[_Jwk, ...], float]:
        if self._jwks_url is None:
            self._jwks_url = await self._discover()
        body, cache_control = await self._get(self._jwks_url, "application/jwk-set+json, application/json")
        return self._parse_set(_load_json_object(body)), self._ttl(cache_control)

    async def _discover(self) -> URL:
        if self._discovery_url is None:  # the constructor guarantees one of the two URLs
            raise _FetchError("no_url")
        body, _ = await self._get(self._discovery_url, "application/json")
        doc = _load_json_object(body)
        # SECURITY: exact string match (OIDC Discovery §4.3): a document for another
        # issuer (mix-up, typo, trailing slash) must not lend us its keys.
        if doc.get("issuer") != self._issuer:
            raise _DiscoveryRejected("discovery_issuer_mismatch")
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise _DiscoveryRejected("discovery_no_jwks_uri")
        try:
            # SECURITY: the document is held to the same URL rules as policy.
            return _check_url(jwks_uri, allow_http=self.settings.allow_http, what="jwks_uri")
        except JwksConfigError as exc:
            raise _DiscoveryRejected("discovery_bad_jwks_uri") from exc

    async def _get(self, url: URL, accept: str) -> tuple[bytes, str | None]:
        session = self._ensure_session()
        async with session.get(
            url,
            # SECURITY: never follow redirects: a 3xx could point at an internal service
            # or an attacker's key set. A 3xx is simply a failed fetch.
            allow_redirects=False,
            # SECURITY: no decompression (a small gzip body can inflate past any cap).
            auto_decompress=False,
            headers={hdrs.ACCEPT: accept, hdrs.ACCEPT_ENCODING: "identity"},
        ) as resp:
            if resp.status != 200:
                raise _FetchError(f"status_{resp.status}")
            encoding = resp.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise _FetchError("content_encoding")
            # SECURITY: bounded read: refuse a declared oversize body unread, and stop
            # reading an undeclared (chunked) one as soon as it passes the cap.
            if resp.content_length is not None and resp.content_length > self.settings.max_bytes:
                raise _FetchError("oversize")
            body = bytearray()
            async for chunk in resp.content.iter_any():
                body += chunk
                if len(body) > self.settings.max_bytes:
                    raise _FetchError("oversize")
            return bytes(body), resp.headers.get(hdrs.CACHE_CONTROL)

    def _ttl(self, cache_control: str | None) -> float:
        """``max-age`` clamped to ``[min_ttl_s, max_ttl_s]``; default without one.

        # SECURITY: the IdP's header may neither make us fetch on every request
        # (``no-store``, ``max-age=0`` → min_ttl_s) nor keep a key past max_ttl_s.
        """
        ttl = self.settings.default_ttl_s
        if cache_control:
            for directive in cache_control.split(","):
                name, _, value = directive.strip().partition("=")
                name = name.strip().lower()
                if name in ("no-store", "no-cache"):
                    ttl = 0.0
                    break
                if name == "max-age":
                    value = value.strip().strip('"')
                    if _MAX_AGE_RE.fullmatch(value):
                        ttl = float(value)
                    break
        return max(self.settings.min_ttl_s, min(self.settings.max_ttl_s, ttl))

    # ------------------------------------------------------------------ parsing

    def _parse_set(self, doc: dict[str, Any]) -> tuple[_Jwk, ...]:
        raw = doc.get("keys")
        if not isinstance(raw, list):
            raise _FetchError("wrong_shape")
        if len(raw) > MAX_KEYS:
            raise _FetchError("too_many_keys")
        parsed: list[_Jwk] = []
        for index, jwk in enumerate(raw):
            try:
                parsed.append(self._parse_jwk(jwk))
            except _SkippedKey as skip:
                if skip.refused:
                    self.refused_keys += 1
                    log.warning("jwks_key_refused", url=self._log_url(), index=index, reason=skip.reason)
                else:
                    log.debug("jwks_key_skipped", url=self._log_url(), index=index, reason=skip.reason)
        # SECURITY: two keys with one kid for the same algorithm make the kid ambiguous: use neither.
        unique: list[_Jwk] = []
        for entry in parsed:
            if entry.kid is not None and any(
                other is not entry and other.kid == entry.kid and other.algorithms & entry.algorithms
                for other in parsed
            ):
                log.warning("jwks_duplicate_kid", url=self._log_url(), kid=entry.kid)
                continue
            unique.append(entry)
        # SECURITY: a set with nothing usable is treated as an outage (keep the stale
        # keys), not as "revoke everything": an empty answer is far likelier a fault.
        if not unique:
            raise _FetchError("no_usable_keys")
        return tuple(unique)

    def _parse_jwk(self, jwk: object) -> _Jwk:
        if not isinstance(jwk, dict):
            raise _SkippedKey("not_an_object")
        kty = jwk.get("kty")
        # SECURITY: a JWKS is public; a symmetric key there is either a leak or a trap
        # (HS256 keyed with published material): always refused.
        if kty == "oct":
            raise _SkippedKey("symmetric_key", refused=True)
        # SECURITY: private members in a public set mean the IdP leaked its key; never
        # load (or keep) private material, and do not trust the key either.
        if any(member in jwk for member in _PRIVATE_MEMBERS):
            raise _SkippedKey("private_key_material", refused=True)
        if not isinstance(kty, str) or kty not in _PUBLIC_MEMBERS:
            raise _SkippedKey("unsupported_kty")
        # SECURITY: encryption keys are not signature keys (RFC 7517 §4.2, §4.3).
        if jwk.get("use", "sig") != "sig":
            raise _SkippedKey("use")
        if "key_ops" in jwk and not (isinstance(jwk["key_ops"], list) and "verify" in jwk["key_ops"]):
            raise _SkippedKey("key_ops")
        kid = jwk.get("kid")
        if kid is not None and not valid_kid(kid):
            raise _SkippedKey("kid")
        alg = jwk.get("alg")
        # SECURITY: a key pinned to an algorithm policy does not allow is not ours to use.
        if alg is not None and alg not in self.algorithms:
            raise _SkippedKey("alg")
        crv = None if kty == "RSA" else jwk.get("crv")
        # SECURITY: the key's family must fit the algorithm (an RSA key never serves ES256).
        fits = frozenset(a for a in self.algorithms if _ALG_FAMILY[a] == (kty, crv) and (alg is None or a == alg))
        if not fits:
            raise _SkippedKey("family")
        public = {member: jwk[member] for member in _PUBLIC_MEMBERS[kty] if member in jwk}
        public["kty"] = kty
        return _Jwk(kid=kid, algorithms=fits, key=_build_key(kty, crv, public))


def _build_key(kty: str, crv: object, public: dict[str, Any]) -> PublicKey:
    """Build a public key with PyJWT's JWK parsers, given only the public members."""
    try:
        loaded: object
        if kty == "RSA":
            loaded = RSAAlgorithm.from_jwk(public)
        elif kty == "EC":
            loaded = ECAlgorithm.from_jwk(public)
        else:
            loaded = OKPAlgorithm.from_jwk(public)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise _SkippedKey("malformed") from exc
    if isinstance(loaded, rsa.RSAPublicKey):
        # SECURITY: < 2048 bits is forgeable in practice; > 8192 bits only costs us CPU.
        if not MIN_RSA_BITS <= loaded.key_size <= MAX_RSA_BITS:
            raise _SkippedKey("rsa_key_size")
        return loaded
    if isinstance(loaded, ec.EllipticCurvePublicKey):
        if not isinstance(crv, str) or loaded.curve.name != _CURVE_NAME.get(crv):
            raise _SkippedKey("curve")
        return loaded
    if isinstance(loaded, ed25519.Ed25519PublicKey):
        return loaded
    raise _SkippedKey("malformed")
