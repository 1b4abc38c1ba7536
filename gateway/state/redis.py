"""Shared state in Redis: a single server, Sentinel, or Cluster, chosen by URL.

URLs (the password may be in the userinfo, percent-encoded; it never appears in logs,
errors or ``repr``)::

    redis://[user:pass@]host:port[/db]            one server
    rediss://...                                  the same over TLS (certificate verified)
    unix:///path/redis.sock[?db=0]                one server on a Unix socket
    redis+sentinel://[user:pass@]h1:p1,h2:p2/SERVICE[/db]   master of SERVICE via Sentinel
    redis+cluster://[user:pass@]h1:p1,h2:p2       Redis Cluster from these seed nodes
    rediss+sentinel://..., rediss+cluster://...   over TLS

TLS query parameters: ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``.
Sentinel query parameters: ``sentinel_password`` (sentinels' own AUTH).

Every operation is one Lua script (one round trip) whose keys share a hash tag, so it
runs on one Cluster slot; scripts are loaded once and called with ``EVALSHA``, falling
back to ``EVAL`` on ``NOSCRIPT`` (a restarted server or a promoted replica has an empty
script cache). Time inside a script is the server's ``TIME``: replicas with skewed clocks
still agree on one timeline per key.

Faults: each call is bounded by ``op_timeout_s`` (100 ms) of ``asyncio.timeout`` around the
whole call, so a half-open server (TCP accepted, no answer) and a SIGSTOPped one both
surface as :class:`StateUnavailable` on time. That deadline measures Redis, not the event
loop: when it fires while the loop has been lagging (the gateway saturated, a reply that
Redis sent in 1 ms still unread in the socket), the call waits on until Redis has had
``op_timeout_s`` of the time the loop was free (lag from
:mod:`gateway.resilience.loop_lag`), never past the hard cap ``lag_cap_s`` (10 x
op_timeout_s); a cap reached because of lag alone is not counted by the breaker. So the
gateway's own load does not look like a Redis outage, and fail closed still holds: an idle
loop detects a dead Redis at ``op_timeout_s`` as before, a busy one within the cap
(``# SECURITY:`` in :meth:`RedisState._outwait_loop_lag`; extensions are counted by the
observer's ``state_deadline_extension``). The socket connect/read timeouts are the
backstop at the cap (at ``op_timeout_s`` on a cluster, whose client relies on them to
notice a stopped master). The call runs in its own task and the caller waits on a
shield, so the deadline holds even where redis-py is slow to honour a cancellation; the
abandoned task is cancelled, which makes redis-py drop the connection it was using, so no
late reply is ever read as the answer to a later command and nothing stays stuck once Redis
is back. A connection error is retried once at once (a pooled connection may be stale after
a restart or failover), never a timeout. After ``breaker_threshold`` consecutive failures
calls fail fast for ``breaker_cooldown_s``, then one probe at a time is let through (not on
a cluster, where one failing master must not fail every slot). Every exception of the
client is converted in :meth:`RedisState._call` and only there.

Cost: connections speak RESP2 without ``CLIENT SETINFO`` (no extra round trips when a burst
opens connections inside the 100 ms budget), and the cluster client reads the ``COMMAND``
table once instead of on every topology refresh (see :class:`_CachedCommandsParser`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
import structlog
from redis._parsers import AsyncCommandsParser
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ClusterError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.resilience import loop_lag
from gateway.resilience.loop_lag import LoopLagMonitor
from gateway.state.base import (
    BUDGET_EPSILON,
    BudgetDecision,
    ConcurrencyCheck,
    Document,
    DocumentConflict,
    Lease,
    LimitCheck,
    LimitDecision,
    QuotaCheck,
    RateCheck,
    Reservation,
    StateKey,
    StateObserver,
    StateUnavailable,
    check_unique,
    clock_us,
    kind_of,
    rate_params,
    seconds,
)

log = structlog.get_logger("gateway.state.redis")

DEFAULT_OP_TIMEOUT_S: Final = 0.1
#: A timed-out call waits on (up to ``lag_cap_s``) only if the event loop lagged for at least
#: this fraction of ``op_timeout_s`` during it; below that the timeout is Redis's.
LAG_FRACTION: Final = 0.1
#: ``lag_cap_s`` when not given: this many times ``op_timeout_s``.
LAG_CAP_FACTOR: Final = 10
PERIOD_GRACE_US: Final = 60_000_000
_PREFIX_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")

# Shared preamble: the time every script computes in (µs), from the server unless a test
# injected a clock (ARGV[1] non-empty).
_NOW = """
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end
local function fmt(x) return string.format('%.0f', x) end
local function fmt17(x) return string.format('%.17g', x) end
local function ms(us) return math.max(1, math.ceil(us / 1000)) end
local function period_of(us)
  local p = math.floor(now / us)
  if p * us > now then p = p - 1 end
  return p
end
-- A budget account's standing in the current period of length period_us: 'same' (the
-- account is of this period), 'carry' (written under another period length, i.e. before a
-- policy edit changed period_s, by a period that overlaps this one: its spend counts here)
-- or 'fresh' (no account, or one of an earlier period).
local function account_standing(p, l, period, period_us)
  if not p then return 'fresh' end
  local old_p, old_l = tonumber(p), tonumber(l) or period_us
  if old_l == period_us then
    if old_p == period then return 'same' end
    return 'fresh'
  end
  if (old_p + 1) * old_l > period * period_us then return 'carry' end
  return 'fresh'
