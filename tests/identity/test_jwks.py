"""JwksKeySource against a real loopback JWKS server (and an attacker server beside it).

Keys are generated per test session with ``cryptography``; no key material is committed.
Time windows (TTL, cooldown, backoff, max-stale) move an injected clock: no test sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.errors import AuthenticationFailed, DependencyUnavailable
from gateway.identity.jwks import JwksConfigError, JwksKeySource, JwksSourceSettings

ISSUER = "https://idp.test/realms/prod"
LOOPBACK = JwksSourceSettings(allow_http=True)
SETTINGS_FIELDS = frozenset(JwksSourceSettings.__dataclass_fields__)
ServerFactory = Callable[[web.Application], Awaitable[TestServer]]

# ----------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class Keys:
    rs1: rsa.RSAPrivateKey
    rs2: rsa.RSAPrivateKey
    rs_weak: rsa.RSAPrivateKey
    p256: ec.EllipticCurvePrivateKey
    p384: ec.EllipticCurvePrivateKey
    ed: ed25519.Ed25519PrivateKey
    attacker: rsa.RSAPrivateKey


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(
        rs1=rsa.generate_private_key(65537, 2048),
        rs2=rsa.generate_private_key(65537, 2048),
        rs_weak=rsa.generate_private_key(65537, 1024),  # noqa: S505 - the weak key the source must refuse
        p256=ec.generate_private_key(ec.SECP256R1()),
        p384=ec.generate_private_key(ec.SECP384R1()),
        ed=ed25519.Ed25519PrivateKey.generate(),
        attacker=rsa.generate_private_key(65537, 2048),
    )


def jwk(key: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    """The public JWK of a private key (``private=True`` in extra: the private JWK)."""
    private = extra.pop("private", False)
    material = key if private else key.public_key()
    if isinstance(key, rsa.RSAPrivateKey):
        out: dict[str, Any] = RSAAlgorithm.to_jwk(material, as_dict=True)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        out = ECAlgorithm.to_jwk(material, as_dict=True)
    else:
        out = OKPAlgorithm.to_jwk(material, as_dict=True)
    if kid is not None:
        out["kid"] = kid
    out.update(extra)
    return out


def same_key(a: Any, b: Any) -> bool:
    if isinstance(a, ed25519.Ed25519PublicKey):
        return isinstance(b, ed25519.Ed25519PublicKey) and a.public_bytes_raw() == b.public_bytes_raw()
    return bool(a.public_numbers() == b.public_numbers())


# ----------------------------------------------------------------------------- servers


@dataclass
class JwksServer:
    """A scriptable JWKS + OIDC discovery server with hit counters."""

    keys: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "ok"
    cache_control: str | None = None
    issuer: str = ISSUER
    discovery_mode: str = "ok"
    redirect_to: str = ""
    hits: int = 0
    discovery_hits: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    def url(self, path: str = "/jwks.json") -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    async def jwks(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        self.arrived.set()
        headers = {"Cache-Control": self.cache_control} if self.cache_control else {}
        body = {"keys": self.keys}
        if self.mode == "ok":
            return web.json_response(body, headers=headers)
        if self.mode == "status_500":
            return web.Response(status=500, text="boom")
        if self.mode == "not_json":
            return web.Response(text="<html>maintenance</html>", content_type="text/html")
        if self.mode == "wrong_shape":
            return web.json_response({"keys": {"rs-1": self.keys[0]}})
        if self.mode == "empty":
            return web.json_response({"keys": []})
        if self.mode == "hang":
            await self.release.wait()
            return web.json_response(body)
        if self.mode == "redirect":
            raise web.HTTPFound(self.redirect_to)
        if self.mode == "oversize":
            return web.json_response({**body, "pad": "x" * 70_000})
        if self.mode == "oversize_chunked":
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            resp.content_type = "application/json"
            await resp.prepare(request)
            # Valid keys and valid JSON: only the byte cap can make this fetch fail.
            await resp.write(json.dumps(body).encode()[:-1] + b', "pad": "')
            for _ in range(200):  # 3.2 MB, far past the cap, without a Content-Length
                await resp.write(b"x" * 16_384)
            await resp.write(b'"}')
            await resp.write_eof()
            return resp
        if self.mode == "gzip":
            data = gzip.compress(json.dumps(body).encode())
            return web.Response(body=data, content_type="application/json", headers={"Content-Encoding": "gzip"})
        raise AssertionError(self.mode)

    async def discovery(self, request: web.Request) -> web.StreamResponse:
        self.discovery_hits += 1
        if self.discovery_mode == "status_500":
            return web.Response(status=500)
        doc: dict[str, Any] = {"issuer": self.issuer, "jwks_uri": self.url()}
        if self.discovery_mode == "no_jwks_uri":
            del doc["jwks_uri"]
        if self.discovery_mode == "jwks_uri":
            doc["jwks_uri"] = self.redirect_to
        return web.json_response(doc)


async def _start(aiohttp_server: ServerFactory) -> JwksServer:
    srv = JwksServer()
    app = web.Application()
    app.router.add_get("/jwks.json", srv.jwks)
    app.router.add_get("/.well-known/openid-configuration", srv.discovery)
    srv.server = await aiohttp_server(app)
    return srv


@pytest.fixture
async def idp(aiohttp_server: ServerFactory, keys: Keys) -> AsyncIterator[JwksServer]:
    srv = await _start(aiohttp_server)
    srv.keys = [jwk(keys.rs1, "rs-1"), jwk(keys.p256, "es-1"), jwk(keys.ed, "ed-1")]
    yield srv
    srv.release.set()  # let a hanging handler finish before the server shuts down


@pytest.fixture
async def attacker_srv(aiohttp_server: ServerFactory, keys: Keys) -> AsyncIterator[JwksServer]:
    srv = await _start(aiohttp_server)
    srv.keys = [jwk(keys.attacker, "rs-1")]
    yield srv
    srv.release.set()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


SourceFactory = Callable[..., JwksKeySource]


@pytest.fixture
async def make_source(idp: JwksServer, clock: Clock) -> AsyncIterator[SourceFactory]:
    made: list[JwksKeySource] = []

    def make(url: str | None = None, **kwargs: Any) -> JwksKeySource:
        kwargs.setdefault("algorithms", ("RS256",))
        kwargs.setdefault("allow_http", True)
        kwargs.setdefault("clock", clock)
        tuning = {name: kwargs.pop(name) for name in SETTINGS_FIELDS & set(kwargs)}
        source = JwksKeySource(url or idp.url(), settings=JwksSourceSettings(**tuning), **kwargs)
        made.append(source)
        return source

    yield make
    for source in made:
        await source.close()


def unknown_kid(exc: pytest.ExceptionInfo[AuthenticationFailed]) -> bool:
    return exc.value.reason == "authn_unknown_kid"


# ----------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize(
    ("alg", "kid", "attr"),
    [("RS256", "rs-1", "rs1"), ("PS256", "rs-1", "rs1"), ("ES256", "es-1", "p256"), ("EdDSA", "ed-1", "ed")],
)
async def test_each_key_family_verifies_a_real_token(
    make_source: SourceFactory, idp: JwksServer, keys: Keys, alg: str, kid: str, attr: str
) -> None:
    private = getattr(keys, attr)
    source = make_source(algorithms=(alg,))
    key = await source.get_key(kid, alg)
    assert same_key(key, private.public_key())
    token = jwt.encode({"sub": "u1"}, private, algorithm=alg, headers={"kid": kid})
    assert jwt.decode(token, key, algorithms=[alg]) == {"sub": "u1"}
    assert (idp.hits, source.fetches, source.hits) == (1, 1, 1)


async def test_p384_key_serves_es384(make_source: SourceFactory, idp: JwksServer, keys: Keys) -> None:
    idp.keys = [jwk(keys.p384, "es-384")]
    source = make_source(algorithms=("ES384",))
    assert same_key(await source.get_key("es-384", "ES384"), keys.p384.public_key())


async def test_keys_are_cached_until_the_default_ttl(make_source: SourceFactory, idp: JwksServer,
                                                     clock: Clock) -> None:
    source = make_source()
    for _ in range(50):
        await source.get_key("rs-1", "RS256")
    assert idp.hits == 1
    clock.advance(299)
    await source.get_key("rs-1", "RS256")
    assert idp.hits == 1
    clock.advance(2)
    await source.get_key("rs-1", "RS256")
    assert idp.hits == 2


@pytest.mark.parametrize(
    ("header", "ttl"),
    [("max-age=5", 60), ("public, max-age=600", 600), ("max-age=999999999", 86_400), ("no-store", 60),
     ("max-age=abc", 300), ("max-age=-5", 300)],
)
async def test_cache_control_max_age_is_clamped(
    make_source: SourceFactory, idp: JwksServer, clock: Clock, header: str, ttl: int
) -> None:
    idp.cache_control = header
    source = make_source()
    await source.get_key("rs-1", "RS256")
    clock.advance(ttl - 1)
    await source.get_key("rs-1", "RS256")
    assert idp.hits == 1
    clock.advance(1)
    await source.get_key("rs-1", "RS256")
    assert idp.hits == 2


async def test_kid_none_needs_exactly_one_usable_key(make_source: SourceFactory, idp: JwksServer,
                                                     keys: Keys) -> None:
    # rs-1 is the only RSA key: usable without a kid; ES256 keys are not RSA and do not count.
    source = make_source()
    assert same_key(await source.get_key(None, "RS256"), keys.rs1.public_key())
    idp.keys = [jwk(keys.rs1, "rs-1"), jwk(keys.rs2, "rs-2")]
    two = make_source()
    with pytest.raises(AuthenticationFailed) as exc:
        await two.get_key(None, "RS256")
    assert exc.value.reason == "authn_kid_required"


async def test_alg_outside_policy_is_refused_without_fetch(make_source: SourceFactory, idp: JwksServer) -> None:
    source = make_source(algorithms=("RS256",))
    for alg in ("ES256", "HS256", "none"):
        with pytest.raises(AuthenticationFailed) as exc:
            await source.get_key("rs-1", alg)
        assert exc.value.reason == "authn_alg_not_allowed"
    assert idp.hits == 0


@pytest.mark.parametrize("kid", ["", "a" * 257, "rs 1", "rs-1\n", "rs-\u0131"])
async def test_junk_kid_is_unknown_without_fetch(make_source: SourceFactory, idp: JwksServer, kid: str) -> None:
    source = make_source()
    with pytest.raises(AuthenticationFailed) as exc:
        await source.get_key(kid, "RS256")
    assert unknown_kid(exc)
    assert idp.hits == 0


# ----------------------------------------------------------------------------- rotation and floods


async def test_rotation_new_kid_one_refresh(make_source: SourceFactory, idp: JwksServer, keys: Keys,
                                            clock: Clock) -> None:
    source = make_source()
    await source.get_key("rs-1", "RS256")
    idp.keys = [*idp.keys, jwk(keys.rs2, "rs-2")]
    # Within the cooldown of the last fetch the new kid is not fetched for.
    with pytest.raises(AuthenticationFailed) as exc:
        await source.get_key("rs-2", "RS256")
    assert unknown_kid(exc)
    assert idp.hits == 1
    clock.advance(30)
    assert same_key(await source.get_key("rs-2", "RS256"), keys.rs2.public_key())
    assert idp.hits == 2
    await source.get_key("rs-2", "RS256")
    await source.get_key("rs-1", "RS256")
    assert idp.hits == 2


async def test_removed_kid_is_refused_after_refresh(make_source: SourceFactory, idp: JwksServer, keys: Keys,
                                                    clock: Clock) -> None:
    source = make_source()
    await source.get_key("rs-1", "RS256")
    idp.keys = [jwk(keys.rs2, "rs-2")]
    clock.advance(300)
    with pytest.raises(AuthenticationFailed) as exc:
        await source.get_key("rs-1", "RS256")
    assert unknown_kid(exc)
    assert idp.hits == 2


async def test_unknown_kid_flood_costs_one_fetch_per_cooldown(make_source: SourceFactory, idp: JwksServer,
                                                              clock: Clock) -> None:
    source = make_source()
    await source.get_key("rs-1", "RS256")
    assert idp.hits == 1
    for window in (1, 2):
        clock.advance(31)
        for i in range(1000):
            with pytest.raises(AuthenticationFailed) as exc:
                await source.get_key(secrets.token_hex(8), "RS256")
            assert unknown_kid(exc)
            clock.advance(0.02)  # 1,000 tokens spread over 20 s, inside one cooldown
            if i % 100 == 0:
                # The legitimate key keeps working during the flood (and is never evicted).
                await source.get_key("rs-1", "RS256")
        assert idp.hits == 1 + window
    assert source.unknown_kids == 2000


async def test_concurrent_unknown_kid_lookups_share_one_fetch(make_source: SourceFactory, idp: JwksServer,
                                                              keys: Keys, clock: Clock) -> None:
    source = make_source()
    await source.get_key("rs-1", "RS256")
    idp.keys = [*idp.keys, jwk(keys.rs2, "rs-2")]
    clock.advance(31)
    found = await asyncio.gather(*(source.get_key("rs-2", "RS256") for _ in range(100)))
    assert all(same_key(k, keys.rs2.public_key()) for k in found)
    assert idp.hits == 2


async def test_concurrent_cold_start_shares_one_fetch(make_source: SourceFactory, idp: JwksServer) -> None:
    source = make_source()
    results = await asyncio.gather(
        *(source.get_key(secrets.token_hex(4), "RS256") for _ in range(50)),
        *(source.get_key("rs-1", "RS256") for _ in range(50)),
        return_exceptions=True,
    )
    assert idp.hits == 1
    assert all(isinstance(r, AuthenticationFailed) for r in results[:50])
    assert not any(isinstance(r, BaseException) for r in results[50:])


async def test_cancelled_caller_does_not_cancel_the_shared_fetch(make_source: SourceFactory, idp: JwksServer) -> None:
    idp.mode = "hang"
    source = make_source(fetch_timeout_s=5.0)
    first = asyncio.ensure_future(source.get_key("rs-1", "RS256"))
    second = asyncio.ensure_future(source.get_key("rs-1", "RS256"))
    await asyncio.wait_for(idp.arrived.wait(), 5)
    first.cancel()
    idp.mode = "ok"
    idp.release.set()
    assert await second is not None
    assert first.cancelled()
    assert idp.hits == 1


# ----------------------------------------------------------------------------- outages


@pytest.mark.parametrize("mode", ["status_500", "not_json", "empty"])
async def test_outage_with_cached_keys_serves_stale(make_source: SourceFactory, idp: JwksServer,
                                                    clock: Clock, mode: str) -> None:
    source = make_source(max_stale_s=3600)
    await source.get_key("rs-1", "RS256")
    idp.mode = mode
    clock.advance(301)
    assert await source.get_key("rs-1", "RS256") is not None
    assert (idp.hits, source.failures, source.stale_served) == (2, 1, 1)
    # Negative caching: no retry inside the backoff, stale keys keep answering.
    for _ in range(20):
        await source.get_key("rs-1", "RS256")
    assert idp.hits == 2
    assert source.stale_served == 21
    # An unknown kid during the outage is refused without a fetch.
    with pytest.raises(AuthenticationFailed):
        await source.get_key("rs-9", "RS256")
    assert idp.hits == 2
    clock.advance(5)
    await source.get_key("rs-1", "RS256")
    assert idp.hits == 3
    # Past max-stale the cache is no longer trusted: fail closed.
    clock.advance(3600)
    with pytest.raises(DependencyUnavailable) as exc:
        await source.get_key("rs-1", "RS256")
    assert exc.value.reason == "jwks_unavailable"
    # Recovery: the next allowed fetch brings fresh keys back.
    idp.mode = "ok"
    clock.advance(30)
    await source.get_key("rs-1", "RS256")
    stale = source.stale_served
    await source.get_key("rs-1", "RS256")
    assert source.stale_served == stale


@pytest.mark.parametrize(
    "mode", ["status_500", "not_json", "wrong_shape", "empty", "oversize", "oversize_chunked", "gzip", "redirect"]
)
async def test_outage_without_cache_fails_closed(make_source: SourceFactory, idp: JwksServer,
                                                 attacker_srv: JwksServer, mode: str) -> None:
    idp.mode = mode
    idp.redirect_to = attacker_srv.url()
    source = make_source()
    with pytest.raises(DependencyUnavailable) as exc:
        await source.get_key("rs-1", "RS256")
    assert exc.value.reason == "jwks_unavailable"
    assert exc.value.http_status == 503
    assert exc.value.retry_after_s is not None and exc.value.retry_after_s >= 1
    assert (idp.hits, source.failures) == (1, 1)
    assert attacker_srv.hits == 0


async def test_failure_backoff_is_exponential_up_to_the_cooldown(make_source: SourceFactory, idp: JwksServer,
                                                                 clock: Clock) -> None:
    idp.mode = "status_500"
    source = make_source()
    for expected_hits, backoff in enumerate((5, 10, 20, 30, 30), start=1):
        with pytest.raises(DependencyUnavailable):
            await source.get_key("rs-1", "RS256")
        assert idp.hits == expected_hits
        clock.advance(backoff - 0.5)
        with pytest.raises(DependencyUnavailable):
            await source.get_key("rs-1", "RS256")
        assert idp.hits == expected_hits
        clock.advance(0.5)
    idp.mode = "ok"
    assert await source.get_key("rs-1", "RS256") is not None


async def test_redirect_is_never_followed(make_source: SourceFactory, idp: JwksServer, keys: Keys,
                                          attacker_srv: JwksServer, clock: Clock) -> None:
    source = make_source()
    await source.get_key("rs-1", "RS256")
    idp.mode = "redirect"
    idp.redirect_to = attacker_srv.url()
    clock.advance(301)
    key = await source.get_key("rs-1", "RS256")  # stale: still the real key, never the attacker's
    assert same_key(key, keys.rs1.public_key())
    assert attacker_srv.hits == 0
    assert (idp.hits, source.failures) == (2, 1)


async def test_hanging_server_times_out(make_source: SourceFactory, idp: JwksServer) -> None:
    idp.mode = "hang"
    source = make_source(fetch_timeout_s=0.2, clock=time.monotonic)
    with pytest.raises(DependencyUnavailable):
        await source.get_key("rs-1", "RS256")
    # The deadline ended the wait, not the server: it is still holding the request.
    assert not idp.release.is_set()
    assert (idp.hits, source.failures, source.fetches) == (1, 1, 1)


async def test_cold_start_request_stops_waiting_while_a_slow_fetch_goes_on(make_source: SourceFactory,
                                                                           idp: JwksServer) -> None:
    # The fetch may take 30 s; a request waits at most request_wait_s from the fetch's start.
    idp.mode = "hang"
    source = make_source(fetch_timeout_s=30, request_wait_s=0.2)
    with pytest.raises(DependencyUnavailable) as exc:
        await source.get_key("rs-1", "RS256")
    assert exc.value.reason == "jwks_unavailable"
    assert (source.fetches, source.failures, source.waits_cut) == (1, 0, 1)  # answered with the fetch in flight
    # Later requests inside the same slow fetch do not wait at all, and start no fetch.
    for _ in range(20):
        with pytest.raises(DependencyUnavailable):
            await source.get_key("rs-1", "RS256")
    assert (idp.hits, source.fetches, source.waits_cut) == (1, 1, 21)
    # The fetch finishes on its own and serves the requests after it.
    idp.release.set()
    assert await source.refresh() is True
    assert await source.get_key("rs-1", "RS256") is not None
    assert idp.hits == 1


async def test_stale_keys_answer_while_a_slow_refresh_goes_on(make_source: SourceFactory, idp: JwksServer,
                                                              keys: Keys, clock: Clock) -> None:
    source = make_source(fetch_timeout_s=30, request_wait_s=0.2)
    await source.get_key("rs-1", "RS256")
    idp.mode = "hang"
    clock.advance(301)
    assert same_key(await source.get_key("rs-1", "RS256"), keys.rs1.public_key())
    assert (idp.hits, source.stale_served, source.waits_cut, source.failures) == (2, 1, 1, 0)
    # An unknown kid meanwhile: refused, no new fetch, no wait.
    with pytest.raises(AuthenticationFailed) as exc:
        await source.get_key("rs-9", "RS256")
    assert unknown_kid(exc)
    assert idp.hits == 2
    idp.release.set()
    assert await source.refresh() is True


async def test_unknown_kid_refresh_against_a_hanging_server_is_cut(make_source: SourceFactory, idp: JwksServer,
                                                                   clock: Clock) -> None:
    source = make_source(fetch_timeout_s=30, request_wait_s=0.2)
    await source.get_key("rs-1", "RS256")
    idp.mode = "hang"
    clock.advance(31)  # past the cooldown: an unknown kid may refresh once
    for _ in range(50):
        with pytest.raises(AuthenticationFailed) as exc:
            await source.get_key("rs-new", "RS256")
        assert unknown_kid(exc)
    assert await source.get_key("rs-1", "RS256") is not None  # the fresh cached key is unaffected
    assert (idp.hits, source.fetches, source.waits_cut) == (2, 2, 50)
    idp.release.set()
    assert await source.refresh() is True


async def test_connection_refused_fails_closed(make_source: SourceFactory, unused_tcp_port: int) -> None:
    source = make_source(f"http://127.0.0.1:{unused_tcp_port}/jwks.json")
    with pytest.raises(DependencyUnavailable):
        await source.get_key("rs-1", "RS256")
    assert source.failures == 1


# ----------------------------------------------------------------------------- key hygiene


def _bad_keys(keys: Keys) -> dict[str, Any]:
    return {
        "oct": {"kty": "oct", "kid": "bad", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"},
        "oct_without_k": {"kty": "oct", "kid": "bad", "alg": "RS256"},
        "private_rsa": jwk(keys.rs2, "bad", private=True),
        "private_member_d_only": {**jwk(keys.rs2, "bad"), "d": "AQAB"},
        "rsa_1024": jwk(keys.rs_weak, "bad"),
        "use_enc": jwk(keys.rs2, "bad", use="enc"),
        "key_ops_encrypt": jwk(keys.rs2, "bad", key_ops=["encrypt"]),
        "key_ops_not_list": jwk(keys.rs2, "bad", key_ops="verify"),
        "alg_not_allowed": jwk(keys.rs2, "bad", alg="RS512"),
        "alg_hs256": jwk(keys.rs2, "bad", alg="HS256"),
        "ec_for_rsa_issuer": jwk(keys.p256, "bad"),
        "okp_for_rsa_issuer": jwk(keys.ed, "bad"),
        "unknown_kty": {"kty": "XYZ", "kid": "bad"},
        "missing_n": {"kty": "RSA", "kid": "bad", "e": "AQAB"},
        "garbage_n": {"kty": "RSA", "kid": "bad", "n": 12, "e": "AQAB"},
        "kid_not_string": {**jwk(keys.rs2, None), "kid": 7},
        "not_an_object": "rsa",
    }


@pytest.mark.parametrize(
    "case",
    ["oct", "oct_without_k", "private_rsa", "private_member_d_only", "rsa_1024", "use_enc", "key_ops_encrypt",
     "key_ops_not_list", "alg_not_allowed", "alg_hs256", "ec_for_rsa_issuer", "okp_for_rsa_issuer", "unknown_kty",
     "missing_n", "garbage_n", "kid_not_string", "not_an_object"],
)
async def test_unusable_jwk_is_skipped(make_source: SourceFactory, idp: JwksServer, keys: Keys, case: str) -> None:
    idp.keys = [jwk(keys.rs1, "rs-1"), _bad_keys(keys)[case]]
    source = make_source()
    assert same_key(await source.get_key("rs-1", "RS256"), keys.rs1.public_key())
    with pytest.raises(AuthenticationFailed) as exc:
        await source.get_key("bad", "RS256")
    assert unknown_kid(exc)
    # A kid-less token still finds exactly one usable key: the bad one never counts.
    assert same_key(await source.get_key(None, "RS256"), keys.rs1.public_key())
    refused = ("oct", "oct_without_k", "private_rsa", "private_member_d_only")
    assert source.refused_keys == (1 if case in refused else 0)


async def test_usable_key_markers_are_accepted(make_source: SourceFactory, idp: JwksServer, keys: Keys) -> None:
    idp.keys = [jwk(keys.rs1, "rs-1", use="sig", alg="RS256", key_ops=["verify"])]
    source = make_source()
    assert same_key(await source.get_key("rs-1", "RS256"), keys.rs1.public_key())


async def test_key_pinned_to_one_alg_serves_only_that_alg(make_source: SourceFactory, idp: JwksServer,
                                                          keys: Keys) -> None:
    idp.keys = [jwk(keys.rs1, "rs-1", alg="PS256")]
    source = make_source(algorithms=("RS256", "PS256"))
    assert await source.get_key("rs-1", "PS256") is not None
    with pytest.raises(AuthenticationFailed):
        await source.get_key("rs-1", "RS256")


@pytest.mark.parametrize(("alg", "attr"), [("ES256", "rs1"), ("ES256", "p384"), ("ES384", "p256"),
                                           ("EdDSA", "p256"), ("RS256", "ed")])
async def test_family_mismatch_is_not_usable(make_source: SourceFactory, idp: JwksServer, keys: Keys,
                                             alg: str, attr: str) -> None:
    idp.keys = [jwk(getattr(keys, attr), "k-1")]
    source = make_source(algorithms=(alg,))
    # The only key does not fit: the set is unusable, which is an outage, not a key.
    with pytest.raises(DependencyUnavailable):
        await source.get_key("k-1", alg)
    assert source.failures == 1


async def test_a_set_of_only_refused_keys_keeps_the_stale_set(make_source: SourceFactory, idp: JwksServer,
                                                              keys: Keys, clock: Clock) -> None:
    source = make_source()
    await source.get_key("rs-1", "RS256")
    idp.keys = [jwk(keys.rs1, "rs-1", private=True)]
    clock.advance(301)
    assert await source.get_key("rs-1", "RS256") is not None
    assert source.stale_served == 1
    assert source.refused_keys == 1


async def test_duplicate_kid_is_ambiguous(make_source: SourceFactory, idp: JwksServer, keys: Keys) -> None:
    idp.keys = [jwk(keys.rs1, "rs-1"), jwk(keys.rs2, "rs-1"), jwk(keys.rs1, "rs-ok")]
    source = make_source()
    with pytest.raises(AuthenticationFailed):
        await source.get_key("rs-1", "RS256")
    assert await source.get_key("rs-ok", "RS256") is not None


async def test_too_many_keys_is_a_failure(make_source: SourceFactory, idp: JwksServer, keys: Keys) -> None:
    idp.keys = [{"kty": "XYZ", "kid": f"k{i}"} for i in range(101)] + [jwk(keys.rs1, "rs-1")]
    source = make_source()
    with pytest.raises(DependencyUnavailable):
        await source.get_key("rs-1", "RS256")


# ----------------------------------------------------------------------------- discovery


async def test_discovery_with_matching_issuer(idp: JwksServer, keys: Keys, clock: Clock) -> None:
    async with await JwksKeySource.from_discovery(
        idp.url("/.well-known/openid-configuration"), issuer=ISSUER, algorithms=("RS256",), settings=LOOPBACK,
        clock=clock,
    ) as source:
        assert source.url == idp.url()
        assert (idp.discovery_hits, idp.hits) == (1, 1)  # warmed at construction
        assert same_key(await source.get_key("rs-1", "RS256"), keys.rs1.public_key())
        assert idp.hits == 1


@pytest.mark.parametrize("published", [ISSUER + "/", "https://idp.test/realms/pro", "https://evil.test/realms/prod",
                                       ""])
async def test_discovery_with_mismatched_issuer_fails(idp: JwksServer, published: str) -> None:
    idp.issuer = published
    with pytest.raises(JwksConfigError):
        await JwksKeySource.from_discovery(
            idp.url("/.well-known/openid-configuration"), issuer=ISSUER, algorithms=("RS256",), settings=LOOPBACK
        )
    assert idp.hits == 0  # the other issuer's jwks_uri is never fetched


async def test_discovery_without_jwks_uri_fails(idp: JwksServer) -> None:
    idp.discovery_mode = "no_jwks_uri"
    with pytest.raises(JwksConfigError):
        await JwksKeySource.from_discovery(
            idp.url("/.well-known/openid-configuration"), issuer=ISSUER, algorithms=("RS256",), settings=LOOPBACK
        )


@pytest.mark.parametrize("jwks_uri", ["/jwks.json", "ftp://127.0.0.1/jwks.json", "https://u:p@idp.test/jwks.json"])
async def test_discovery_with_unusable_jwks_uri_fails(idp: JwksServer, jwks_uri: str) -> None:
    # The document's jwks_uri is held to the same URL rules as a policy URL.
    idp.discovery_mode = "jwks_uri"
    idp.redirect_to = jwks_uri
    with pytest.raises(JwksConfigError):
        await JwksKeySource.from_discovery(
            idp.url("/.well-known/openid-configuration"), issuer=ISSUER, algorithms=("RS256",), settings=LOOPBACK
        )
    assert idp.hits == 0


async def test_discovery_outage_at_startup_heals(idp: JwksServer, clock: Clock) -> None:
    idp.discovery_mode = "status_500"
    source = await JwksKeySource.from_discovery(
        idp.url("/.well-known/openid-configuration"), issuer=ISSUER, algorithms=("RS256",), settings=LOOPBACK,
        clock=clock,
    )
    try:
        assert source.url is None
        with pytest.raises(DependencyUnavailable):
            await source.get_key("rs-1", "RS256")
        assert idp.discovery_hits == 1  # inside the backoff: no second attempt
        idp.discovery_mode = "ok"
        clock.advance(5)
        assert await source.get_key("rs-1", "RS256") is not None
        assert (idp.discovery_hits, idp.hits) == (2, 1)
    finally:
        await source.close()


# ----------------------------------------------------------------------------- configuration and lifecycle


@pytest.mark.parametrize(
    ("url", "kwargs"),
    [
        ("http://127.0.0.1:1/jwks.json", {}),  # http needs allow_http
        ("ftp://idp.test/jwks.json", {"allow_http": True}),
        ("/jwks.json", {}),
        ("https:///jwks.json", {}),
        ("https://user:pw@idp.test/jwks.json", {}),
        ("https://idp.test/jwks.json", {"algorithms": ("HS256",)}),
        ("https://idp.test/jwks.json", {"algorithms": ()}),
        ("https://idp.test/jwks.json", {"algorithms": ("ES512",)}),
        ("https://idp.test/jwks.json", {"fetch_timeout_s": 0}),
        ("https://idp.test/jwks.json", {"request_wait_s": 0}),
        ("https://idp.test/jwks.json", {"max_stale_s": -1}),
        ("https://idp.test/jwks.json", {"failure_backoff_s": float("inf")}),
        ("https://idp.test/jwks.json", {"min_ttl_s": 100, "max_ttl_s": 50}),
        ("https://idp.test/jwks.json", {"max_bytes": 0}),
        ("https://idp.test/jwks.json", {"refresh_cooldown_s": float("nan")}),
    ],
)
def test_bad_configuration_is_refused_at_construction(url: str, kwargs: dict[str, Any]) -> None:
    algorithms = kwargs.pop("algorithms", ("RS256",))
    with pytest.raises(JwksConfigError):
        JwksKeySource(url, algorithms=algorithms, settings=JwksSourceSettings(**kwargs))


def test_url_or_discovery_exactly_once() -> None:
    with pytest.raises(JwksConfigError):
        JwksKeySource(algorithms=("RS256",))
    with pytest.raises(JwksConfigError):
        JwksKeySource("https://idp.test/jwks.json", discovery_url="https://idp.test/.well-known/openid-configuration",
                      issuer=ISSUER, algorithms=("RS256",))
    with pytest.raises(JwksConfigError):
        JwksKeySource(discovery_url="https://idp.test/.well-known/openid-configuration", algorithms=("RS256",))


async def test_injected_session_is_used_and_not_closed(idp: JwksServer, clock: Clock) -> None:
    async with aiohttp.ClientSession() as session:
        source = JwksKeySource(idp.url(), algorithms=("RS256",), settings=LOOPBACK, clock=clock, session=session)
        assert await source.get_key("rs-1", "RS256") is not None
        await source.close()
        assert not session.closed


async def test_closed_source_fails_closed(make_source: SourceFactory, idp: JwksServer) -> None:
    source = make_source()
    await source.start()
    await source.close()
    with pytest.raises(DependencyUnavailable):
        await source.get_key("rs-1", "RS256")
    assert idp.hits == 0


async def test_from_discovery_and_constructor_share_one_settings_object(idp: JwksServer, clock: Clock) -> None:
    settings = JwksSourceSettings(allow_http=True, max_stale_s=7, fetch_timeout_s=1.5)
    async with await JwksKeySource.from_discovery(
        idp.url("/.well-known/openid-configuration"), issuer=ISSUER, algorithms=("RS256",), settings=settings,
        clock=clock,
    ) as source:
        assert source.settings is settings
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.max_stale_s = 10  # type: ignore[misc]
