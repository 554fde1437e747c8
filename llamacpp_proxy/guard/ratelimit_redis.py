"""A limiter shared by several proxy processes through Redis.

Each check-and-admit is one Lua script run atomically by Redis, with Redis's own clock, so N
processes together admit exactly what one would. Concurrent slots are short leases renewed
by a heartbeat while their request runs, so a process that dies (even `kill -9`) frees its
slots within seconds. Every script does constant work per call, or amortised constant work:
the token budget keeps a running total beside its sorted set, and each entry is read once,
when it expires.

Connections are a bounded pool, and callers wait their turn for one (with a deadline): a
burst is backpressure, answered 503 "busy" if the wait runs out, never taken for "Redis is
down" (which, in `open` mode, would admit the burst without limits).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

from ..errors import RateLimiterUnavailable
from .auth import Principal
from .ratelimit import ONE_GENERATION, TOKEN_WINDOW, Admission, Cost, KeyUsage, conclude
from .redis_gate import POOL_WAIT, Gate, RedisBusy, connect

log = logging.getLogger("llamacpp_proxy.ratelimit")

SLOT_LEASE = 10.0  # seconds a slot is held without a heartbeat (a dead process's slots)
HEARTBEAT = SLOT_LEASE / 4  # leases of live requests are renewed this often
POOL_SIZE = 64  # Redis connections per process
RELEASE_ATTEMPTS = 6  # a failed release is retried (0.1, 0.2, ... 3.2 s apart)
TOKEN_WAIT_SCAN = 128  # oldest token entries read to compute a refusal's Retry-After

# KEYS: requests zset, tokens zset, slots zset, tokens running total.
# ARGV: request limit, window ms, token limit, token window ms, concurrency limit,
#       admission id, lease ms, token estimate, generations, wait scan.
# Zero disables a limit. Token entries are members "<id>:<kind>:<tokens>" scored by time.
# Returns: refused kind ('' = admitted), requests used, request wait ms, request reset ms,
#          tokens used, token wait ms, token reset ms, in flight, slots granted.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local req_limit, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local tok_limit, tok_window = tonumber(ARGV[3]), tonumber(ARGV[4])
local conc_limit, id, lease = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local estimate, generations, scan = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])

local req_used, req_wait, req_reset = 0, 0, 0
if req_limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - window))
  req_used = redis.call('ZCARD', KEYS[1])
  if req_used >= req_limit then
    local nth = redis.call('ZRANGE', KEYS[1], req_used - req_limit, req_used - req_limit,
                           'WITHSCORES')
    req_wait = tonumber(nth[2]) + window - now + 1
  end
  local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if newest[2] then req_reset = tonumber(newest[2]) + window - now end
end

local tok_used, tok_wait, tok_reset = 0, 0, 0
local threshold = 0
if tok_limit > 0 then
  -- Expire old entries, taking their weights off the running total: each entry is read
  -- once in its life, so admissions cost amortised constant work, not a scan of the minute.
  local cutoff = '(' .. (now - tok_window)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  if #gone > 0 then
    local weight = 0
    for i = 1, #gone do weight = weight + tonumber(string.match(gone[i], ':(%d+)$')) end
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
    redis.call('DECRBY', KEYS[4], weight)
  end
  if redis.call('ZCARD', KEYS[2]) == 0 then
    redis.call('DEL', KEYS[4])  -- nothing counted: the total is 0 (resynchronised)
  end
  tok_used = tonumber(redis.call('GET', KEYS[4]) or '0')
  threshold = tok_limit - math.max(estimate, 1) + 1
  if tok_used >= threshold and estimate <= tok_limit then
    -- Retry-After: when enough of the oldest entries expire. Only the oldest `scan` are
    -- read (constant work); past them the answer is a lower bound, and a client retrying
    -- then is told the next wait.
    local excess = tok_used - threshold
    local oldest = redis.call('ZRANGE', KEYS[2], 0, scan - 1, 'WITHSCORES')
    for i = 1, #oldest, 2 do
      excess = excess - tonumber(string.match(oldest[i], ':(%d+)$'))
      tok_wait = tonumber(oldest[i + 1]) + tok_window - now + 1
      if excess < 0 then break end
    end
  end
  local newest = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
  if newest[2] then tok_reset = tonumber(newest[2]) + tok_window - now end
end

local in_flight = 0
if conc_limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  in_flight = redis.call('ZCARD', KEYS[3])
end

local refused = ''
if tok_limit > 0 and estimate > tok_limit then refused = 'too_large'
elseif tok_limit > 0 and tok_used >= threshold then refused = 'tokens'
elseif req_limit > 0 and req_used >= req_limit then refused = 'requests'
elseif conc_limit > 0 and in_flight >= conc_limit then refused = 'concurrency' end

local slots = 0
if refused == '' then
  if req_limit > 0 then
    redis.call('ZADD', KEYS[1], now, id)
    redis.call('PEXPIRE', KEYS[1], window + 1000)
  end
  if tok_limit > 0 and estimate > 0 then
    redis.call('ZADD', KEYS[2], now, id .. ':r:' .. estimate)
    redis.call('INCRBY', KEYS[4], estimate)
    redis.call('PEXPIRE', KEYS[2], tok_window + 1000)
    redis.call('PEXPIRE', KEYS[4], tok_window + 1000)
  end
  if conc_limit > 0 then
    slots = math.max(1, math.min(generations, conc_limit - in_flight))
    for i = 1, slots do redis.call('ZADD', KEYS[3], now + lease, id .. '#' .. i) end
    redis.call('PEXPIRE', KEYS[3], lease + 1000)
  end
end
return {refused, req_used, req_wait, req_reset, tok_used, tok_wait, tok_reset, in_flight, slots}
"""