end
"""

# Limits: decide every check, then charge all or none. KEYS[i] belongs to check i.
# ARGV[2] = 'a' (apply) or 'u' (undo a previous apply); then 5 ARGV per check:
#   r (GCRA)        interval_us tolerance_us cost burst
#   q (quota)       limit period_us cost grace_us
#   c (concurrency) limit ttl_us lease_id -
# Returns 5 integers per check: allowed limit remaining reset_us retry_us (-1: never), as
# one comma-separated string: the client parses one reply line instead of 5 per check.
LIMITS_LUA: Final = _NOW + """
local n = #KEYS
if ARGV[2] == 'u' then
  for i = 1, n do
    local b = 2 + (i - 1) * 5
    local kind, key = ARGV[b + 1], KEYS[i]
    if kind == 'r' then
      local tat = tonumber(redis.call('GET', key))
      if tat then
        local v = math.ceil(tat - tonumber(ARGV[b + 4]) * tonumber(ARGV[b + 2]))
        if v <= now then redis.call('DEL', key) else redis.call('SET', key, fmt(v), 'PX', ms(v - now)) end
      end
    elseif kind == 'q' then
      local h = redis.call('HMGET', key, 'p', 'n')
      if h[1] and tonumber(h[1]) == period_of(tonumber(ARGV[b + 3])) then
        redis.call('HSET', key, 'n', fmt(math.max(0, tonumber(h[2]) - tonumber(ARGV[b + 4]))))
      end
    else
      redis.call('ZREM', key, ARGV[b + 4])
    end
  end
  return {}
end
local out, plan, ok = {}, {}, true
local function clamp(v, hi) if v < 0 then return 0 elseif v > hi then return hi end return v end
for i = 1, n do
  local b = 2 + (i - 1) * 5
  local kind, key = ARGV[b + 1], KEYS[i]
  local o = (i - 1) * 5
  if kind == 'r' then
    local interval, tolerance = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
    local cost, burst = tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
    local tat = tonumber(redis.call('GET', key)) or now
    if tat < now then tat = now end
    -- a TAT beyond an empty bucket was written before the clock stepped back: lower it
    -- to an empty bucket and keep that even if this call is refused (never a longer lockout)
    if tat > now + tolerance then
      tat = math.floor(now + tolerance)
      redis.call('SET', key, fmt(tat), 'PX', ms(tat - now))
    end
    local new_tat = tat + cost * interval
    if new_tat - tolerance <= now then
      local keep = math.ceil(new_tat)
      out[o+1], out[o+2] = 1, burst
      out[o+3] = clamp(math.floor((tolerance - (new_tat - now)) / interval + 1e-6), burst)
      out[o+4], out[o+5] = keep - now, 0
      if keep > now then plan[i] = keep end
    else
      ok = false
      out[o+1], out[o+2] = 0, burst
      out[o+3] = clamp(math.floor((tolerance - (tat - now)) / interval + 1e-6), burst)
      out[o+4] = math.ceil(tat - now)
      if cost * interval > tolerance then out[o+5] = -1 else out[o+5] = math.ceil(new_tat - tolerance - now) end
    end
  elseif kind == 'q' then
    local limit, period_us = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
    local cost, grace = tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
    local period = period_of(period_us)
    local h = redis.call('HMGET', key, 'p', 'n')
    -- the clock stepped back over a boundary: keep counting in the later period
    if h[1] and tonumber(h[1]) > period then period = tonumber(h[1]) end
    local stop = (period + 1) * period_us
    local count = 0
    if h[1] and tonumber(h[1]) == period then count = tonumber(h[2]) end
    out[o+2], out[o+4] = limit, stop - now
    if count + cost <= limit then
      count = count + cost
      out[o+1], out[o+3], out[o+5] = 1, limit - count, 0
      plan[i] = {period, count, stop + grace}
    else
      ok = false
      out[o+1], out[o+3] = 0, math.max(0, limit - count)
      if cost > limit then out[o+5] = -1 else out[o+5] = stop - now end
    end
  else
    local limit, ttl, lease = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), ARGV[b + 4]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now))
    local count = redis.call('ZCARD', key)
    local mine = redis.call('ZSCORE', key, lease)
    out[o+2] = limit
    if mine or count < limit then
      if mine then count = count - 1 end
      local oldest = now + ttl
      if count > 0 then
        local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
        oldest = math.min(tonumber(first[2]), oldest)
      end
      out[o+1], out[o+3], out[o+4], out[o+5] = 1, limit - count - 1, oldest - now, 0
      plan[i] = now + ttl
    else
      ok = false
      local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      local reset = tonumber(first[2]) - now
      out[o+1], out[o+3], out[o+4], out[o+5] = 0, 0, reset, math.min(reset, 1000000)
    end
  end
end
if ok then
  for i = 1, n do
    local p = plan[i]
    if p then
      local b = 2 + (i - 1) * 5
      local kind, key = ARGV[b + 1], KEYS[i]
      if kind == 'r' then
        redis.call('SET', key, fmt(p), 'PX', ms(p - now))
      elseif kind == 'q' then
        redis.call('HSET', key, 'p', fmt(p[1]), 'n', fmt(p[2]))
        redis.call('PEXPIRE', key, ms(p[3] - now))
      else
        redis.call('ZADD', key, fmt(p), ARGV[b + 4])
        local want = ms(tonumber(ARGV[b + 3]))
        if redis.call('PTTL', key) < want then redis.call('PEXPIRE', key, want) end
      end
    end
  end
end
for i = 1, #out do out[i] = fmt(out[i]) end
return table.concat(out, ',')
"""

# Budget reserve. ARGV: now capacity period_us amount reservation_id grace_us epsilon.
# Returns {granted, spent, period, reset_us, amount held ('' when refused), seq}. ``q`` (seq)
# counts the account's reservations this period and never goes down (refunds lower ``s``,
# not ``q``): a caller that saw a higher seq for this period knows the account was lost or
# rolled back (DEL, eviction, expiry, an older snapshot; see gateway/state/dp_ledger.py).
RESERVE_LUA: Final = _NOW + """
local key = KEYS[1]
local capacity, period_us, amount = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local rid, grace, eps = 'r:' .. ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local period = period_of(period_us)
local stop = (period + 1) * period_us
local h = redis.call('HMGET', key, 'p', 's', 'q', 'l')
local spent, seq = 0, 0
local standing = account_standing(h[1], h[4], period, period_us)
if standing == 'same' then
  spent, seq = tonumber(h[2]), tonumber(h[3]) or 0
  local held = redis.call('HGET', key, rid)
  if held then return {1, fmt17(spent), fmt(period), stop - now, held, fmt(seq)} end
