"""A limiter shared by several proxy processes through Redis.

Each check-and-admit is one Lua script run atomically by Redis, with Redis's own clock, so N
processes together admit exactly what one would. Concurrent slots are leases that expire, so
a process that dies cannot leave a key stuck at its limit.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from ..errors import RateLimiterUnavailable
from .auth import Principal
from .ratelimit import TOKEN_WINDOW, Admission, KeyUsage, conclude

log = logging.getLogger("llamacpp_proxy.ratelimit")

SLOT_LEASE = 3600.0  # seconds a concurrent slot is held if its process never releases it

# KEYS: requests zset, tokens zset, slots zset.  ARGV: request limit, window ms, token limit,
# token window ms, concurrency limit, admission id, lease ms.  Zero disables a limit.
# Returns: admitted (1/0), refused kind, requests used, request wait ms, request reset ms,
# tokens used, token wait ms, token reset ms, in flight.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local req_limit, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local tok_limit, tok_window = tonumber(ARGV[3]), tonumber(ARGV[4])
local conc_limit, id, lease = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])

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
if tok_limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - tok_window))
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    tok_used = tok_used + tonumber(string.match(entries[i], ':(%d+)$'))
  end
  local excess = tok_used - tok_limit
  if excess >= 0 then
    for i = 1, #entries, 2 do
      excess = excess - tonumber(string.match(entries[i], ':(%d+)$'))
      if excess < 0 then
        tok_wait = tonumber(entries[i + 1]) + tok_window - now + 1
        break
      end
    end
  end
  if #entries > 0 then tok_reset = tonumber(entries[#entries]) + tok_window - now end
end

local in_flight = 0
if conc_limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  in_flight = redis.call('ZCARD', KEYS[3])
end

local refused = ''
if tok_limit > 0 and tok_used >= tok_limit then refused = 'tokens'
elseif req_limit > 0 and req_used >= req_limit then refused = 'requests'
elseif conc_limit > 0 and in_flight >= conc_limit then refused = 'concurrency' end

if refused == '' then
  if req_limit > 0 then
    redis.call('ZADD', KEYS[1], now, id)
    redis.call('PEXPIRE', KEYS[1], window + 1000)
  end
  if conc_limit > 0 then
    redis.call('ZADD', KEYS[3], now + lease, id)
    redis.call('PEXPIRE', KEYS[3], lease + 1000)
  end
end
return {refused == '' and 1 or 0, refused, req_used, req_wait, req_reset,
        tok_used, tok_wait, tok_reset, in_flight}
"""

# KEYS: tokens zset, slots zset.  ARGV: admission id, tokens, token window ms.
FINISH = """
redis.call('ZREM', KEYS[2], ARGV[1])
local tokens = tonumber(ARGV[2])
if tokens > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[1], now, ARGV[1] .. ':' .. tokens)
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + 1000)
end
return 1
"""


class RedisLimiter:
    """The Limiter protocol on Redis; `failure_mode` is "open" (admit) or "closed" (503)."""

    def __init__(self, client: Any, failure_mode: str = "closed", prefix: str = "llp") -> None:
        self._redis = client
        self._failure_mode = failure_mode
        self._prefix = prefix
        self._admit = client.register_script(ADMIT)
        self._finish = client.register_script(FINISH)
        self._healthy = True

    @classmethod
    def from_url(cls, url: str, failure_mode: str = "closed", timeout: float = 1.0) -> RedisLimiter:
        """A limiter on the Redis at `url` (redis://host:port/db)."""
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
        )
        return cls(client, failure_mode)

    def _keys(self, name: str) -> list[str]:
        base = f"{self._prefix}:{{{name}}}"  # one hash slot per key name (Redis Cluster)
        return [f"{base}:req", f"{base}:tok", f"{base}:slots"]

    def _redis_failed(self, exc: Exception) -> None:
        if self._healthy:
            self._healthy = False
            log.error(
                "Redis is unreachable (%s); failing %s until it returns", exc, self._failure_mode
            )

    def _redis_ok(self) -> None:
        if not self._healthy:
            self._healthy = True
            log.warning("Redis is reachable again; shared limits are enforced")

    async def admit(self, principal: Principal) -> Admission:
        """Admit the request or raise RateLimited; see the Limiter protocol."""
        limits = principal.limits
        if limits is None:
            return Admission(principal)
        admission_id = secrets.token_hex(8)
        args = [
            limits.requests or 0,
            int(limits.window * 1000),
            limits.tokens_per_minute or 0,
            int(TOKEN_WINDOW * 1000),
            limits.max_concurrent or 0,
            admission_id,
            int(SLOT_LEASE * 1000),
        ]
        try:
            result = await self._admit(keys=self._keys(principal.name), args=args)
        except Exception as exc:  # any Redis or network failure
            self._redis_failed(exc)
            if self._failure_mode == "open":
                return Admission(principal)
            raise RateLimiterUnavailable(
                "The rate limiter is unavailable; retry shortly.", headers={"Retry-After": "1"}
            ) from exc
        self._redis_ok()
        _, refused, req_used, req_wait, req_reset, tok_used, tok_wait, tok_reset, in_flight = result
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
        admission = conclude(principal, kind or None, usage)
        admission.holds_slot = bool(limits.max_concurrent)
        admission.lease_id = admission_id
        return admission

    async def finish(self, admission: Admission, tokens: int) -> None:
        """Charge tokens and release the slot, once per admission."""
        if admission.finished:
            return
        admission.finished = True
        limits = admission.principal.limits
        lease_id = admission.lease_id
        if limits is None or lease_id is None:
            return
        if not admission.holds_slot and not (limits.tokens_per_minute and tokens > 0):
            return
        keys = self._keys(admission.principal.name)
        try:
            await self._finish(
                keys=[keys[1], keys[2]], args=[lease_id, max(0, tokens), int(TOKEN_WINDOW * 1000)]
            )
        except Exception as exc:
            # The slot's lease expires on its own; the tokens are lost: say so.
            self._redis_failed(exc)
            log.warning(
                "could not record %d tokens / release a slot of key '%s' in Redis",
                tokens,
                admission.principal.name,
            )
        else:
            self._redis_ok()

    async def close(self) -> None:
        """Close the Redis connections."""
        await self._redis.aclose()
