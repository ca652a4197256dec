"""The dispatcher: which (report, slot) pairs fall due in a window, recorded and handed to the queue.

Fired at T, the dispatcher covers [T, its own next fire time) and enqueues each slot with eta=slot.
It also looks back one grace period: a slot there that never got a ledger row (beat was down), or
whose rows are all still queued long after the slot (its task was lost), is enqueued again now.
Re-enqueueing is always safe: the ledger's claim lets only one execution send.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from reporter import ledger as L
from reporter.config import Config
from reporter.deliver import recipient_keys
from reporter.ledger import Ledger
from reporter.schedule import slots_between

LOST_AFTER = timedelta(minutes=15)
"""A slot whose rows are all still queued this long after it is taken to have lost its task."""


@dataclass(frozen=True)
class Due:
    report: str
    slot: datetime
    catch_up: bool = False


def due_slots(config: Config, start: datetime, end: datetime) -> list[Due]:
    """Every enabled report's slots in [START, END), in time order."""
    due = [
        Due(name, slot)
        for name, report in config.reports.items()
        if report.enabled
        for slot in slots_between(report.schedule, config.zone(report), start, end)
    ]
    return sorted(due, key=lambda d: (d.slot, d.report))


def dispatch(
    config: Config,
    ledger: Ledger,
    enqueue: Callable[[Due], None],
    start: datetime,
    end: datetime,
    now: datetime,
    grace: float | None = None,
) -> list[Due]:
    """Record and enqueue the slots due in [START, END) and those to catch up; return them."""
    grace_s = config.defaults.catch_up_grace if grace is None else grace
    look_back = start - timedelta(seconds=grace_s)
    todo: list[Due] = []
    for due in due_slots(config, look_back, start):
        statuses = ledger.slots_with_rows(due.report, due.slot, due.slot + timedelta(microseconds=1)).get(due.slot)
        lost = statuses == {L.QUEUED} and now - due.slot > LOST_AFTER
        if statuses is None or lost:
            todo.append(Due(due.report, due.slot, catch_up=True))
    todo.extend(due_slots(config, start, end))
    for due in todo:
        ledger.ensure(due.report, due.slot, recipient_keys(config.reports[due.report].recipients))
        enqueue(due)
    return todo
