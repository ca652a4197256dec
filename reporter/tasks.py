"""The Celery tasks. Thin: each calls plain functions that tests can call without a broker.

Registered with `shared_task`, so importing this module needs no app: the app that `celery -A
reporter.celery_app` builds (reporter.app.create_app) includes it, and any other app gets them too.
The policies the tasks apply (backoff, the sweep's give-up, the busy re-check) are plain functions below.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded

from reporter import burst, defaults
from reporter.audience import audience
from reporter.beat import dispatch_window
from reporter.deliver import SendResult, fail_for_good, send_slot
from reporter.dispatch import Due, dispatch
from reporter.errors import ConfigError
from reporter.ledger import Stuck
from reporter.notice import notify_owners
from reporter.runtime import Runtime, runtime
from reporter.schedule import isoformat, parse_instant

log = logging.getLogger(__name__)


def backoff(
    retries: int, base: float = defaults.RETRY_BACKOFF, maximum: float = defaults.RETRY_BACKOFF_MAX, rand: random.Random | None = None
) -> float:
    """Exponential backoff with equal jitter: half the step fixed, half random, capped at MAXIMUM."""
    step: float = min(maximum, base * (2**retries))
    return step / 2 + (rand or random).uniform(0, step / 2)


def out_of_retries(retries: int, allowed: int) -> bool:
    """True when a send already retried RETRIES times may not retry again (ALLOWED: the report's max_retries)."""
    return retries >= allowed


def busy_recheck(busy: Sequence[str], busy_until: datetime | None, now: datetime) -> float | None:
    """Seconds after which to look again at the BUSY recipients another execution holds (once its claim,
    valid until BUSY_UNTIL, would have gone stale; at least a second); None when there is nothing to re-check."""
    if not busy or busy_until is None:
        return None
    return max((busy_until - now).total_seconds(), 1.0)


def same_queue(delivery_info: Mapping[str, Any] | None) -> str:
    """The queue a task came from (so a re-check of a send-now stays urgent); the scheduled queue if unknown."""
    return str((delivery_info or {}).get("routing_key") or defaults.QUEUE_SCHEDULED)


def give_up(rows: Sequence[Stuck], retries: int) -> tuple[list[Stuck], list[Stuck]]:
    """The sweep's policy for one slot's stuck ROWS: (failed for good, re-enqueued).

    Each attempt that ended without a result (its process killed by the hard time limit or with its
    worker) counts; a dead row that used up the report's RETRIES plus the first attempt is failed, not
    retried forever. Lost rows (queued, their task gone) are always re-enqueued."""
    spent = [r for r in rows if r.dead and r.attempts >= retries + 1]
    return spent, [r for r in rows if r not in spent]


def enqueue_send(
    rt: Runtime,
    due: Due,
    queue: str = defaults.QUEUE_SCHEDULED,
    only: list[str] | None = None,
    trigger: str = "schedule",
    countdown: float | None = None,
    producer: Any = None,
) -> Any:
    """Publish email_reports.send for DUE: scheduled sends wait for their slot (eta), others go now
    (or after COUNTDOWN seconds)."""
    soft, hard = rt.time_limits(due.report)
    timing: dict[str, Any] = {"countdown": countdown} if countdown is not None else {"eta": due.slot} if trigger == "schedule" else {}
    return send.apply_async(
        args=(due.report, isoformat(due.slot)),
        # The config version it is dispatched under: the worker renders it with that one or a newer one.
        kwargs={"only": only, "trigger": trigger, "config": rt.config.version},
        queue=queue,
        soft_time_limit=soft,
        time_limit=hard,
        producer=producer,
        **timing,
    )


@shared_task(name=defaults.TASK_DISPATCH, acks_late=False)
def schedule_hourly(
    scheduled_for: str | None = None, window_end: str | None = None, reports: list[str] | None = None, config: str | None = None
) -> dict[str, Any]:
    """Enqueue every report slot due from SCHEDULED_FOR (default: now) to WINDOW_END (default: the next fire);
    only REPORTS' when given (beat's dispatch for reports added to the config)."""
    rt = runtime()
    rt.follow(config)
    now = datetime.now(UTC)
    start = parse_instant(scheduled_for, UTC) if scheduled_for else now
    end = parse_instant(window_end, UTC) if window_end else dispatch_window(rt.config, start)[1]
    # One producer (one broker connection) for every publish of this dispatch, and on Redis one pipeline
    # per 1,000 messages instead of a round trip each (kombu >= 5.7; others publish one by one).
    # Every row is in the ledger before the first publish; the batch goes to the broker when this block
    # ends, after the watermarks moved, so rows of a batch lost to a broker error stay queued and the
    # sweep re-enqueues them (REPORTER_SWEEP_GRACE after their slot).
    with schedule_hourly.app.producer_or_acquire() as producer, getattr(producer, "batch", contextlib.nullcontext)():
        done = dispatch(rt.config, rt.ledger, lambda due: enqueue_send(rt, due, producer=producer), start, end, now, only=reports)
    log.info("dispatched %d slot(s) for [%s, %s)", len(done), isoformat(start), isoformat(end))
    return {"window": [isoformat(start), isoformat(end)], "enqueued": len(done), "caught_up": sum(d.catch_up for d in done)}


@shared_task(name=defaults.TASK_SEND, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def send(
    self: Task, report: str, slot: str, only: list[str] | None = None, trigger: str = "schedule", config: str | None = None
) -> dict[str, Any]:
    """Render REPORT for SLOT once and send it to each recipient not yet sent to, with configuration
    CONFIG (the version it was dispatched under) or a newer one."""
    rt = runtime()
    at = parse_instant(slot, UTC)
    try:
        rt.follow(config)
    except ConfigError as exc:
        # The version it was dispatched under exists but does not load here (e.g. another environment).
        log.error("send %s %s: configuration %s cannot be used here: %s; retrying", report, slot, config, exc)
        raise self.retry(countdown=backoff(self.request.retries), max_retries=None) from None
    if (why := not_to_send(rt, report, trigger)) is not None:
        skipped = rt.ledger.skip_slot(report, at, why)
        log.warning("send %s %s: %s; %d queued row(s) recorded as skipped", report, slot, why, skipped)
        return {"report": report, "slot": slot, "skipped": skipped, "reason": why}
    try:
        result = send_slot(rt, report, at, only=only, trigger=trigger, task_id=self.request.id)
    except SoftTimeLimitExceeded:
        limit = (self.request.timelimit or (None, None))[1] or self.soft_time_limit or self.app.conf.task_soft_time_limit
        error = f"soft time limit exceeded ({limit:g}s)"
        if not out_of_retries(self.request.retries, rt.config.retries_of(rt.config.reports[report])):
            log.error("send %s %s: %s; released for a retry", report, slot, error)
            raise self.retry(countdown=backoff(self.request.retries)) from None
        log.error("send %s %s: %s; no retries left", report, slot, error)
        stuck = SendResult(report, at, retry=dict.fromkeys(audience(rt.config.reports[report], only or None).keys(), error))
        fail_for_good(rt, stuck, f"after {self.request.retries} retries")
        notify_owners(rt, stuck)
        return stuck.as_dict()
    # First, before a retry below ends this run.
    wait = busy_recheck(result.busy, result.busy_until, datetime.now(UTC))
    if wait is not None:
        # Another execution holds these rows (a redelivered copy of this task, or a process that
        # was killed). Look again once its claim would have gone stale; a fresh message, not a retry.
        enqueue_send(rt, Due(report, at), queue=same_queue(self.request.delivery_info), only=result.busy, trigger=trigger, countdown=wait)
    max_retries = rt.config.retries_of(rt.config.reports[report])
    if result.retry and out_of_retries(self.request.retries, max_retries):
        fail_for_good(rt, result, f"gave up after {self.request.retries} retries")
    # Tell the owners of what failed for good in this run, including when others are retried below.
    notify_owners(rt, result)
    if result.retry:
        kwargs = {"only": list(result.retry), "trigger": trigger, "config": rt.config.version}
        raise self.retry(kwargs=kwargs, countdown=backoff(self.request.retries), max_retries=max_retries)
    return result.as_dict()


def not_to_send(rt: Runtime, report: str, trigger: str) -> str | None:
    """Why a send of REPORT must not go out under the current config (removed, or disabled for a
    scheduled send); None if it may."""
    spec = rt.config.reports.get(report)
    if spec is None:
        return f"the report is no longer in the configuration (version {rt.config.version})"
    if not spec.enabled and trigger == "schedule":
        return f"the report is disabled in the configuration (version {rt.config.version})"
    return None


@shared_task(name=defaults.TASK_PRUNE)
def prune_ledger(days: int | None = None) -> dict[str, Any]:
    """Delete final ledger rows older than the retention."""
    rt = runtime()
    rt.follow()
    keep = days or rt.config.defaults.retention_days
    deleted = rt.ledger.prune(datetime.now(UTC) - timedelta(days=keep))
    return {"deleted": deleted, "retention_days": keep}


@shared_task(name=defaults.TASK_SWEEP, acks_late=False)
def sweep() -> dict[str, Any]:
    """Re-enqueue deliveries whose task died with its worker or was lost with the broker.

    A worker killed outright holds unacknowledged messages that Redis would only redeliver after its
    visibility timeout (more than an hour); this finds their ledger rows within minutes instead.
    """
    rt = runtime()
    rt.follow()
    now = datetime.now(UTC)
    # A row still queued this long after its slot, and untouched as long, has lost its task.
    grace = timedelta(seconds=rt.settings.sweep_grace)
    found = rt.ledger.stuck(
        stale_before=now - timedelta(seconds=rt.stale_after),
        queued_before=now - grace,
        retry_before=now - timedelta(seconds=defaults.RETRY_BACKOFF_MAX) - grace,
    )
    # By trigger too: a send-now's rows go back as a send-now (urgent, and an alert's manual send records
    # no evaluation), a scheduled slot's as scheduled.
    groups: dict[tuple[str, datetime, str], list[Stuck]] = {}
    for row in found:
        groups.setdefault((row.report, row.slot, row.trigger), []).append(row)
    counts = {"re_enqueued": 0, "gave_up": 0, "skipped": 0}
    for (report, slot, trigger), rows in groups.items():
        if report not in rt.config.reports:
            gone = "the report is no longer in the configuration"
            counts["skipped"] += rt.ledger.skip_stuck(report, slot, [r.recipient for r in rows], gone)
            continue
        spent, again_rows = give_up(rows, rt.config.retries_of(rt.config.reports[report]))
        if spent:
            why = f"{max(r.attempts for r in spent)} attempts ended without a result (killed or timed out)"
            result = SendResult(report, slot, retry={r.recipient: why for r in spent})
            fail_for_good(rt, result, "gave up")
            notify_owners(rt, result)
            counts["gave_up"] += len(spent)
        again = [r.recipient for r in again_rows]
        if again:
            log.warning("sweep: re-enqueuing %s %s for %d recipient(s)", report, isoformat(slot), len(again))
            if rt.config.reports[report].burst is not None:
                burst.requeue(rt, report, slot, again, trigger=trigger)  # in pieces, each within the time limit
            else:
                queue = defaults.QUEUE_URGENT if trigger == "manual" else defaults.QUEUE_SCHEDULED
                enqueue_send(rt, Due(report, slot), queue=queue, only=again, trigger=trigger)
            counts["re_enqueued"] += len(again)
    return counts