elseif standing == 'carry' then
  -- the period length changed mid-period (a policy edit): what was spent stays spent
  spent, seq = tonumber(h[2]) or 0, tonumber(h[3]) or 0
  redis.call('HSET', key, 'p', fmt(period), 'l', fmt(period_us))
  redis.call('PEXPIRE', key, ms(stop + grace - now))
elseif h[1] then
  redis.call('DEL', key)
end
if spent + amount > capacity * (1 + eps) then return {0, fmt17(spent), fmt(period), stop - now, '', fmt(seq)} end
spent, seq = spent + amount, seq + 1
redis.call('HSET', key, 'p', fmt(period), 'l', fmt(period_us), 's', fmt17(spent), 'q', fmt(seq), rid, fmt17(amount))
redis.call('PEXPIRE', key, ms(stop + grace - now))
return {1, fmt17(spent), fmt(period), stop - now, fmt17(amount), fmt(seq)}
"""

# Settle (commit or refund) a reservation of the current period.
# ARGV: now reservation_id period refund ('' = none) period_us.
SETTLE_LUA: Final = _NOW + """
local key = KEYS[1]
local h = redis.call('HMGET', key, 'p', 's')
local period = tonumber(ARGV[3])
if not h[1] or tonumber(h[1]) ~= period or period_of(tonumber(ARGV[5])) ~= period then return 0 end
local rid = 'r:' .. ARGV[2]
local held = tonumber(redis.call('HGET', key, rid))
if not held then return 0 end
redis.call('HDEL', key, rid)
if ARGV[4] ~= '' then
  redis.call('HSET', key, 's', fmt17(math.max(0, tonumber(h[2]) - math.min(tonumber(ARGV[4]), held))))
end
return 1
"""

# Give back several concurrency slots in one round trip. KEYS[i] holds lease ARGV[i + 1]
# (ARGV[1] is the clock every script is called with; unused here).
RELEASE_LUA: Final = """
for i = 1, #KEYS do redis.call('ZREM', KEYS[i], ARGV[i + 1]) end
return 0
"""

# Compare-and-set of a versioned document. ARGV: now expected ('' = absent) value.
PUT_DOC_LUA: Final = _NOW + """
local cur = redis.call('HGET', KEYS[1], 'v')
if (ARGV[2] == '' and cur) or (ARGV[2] ~= '' and tostring(cur) ~= ARGV[2]) then
  return {0, tonumber(cur) or 0}
end
local v = (tonumber(cur) or 0) + 1
redis.call('HSET', KEYS[1], 'v', v, 'd', ARGV[3])
return {1, v}
"""


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest())


SCRIPTS: Final = (
    Script("limits", LIMITS_LUA),
    Script("reserve", RESERVE_LUA),
    Script("settle", SETTLE_LUA),
    Script("put_document", PUT_DOC_LUA),
    Script("release", RELEASE_LUA),
)
_LIMITS, _RESERVE, _SETTLE, _PUT_DOC, _RELEASE = SCRIPTS
#: The preamble every script starts with (``now``, ``fmt17``, ``period_of``...), for scripts
#: other modules run through :meth:`RedisState.run_script` (one clock, one period rule).
SCRIPT_PREAMBLE: Final = _NOW


@lru_cache(maxsize=16384)
def encode_key(prefix: str, key: StateKey) -> str:
    """``prefix:{tag}:kind:digest``. The tag is a hash of the group, so every key of a group
    lands in one Cluster slot whatever characters the group holds.

    # SECURITY: parts are untrusted (token claims, addresses); they are hashed with their
    # lengths, never spliced in, so no two principals share a key (RL-09), no ``{`` in a
    # subject can move the hash tag, and no user id is readable in Redis.
    """
    tag = hashlib.blake2b(key.group.encode("utf-8", "surrogatepass"), digest_size=8, person=b"ig-slot").hexdigest()
    digest = hashlib.blake2b(digest_size=16, person=b"ig-key")
    for part in (key.group, *key.parts):
        raw = part.encode("utf-8", "surrogatepass")
        digest.update(len(raw).to_bytes(4, "big"))
        digest.update(raw)
    return f"{prefix}:{{{tag}}}:{key.kind}:{digest.hexdigest()}"


def classify(exc: BaseException) -> str:
    """A bounded error code for metrics; the order matters (subclasses first)."""
    if isinstance(exc, TimeoutError | RedisTimeoutError):
        return "timeout"
    if isinstance(exc, AuthenticationError):
        return "auth"
    if isinstance(exc, BusyLoadingError):
        return "loading"
    if isinstance(exc, RedisConnectionError | OSError):
        return "connection"
    if isinstance(exc, ReadOnlyError):
        return "readonly"
    if isinstance(exc, OutOfMemoryError):
        return "oom"
    if isinstance(exc, ClusterError | RedisClusterException):
        return "cluster"
    if isinstance(exc, ResponseError) and str(exc).startswith("BUSY"):
        return "busy"
    if isinstance(exc, ResponseError) and "WRONGTYPE" in str(exc):
        return "wrongtype"  # inside a script the reply reads "ERR ... WRONGTYPE ...", so not startswith
    if isinstance(exc, RedisError):
        return "error"
    return "client_error"


class _CachedCommandsParser(AsyncCommandsParser):
    """redis-py's cluster client re-reads ``COMMAND`` (~200 KB) on every topology refresh.

    Parsing it takes ~15 ms of pure-Python CPU, and a failover triggers a refresh after
    every connection error: measured, the event loop was blocked half the time for the
    whole failover. The command table does not change when a replica is promoted, so it is
    read once and reused; only the node it is read from is updated.
    """

    __slots__ = ()

    async def initialize(self, node: Any = None) -> None:
        if node is not None:
            self.node = node
        if not self.commands:
            await super().initialize(node)


class _LoopLagTimeout(TimeoutError):
    """The hard cap ran out while the event loop, not Redis, had used the time (see ``_outwait_loop_lag``)."""


class _Breaker:
    """Fail fast after repeated failures; let one probe through per cooldown."""

    def __init__(self, threshold: int, cooldown_s: float) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.failures = 0
        self.open_until = 0.0
        self.probing = False

    def allow(self) -> bool:
        if self.threshold <= 0 or self.failures < self.threshold:
            return True
        if time.monotonic() < self.open_until or self.probing:
            return False
        self.probing = True
        return True

    def record_neutral(self) -> None:
        """An outcome that says nothing about Redis: no failure counted, a probe slot freed."""
        self.probing = False

    def record(self, ok: bool) -> None:
        self.probing = False
        if ok:
            self.failures = 0
            return
        self.failures += 1
        if self.threshold > 0 and self.failures >= self.threshold:
            self.open_until = time.monotonic() + self.cooldown_s


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed state URL, without the secret in ``repr``."""

    mode: str  # redis | sentinel | cluster
    nodes: tuple[tuple[str, int], ...]
    tls: bool
    username: str | None
    password: str | None
    db: int
    service: str | None
    unix_path: str | None
    query: tuple[tuple[str, str], ...]

    def __repr__(self) -> str:
        return f"RedisTarget({self.redacted()})"

    def redacted(self) -> str:
        """The URL as logs may show it: no password."""
        scheme = {"redis": "redis", "sentinel": "redis+sentinel", "cluster": "redis+cluster"}[self.mode]
        if self.tls:
            scheme = "rediss" + scheme[5:]
        if self.unix_path:
            return f"unix://{self.unix_path}"
        auth = "***@" if self.password else ""
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.nodes)
        path = f"/{self.service}" if self.service else ""
        return f"{scheme}://{auth}{hosts}{path}"


