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
from zoneinfo import ZoneInfo

from reporter import ledger as L
from reporter.audience import keys_of
from reporter.config import Config
from reporter.ledger import Ledger
from reporter.schedule import slots_between, slots_in

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
    return _due(config, [n for n, r in config.reports.items() if r.enabled], start, end)


def _due(config: Config, names: Sequence[str], start: datetime, end: datetime) -> list[Due]:
    """NAMES' slots in [START, END), in time order: computed once per distinct (cron, zone), which
    most reports share, and not at all for a cron known not to fire in the window."""
    groups: dict[tuple[str, ZoneInfo], list[str]] = {}
    for name in names:
        report = config.reports[name]
        groups.setdefault((report.schedule, config.zone(report)), []).append(name)
    due = [Due(name, slot) for (cron, zone), members in groups.items() for slot in slots_in(cron, zone, start, end) for name in members]
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
    With ONLY, just those reports' (the others' watermarks stay where they are).

    Its cost follows the due work, not the size of the config: one read of the watermarks, one
    read of the ledger for every slot in the look-back, one batched insert of every row, one
    watermark update; a report whose cron does not fire in the window costs a dictionary look-up.
    """
    grace_start = start - timedelta(seconds=config.defaults.catch_up_grace if grace is None else grace)
    watermarks = ledger.marks()
    names = [n for n in config.reports if only is None or n in only]
    enabled = [n for n in names if config.reports[n].enabled]

    # Reports whose mark is older than the grace: the dispatcher was down. Their slots from the mark
    # to the grace are recorded as skipped (rare, so report by report).
    for name in enabled:
        mark = watermarks.get(name)
        if mark is None or mark >= grace_start:
            continue
        report = config.reports[name]
        skip_from = max(mark, grace_start - SKIP_HORIZON)
        missed = slots_between(report.schedule, config.zone(report), skip_from, grace_start)
        had_rows = ledger.slots_with_rows(name, skip_from, grace_start) if missed else {}
        keys = keys_of(report)
        for slot in missed:
            if slot not in had_rows:
                ledger.ensure(name, slot, keys)
                ledger.mark_skipped(
                    name, slot, list(keys), "missed: the dispatcher did not run, and the slot is older than the catch-up grace"
                )

    # The look-back [grace, start): one ledger read for every report with a slot in it.
    look_back = _due(config, enabled, grace_start, start)
    recorded = ledger.slot_statuses(sorted({d.report for d in look_back}), grace_start, start) if look_back else {}
    todo: list[Due] = []
    for due in look_back:
        mark = watermarks.get(due.report)  # None: a new report, with nothing to catch up
        statuses = recorded.get((due.report, due.slot))
        # No rows, past the mark: never dispatched. Rows all still queued: their task was lost with
        # a broker (long after the slot), or the dispatch that recorded them failed before it moved
        # the mark over them (it may not have enqueued them). Enqueueing again is harmless.
        past_mark = mark is not None and due.slot >= mark
        never_dispatched = statuses is None and past_mark
        unfinished = statuses == {L.QUEUED} and (now - due.slot > LOST_AFTER or past_mark)
        if never_dispatched or unfinished:
            todo.append(Due(due.report, due.slot, catch_up=True))
    todo.extend(_due(config, enabled, start, end))
    # Every row before any task: a worker must find its rows. One batched insert for all of them.
    ledger.ensure_many((due.report, due.slot, keys_of(config.reports[due.report])) for due in todo)
    for due in todo:
        enqueue(due)
    # Disabled reports move too: a disabled period is not downtime to catch up on re-enabling.
    ledger.advance_marks(names, end)
    return todo
