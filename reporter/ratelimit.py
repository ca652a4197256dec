"""Send-rate limits. RedisLimiter holds across every worker process; LocalLimiter within one process.

Both reserve the next free send time and sleep until it, so sends of one bucket are spaced at least
1/rate seconds apart however many processes compete.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from reporter.errors import TransientDeliveryError
from reporter.settings import is_redis_url, redis_client_url

MARGIN = 1.05
"""Sends are spaced this much wider than 1/rate, so jitter between reserving a send time and the
server receiving the message cannot put one send too many into any one-second window."""


class Limiter(Protocol):
    def acquire(self, bucket: str, rate: float) -> float:
        """Block until a send of BUCKET at RATE per second is allowed; return the seconds waited."""
        ...


class LocalLimiter:
    """One process's limiter (for `reporter send --sync` and tests)."""

    def __init__(self) -> None:
        self._next: dict[str, float] = {}
        self._lock = threading.Lock()

    def acquire(self, bucket: str, rate: float) -> float:
        with self._lock:
            now = time.monotonic()
            at = max(now, self._next.get(bucket, 0.0))
            self._next[bucket] = at + MARGIN / rate
        wait = at - now
        if wait > 0:
            time.sleep(wait)
        return wait


# Reserve the next send time of a bucket on Redis' own clock, so worker clocks don't matter.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local at = tonumber(redis.call('GET', KEYS[1]) or '0')
if at < now then at = now end
-- Keep the key as long as its furthest reservation, plus a minute.
redis.call('SET', KEYS[1], at + interval, 'PX', math.floor((at + interval - now) / 1000) + 60000)
return at - now
"""


class RedisLimiter:
    """A limiter shared by every process that talks to the same Redis."""

    def __init__(self, client: Any, prefix: str = "reporter:rate:") -> None:
        self._client = client
        self._prefix = prefix
        self._script = client.register_script(_RESERVE)

    @classmethod
    def from_url(cls, url: str) -> RedisLimiter:
        import redis

        return cls(redis.Redis.from_url(url))

    def acquire(self, bucket: str, rate: float) -> float:
        from redis.exceptions import RedisError

        try:
            wait_us = int(self._script(keys=[self._prefix + bucket], args=[int(1_000_000 * MARGIN / rate)]))
        except RedisError as exc:
            raise TransientDeliveryError(f"rate limiter unavailable (Redis): {exc}") from None
        wait = wait_us / 1_000_000
        if wait > 0:
            time.sleep(wait)
        return wait


def for_broker(broker_url: str | None) -> Limiter:
    """A Redis limiter when the broker is Redis, else a per-process one."""
    if broker_url and is_redis_url(broker_url):
        return RedisLimiter.from_url(redis_client_url(broker_url))
    return LocalLimiter()
