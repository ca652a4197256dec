"""The dispatcher: which (report, slot) pairs fall due in a window, recorded and handed to the queue.

Fired at T, the dispatcher covers [T, its own next fire time) and enqueues each slot with eta=slot,
then moves each report's watermark to the window's end. A later dispatch that finds a watermark
before its T knows the dispatcher did not run for a while (beat was down): slots from the watermark
that are at most one grace period old are caught up now; older ones are recorded as `skipped`, so
nothing is silently lost. A report without a watermark is new and has nothing to catch up.

It also re-enqueues slots in the grace period whose rows are all still `queued` long after the slot
(their task was lost with a broker). Re-enqueueing is always safe: the ledger's claim lets only one
execution send.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from reporter import ledger as L
from reporter.audience import audience
from reporter.config import Config
from reporter.ledger import Ledger
from reporter.schedule import slots_between

LOST_AFTER = timedelta(minutes=15)
"""A slot whose rows are all still queued this long after it is taken to have lost its task."""

SKIP_HORIZON = timedelta(days=7)
"""Missed slots older than the grace are recorded as skipped back to at most this far."""


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
    only: Sequence[str] | None = None,
) -> list[Due]:
    """Record and enqueue the slots due in [START, END) and those to catch up; return them.
    With ONLY, just those reports' (the others' watermarks stay where they are)."""
    grace_start = start - timedelta(seconds=config.defaults.catch_up_grace if grace is None else grace)
    watermarks = ledger.marks()
    names = [n for n in config.reports if only is None or n in only]
    todo: list[Due] = []
    for name in names:
        report = config.reports[name]
        if not report.enabled:
            continue
        zone = config.zone(report)
        mark = watermarks.get(name)
        skip_from = max(mark, grace_start - SKIP_HORIZON) if mark is not None and mark < grace_start else grace_start
        # One read of the ledger for everything this report's look-back needs, not one per slot.
        recorded = ledger.slots_with_rows(name, min(skip_from, grace_start), start)
        if skip_from < grace_start:
            keys = audience(report).keys()
            for slot in slots_between(report.schedule, zone, skip_from, grace_start):
                if slot not in recorded:
                    ledger.ensure(name, slot, keys)
                    ledger.mark_skipped(
                        name, slot, list(keys), "missed: the dispatcher did not run, and the slot is older than the catch-up grace"
                    )
        for slot in slots_between(report.schedule, zone, grace_start, start):
            statuses = recorded.get(slot)
            never_dispatched = statuses is None and mark is not None and slot >= mark
            lost = statuses == {L.QUEUED} and now - slot > LOST_AFTER
            if never_dispatched or lost:
                todo.append(Due(name, slot, catch_up=True))
    todo.sort(key=lambda d: (d.slot, d.report))
    todo.extend(d for d in due_slots(config, start, end) if d.report in names)
    for due in todo:
        ledger.ensure(due.report, due.slot, audience(config.reports[due.report]).keys())
        enqueue(due)
    for name in names:
        # Disabled reports move too: a disabled period is not downtime to catch up on re-enabling.
        ledger.advance_mark(name, end)
    return todo