# KEYS: tokens zset, slots zset, tokens running total.
# ARGV: admission id, slots held, tokens used, token estimate reserved, token window ms.
FINISH = """
local id, slots = ARGV[1], tonumber(ARGV[2])
for i = 1, slots do redis.call('ZREM', KEYS[2], id .. '#' .. i) end
local tokens, estimate, tok_window = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if estimate > 0 and redis.call('ZREM', KEYS[1], id .. ':r:' .. estimate) == 1 then
  redis.call('DECRBY', KEYS[3], estimate)  -- still counted: settle it
end
if tokens > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  -- Counted only when the entry is new: a retry of a release whose reply was lost (it ran)
  -- must not add the tokens to the total a second time.
  if redis.call('ZADD', KEYS[1], 'NX', now, id .. ':f:' .. tokens) == 1 then
    redis.call('INCRBY', KEYS[3], tokens)
  end
  redis.call('PEXPIRE', KEYS[1], tok_window + 1000)
  redis.call('PEXPIRE', KEYS[3], tok_window + 1000)
end
return 1
"""

# KEYS: slots zset.  ARGV: admission id, slots held, lease ms.
# XX: a lease that already expired (this process stalled past it) is not taken back, as its
# slot may have gone to another request.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id, slots, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, slots do redis.call('ZADD', KEYS[1], 'XX', now + lease, id .. '#' .. i) end
redis.call('PEXPIRE', KEYS[1], lease + 1000)
return 1
"""


class RedisLimiter:
    """The Limiter protocol on Redis; `failure_mode` is "open" (admit) or "closed" (503)."""

    def __init__(
        self,
        client: Any,
        failure_mode: str = "closed",
        prefix: str = "llp",
        *,
        lease: float = SLOT_LEASE,
        pool_size: int = POOL_SIZE,
        pool_wait: float = POOL_WAIT,
    ) -> None:
        self._redis = client
        self._failure_mode = failure_mode
        self._prefix = prefix
        self._admit = client.register_script(ADMIT)
        self._finish = client.register_script(FINISH)
        self._renew = client.register_script(RENEW)
        self._healthy = True
        self._lease = lease
        self._heartbeat_every = lease / 4
        self._gate = Gate(pool_size, pool_wait)  # "busy" under load, never "Redis down"
        self._live: dict[str, tuple[str, int]] = {}
        """Admissions holding slots: lease id -> (slots key, slots held), for the heartbeat."""
        self._heartbeat: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: str,
        failure_mode: str = "closed",
        timeout: float = 1.0,
        *,
        lease: float = SLOT_LEASE,
        pool_size: int = POOL_SIZE,
    ) -> RedisLimiter:
        """A limiter on the Redis at `url` (redis://host:port/db)."""
        client = connect(url, timeout, pool_size)
        return cls(client, failure_mode, lease=lease, pool_size=pool_size)

    def _keys(self, name: str) -> list[str]:
        base = f"{self._prefix}:{{{name}}}"  # one hash slot per key name (Redis Cluster)
        return [f"{base}:req", f"{base}:tok", f"{base}:slots", f"{base}:toktotal"]

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run a script once a connection is ours; RedisBusy if none frees in time."""
        return await self._gate.call(lambda: script(keys=keys, args=args))

    def _redis_failed(self, exc: BaseException) -> None:
        if self._healthy:
            self._healthy = False
            log.error(
                "Redis is unreachable (%s); failing %s until it returns", exc, self._failure_mode
            )

    def _redis_ok(self) -> None:
        if not self._healthy:
            self._healthy = True
            log.warning("Redis is reachable again; shared limits are enforced")

    async def admit(self, principal: Principal, cost: Cost = ONE_GENERATION) -> Admission:
        """Admit the request or raise RateLimited; see the Limiter protocol."""
        limits = principal.limits
        if limits is None:
            return Admission(principal, slots=cost.generations)
        admission_id = secrets.token_hex(8)
        args = [
            limits.requests or 0,
            int(limits.window * 1000),
            limits.tokens_per_minute or 0,
            int(TOKEN_WINDOW * 1000),
            limits.max_concurrent or 0,
            admission_id,
            int(self._lease * 1000),
            max(0, cost.tokens),
            max(1, cost.generations),
            TOKEN_WAIT_SCAN,
        ]
        try:
            result = await self._call(self._admit, self._keys(principal.name), args)
        except RedisBusy:
            # Load, in either failure mode: admitting it unlimited ("open") is what a burst
            # must never get.
            raise RateLimiterUnavailable(
                "The rate limiter is busy; retry shortly.",
                code="rate_limiter_busy",
                headers={"Retry-After": "1"},
            ) from None
        except Exception as exc:  # any Redis or network failure
            self._redis_failed(exc)
            if self._failure_mode == "open":
                return Admission(principal, slots=cost.generations)
            raise RateLimiterUnavailable(
                "The rate limiter is unavailable; retry shortly.", headers={"Retry-After": "1"}
            ) from exc
        self._redis_ok()
        refused, req_used, req_wait, req_reset, tok_used, tok_wait, tok_reset, in_flight, slots = (
            result
        )
        usage = KeyUsage(
            requests_used=int(req_used),
            requests_wait=int(req_wait) / 1000,
            requests_reset=int(req_reset) / 1000,
            tokens_used=int(tok_used),
            tokens_wait=int(tok_wait) / 1000,
            tokens_reset=int(tok_reset) / 1000,
            in_flight=int(in_flight),
        )
        kind = refused.decode() if isinstance(refused, bytes) else str(refused)
        admission = conclude(principal, kind or None, usage, cost)
        admission.lease_id = admission_id
        admission.held_slots = int(slots)
        admission.slots = admission.held_slots or cost.generations
        if limits.tokens_per_minute and cost.tokens > 0:
            admission.reserved_tokens = cost.tokens
        if admission.held_slots:
            self._live[admission_id] = (self._keys(principal.name)[2], admission.held_slots)
            self._ensure_heartbeat()
        return admission

    async def finish(self, admission: Admission, tokens: int) -> None:
        """Settle the reservation, charge tokens and release the slots, once per admission;
        a failed release is retried (the lease ends on its own if every attempt fails)."""
        if admission.finished:
            return
        admission.finished = True
        limits = admission.principal.limits
        lease_id = admission.lease_id
        if limits is None or lease_id is None:
            return
        self._live.pop(lease_id, None)  # no more heartbeats, whatever happens below
        charge = max(0, tokens) if limits.tokens_per_minute else 0
        if not admission.held_slots and not admission.reserved_tokens and not charge:
            return
        keys = self._keys(admission.principal.name)
        args = [
            lease_id,
            admission.held_slots,
            charge,
            admission.reserved_tokens,
            int(TOKEN_WINDOW * 1000),
        ]
        delay = 0.1
        for attempt in range(1, RELEASE_ATTEMPTS + 1):
            try:
                await self._call(self._finish, [keys[1], keys[2], keys[3]], args)
            except Exception as exc:  # RedisBusy included: try again
                if attempt == RELEASE_ATTEMPTS or self._closed:
                    if not isinstance(exc, RedisBusy):
                        self._redis_failed(exc)
                    log.warning(
                        "could not record %d tokens / release %d slot(s) of key '%s' in "
                        "Redis after %d attempts; the slots' leases end within %gs",
                        charge,
                        admission.held_slots,
                        admission.principal.name,
                        attempt,
                        self._lease,
                    )
                    return
                await asyncio.sleep(delay)
                delay *= 2
            else:
                self._redis_ok()
                return

    def _ensure_heartbeat(self) -> None:
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.ensure_future(self._renew_leases())

    async def _renew_leases(self) -> None:
        """Renew the leases of every admission still running, until none is left."""
        lease_ms = int(self._lease * 1000)
        while self._live and not self._closed:
            await asyncio.sleep(self._heartbeat_every)
            live = list(self._live.items())
            results = await asyncio.gather(
                *(
                    self._call(self._renew, [slots_key], [lease_id, held, lease_ms])
                    for lease_id, (slots_key, held) in live
                    if lease_id in self._live
                ),
                return_exceptions=True,
            )
            failure = next((r for r in results if isinstance(r, Exception)), None)
            if failure is not None and not isinstance(failure, RedisBusy):
                self._redis_failed(failure)

    @property
    def live_leases(self) -> int:
        """Admissions whose slots this process keeps renewing (for tests)."""
        return len(self._live)

    async def close(self) -> None:
        """Stop the heartbeat and close the Redis connections."""
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        await self._redis.aclose()
