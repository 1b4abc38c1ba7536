"""RDP (Gaussian) privacy budgets shared through Redis: a vector per account, one Lua script per step.

Why a vector: Gaussian releases compose in Rényi DP, where each answered row adds ``α·ρ``
at every order α, and the tenant's (ε, δ) guarantee is the conversion of the *sum*
(:mod:`privacy.dp.accounting`). The compact per-account state is therefore the RDP curve
at the fixed orders ``RDP_ORDERS`` (69 doubles), and the admission check needs all of it.

Why the check is exact, with no conversion in Lua: the converted budget check
``ε(δ) = min_α (rdp_α + c_α) ≤ E`` holds exactly when **some** order has
``rdp_α ≤ E − c_α``; the accountant hands the ledger that limit vector
``(E − c_α)_α`` (``RdpAccountant.limit``), so the script tests
``∃ i: used_i + amount_i ≤ limit_i`` — the same double-precision operations, in the same
order, as :func:`privacy.dp.ledger.fits`, with the same relative tolerance. A minimum
taken in Lua would be the same number computed a second way; one formula in one place
(Opacus's conversion, tested against ``RDPAccountant``) is safer.

Layout: the account is the same Redis hash as the scalar (Laplace) account of that
(tenant, model), so a mechanism switched mid-period can never open a second, fresh budget:

====================  ===========================================================
``p``                 period index (server time // period), as the scalar script
``n``                 vector length (an account of another length fails closed)
``u``                 used = committed + open reservations, ``%.17g`` comma-separated
``s``                 ``1e308``: makes the scalar script refuse on this account
``q``                 reservations this period (the scalar script's counter too)
``v:<id>``            one open reservation's vector (the request's amount)
====================  ===========================================================

and a vector request on a *scalar* account of the current period is a
:class:`~privacy.dp.ledger.LedgerMismatch`. Doubles travel as ``repr`` / ``%.17g``, both
exact round trips. Periods are the scalar path's: epoch-aligned, measured by the server's
``TIME``, the hash expiring a grace minute after its period.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

from gateway.state.base import StateKey
from gateway.state.redis import PERIOD_GRACE_US, SCRIPT_PREAMBLE, Script
from privacy.dp.ledger import LEDGER_RELATIVE_TOLERANCE

#: What the ``s`` field of a vector account holds: larger than any scalar capacity.
SCALAR_LOCK: Final = "1e308"

_HELPERS = """
local function parse(csv)
  local out = {}
  for x in string.gmatch(csv or '', '[^,]+') do out[#out + 1] = tonumber(x) end
  return out
end
local function pack(v)
  local parts = {}
  for i = 1, #v do parts[i] = fmt17(v[i]) end
  return table.concat(parts, ',')
end
"""

# ARGV: now period_us reservation_id grace_us tolerance n amount limit (amount/limit as CSV).
# Returns {status, used, period, reset_us, held, seq}: status 1 granted, 0 refused, -1 mismatch;
# seq is the account's reservation counter ``q`` (see RESERVE_LUA in gateway/state/redis.py).
RESERVE_VECTOR_LUA: Final = SCRIPT_PREAMBLE + _HELPERS + """
local key = KEYS[1]
local period_us, rid = tonumber(ARGV[2]), 'v:' .. ARGV[3]
local grace, tol, n = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local amount, limit = parse(ARGV[7]), parse(ARGV[8])
local period = period_of(period_us)
local stop = (period + 1) * period_us
if #amount ~= n or #limit ~= n then return redis.error_reply('dp vector length') end
local h = redis.call('HMGET', key, 'p', 'n', 'u', 'q', 'l')
local used, seq = {}, 0
local standing = account_standing(h[1], h[5], period, period_us)
if standing ~= 'fresh' then
  seq = tonumber(h[4]) or 0
  if not h[2] or tonumber(h[2]) ~= n then return {-1, '', fmt(period), stop - now, '', fmt(seq)} end
  used = parse(h[3])
  if standing == 'carry' then
    -- the period length changed mid-period (a policy edit): what was spent stays spent
    redis.call('HSET', key, 'p', fmt(period), 'l', fmt(period_us))
    redis.call('PEXPIRE', key, ms(stop + grace - now))
  else
    local held = redis.call('HGET', key, rid)
    if held then return {1, h[3], fmt(period), stop - now, held, fmt(seq)} end
  end
else
  if h[1] then redis.call('DEL', key) end
  for i = 1, n do used[i] = 0 end
end
local fits = false
for i = 1, n do
  if used[i] + amount[i] <= limit[i] + tol * math.abs(limit[i]) then
    fits = true
    break
  end
end
if not fits then return {0, pack(used), fmt(period), stop - now, '', fmt(seq)} end
for i = 1, n do used[i] = used[i] + amount[i] end
local u = pack(used)
seq = seq + 1
redis.call('HSET', key, 'p', fmt(period), 'l', fmt(period_us), 'n', n, 'u', u,
  's', '""" + SCALAR_LOCK + """', 'q', fmt(seq), rid, ARGV[7])
redis.call('PEXPIRE', key, ms(stop + grace - now))
return {1, u, fmt(period), stop - now, ARGV[7], fmt(seq)}
"""

# ARGV: now reservation_id period refund ('1' = give the amount back, '' = commit) period_us.
SETTLE_VECTOR_LUA: Final = SCRIPT_PREAMBLE + _HELPERS + """
local key = KEYS[1]
local h = redis.call('HMGET', key, 'p', 'n', 'u')
local period = tonumber(ARGV[3])
if not h[1] or not h[2] or tonumber(h[1]) ~= period or period_of(tonumber(ARGV[5])) ~= period then return 0 end
local rid = 'v:' .. ARGV[2]
local held = redis.call('HGET', key, rid)
if not held then return 0 end
redis.call('HDEL', key, rid)
if ARGV[4] ~= '' then
  local used, amount = parse(h[3]), parse(held)
  for i = 1, #used do used[i] = math.max(0, used[i] - (amount[i] or 0)) end
  redis.call('HSET', key, 'u', pack(used))
end
return 1
"""

# ARGV: now period_us n. Returns {status, used, period, seq}: 1 with '' for a fresh account,
# -1 mismatch.
USAGE_VECTOR_LUA: Final = SCRIPT_PREAMBLE + """
local h = redis.call('HMGET', KEYS[1], 'p', 'n', 'u', 'q', 'l')
local period_us = tonumber(ARGV[2])
local period = period_of(period_us)
if account_standing(h[1], h[5], period, period_us) == 'fresh' then return {1, '', fmt(period), '0'} end
local seq = fmt(tonumber(h[4]) or 0)
if not h[2] or tonumber(h[2]) ~= tonumber(ARGV[3]) then return {-1, '', fmt(period), seq} end
return {1, h[3], fmt(period), seq}
"""

RESERVE_VECTOR: Final = Script("dp_vector_reserve", RESERVE_VECTOR_LUA)
SETTLE_VECTOR: Final = Script("dp_vector_settle", SETTLE_VECTOR_LUA)
USAGE_VECTOR: Final = Script("dp_vector_usage", USAGE_VECTOR_LUA)


@runtime_checkable
class ScriptRunner(Protocol):
    """What a store must offer for vector budgets: :meth:`RedisState.run_script`."""

    async def run_script(self, op: str, script: Script, keys: Sequence[StateKey],
                         args: Sequence[str | int | bytes]) -> Any: ...


@dataclass(frozen=True, slots=True)
class VectorHold:
    """An open reservation as the store knows it (server period, not the caller's)."""

    key: StateKey
    reservation_id: str
    period: int
    period_us: int


@dataclass(frozen=True, slots=True)
class VectorDecision:
    status: int  # 1 granted, 0 refused, -1 the account holds another kind of budget
    used: tuple[float, ...]  # including this reservation when granted
    reset_s: float
    hold: VectorHold | None
    period: int = -1  # the store's period index
    seq: int = 0  # the account's reservation counter this period (``q``)


def _csv(values: Sequence[float]) -> str:
    return ",".join(repr(float(v)) for v in values)


def _parse(raw: Any, size: int) -> tuple[float, ...]:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    if not text:
        return tuple(0.0 for _ in range(size))
    return tuple(float(x) for x in text.split(","))


class RedisVectorBudgets:
    """Reserve / commit / refund / read RDP budget vectors on a :class:`ScriptRunner`."""

    def __init__(self, store: ScriptRunner) -> None:
        self.store = store

    async def reserve(self, key: StateKey, amount: Sequence[float], limit: Sequence[float],
                      period_s: int) -> VectorDecision:
        rid = secrets.token_hex(12)
        period_us = period_s * 1_000_000
        raw = await self.store.run_script(
            "dp_reserve", RESERVE_VECTOR, [key],
            [period_us, rid, PERIOD_GRACE_US, repr(LEDGER_RELATIVE_TOLERANCE), len(amount),
             _csv(amount), _csv(limit)],
        )
        status, used, period, reset_us, _held, seq = raw
        hold = VectorHold(key, rid, int(period), period_us) if int(status) == 1 else None
        return VectorDecision(int(status), _parse(used, len(amount)), max(int(reset_us), 0) / 1e6, hold,
                              int(period), int(seq))

    async def commit(self, hold: VectorHold) -> bool:
        return bool(await self._settle("dp_commit", hold, ""))

    async def refund(self, hold: VectorHold) -> bool:
        return bool(await self._settle("dp_refund", hold, "1"))

    async def _settle(self, op: str, hold: VectorHold, refund: str) -> Any:
        return await self.store.run_script(op, SETTLE_VECTOR, [hold.key],
                                           [hold.reservation_id, hold.period, refund, hold.period_us])

    async def usage(self, key: StateKey, size: int, period_s: int) -> tuple[int, tuple[float, ...], int, int]:
        """(status, used, store period index, reservation counter ``q``) without reserving."""
        status, used, period, seq = await self.store.run_script("dp_usage", USAGE_VECTOR, [key],
                                                                [period_s * 1_000_000, size])
        return int(status), _parse(used, size), int(period), int(seq)
