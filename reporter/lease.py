"""A lease in the ledger database: beat's leadership when the broker is not Redis (RabbitMQ, …).

The same interface as `reporter.lock.RedisLock` (acquire, renew, release, holder), kept as a row of the
ledger's `leases` table, so exactly one beat schedules whatever the broker, and a standby takes over
once the leader's lease expires.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from reporter.ledger import Ledger
from reporter.lock import owner_id


class LedgerLease:
    """Lease NAME for TIMEOUT seconds in the ledger at URL (or the LEDGER given), held by OWNER.

    The ledger is opened on first use, so a beat starts while the database is down and takes the lease
    once it answers; until then every call raises one of `unreachable`."""

    unreachable: tuple[type[Exception], ...] = (sa.exc.SQLAlchemyError, OSError)
    """What a call raises while the database does not answer."""

    def __init__(self, name: str, timeout: float, url: str | None = None, ledger: Ledger | None = None, owner: str | None = None) -> None:
        if (url is None) == (ledger is None):
            raise ValueError("give the ledger's URL or the ledger, not both")
        self.name = name
        self.timeout = float(timeout)
        self.url = url
        self._ledger = ledger
        self.owner = owner or owner_id()
        host, pid, _ = [*self.owner.split(":"), "", "", ""][:3]
        self.value = json.dumps({"id": self.owner, "host": host, "pid": pid, "since": datetime.now(UTC).isoformat()})

    @property
    def ledger(self) -> Ledger:
        """The ledger, opened (and its tables created) on first use."""
        if self._ledger is None:
            assert self.url is not None
            ledger = Ledger.from_url(self.url)
            self._ledger = ledger
        return self._ledger

    def acquire(self) -> bool:
        """Take the lease if nobody holds it or its holder's lease expired."""
        return self.ledger.take_lease(self.name, self.value, self.timeout)

    def renew(self) -> bool:
        """Extend our lease; False if it is no longer ours."""
        return self.ledger.renew_lease(self.name, self.value, self.timeout)

    def release(self) -> bool:
        """Give the lease up if it is ours."""
        return self.ledger.drop_lease(self.name, self.value)

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lease now, if anyone."""
        raw = self.ledger.lease_holder(self.name)
        return None if raw is None else dict(json.loads(raw))

    def heartbeat(self, key: str, value: str) -> None:
        """Nothing: the heartbeat `reporter status` reads lives in a Redis broker, and the lease row's
        expiry already says the leader is alive."""

    def close(self) -> None:
        """Close the ledger's connections (if this lease opened them)."""
        if self._ledger is not None and self.url is not None:
            self._ledger.dispose()
