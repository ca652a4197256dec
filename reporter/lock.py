"""A lease in Redis: held by one owner, kept alive by renewal, lost when not renewed in time.

Beat uses it so that exactly one beat schedules, and a standby takes over when the leader dies.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from datetime import UTC, datetime
from typing import Any, Protocol

from redis.exceptions import RedisError

# Renew or release only if the lock is still ours: a leader that stalled past its lease must not
# extend or delete the lock its successor now holds.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def owner_id() -> str:
    """host:pid:random, unique per process start."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease(Protocol):
    """What beat's leadership needs of a lease, wherever it is kept (RedisLock, reporter.lease.LedgerLease)."""

    owner: str
    unreachable: tuple[type[Exception], ...]

    def acquire(self) -> bool: ...
    def renew(self) -> bool: ...
    def release(self) -> bool: ...
    def holder(self) -> dict[str, Any] | None: ...
    def heartbeat(self, key: str, value: str) -> None: ...


class RedisLock:
    """A lease on KEY for TIMEOUT seconds, identified by a JSON value naming its owner."""

    unreachable: tuple[type[Exception], ...] = (RedisError,)
    """What a call raises while Redis does not answer."""

    def __init__(self, client: Any, key: str, timeout: float, owner: str | None = None) -> None:
        self.client = client
        self.key = key
        self.timeout_ms = int(timeout * 1000)
        self.owner = owner or owner_id()
        host, pid, _ = [*self.owner.split(":"), "", "", ""][:3]
        self.value = json.dumps({"id": self.owner, "host": host, "pid": pid, "since": datetime.now(UTC).isoformat()})
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire(self) -> bool:
        """Take the lock if nobody holds it."""
        return bool(self.client.set(self.key, self.value, nx=True, px=self.timeout_ms))

    def renew(self) -> bool:
        """Extend our lease; False if the lock is no longer ours."""
        return bool(self._renew(keys=[self.key], args=[self.value, self.timeout_ms]))

    def release(self) -> bool:
        """Give the lock up if it is ours."""
        return bool(self._release(keys=[self.key], args=[self.value]))

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock now, if anyone."""
        raw = self.client.get(self.key)
        return None if raw is None else dict(json.loads(raw))

    def heartbeat(self, key: str, value: str) -> None:
        """Write the leader's heartbeat (what `reporter status` shows) at KEY."""
        self.client.set(key, value)