def parse_url(url: str) -> RedisTarget:
    """Parse a state URL (module docstring). Raises ``ValueError`` naming the problem, never the password."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    modes = {"redis": ("redis", False), "rediss": ("redis", True), "unix": ("redis", False),
             "redis+sentinel": ("sentinel", False), "rediss+sentinel": ("sentinel", True),
             "redis+cluster": ("cluster", False), "rediss+cluster": ("cluster", True)}
    if scheme not in modes:
        raise ValueError(f"unsupported state URL scheme {scheme!r}; use one of {sorted(modes)}")
    mode, tls = modes[scheme]
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if userinfo:
        user, sep, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if sep else None
    query = _query(parts.query, mode=mode, tls=tls)
    if scheme == "unix":
        if not parts.path:
            raise ValueError("unix:// state URL needs a socket path")
        return RedisTarget("redis", (), False, username, password, _db(query.pop("db", "0")), None, parts.path,
                           tuple(sorted(query.items())))
    nodes = tuple(_host_port(item) for item in hostlist.split(",") if item)
    if not nodes:
        raise ValueError("state URL names no host")
    segments = [unquote(s) for s in parts.path.split("/") if s]
    service: str | None = None
    db = 0
    if mode == "sentinel":
        if not segments:
            raise ValueError("redis+sentinel:// URL needs the service name as its path: /SERVICE[/db]")
        service = segments.pop(0)
    if segments:
        if mode == "cluster" or len(segments) > 1 or not segments[0].isdigit():
            raise ValueError("state URL path must be a database number (none for a cluster)")
        db = int(segments[0])
    if mode == "redis" and len(nodes) != 1:
        raise ValueError("redis:// names one server; use redis+sentinel:// or redis+cluster:// for several")
    if "db" in query:
        db = _db(query.pop("db"))
    return RedisTarget(mode, nodes, tls, username, password, db, service, None, tuple(sorted(query.items())))


_TLS_PARAMS: Final = frozenset({"ssl_ca_certs", "ssl_certfile", "ssl_keyfile"})


def _query(raw: str, *, mode: str, tls: bool) -> dict[str, str]:
    """The query parameters this gateway reads; any other one refuses the URL.

    # SECURITY: an ignored parameter is a setting the operator believes in and the gateway
    # does not apply: ``?password=...`` (redis-py's own spelling) would connect without
    # AUTH, ``?ssl_ca_certs=`` on a ``redis://`` URL would leave the channel in the clear.
    # The refusal names the parameter, never its value (a password, for ``?password=``).
    """
    allowed = {"db"} | (_TLS_PARAMS if tls else set()) | ({"sentinel_password"} if mode == "sentinel" else set())
    query: dict[str, str] = {}
    for name, value in parse_qsl(raw, keep_blank_values=True):
        if name not in allowed:
            shown = repr(name) if name.isidentifier() and len(name) <= 32 else "(unprintable)"
            hint = (" (the password goes in the userinfo: redis://[user]:PASSWORD@host)" if name == "password"
                    else " (needs rediss://)" if name in _TLS_PARAMS else "")
            raise ValueError(f"unsupported state URL parameter {shown}{hint}; allowed here: {sorted(allowed)}")
        if name in query:
            raise ValueError(f"state URL parameter {name!r} given twice")
        query[name] = value
    return query


def _db(value: str) -> int:
    if not value.isdigit() or len(value) > 5:
        raise ValueError("state URL database number must be a small non-negative integer")
    return int(value)


def _host_port(item: str) -> tuple[str, int]:
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError("state URL has an empty host")
    if not port:
        return host, 6379
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("state URL has an invalid port")
    return host, int(port)


class RedisState:
    """:class:`~gateway.state.base.SharedState` on Redis. Build with :meth:`from_url`."""

    def __init__(self, client: Any, *, mode: str, target: str, op_timeout_s: float = DEFAULT_OP_TIMEOUT_S,
                 key_prefix: str = "ig", clock: Callable[[], float] | None = None,
                 observer: StateObserver | None = None, breaker_threshold: int = 5,
                 breaker_cooldown_s: float = 0.5, on_close: Callable[[], Awaitable[None]] | None = None,
                 lag_cap_s: float | None = None) -> None:
        if not key_prefix or len(key_prefix) > 32 or not set(key_prefix) <= _PREFIX_CHARS:
            raise ValueError("key_prefix must be 1-32 characters of [A-Za-z0-9_.-]")
        self._client = client
        self._mode = mode
        self._target = target
        self.op_timeout_s = op_timeout_s
        # The longest a call may wait when the event loop's lag, not Redis, used its budget.
        self.lag_cap_s = max(op_timeout_s, LAG_CAP_FACTOR * op_timeout_s if lag_cap_s is None else lag_cap_s)
        self._lag: LoopLagMonitor | None = None
        self._prefix = key_prefix
        # For tests only: production reads the time from the Redis server (TIME).
        self._clock = clock
        self._observer = observer
        self._breaker = _Breaker(breaker_threshold, breaker_cooldown_s)
        self._on_close = on_close
        self._background: set[asyncio.Future[Any]] = set()
        # Lease ids must be unique among every replica's leases in one sorted set: a random
        # 64-bit prefix per process and a counter, instead of a urandom call per lease.
        self._lease_prefix = secrets.token_hex(8)
        self._lease_ids = itertools.count()

    @classmethod
    def from_url(cls, url: str, *, op_timeout_s: float = DEFAULT_OP_TIMEOUT_S, key_prefix: str = "ig",
                 max_connections: int = 256, clock: Callable[[], float] | None = None,
                 observer: StateObserver | None = None, breaker_threshold: int | None = None,
                 breaker_cooldown_s: float = 0.5, lag_cap_s: float | None = None) -> RedisState:
        """Connect lazily (no I/O here): the gateway starts even while Redis is down."""
        target = parse_url(url)
        query = dict(target.query)
        cap_s = max(op_timeout_s, LAG_CAP_FACTOR * op_timeout_s if lag_cap_s is None else lag_cap_s)
        # redis-py's own socket timeouts run on the same lagging loop: at op_timeout_s they
        # would throw away a reply that is already in the socket (and drop the connection)
        # whenever the loop is busy. :meth:`_call` enforces op_timeout_s (net of the loop's
        # lag); the socket timeouts are only the backstop at the hard cap. Not for a cluster,
        # whose client needs its own timeouts to notice a stopped master and refresh slots.
        socket_timeout_s = op_timeout_s if target.mode == "cluster" else cap_s
        common: dict[str, Any] = {
            "username": target.username,
            "password": target.password,
            "socket_timeout": socket_timeout_s,
            "socket_connect_timeout": socket_timeout_s,
            # One immediate retry on a connection error (a stale pooled connection); never
            # on a timeout, which already used the whole budget.
            "retry": Retry(NoBackoff(), 1, (RedisConnectionError,)),
            "decode_responses": False,
            "health_check_interval": 0,
            # No CLIENT SETINFO on connect: one round trip less inside the op timeout when a
            # burst has to open new connections.
            "driver_info": None,
            # RESP2: no HELLO round trip on connect, and a cheaper reply parser; every reply
            # here is an integer, a bulk string or an array of them.
            "protocol": 2,
        }
        if target.tls:
            common["ssl"] = True
            for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
                if name in query:
                    common[name] = query[name]
        on_close: Callable[[], Awaitable[None]] | None = None
        client: Any
        if target.mode == "cluster":
            common.pop("health_check_interval")
            client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.nodes],
                                  max_connections=max_connections, require_full_coverage=True, **common)
            client.commands_parser = _CachedCommandsParser()
            # A global breaker would fail every slot when one master fails over: off for clusters.
            threshold = 0 if breaker_threshold is None else breaker_threshold
        elif target.mode == "sentinel":
            sentinel_kwargs: dict[str, Any] = {"socket_timeout": op_timeout_s,
                                               "socket_connect_timeout": op_timeout_s}
            if "sentinel_password" in query:
                sentinel_kwargs["password"] = query["sentinel_password"]
            if target.tls:
                sentinel_kwargs["ssl"] = True
            sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs, **common)  # type: ignore[no-untyped-call]
            assert target.service is not None  # noqa: S101 - parse_url guarantees it
            client = sentinel.master_for(target.service, db=target.db, max_connections=max_connections)
            threshold = 5 if breaker_threshold is None else breaker_threshold

            async def close_sentinels() -> None:
                for s in sentinel.sentinels:
                    await s.aclose()

            on_close = close_sentinels
        else:
            pool_kwargs = dict(common, db=target.db)
            if target.unix_path:
                pool_kwargs["path"] = target.unix_path
                connection_class: Any = aioredis.UnixDomainSocketConnection
            else:
                pool_kwargs["host"], pool_kwargs["port"] = target.nodes[0]
                connection_class = aioredis.SSLConnection if target.tls else aioredis.Connection
                if target.tls:
                    pool_kwargs.pop("ssl")
            # The plain pool: measured ~15% less client CPU per call than the blocking pool's
            # condition variable. A burst beyond max_connections fails (its limit's fail mode
            # applies) instead of queueing.
            pool = aioredis.ConnectionPool(connection_class=connection_class, max_connections=max_connections,
                                           **pool_kwargs)
            client = aioredis.Redis.from_pool(pool)
            threshold = 5 if breaker_threshold is None else breaker_threshold
        return cls(client, mode=target.mode, target=target.redacted(), op_timeout_s=op_timeout_s,
                   key_prefix=key_prefix, clock=clock, observer=observer, breaker_threshold=threshold,
                   breaker_cooldown_s=breaker_cooldown_s, on_close=on_close, lag_cap_s=cap_s)

    def __repr__(self) -> str:
        return f"RedisState({self._target})"

    @property
    def backend(self) -> str:
        return self._mode

    def key(self, key: StateKey) -> str:
        """The Redis key name of ``key`` (for tests and operators)."""
        return encode_key(self._prefix, key)

    # -- the one boundary where redis-py meets the gateway ----------------------------

    async def _call(self, op: str, command: Callable[[], Awaitable[Any]]) -> Any:
        if not self._breaker.allow():
            self._observe(op, 0.0, "circuit_open")
            raise StateUnavailable(op, "circuit_open")
        start = time.perf_counter()
        lag = self._lag_monitor()
        lag_mark = lag.lag_total()
        task = asyncio.ensure_future(command())
        try:
            try:
                # The caller waits on a shield, so the deadline holds even when the client
                # library is slow to honour the cancellation (measured: redis-py's cluster
                # client sleeping 250 ms on CLUSTERDOWN, Python 3.11's wait_for losing a cancel).
                async with asyncio.timeout(self.op_timeout_s):
                    result = await asyncio.shield(task)
            except TimeoutError:
                if not task.done():  # a reply that is already in is used, never thrown away
                    await self._outwait_loop_lag(op, task, start, lag, lag_mark)
                result = task.result()  # the call's own outcome (its exception, if it failed)
        except BaseException as exc:
            if not task.done():
                task.cancel()  # redis-py drops the connection it was using
                self._background.add(task)
                task.add_done_callback(_reap(self._background))
            if not isinstance(exc, Exception):
                raise  # our own caller was cancelled (asyncio.timeout turns its own cancel into TimeoutError)
            # RedisError and OSError (which covers asyncio's TimeoutError) are the expected
            # ones; anything else is a redis-py fault under failover (seen: a connection torn
            # down by a concurrent reset while another command was sending on it), and the
            # caller's fail mode must apply to it too.
            kind = classify(exc)
            if isinstance(exc, _LoopLagTimeout) or kind == "wrongtype":
                # The loop's overload, or one key holding another structure: not a Redis
                # failure. SECURITY: counting a per-key error would let the callers of one
                # bad key open the breaker and fail every tenant's calls for the cooldown.
                self._breaker.record_neutral()
            else:
                self._breaker.record(False)
            self._observe(op, time.perf_counter() - start, kind)
            if kind in {"error", "client_error", "wrongtype"}:
                log.warning("state_backend_error", op=op, kind=kind, error=type(exc).__name__)
            raise StateUnavailable(op, kind) from exc
        self._breaker.record(True)
        self._observe(op, time.perf_counter() - start, None)
        return result

    async def _outwait_loop_lag(self, op: str, task: asyncio.Future[Any], start: float,
                                lag: LoopLagMonitor, lag_mark: float) -> None:
        """The op timeout fired with no reply: wait on while the event loop, not Redis, used the budget.

        Returns once ``task`` is done; raises ``TimeoutError`` when Redis has had its full
        ``op_timeout_s`` of loop-available time (a real outage: counted by the breaker), or
        :class:`_LoopLagTimeout` at ``lag_cap_s`` when the loop lagged through nearly all of
        it (not counted: the process is overloaded, Redis is not known to be down).

        # SECURITY: fail closed is kept; only *when* it happens moves. On an idle loop the
        # lag is ~0 and a dead, stopped or half-open Redis fails at ``op_timeout_s`` exactly
        # as before. Under load it fails once Redis has had ``op_timeout_s`` of the time the
        # loop was free, and in every case by ``lag_cap_s`` (default 10 x op_timeout_s), so
        # no request is held longer than that and the caller's fail mode (503) still
        # applies. The trade-off: while the process is overloaded, a dead Redis costs each
        # request up to the cap instead of op_timeout_s, and the breaker opens later; in
        # exchange healthy traffic is not refused because the gateway itself is busy.
        """
        budget = self.op_timeout_s
        extended = False
        while True:
            elapsed = time.perf_counter() - start
            lagged = lag.lag_total() - lag_mark
            dependency_s = elapsed - lagged  # the time the loop was free to read a reply
            if elapsed >= self.lag_cap_s:
                self._extension(op, extended, "failed")
                if dependency_s >= budget:
                    raise TimeoutError
                raise _LoopLagTimeout
            if dependency_s >= budget or lagged < budget * LAG_FRACTION:
                self._extension(op, extended, "failed")
                raise TimeoutError
            if not extended:
                extended = True
                self._extension(op, False, "extended")
            wait_s = min(max(budget - dependency_s, budget * LAG_FRACTION), self.lag_cap_s - elapsed)
            _ = await asyncio.wait((task,), timeout=wait_s)
            if task.done():
                self._extension(op, True, "answered")
                return

    def _extension(self, op: str, extended: bool, outcome: str) -> None:
        """Count deadline extensions: ``extended`` when one starts, then ``answered`` or ``failed``."""
        if outcome != "extended" and not extended:
            return
        hook = getattr(self._observer, "state_deadline_extension", None)
        if hook is not None:
            hook(self._mode, op, outcome)

    def _lag_monitor(self) -> LoopLagMonitor:
        """The running loop's lag monitor (one lookup per loop, not per call)."""
        found = self._lag
        if found is None or not found.running or found.loop is not asyncio.get_running_loop():
            found = self._lag = loop_lag.monitor()
        return found

    async def _script(self, op: str, script: Script, keys: Sequence[str],
                      args: Sequence[str | int | bytes]) -> Any:
        now = "" if self._clock is None else str(clock_us(self._clock))

        async def run() -> Any:
            try:
                return await self._client.evalsha(script.sha, len(keys), *keys, now, *args)
            except NoScriptError:
                # An empty script cache (restart, promoted replica): EVAL runs and caches it.
                return await self._client.eval(script.source, len(keys), *keys, now, *args)

        return await self._call(op, run)

    async def run_script(self, op: str, script: Script, keys: Sequence[StateKey],
                         args: Sequence[str | int | bytes]) -> Any:
        """A script of another module (it starts with :data:`SCRIPT_PREAMBLE`) through this
        boundary: same key encoding, server time, deadline, breaker and error conversion."""
        return await self._script(op, script, [self.key(k) for k in keys], args)

    def _observe(self, op: str, elapsed: float, error: str | None) -> None:
        if self._observer is not None:
            self._observer.state_op(self._mode, op, elapsed, error)

    async def start(self, timeout_s: float = 5.0) -> None:
        """Warm up before the first request: discover the cluster, open a connection, load scripts.

        A cold cluster client spends tens of milliseconds on topology discovery, which would
        otherwise eat the first requests' 100 ms budgets. Best effort and bounded by
        ``timeout_s``: Redis may be down at start-up, and the gateway starts anyway.
        """

        async def warm_up() -> None:
            if isinstance(self._client, RedisCluster):
                _ = await self._client.initialize()
            for script in SCRIPTS:
                await self._client.script_load(script.source)

        try:
            async with asyncio.timeout(timeout_s):
                await warm_up()
        except Exception as exc:  # noqa: BLE001 - start-up must not fail because Redis does
            log.warning("state_warm_up_failed", backend=self._mode, kind=classify(exc))

    # -- limits -------------------------------------------------------------------------

    async def run_limits(self, checks: Sequence[LimitCheck]) -> list[LimitDecision]:
        if not checks:
            return []
        if len(checks) > 1:
            check_unique(checks)
        leases = [Lease(c.key, f"{self._lease_prefix}{next(self._lease_ids):x}")
                  if isinstance(c, ConcurrencyCheck) else None for c in checks]
        groups: dict[str, list[int]] = {}
        for index, check in enumerate(checks):
            groups.setdefault(check.key.group, []).append(index)
        # Groups exist for Cluster slots. One server (or Sentinel's master) runs one script
        # over keys of any group: one round trip, all-or-nothing without an undo.
        if len(groups) == 1 or self._mode != "cluster":
            try:
                return _decisions(await self._limits_script("limits", "a", checks, leases), checks, leases)
            except BaseException:
                # The script may have run before the reply was lost (timeout, cancelled
                # caller): give back any slot it took rather than hold it until the TTL.
                self._release_blind(leases)
                raise
        # Keys in several slots: one script per slot, concurrently; undo the charged ones if
        # another slot refuses or fails, so the result stays all-or-nothing.
        members = list(groups.values())
        results = await asyncio.gather(
            *(self._limits_script("limits", "a", [checks[i] for i in idx], [leases[i] for i in idx])
              for idx in members),
            return_exceptions=True,
        )
        decisions: list[LimitDecision | None] = [None] * len(checks)
        charged: list[list[int]] = []
        failure: BaseException | None = None
        for idx, result in zip(members, results, strict=True):
            if isinstance(result, BaseException):
                failure = failure or result
                self._release_blind([leases[i] for i in idx])
                continue
            part = _decisions(result, [checks[i] for i in idx], [leases[i] for i in idx])
            for i, decision in zip(idx, part, strict=True):
                decisions[i] = decision
            if all(d.allowed for d in part):
                charged.append(idx)
        complete = [d for d in decisions if d is not None]
        if failure is None and len(charged) == len(members):
            return complete
        for idx in charged:
            self._spawn(self._limits_script("undo", "u", [checks[i] for i in idx], [leases[i] for i in idx]))
        if failure is not None:
            raise failure
        return [replace(d, lease=None) if d.lease is not None else d for d in complete]

    async def undo_limits(self, checks: Sequence[RateCheck | QuotaCheck]) -> None:
        groups: dict[str, list[RateCheck | QuotaCheck]] = {}
        for check in checks:
            groups.setdefault(check.key.group, []).append(check)
        if len(groups) > 1 and self._mode != "cluster":
            groups = {"": list(checks)}
        await asyncio.gather(*(self._limits_script("undo", "u", part, [None] * len(part))
                               for part in groups.values()))

    async def _limits_script(self, op: str, mode: str, checks: Sequence[LimitCheck],
                             leases: Sequence[Lease | None]) -> Any:
        keys = [self.key(c.key) for c in checks]
        args: list[str | int | bytes] = [mode]
        for check, lease in zip(checks, leases, strict=True):
            args.extend(_check_args(check, lease))
        return await self._script(op, _LIMITS, keys, args)

    def _release_blind(self, leases: Sequence[Lease | None]) -> None:
        taken = [lease for lease in leases if lease is not None]
        if taken:
            self._spawn(self.release(taken))

    def _spawn(self, call: Awaitable[Any]) -> None:
        async def quietly() -> None:
            with contextlib.suppress(StateUnavailable):
                await call

        task = asyncio.ensure_future(quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def acquire(self, check: ConcurrencyCheck) -> LimitDecision:
        return (await self.run_limits([check]))[0]

    async def release(self, leases: Sequence[Lease]) -> None:
        """One round trip per slot: ``ZREM`` for one lease, a script for several."""
        if not leases:
            return
        groups: dict[str, list[Lease]] = {}
        for lease in leases:
            groups.setdefault(lease.key.group if self._mode == "cluster" else "", []).append(lease)
        parts = list(groups.values())
        if len(parts) == 1:
            await self._call("release", lambda: self._release_group(parts[0]))
        else:
            await self._call("release", lambda: asyncio.gather(*(self._release_group(part) for part in parts)))

    async def _release_group(self, leases: Sequence[Lease]) -> None:
        if len(leases) == 1:
            await self._client.zrem(self.key(leases[0].key), leases[0].lease_id)
            return
        keys = [self.key(lease.key) for lease in leases]
        now = "" if self._clock is None else str(clock_us(self._clock))
        try:
            await self._client.evalsha(_RELEASE.sha, len(keys), *keys, now, *(lease.lease_id for lease in leases))
        except NoScriptError:
            await self._client.eval(_RELEASE.source, len(keys), *keys, now, *(lease.lease_id for lease in leases))

    # -- budgets ------------------------------------------------------------------------

    async def reserve(self, key: StateKey, amount: float, *, capacity: float, period_s: int,
                      reservation_id: str | None = None) -> BudgetDecision:
        if not amount >= 0 or amount == float("inf"):
            raise ValueError(f"budget amounts must be finite and >= 0, got {amount!r}")
        rid = reservation_id or secrets.token_hex(12)
        raw = await self._script("reserve", _RESERVE, [self.key(key)],
                                 [repr(float(capacity)), period_s * 1_000_000, repr(float(amount)), rid,
                                  PERIOD_GRACE_US, repr(BUDGET_EPSILON)])
        granted, spent, period, reset, held, seq = raw
        reservation = Reservation(key, rid, float(held), int(period), period_s) if granted else None
        return BudgetDecision(bool(granted), capacity, float(spent), seconds(int(reset)), reservation,
                              period=int(period), seq=int(seq))

    async def commit(self, reservation: Reservation, *, actual: float | None = None) -> bool:
        refund = ""
        if actual is not None:
            if not 0 <= actual <= reservation.amount:
                raise ValueError("commit takes an actual amount between 0 and the amount reserved")
            refund = repr(reservation.amount - actual)
        return await self._settle("commit", reservation, refund)

    async def refund(self, reservation: Reservation) -> bool:
        return await self._settle("refund", reservation, repr(reservation.amount))

    async def _settle(self, op: str, reservation: Reservation, refund: str) -> bool:
        raw = await self._script(op, _SETTLE, [self.key(reservation.key)],
                                 [reservation.reservation_id, reservation.period, refund,
                                  reservation.period_s * 1_000_000])
        return bool(raw)

    # -- documents ----------------------------------------------------------------------

    async def get_document(self, key: StateKey) -> Document | None:
        version, value = await self._call("doc_get", lambda: self._client.hmget(self.key(key), "v", "d"))
        if version is None:
            return None
        return Document(int(version), bytes(value or b""))

    async def put_document(self, key: StateKey, value: bytes, *, expected_version: int | None) -> int:
        expected = "" if expected_version is None else str(expected_version)
        done, version = await self._script("doc_put", _PUT_DOC, [self.key(key)], [expected, value])
        if not done:
            raise DocumentConflict(int(version))
        return int(version)

    # -- server configuration ---------------------------------------------------------

    async def eviction_policy(self) -> str | None:
        """The server's ``maxmemory-policy``, or None when it cannot be read.

        Managed Redis services often forbid ``CONFIG`` (and a cluster answers per node):
        None then, and the caller decides (the DP ledger warns; see gateway/state/dp_ledger.py).
        A server that is down raises :class:`StateUnavailable` as every call does.
        """
        async def read() -> Any:
            try:
                if isinstance(self._client, RedisCluster):
                    # Every master holds budget keys: read them all (the default is one random node).
                    return await self._client.config_get("maxmemory-policy",
                                                         target_nodes=RedisCluster.PRIMARIES)
                return await self._client.config_get("maxmemory-policy")
            except ResponseError:  # NOPERM, unknown command (renamed CONFIG): not an outage
                return None

        return eviction_policy_of(await self._call("config_get", read))

    # -- lifecycle ----------------------------------------------------------------------

    async def ping(self) -> None:
        await self._call("ping", self._client.ping)

    async def close(self) -> None:
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._client.aclose()
        if self._on_close is not None:
            await self._on_close()


def eviction_policy_of(reply: Any) -> str | None:
    """``maxmemory-policy`` from a ``CONFIG GET`` reply: one server's ``{name: value}``, or a
    cluster's ``{node: {name: value}}`` (then the first policy other than ``noeviction``, so
    one evicting master is enough to refuse). None when absent or unreadable."""
    if not isinstance(reply, dict):
        return None
    name = ("maxmemory-policy", b"maxmemory-policy")
    direct = [reply[k] for k in name if k in reply]
    if direct:
        value = direct[0]
        return value.decode() if isinstance(value, bytes) else str(value)
    found = [eviction_policy_of(v) for v in reply.values() if isinstance(v, dict)]
    if not found or any(p is None for p in found):
        return None
    return next((p for p in found if p != "noeviction"), found[0])


def _reap(background: set[asyncio.Future[Any]]) -> Callable[[asyncio.Future[Any]], None]:
    """Forget an abandoned call once it ends, reading its outcome so nothing is logged as lost."""

    def done(task: asyncio.Future[Any]) -> None:
        background.discard(task)
        if not task.cancelled():
            task.exception()

    return done


def _check_args(check: LimitCheck, lease: Lease | None) -> tuple[str | int, ...]:
    kind = kind_of(check)
    if isinstance(check, RateCheck):
        interval, tolerance = rate_params(check)
        return kind.value, repr(interval), repr(tolerance), check.cost, check.burst
    if isinstance(check, QuotaCheck):
        return kind.value, check.limit, check.period_s * 1_000_000, check.cost, PERIOD_GRACE_US
    assert lease is not None  # noqa: S101 - every concurrency check has a lease id
    return kind.value, check.limit, round(check.lease_ttl_s * 1_000_000), lease.lease_id, 0


def _decisions(reply: bytes, checks: Sequence[LimitCheck], leases: Sequence[Lease | None]) -> list[LimitDecision]:
    raw = reply.split(b",")
    if len(raw) != 5 * len(checks):
        raise StateUnavailable("limits", "error", "unexpected reply from the limits script")
    out: list[LimitDecision] = []
    overall = all(int(raw[i * 5]) for i in range(len(checks)))
    for i, lease in enumerate(leases):
        allowed, limit, remaining, reset, retry = (int(v) for v in raw[i * 5:i * 5 + 5])
        out.append(LimitDecision(bool(allowed), limit, remaining, seconds(reset), seconds(retry),
                                 lease if allowed and overall else None))
    return out

