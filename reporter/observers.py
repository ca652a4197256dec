"""Who is told what happened: each render, each delivery and each configuration applied or refused.

Logs and metrics are observers. `Observers` tells all of them and logs an observer's failure instead of
raising it, so a broken metrics exporter or log handler never stops a delivery. Its own module, so
deliver, runtime, metrics and live can all import it without importing each other.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from reporter.schedule import isoformat

# The delivery lines have always come from reporter.deliver; a logging setup that filters on that
# name keeps working now that the observers live here.
log = logging.getLogger("reporter.deliver")


@dataclass(frozen=True)
class Delivery:
    """What happened to one email: what observers (logs, metrics) are told."""

    report: str
    slot: datetime
    recipient: str
    status: str
    """sent, failed (for good), retry (handed back for another attempt) or not-sent (an alert decided so)"""
    seconds: float
    message_id: str | None
    size: int | None
    error: str | None

    def fields(self) -> dict[str, str | int | float | None]:
        """The delivery as a log line's fields, with the lag from its slot to now."""
        return {
            "report": self.report,
            "slot": isoformat(self.slot),
            "recipient": self.recipient,
            "status": self.status,
            "duration_ms": int(self.seconds * 1000),
            "message_id": self.message_id,
            "size": self.size,
            "error": self.error,
            "lag_s": round((datetime.now(UTC) - self.slot).total_seconds(), 3),
        }


class Observer(Protocol):
    """Told of each render and each delivery (metrics, structured logs)."""

    def rendered(self, report: str, slot: datetime, seconds: float, rows: int) -> None: ...

    def delivered(self, delivery: Delivery) -> None: ...

    def configured(self, version: str, problems: int) -> None: ...


class LogObserver:
    """One log line per delivery: key=value, or a JSON object with `as_json`."""

    def __init__(self, as_json: bool = False) -> None:
        self.as_json = as_json

    def rendered(self, report: str, slot: datetime, seconds: float, rows: int) -> None:
        log.debug("rendered report=%s slot=%s rows=%d ms=%d", report, isoformat(slot), rows, seconds * 1000)

    def delivered(self, delivery: Delivery) -> None:
        fields = delivery.fields()
        if self.as_json:
            log.info("%s", json.dumps({"event": "delivery", **fields}, sort_keys=False))
        else:
            log.info("delivery %s", " ".join(f"{k}={v}" for k, v in fields.items() if v is not None))

    def configured(self, version: str, problems: int) -> None:
        pass  # live.py logs configuration changes and problems itself


class Observers:
    """Every observer of a process, told as one: an observer's failure is logged, never raised."""

    def __init__(self, members: Iterable[Observer] = ()) -> None:
        self.members: list[Observer] = list(members)

    def append(self, observer: Observer) -> None:
        """Tell OBSERVER too from now on."""
        self.members.append(observer)

    def rendered(self, report: str, slot: datetime, seconds: float, rows: int) -> None:
        """A report slot was rendered in SECONDS from ROWS rows of data."""
        self._each("rendered", lambda o: o.rendered(report, slot, seconds, rows))

    def delivered(self, delivery: Delivery) -> None:
        """One recipient's email was sent, failed for good, or handed back for a retry."""
        self._each("delivered", lambda o: o.delivered(delivery))

    def configured(self, version: str, problems: int) -> None:
        """The process runs configuration VERSION; the files on disk have PROBLEMS (0: none)."""
        self._each("configured", lambda o: o.configured(version, problems))

    def _each(self, event: str, tell: Callable[[Observer], None]) -> None:
        for observer in self.members:
            try:
                tell(observer)
            except Exception:  # metrics and logs must never break sending
                log.exception("observer %r failed on %s", observer, event)

    def __repr__(self) -> str:
        return f"Observers({self.members!r})"
